// Elementwise kernels, bf16 storage with f32 math. One thread per element, grid-stride loops, any n.
//
// act_forward_bf16(out, x, n, kind):      out = act(x)
// act_backward_bf16(dx, dout, x, n, kind): dx += dout · act'(x)      (gradients accumulate, as on the CPU)
//   kind: 0 = GELU (erf), 1 = GELU sigmoid x·σ(1.702x) (Enformer), 2 = ReLU, 3 = softplus (threshold 20).
// swiglu_forward_bf16(out, u, rows, width):   out[r, j] = silu(u[r, j]) · u[r, width + j]
// swiglu_backward_bf16(du, dout, u, rows, width): du += ∂/∂u (both halves)
// add_bf16(out, a, b, n):                     out = a + b  (residual)
// bias_add_bf16(out, bias, rows, cols):       out[r, c] += bias[c]  (in place)
// fill_rows_bf16(out, row, rows, cols):       out[r, :] = row (a bias, before a GEMM accumulates onto it)
// scale_rows_bf16(x, scales, rows, cols):     x[r, :] *= scales[r] (f32; embedding masks and token dropout)
// cast_f32_to_bf16 / cast_bf16_to_f32(out, in, n): round to nearest even / widen.
// add_f32_to_bf16(out, x, n):                 out += x (an f32 gradient added into bf16, one rounding)
#include "common.cuh"

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float act_f(float x, int kind) {
    switch (kind) {
        case 0:
            return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
        case 1:
            return x * sigmoidf_(1.702f * x);
        case 2:
            return x > 0.0f ? x : 0.0f;
        default:
            return x > 20.0f ? x : log1pf(expf(x));
    }
}

__device__ __forceinline__ float act_df(float x, int kind) {
    switch (kind) {
        case 0:
            return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) + x * 0.3989422804014327f * expf(-0.5f * x * x);
        case 1: {
            float s = sigmoidf_(1.702f * x);
            return s + 1.702f * x * s * (1.0f - s);
        }
        case 2:
            return x > 0.0f ? 1.0f : 0.0f;
        default:
            return x > 20.0f ? 1.0f : sigmoidf_(x);
    }
}

#define GRID_STRIDE(i, n) for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void act_forward_bf16(bf16* __restrict__ out, const bf16* __restrict__ x, long long n, int kind) {
    GRID_STRIDE(i, n) out[i] = to_bf16(act_f(to_f32(x[i]), kind));
}

extern "C" __global__ void act_backward_bf16(bf16* __restrict__ dx, const bf16* __restrict__ dout, const bf16* __restrict__ x,
                                             long long n, int kind) {
    GRID_STRIDE(i, n) dx[i] = to_bf16(to_f32(dx[i]) + to_f32(dout[i]) * act_df(to_f32(x[i]), kind));
}

extern "C" __global__ void swiglu_forward_bf16(bf16* __restrict__ out, const bf16* __restrict__ u, long long rows, int width) {
    GRID_STRIDE(i, rows * width) {
        long long r = i / width;
        int j = (int)(i % width);
        float g = to_f32(u[r * 2 * width + j]), v = to_f32(u[r * 2 * width + width + j]);
        out[i] = to_bf16(g * sigmoidf_(g) * v);
    }
}

extern "C" __global__ void swiglu_backward_bf16(bf16* __restrict__ du, const bf16* __restrict__ dout, const bf16* __restrict__ u,
                                                long long rows, int width) {
    GRID_STRIDE(i, rows * width) {
        long long r = i / width;
        int j = (int)(i % width);
        long long gi = r * 2 * width + j, vi = gi + width;
        float g = to_f32(u[gi]), v = to_f32(u[vi]), d = to_f32(dout[i]);
        float s = sigmoidf_(g);
        du[gi] = to_bf16(to_f32(du[gi]) + d * v * s * (1.0f + g * (1.0f - s)));
        du[vi] = to_bf16(to_f32(du[vi]) + d * g * s);
    }
}

extern "C" __global__ void scale_rows_bf16(bf16* __restrict__ x, const float* __restrict__ scales, long long rows, int cols) {
    GRID_STRIDE(i, rows * cols) x[i] = to_bf16(to_f32(x[i]) * scales[i / cols]);
}

extern "C" __global__ void fill_rows_bf16(bf16* __restrict__ out, const bf16* __restrict__ row, long long rows, int cols) {
    GRID_STRIDE(i, rows * cols) out[i] = row[i % cols];
}

extern "C" __global__ void bias_add_bf16(bf16* __restrict__ out, const bf16* __restrict__ bias, long long rows, int cols) {
    GRID_STRIDE(i, rows * cols) out[i] = to_bf16(to_f32(out[i]) + to_f32(bias[i % cols]));
}

extern "C" __global__ void add_bf16(bf16* __restrict__ out, const bf16* __restrict__ a, const bf16* __restrict__ b, long long n) {
    GRID_STRIDE(i, n) out[i] = to_bf16(to_f32(a[i]) + to_f32(b[i]));
}

extern "C" __global__ void add_f32_to_bf16(bf16* __restrict__ out, const float* __restrict__ x, long long n) {
    GRID_STRIDE(i, n) out[i] = to_bf16(to_f32(out[i]) + x[i]);
}

extern "C" __global__ void cast_f32_to_bf16(bf16* __restrict__ out, const float* __restrict__ in, long long n) {
    GRID_STRIDE(i, n) out[i] = to_bf16(in[i]);
}

extern "C" __global__ void cast_bf16_to_f32(float* __restrict__ out, const bf16* __restrict__ in, long long n) {
    GRID_STRIDE(i, n) out[i] = to_f32(in[i]);
}

EMU_REGISTER(act_forward_bf16)
EMU_REGISTER(act_backward_bf16)
EMU_REGISTER(swiglu_forward_bf16)
EMU_REGISTER(swiglu_backward_bf16)
EMU_REGISTER(add_bf16)
EMU_REGISTER(bias_add_bf16)
EMU_REGISTER(fill_rows_bf16)
EMU_REGISTER(scale_rows_bf16)
EMU_REGISTER(cast_f32_to_bf16)
EMU_REGISTER(add_f32_to_bf16)
EMU_REGISTER(cast_bf16_to_f32)
