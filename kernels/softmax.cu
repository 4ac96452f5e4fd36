// Row softmax (bf16 in and out, f32 math), one warp per row, any row length; a row of all −∞ gives zeros.
// softmax_forward_bf16(out, x, rows, dim);  softmax_backward_bf16(dx, dy, y, rows, dim): dx += y∘(dy − Σ dy∘y).
// Rotary embedding, split-half convention (ESM-2, NT-v2), on x [B, L, H, D] with f32 tables cos/sin
// [max_len, D/2]: rotary_bf16(out, x, cos, sin, rows, len, heads, d, sign) writes out = rope(x) (sign = 1)
// or adds the transpose ropeᵀ(x) into out (sign = −1, the backward).
#include "common.cuh"

extern "C" __global__ void softmax_forward_bf16(bf16* __restrict__ out, const bf16* __restrict__ x, int rows, int dim) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    const bf16* xr = x + (size_t)row * dim;
    float m = -INFINITY;
    for (int i = lane; i < dim; i += 32) m = fmaxf(m, to_f32(xr[i]));
    m = warp_max(m);
    float s = 0.0f;
    for (int i = lane; i < dim; i += 32) s += m == -INFINITY ? 0.0f : expf(to_f32(xr[i]) - m);
    s = warp_sum(s);
    bf16* o = out + (size_t)row * dim;
    for (int i = lane; i < dim; i += 32) o[i] = to_bf16(m == -INFINITY ? 0.0f : expf(to_f32(xr[i]) - m) / s);
}

extern "C" __global__ void softmax_backward_bf16(bf16* __restrict__ dx, const bf16* __restrict__ dy, const bf16* __restrict__ y,
                                                 int rows, int dim) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= rows) return;
    size_t base = (size_t)row * dim;
    float dot = 0.0f;
    for (int i = lane; i < dim; i += 32) dot += to_f32(dy[base + i]) * to_f32(y[base + i]);
    dot = warp_sum(dot);
    for (int i = lane; i < dim; i += 32) dx[base + i] = to_bf16(to_f32(dx[base + i]) + to_f32(y[base + i]) * (to_f32(dy[base + i]) - dot));
}

extern "C" __global__ void rotary_bf16(bf16* __restrict__ out, const bf16* __restrict__ x, const float* __restrict__ cos_t,
                                       const float* __restrict__ sin_t, long long vectors, int len, int heads, int d, float sign) {
    int half = d / 2;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < vectors * half; i += (long long)gridDim.x * blockDim.x) {
        long long vec = i / half;
        int j = (int)(i % half);
        int pos = (int)((vec / heads) % len);
        float c = cos_t[(size_t)pos * half + j], s = sign * sin_t[(size_t)pos * half + j];
        size_t base = (size_t)vec * d;
        float a = to_f32(x[base + j]), b = to_f32(x[base + j + half]);
        float ra = a * c - b * s, rb = b * c + a * s;
        if (sign > 0.0f) {
            out[base + j] = to_bf16(ra);
            out[base + j + half] = to_bf16(rb);
        } else {
            out[base + j] = to_bf16(to_f32(out[base + j]) + ra);
            out[base + j + half] = to_bf16(to_f32(out[base + j + half]) + rb);
        }
    }
}

EMU_REGISTER(softmax_forward_bf16)
EMU_REGISTER(softmax_backward_bf16)
EMU_REGISTER(rotary_bf16)
