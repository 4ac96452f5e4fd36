// LayerNorm over the last dimension, bf16 activations and parameters, f32 statistics and accumulation.
//
// layernorm_forward_bf16:  out[r, :] = (x[r, :] − mean_r)·rstd_r·gamma + beta; saves mean_r and rstd_r (f32).
//   One warp per row (any dim); block = 32 × rows_per_block threads; grid = ceil(rows / rows_per_block).
// layernorm_backward_bf16: dx[r, :] += rstd·(dn − mean(dn) − xhat·mean(dn·xhat)) with dn = dout·gamma, and
//   per-block partial sums of dgamma/dbeta written to `partial` ([grid, 2, dim], f32), which
//   reduce_columns_f32 then sums in block order (deterministic, no atomics).
// residual_layernorm_forward_bf16: the fused residual add + LayerNorm of a pre-LN block:
//   res = x + delta (written, bf16), out = LN(res) with mean/rstd saved; the statistics are taken on the
//   bf16-rounded res that the next layer reads, so the fusion changes no result.
// Layouts: row-major [rows, dim]. Assumes dim ≥ 1; rows past the end are skipped (odd sizes are fine).
#include "common.cuh"

extern "C" __global__ void layernorm_forward_bf16(bf16* __restrict__ out, float* __restrict__ mean, float* __restrict__ rstd,
                                       const bf16* __restrict__ x, const bf16* __restrict__ gamma,
                                       const bf16* __restrict__ beta, int rows, int dim, float eps) {
    int warps = blockDim.x / 32;
    int row = blockIdx.x * warps + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const bf16* xr = x + (size_t)row * dim;
    float sum = 0.0f;
    for (int i = lane; i < dim; i += 32) sum += to_f32(xr[i]);
    float mu = warp_sum(sum) / dim;
    float sq = 0.0f;
    for (int i = lane; i < dim; i += 32) {
        float d = to_f32(xr[i]) - mu;
        sq += d * d;
    }
    float r = rsqrtf(warp_sum(sq) / dim + eps);
    bf16* o = out + (size_t)row * dim;
    for (int i = lane; i < dim; i += 32) o[i] = to_bf16((to_f32(xr[i]) - mu) * r * to_f32(gamma[i]) + to_f32(beta[i]));
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = r;
    }
}

extern "C" __global__ void layernorm_backward_bf16(bf16* __restrict__ dx, float* __restrict__ partial,
                                        const bf16* __restrict__ dout, const bf16* __restrict__ x,
                                        const bf16* __restrict__ gamma, const float* __restrict__ mean,
                                        const float* __restrict__ rstd, int rows, int dim) {
    int warps = blockDim.x / 32;
    int warp = threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    int row = blockIdx.x * warps + warp;
    // Per-block column sums: each warp adds its row into shared accumulators, in warp order.
    EMU_DYNAMIC_SHARED(float, acc);  // [2, dim]
    for (int i = threadIdx.x; i < 2 * dim; i += blockDim.x) acc[i] = 0.0f;
    __syncthreads();
    float mu = 0.0f, r = 0.0f, mean_dn = 0.0f, mean_dn_xhat = 0.0f;
    bool active = row < rows;
    if (active) {
        mu = mean[row];
        r = rstd[row];
        const bf16* xr = x + (size_t)row * dim;
        const bf16* dr = dout + (size_t)row * dim;
        float s1 = 0.0f, s2 = 0.0f;
        for (int i = lane; i < dim; i += 32) {
            float dn = to_f32(dr[i]) * to_f32(gamma[i]);
            s1 += dn;
            s2 += dn * (to_f32(xr[i]) - mu) * r;
        }
        mean_dn = warp_sum(s1) / dim;
        mean_dn_xhat = warp_sum(s2) / dim;
        bf16* dxr = dx + (size_t)row * dim;
        for (int i = lane; i < dim; i += 32) {
            float xhat = (to_f32(xr[i]) - mu) * r;
            float dn = to_f32(dr[i]) * to_f32(gamma[i]);
            dxr[i] = to_bf16(to_f32(dxr[i]) + r * (dn - mean_dn - xhat * mean_dn_xhat));
        }
    }
    for (int w = 0; w < warps; ++w) {
        if (w == warp && active) {
            const bf16* xr = x + (size_t)row * dim;
            const bf16* dr = dout + (size_t)row * dim;
            for (int i = lane; i < dim; i += 32) {
                float d = to_f32(dr[i]);
                acc[i] += d * (to_f32(xr[i]) - mu) * r;
                acc[dim + i] += d;
            }
        }
        __syncthreads();
    }
    float* p = partial + (size_t)blockIdx.x * 2 * dim;
    for (int i = threadIdx.x; i < 2 * dim; i += blockDim.x) p[i] = acc[i];
}

// out[c] += Σ_b partial[b, c] for c < cols, summing b in order. One thread per column.
extern "C" __global__ void reduce_columns_f32(float* __restrict__ out, const float* __restrict__ partial, int blocks, int cols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int b = 0; b < blocks; ++b) s += partial[(size_t)b * cols + c];
    out[c] += s;
}

extern "C" __global__ void residual_layernorm_forward_bf16(bf16* __restrict__ res, bf16* __restrict__ out, float* __restrict__ mean,
                                                           float* __restrict__ rstd, const bf16* __restrict__ x,
                                                           const bf16* __restrict__ delta, const bf16* __restrict__ gamma,
                                                           const bf16* __restrict__ beta, int rows, int dim, float eps) {
    int warps = blockDim.x / 32;
    int row = blockIdx.x * warps + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    size_t base = (size_t)row * dim;
    float sum = 0.0f;
    for (int i = lane; i < dim; i += 32) {
        bf16 r = to_bf16(to_f32(x[base + i]) + to_f32(delta[base + i]));
        res[base + i] = r;
        sum += to_f32(r);
    }
    float mu = warp_sum(sum) / dim;
    float sq = 0.0f;
    for (int i = lane; i < dim; i += 32) {
        float d = to_f32(res[base + i]) - mu;
        sq += d * d;
    }
    float r = rsqrtf(warp_sum(sq) / dim + eps);
    for (int i = lane; i < dim; i += 32) out[base + i] = to_bf16((to_f32(res[base + i]) - mu) * r * to_f32(gamma[i]) + to_f32(beta[i]));
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = r;
    }
}

EMU_REGISTER(residual_layernorm_forward_bf16)
EMU_REGISTER(layernorm_forward_bf16)
EMU_REGISTER(layernorm_backward_bf16)
EMU_REGISTER(reduce_columns_f32)
