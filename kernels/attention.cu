// Flash attention forward (FlashAttention-2 structure) on tensor cores through the WMMA API.
//
// flash_attention_forward_bf16: out = softmax(scale·q·kᵀ + bias, keys < kv_lens[b]) · v, and the per-row
//   log-sum-exp `lse` (f32, −∞ for a row with no visible key, whose output is 0).
//   Layouts: q [B, Lq, H, D], k [B, Lk, H, D], v [B, Lk, H, Dv], out [B, Lq, H, Dv] (bf16);
//   lse [B, H, Lq]; bias [1 or B, H, Lq, Lk] (f32, optional: null); kv_lens [B] (int, optional: null).
//   Self- or cross-attention (Lq ≠ Lk), any lengths, any head dims (shared-memory tiles are zero-padded to
//   multiples of 16 for the 16×16×16 products; 32, 48, 64, 192 and 384 need no padding).
//   Grid (⌈Lq/64⌉, B·H, ⌈Dv/64⌉), 128 threads: each of 4 warps owns 16 query rows; the block walks key tiles
//   of 32 with an online softmax (one key per lane), keeping its O slice (64 columns of Dv) in shared f32.
//   S = Q·Kᵀ and O += P·V are 16×16×16 bf16 WMMA products with f32 accumulation; P is rounded to bf16 for
//   the second product, as in FlashAttention. Dynamic shared memory: see flash_forward_smem_bytes in ops.rs.
#include "common.cuh"

using namespace nvcuda;

#define FA_BR 64
#define FA_BC 32
#define FA_DVC 64

extern "C" __global__ void __launch_bounds__(128) flash_attention_forward_bf16(
    bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ q, const bf16* __restrict__ k,
    const bf16* __restrict__ v, const int* __restrict__ kv_lens, const float* __restrict__ bias, int bias_per_batch,
    int heads, int q_len, int kv_len, int d, int dv, float scale) {
    EMU_DYNAMIC_SHARED(unsigned char, smem);
    const int dp = CEIL_DIV(d, 16) * 16;  // padded head dim (row stride of Qs and Ks)
    bf16* Qs = reinterpret_cast<bf16*>(smem);
    bf16* Ks = Qs + FA_BR * dp;
    bf16* Vs = Ks + FA_BC * dp;
    float* S = reinterpret_cast<float*>(Vs + FA_BC * FA_DVC);
    bf16* P = reinterpret_cast<bf16*>(S + FA_BR * FA_BC);
    float* O = reinterpret_cast<float*>(P + FA_BR * FA_BC);
    float* M = O + FA_BR * FA_DVC;
    float* L = M + FA_BR;

    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int q0 = blockIdx.x * FA_BR, c0 = blockIdx.z * FA_DVC;
    const int dvc = min(FA_DVC, dv - c0);
    const int n = kv_lens ? kv_lens[b] : kv_len;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const bf16 zero = to_bf16(0.0f);

    for (int i = threadIdx.x; i < FA_BR * dp; i += blockDim.x) {
        int r = i / dp, c = i % dp, qi = q0 + r;
        Qs[i] = (qi < q_len && c < d) ? q[((size_t)(b * q_len + qi) * heads + h) * d + c] : zero;
    }
    for (int i = threadIdx.x; i < FA_BR * FA_DVC; i += blockDim.x) O[i] = 0.0f;
    for (int i = threadIdx.x; i < FA_BR; i += blockDim.x) {
        M[i] = -INFINITY;
        L[i] = 0.0f;
    }
    __syncthreads();

    for (int k0 = 0; k0 < n; k0 += FA_BC) {
        for (int i = threadIdx.x; i < FA_BC * dp; i += blockDim.x) {
            int r = i / dp, c = i % dp, kj = k0 + r;
            Ks[i] = (kj < n && c < d) ? k[((size_t)(b * kv_len + kj) * heads + h) * d + c] : zero;
        }
        for (int i = threadIdx.x; i < FA_BC * FA_DVC; i += blockDim.x) {
            int r = i / FA_DVC, c = i % FA_DVC, kj = k0 + r;
            Vs[i] = (kj < n && c < dvc) ? v[((size_t)(b * kv_len + kj) * heads + h) * dv + c0 + c] : zero;
        }
        __syncthreads();

        // S (this warp's 16 rows × 32 keys) = Q·Kᵀ
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc0, acc1;
        wmma::fill_fragment(acc0, 0.0f);
        wmma::fill_fragment(acc1, 0.0f);
        for (int kk = 0; kk < dp; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> kt;
            wmma::load_matrix_sync(a, Qs + warp * 16 * dp + kk, dp);
            wmma::load_matrix_sync(kt, Ks + kk, dp);
            wmma::mma_sync(acc0, a, kt, acc0);
            wmma::load_matrix_sync(kt, Ks + 16 * dp + kk, dp);
            wmma::mma_sync(acc1, a, kt, acc1);
        }
        wmma::store_matrix_sync(S + warp * 16 * FA_BC, acc0, FA_BC, wmma::mem_row_major);
        wmma::store_matrix_sync(S + warp * 16 * FA_BC + 16, acc1, FA_BC, wmma::mem_row_major);
        __syncwarp();

        // Online softmax, one key per lane.
        for (int r = 0; r < 16; ++r) {
            const int row = warp * 16 + r, qi = q0 + row, kj = k0 + lane;
            float s = -INFINITY;
            if (kj < n && qi < q_len) {
                s = S[row * FA_BC + lane] * scale;
                if (bias) s += bias[(((size_t)(bias_per_batch ? b : 0) * heads + h) * q_len + qi) * kv_len + kj];
            }
            const float m_old = M[row];
            const float m_new = fmaxf(m_old, warp_max(s));
            const float p = (s == -INFINITY) ? 0.0f : expf(s - m_new);
            const float alpha = (m_old == -INFINITY) ? 0.0f : expf(m_old - m_new);
            const float rowsum = warp_sum(p);
            P[row * FA_BC + lane] = to_bf16(p);
            for (int c = lane; c < FA_DVC; c += 32) O[row * FA_DVC + c] *= alpha;
            __syncwarp();
            if (lane == 0) {
                M[row] = m_new;
                L[row] = L[row] * alpha + rowsum;
            }
            __syncwarp();
        }

        // O += P·V for this warp's rows.
        for (int cc = 0; cc < dvc; cc += 16) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
            wmma::load_matrix_sync(o, O + warp * 16 * FA_DVC + cc, FA_DVC, wmma::mem_row_major);
            for (int kk = 0; kk < FA_BC; kk += 16) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> pa;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> vb;
                wmma::load_matrix_sync(pa, P + warp * 16 * FA_BC + kk, FA_BC);
                wmma::load_matrix_sync(vb, Vs + kk * FA_DVC + cc, FA_DVC);
                wmma::mma_sync(o, pa, vb, o);
            }
            wmma::store_matrix_sync(O + warp * 16 * FA_DVC + cc, o, FA_DVC, wmma::mem_row_major);
        }
        __syncthreads();
    }

    for (int i = threadIdx.x; i < FA_BR * FA_DVC; i += blockDim.x) {
        int r = i / FA_DVC, c = i % FA_DVC, qi = q0 + r;
        if (qi < q_len && c < dvc) {
            float l = L[r];
            out[((size_t)(b * q_len + qi) * heads + h) * dv + c0 + c] = to_bf16(l > 0.0f ? O[i] / l : 0.0f);
        }
    }
    if (blockIdx.z == 0) {
        for (int r = threadIdx.x; r < FA_BR; r += blockDim.x) {
            int qi = q0 + r;
            if (qi < q_len) lse[((size_t)b * heads + h) * q_len + qi] = L[r] > 0.0f ? M[r] + logf(L[r]) : -INFINITY;
        }
    }
}

EMU_REGISTER(flash_attention_forward_bf16)

// ---------------------------------------------------------------------------------------------------------
// Backward (FlashAttention-2: P recomputed from the saved LSE, D = rowsum(dO ∘ O)), deterministic: no atomics.
// With dS = P ∘ (dP − D) and dP = dO·Vᵀ:  dV += Pᵀ·dO,  dK += scale·dSᵀ·Q,  dQ += scale·dS·K,  dbias = dS.
//
// flash_attention_backward_rowdot_bf16: Drow[b, h, i] = Σ_c dO[b, i, h, c]·O[b, i, h, c] (one warp per row).
// flash_attention_backward_dkdv_bf16: grid (⌈Lk/16⌉, B·H), one warp owning 16 keys, walking query tiles of 16;
//   dK, dV of its keys accumulate in shared f32 and are added to the bf16 outputs at the end.
// flash_attention_backward_dq_bf16: grid (⌈Lq/16⌉, B·H), one warp owning 16 queries, walking key tiles of 16;
//   adds into dbias (per batch entry: [B, H, Lq, Lk]) when a buffer is given, and into dQ.
// Same layouts and masking as the forward; gradients are added into dq, dk, dv.

#define FB 16

__device__ __forceinline__ float score_prob(float s_acc, float scale, const float* bias, int bias_per_batch, int b, int h,
                                            int heads, int q_len, int kv_len, int qi, int kj, int n, float lse_i) {
    if (qi >= q_len || kj >= n || lse_i == -INFINITY) return 0.0f;
    float s = s_acc * scale;
    if (bias) s += bias[(((size_t)(bias_per_batch ? b : 0) * heads + h) * q_len + qi) * kv_len + kj];
    return expf(s - lse_i);
}

// out[16×16] (f32, ld 16) = A·Bᵀ for A, B row-major [16 × kdim] in shared memory (ld kdim, a multiple of 16).
__device__ __forceinline__ void tile_a_bt(float* out, const bf16* A, const bf16* B, int kdim) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int kk = 0; kk < kdim; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> bt;
        wmma::load_matrix_sync(a, A + kk, kdim);
        wmma::load_matrix_sync(bt, B + kk, kdim);
        wmma::mma_sync(acc, a, bt, acc);
    }
    wmma::store_matrix_sync(out, acc, FB, wmma::mem_row_major);
}

// acc[16 × width] (f32, ld width) += (hi + lo)·B: the 16×16 factor given as two bf16 terms, B row-major
// [16 × width] (ld width, a multiple of 16).
__device__ __forceinline__ void accumulate_hi_lo(float* acc, const bf16* hi, const bf16* lo, const bf16* B, int width) {
    for (int cc = 0; cc < width; cc += 16) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> bm;
        wmma::load_matrix_sync(o, acc + cc, width, wmma::mem_row_major);
        wmma::load_matrix_sync(bm, B + cc, width);
        wmma::load_matrix_sync(a, hi, FB);
        wmma::mma_sync(o, a, bm, o);
        wmma::load_matrix_sync(a, lo, FB);
        wmma::mma_sync(o, a, bm, o);
        wmma::store_matrix_sync(acc + cc, o, width, wmma::mem_row_major);
    }
}

extern "C" __global__ void flash_attention_backward_rowdot_bf16(float* __restrict__ drow, const bf16* __restrict__ dout,
                                                                const bf16* __restrict__ out, int batch, int heads,
                                                                int q_len, int dv) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // over (b, i, h)
    int lane = threadIdx.x % 32;
    if (row >= batch * q_len * heads) return;
    const bf16* o = out + (size_t)row * dv;
    const bf16* g = dout + (size_t)row * dv;
    float s = 0.0f;
    for (int c = lane; c < dv; c += 32) s += to_f32(o[c]) * to_f32(g[c]);
    s = warp_sum(s);
    if (lane == 0) {
        int h = row % heads, i = (row / heads) % q_len, b = row / (heads * q_len);
        drow[((size_t)b * heads + h) * q_len + i] = s;
    }
}

// Loads a [FB, padded] tile of rows r0.. of a [B, L, H, width] tensor into shared memory, zeros past `limit`
// and in the padding columns (padded = width rounded up to 16).
__device__ __forceinline__ void load_rows(bf16* dst, const bf16* src, int b, int h, int heads, int len, int r0, int limit,
                                          int width, int padded) {
    for (int i = threadIdx.x; i < FB * padded; i += blockDim.x) {
        int r = i / padded, c = i % padded, row = r0 + r;
        dst[i] = (row < limit && c < width) ? src[((size_t)(b * len + row) * heads + h) * width + c] : to_bf16(0.0f);
    }
}

extern "C" __global__ void __launch_bounds__(32) flash_attention_backward_dkdv_bf16(
    bf16* __restrict__ dk, bf16* __restrict__ dv_out, const bf16* __restrict__ q, const bf16* __restrict__ k,
    const bf16* __restrict__ v, const bf16* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ drow,
    const int* __restrict__ kv_lens, const float* __restrict__ bias, int bias_per_batch, int heads, int q_len, int kv_len,
    int d, int dv, float scale) {
    EMU_DYNAMIC_SHARED(unsigned char, smem);
    const int dp = CEIL_DIV(d, 16) * 16, dvp = CEIL_DIV(dv, 16) * 16;  // padded strides
    bf16* Ks = reinterpret_cast<bf16*>(smem);
    bf16* Vs = Ks + FB * dp;
    bf16* Qs = Vs + FB * dvp;
    bf16* dOs = Qs + FB * dp;
    // P and dS go to the tensor cores as two bf16 terms, hi + lo (hi = bf16(x), lo = bf16(x − hi)), which
    // keeps their f32 accuracy in the products.
    bf16* Pt = dOs + FB * dvp;  // [key][query]
    bf16* Ptl = Pt + FB * FB;
    bf16* dSt = Ptl + FB * FB;
    bf16* dStl = dSt + FB * FB;
    float* dK = reinterpret_cast<float*>(dStl + FB * FB);
    float* dV = dK + FB * dp;
    float* T = dV + FB * dvp;  // [FB][FB] scratch
    float* Pf = T + FB * FB;   // P in f32

    const int b = blockIdx.y / heads, h = blockIdx.y % heads, k0 = blockIdx.x * FB, lane = threadIdx.x;
    const int n = kv_lens ? kv_lens[b] : kv_len;
    if (k0 >= n) return;  // these keys are masked: no gradient
    load_rows(Ks, k, b, h, heads, kv_len, k0, n, d, dp);
    load_rows(Vs, v, b, h, heads, kv_len, k0, n, dv, dvp);
    for (int i = lane; i < FB * dp; i += 32) dK[i] = 0.0f;
    for (int i = lane; i < FB * dvp; i += 32) dV[i] = 0.0f;
    __syncwarp();
    for (int q0 = 0; q0 < q_len; q0 += FB) {
        load_rows(Qs, q, b, h, heads, q_len, q0, q_len, d, dp);
        load_rows(dOs, dout, b, h, heads, q_len, q0, q_len, dv, dvp);
        __syncwarp();
        tile_a_bt(T, Ks, Qs, dp);  // Sᵀ = K·Qᵀ  (keys × queries)
        __syncwarp();
        for (int i = lane; i < FB * FB; i += 32) {
            int kr = i / FB, qc = i % FB, qi = q0 + qc, kj = k0 + kr;
            float lse_i = qi < q_len ? lse[((size_t)b * heads + h) * q_len + qi] : -INFINITY;
            float p = score_prob(T[i], scale, bias, bias_per_batch, b, h, heads, q_len, kv_len, qi, kj, n, lse_i);
            Pf[i] = p;
            Pt[i] = to_bf16(p);
            Ptl[i] = to_bf16(p - to_f32(Pt[i]));
        }
        __syncwarp();
        tile_a_bt(T, Vs, dOs, dvp);  // dPᵀ = V·dOᵀ
        __syncwarp();
        for (int i = lane; i < FB * FB; i += 32) {
            int qc = i % FB, qi = q0 + qc;
            float dri = qi < q_len ? drow[((size_t)b * heads + h) * q_len + qi] : 0.0f;
            float ds = Pf[i] * (T[i] - dri);
            dSt[i] = to_bf16(ds);
            dStl[i] = to_bf16(ds - to_f32(dSt[i]));
        }
        __syncwarp();
        // dV += Pᵀ·dO ; dK += dSᵀ·Q (scale applied at the end)
        accumulate_hi_lo(dV, Pt, Ptl, dOs, dvp);
        accumulate_hi_lo(dK, dSt, dStl, Qs, dp);
        __syncwarp();
    }
    for (int i = lane; i < FB * dp; i += 32) {
        int r = i / dp, c = i % dp, kj = k0 + r;
        if (kj < n && c < d) {
            bf16* p = dk + ((size_t)(b * kv_len + kj) * heads + h) * d + c;
            *p = to_bf16(to_f32(*p) + scale * dK[i]);
        }
    }
    for (int i = lane; i < FB * dvp; i += 32) {
        int r = i / dvp, c = i % dvp, kj = k0 + r;
        if (kj < n && c < dv) {
            bf16* p = dv_out + ((size_t)(b * kv_len + kj) * heads + h) * dv + c;
            *p = to_bf16(to_f32(*p) + dV[i]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(32) flash_attention_backward_dq_bf16(
    bf16* __restrict__ dq, float* __restrict__ dbias, const bf16* __restrict__ q, const bf16* __restrict__ k,
    const bf16* __restrict__ v, const bf16* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ drow,
    const int* __restrict__ kv_lens, const float* __restrict__ bias, int bias_per_batch, int heads, int q_len, int kv_len,
    int d, int dv, float scale) {
    EMU_DYNAMIC_SHARED(unsigned char, smem);
    const int dp = CEIL_DIV(d, 16) * 16, dvp = CEIL_DIV(dv, 16) * 16;  // padded strides
    bf16* Qs = reinterpret_cast<bf16*>(smem);
    bf16* dOs = Qs + FB * dp;
    bf16* Ks = dOs + FB * dvp;
    bf16* Vs = Ks + FB * dp;
    bf16* dS = Vs + FB * dvp;  // dS as hi + lo bf16 terms (see the dK/dV kernel)
    bf16* dSl = dS + FB * FB;
    float* dQ = reinterpret_cast<float*>(dSl + FB * FB);
    float* S = dQ + FB * dp;
    float* T = S + FB * FB;

    const int b = blockIdx.y / heads, h = blockIdx.y % heads, q0 = blockIdx.x * FB, lane = threadIdx.x;
    const int n = kv_lens ? kv_lens[b] : kv_len;
    load_rows(Qs, q, b, h, heads, q_len, q0, q_len, d, dp);
    load_rows(dOs, dout, b, h, heads, q_len, q0, q_len, dv, dvp);
    for (int i = lane; i < FB * dp; i += 32) dQ[i] = 0.0f;
    __syncwarp();
    for (int k0 = 0; k0 < n; k0 += FB) {
        load_rows(Ks, k, b, h, heads, kv_len, k0, n, d, dp);
        load_rows(Vs, v, b, h, heads, kv_len, k0, n, dv, dvp);
        __syncwarp();
        tile_a_bt(S, Qs, Ks, dp);    // S = Q·Kᵀ
        tile_a_bt(T, dOs, Vs, dvp);  // dP = dO·Vᵀ
        __syncwarp();
        for (int i = lane; i < FB * FB; i += 32) {
            int qr = i / FB, kc = i % FB, qi = q0 + qr, kj = k0 + kc;
            float lse_i = qi < q_len ? lse[((size_t)b * heads + h) * q_len + qi] : -INFINITY;
            float p = score_prob(S[i], scale, bias, bias_per_batch, b, h, heads, q_len, kv_len, qi, kj, n, lse_i);
            float dri = qi < q_len ? drow[((size_t)b * heads + h) * q_len + qi] : 0.0f;
            float ds = p * (T[i] - dri);
            dS[i] = to_bf16(ds);
            dSl[i] = to_bf16(ds - to_f32(dS[i]));
            if (dbias && qi < q_len && kj < n) dbias[(((size_t)b * heads + h) * q_len + qi) * kv_len + kj] += ds;
        }
        __syncwarp();
        accumulate_hi_lo(dQ, dS, dSl, Ks, dp);  // dQ += dS·K (scale applied at the end)
        __syncwarp();
    }
    for (int i = lane; i < FB * dp; i += 32) {
        int r = i / dp, c = i % dp, qi = q0 + r;
        if (qi < q_len && c < d) {
            bf16* p = dq + ((size_t)(b * q_len + qi) * heads + h) * d + c;
            *p = to_bf16(to_f32(*p) + scale * dQ[i]);
        }
    }
}

// Enformer's relative-position logits, the additive bias of its attention:
// bias[b, h, i, j] = Σ_c q_pos[b, i, h, c] · rel_k[(n − 1) + j − i, h, c]   (q_pos [B, n, H, dk], rel_k [2n−1, H, dk]).
extern "C" __global__ void relative_logits_f32(float* __restrict__ bias, const bf16* __restrict__ q_pos, const bf16* __restrict__ rel_k,
                                               int batch, int heads, int n, int dk) {
    long long total = (long long)batch * heads * n * n;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total; t += (long long)gridDim.x * blockDim.x) {
        int j = (int)(t % n), i = (int)((t / n) % n), h = (int)((t / ((long long)n * n)) % heads), b = (int)(t / ((long long)n * n * heads));
        const bf16* qv = q_pos + ((size_t)(b * n + i) * heads + h) * dk;
        const bf16* rv = rel_k + ((size_t)(n - 1 + j - i) * heads + h) * dk;
        float s = 0.0f;
        for (int c = 0; c < dk; ++c) s += to_f32(qv[c]) * to_f32(rv[c]);
        bias[t] = s;
    }
}

// Its gradients, one thread per output element (no atomics, fixed summation order), added to bf16 outputs:
// relative_logits_backward_q_bf16: dq_pos[b, i, h, c] += Σ_j dbias[b, h, i, j] · rel_k[(n − 1) + j − i, h, c]
// relative_logits_backward_k_bf16: drel_k[r, h, c] += Σ_b Σ_i dbias[b, h, i, i + r − (n − 1)] · q_pos[b, i, h, c]
extern "C" __global__ void relative_logits_backward_q_bf16(bf16* __restrict__ dq_pos, const float* __restrict__ dbias,
                                                           const bf16* __restrict__ rel_k, int batch, int heads, int n, int dk) {
    long long total = (long long)batch * n * heads * dk;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total; t += (long long)gridDim.x * blockDim.x) {
        int c = (int)(t % dk), h = (int)((t / dk) % heads), i = (int)((t / ((long long)dk * heads)) % n);
        int b = (int)(t / ((long long)dk * heads * n));
        const float* row = dbias + (((size_t)b * heads + h) * n + i) * n;
        float s = 0.0f;
        for (int j = 0; j < n; ++j) s += row[j] * to_f32(rel_k[((size_t)(n - 1 + j - i) * heads + h) * dk + c]);
        dq_pos[t] = to_bf16(to_f32(dq_pos[t]) + s);
    }
}

extern "C" __global__ void relative_logits_backward_k_bf16(bf16* __restrict__ drel_k, const float* __restrict__ dbias,
                                                           const bf16* __restrict__ q_pos, int batch, int heads, int n, int dk) {
    long long total = (long long)(2 * n - 1) * heads * dk;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total; t += (long long)gridDim.x * blockDim.x) {
        int c = (int)(t % dk), h = (int)((t / dk) % heads), r = (int)(t / ((long long)dk * heads));
        int d = r - (n - 1);  // key − query
        int i0 = d < 0 ? -d : 0, i1 = d > 0 ? n - d : n;
        float s = 0.0f;
        for (int b = 0; b < batch; ++b)
            for (int i = i0; i < i1; ++i)
                s += dbias[(((size_t)b * heads + h) * n + i) * n + i + d] * to_f32(q_pos[((size_t)(b * n + i) * heads + h) * dk + c]);
        drel_k[t] = to_bf16(to_f32(drel_k[t]) + s);
    }
}

extern "C" __global__ void fill_f32(float* __restrict__ out, float value, long long n) {
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < n; j += (long long)gridDim.x * blockDim.x) out[j] = value;
}

// out[j] += Σ_b in[b, j] over `batch` slices of `n` elements, in batch order (broadcast-bias gradients).
extern "C" __global__ void sum_over_batch_f32(float* __restrict__ out, const float* __restrict__ in, int batch, long long n) {
    for (long long j = blockIdx.x * (long long)blockDim.x + threadIdx.x; j < n; j += (long long)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int b = 0; b < batch; ++b) s += in[(size_t)b * n + j];
        out[j] += s;
    }
}

EMU_REGISTER(flash_attention_backward_rowdot_bf16)
EMU_REGISTER(flash_attention_backward_dkdv_bf16)
EMU_REGISTER(flash_attention_backward_dq_bf16)
EMU_REGISTER(sum_over_batch_f32)
EMU_REGISTER(fill_f32)
EMU_REGISTER(relative_logits_f32)
EMU_REGISTER(relative_logits_backward_q_bf16)
EMU_REGISTER(relative_logits_backward_k_bf16)
