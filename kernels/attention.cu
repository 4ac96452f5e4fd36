// Flash attention forward (FlashAttention-2 structure) on tensor cores through the WMMA API.
//
// flash_attention_forward_bf16: out = softmax(scale·q·kᵀ + bias, keys < kv_lens[b]) · v, and the per-row
//   log-sum-exp `lse` (f32, −∞ for a row with no visible key, whose output is 0).
//   Layouts: q [B, Lq, H, D], k [B, Lk, H, D], v [B, Lk, H, Dv], out [B, Lq, H, Dv] (bf16);
//   lse [B, H, Lq]; bias [1 or B, H, Lq, Lk] (f32, optional: null); kv_lens [B] (int, optional: null).
//   Self- or cross-attention (Lq ≠ Lk), any lengths; D and Dv multiples of 16 (32, 48, 64, 192, 384, …).
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
    bf16* Qs = reinterpret_cast<bf16*>(smem);
    bf16* Ks = Qs + FA_BR * d;
    bf16* Vs = Ks + FA_BC * d;
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

    for (int i = threadIdx.x; i < FA_BR * d; i += blockDim.x) {
        int r = i / d, c = i % d, qi = q0 + r;
        Qs[i] = qi < q_len ? q[((size_t)(b * q_len + qi) * heads + h) * d + c] : zero;
    }
    for (int i = threadIdx.x; i < FA_BR * FA_DVC; i += blockDim.x) O[i] = 0.0f;
    for (int i = threadIdx.x; i < FA_BR; i += blockDim.x) {
        M[i] = -INFINITY;
        L[i] = 0.0f;
    }
    __syncthreads();

    for (int k0 = 0; k0 < n; k0 += FA_BC) {
        for (int i = threadIdx.x; i < FA_BC * d; i += blockDim.x) {
            int r = i / d, c = i % d, kj = k0 + r;
            Ks[i] = kj < n ? k[((size_t)(b * kv_len + kj) * heads + h) * d + c] : zero;
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
        for (int kk = 0; kk < d; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> kt;
            wmma::load_matrix_sync(a, Qs + warp * 16 * d + kk, d);
            wmma::load_matrix_sync(kt, Ks + kk, d);
            wmma::mma_sync(acc0, a, kt, acc0);
            wmma::load_matrix_sync(kt, Ks + 16 * d + kk, d);
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
