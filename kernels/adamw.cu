// AdamW with gradient clipping and the bf16 cast of the updated weights, fused; and the global gradient norm.
//
// sum_squares_partial_f32(partial, x, n): per-block Σ x² (f32 accumulation of f32 values) into partial[block];
//   sum_partials_f32(out, partial, blocks) then adds the partials in block order: deterministic, no atomics.
// adamw_bf16(params, params_bf16, m, v, grads, n, lr, beta1, beta2, eps, weight_decay, bias_corr1,
//            bias_corr2, grad_scale):
//   g = grads·grad_scale (the clipping coefficient); p -= lr·wd·p; m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²;
//   p -= lr·(m/bc1)/(√(v/bc2) + ε); params_bf16 = bf16(p). f32 master weights and moments; one launch per
//   parameter group (lr and decay differ). Layout: flat arrays of n elements.
#include "common.cuh"

extern "C" __global__ void sum_squares_partial_f32(float* __restrict__ partial, const float* __restrict__ x, long long n) {
    __shared__ float warp_sums[32];
    float s = 0.0f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) s += x[i] * x[i];
    s = warp_sum(s);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.0f;
        for (int w = 0; w < (int)CEIL_DIV(blockDim.x, 32); ++w) t += warp_sums[w];
        partial[blockIdx.x] = t;
    }
}

extern "C" __global__ void sum_partials_f32(float* __restrict__ out, const float* __restrict__ partial, int blocks) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        float t = 0.0f;
        for (int b = 0; b < blocks; ++b) t += partial[b];
        out[0] = t;
    }
}

extern "C" __global__ void adamw_bf16(float* __restrict__ params, bf16* __restrict__ params_bf16, float* __restrict__ m,
                                      float* __restrict__ v, const float* __restrict__ grads, long long n, float lr,
                                      float beta1, float beta2, float eps, float weight_decay, float bias_corr1,
                                      float bias_corr2, float grad_scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float g = grads[i] * grad_scale;
        float p = params[i];
        p -= lr * weight_decay * p;
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        p -= lr * (mi / bias_corr1) / (sqrtf(vi / bias_corr2) + eps);
        m[i] = mi;
        v[i] = vi;
        params[i] = p;
        params_bf16[i] = to_bf16(p);
    }
}

EMU_REGISTER(sum_squares_partial_f32)
EMU_REGISTER(sum_partials_f32)
EMU_REGISTER(adamw_bf16)
