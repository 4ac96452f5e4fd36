// Convolution pieces for Enformer (channels-last [B, L, C], bf16): conv1d = im2col + cuBLAS GEMM against the
// PyTorch weight [Cout, Cin, K] read as [Cout, Cin·K]; batchnorm; attention pooling over windows of 2.
//
// im2col_bf16(cols, x, batch, len, cin, k): cols[b·L + l, ci·K + t] = x[b, l + t − K/2, ci] (zero outside).
// col2im_bf16(dx, dcols, batch, len, cin, k): dx[b, l, ci] += Σ_t dcols[b·L + l − t + K/2, ci·K + t]
//   (dcols in f32, straight from the GEMM, so dx is rounded once; each output gathers its K contributions in
//   order: deterministic).
// column_sum_bf16_f32(out, m, rows, cols): out[c] += Σ_r m[r, c] (bias gradients), rows in order.
// batchnorm_stats_f32(mean, var, x, rows, channels): biased batch statistics per channel (training mode).
// batchnorm_running_update_f32(running_mean, running_var, mean, var, rows, channels, momentum): the update of
//   the running statistics after a training step (unbiased variance).
// batchnorm_forward_bf16(out, x, mean, var, gamma, beta, rows, channels, eps): out = (x − mean)/√(var+eps)·γ + β
//   (train: batch statistics from batchnorm_stats_f32; eval: running statistics).
// batchnorm_backward_bf16(dx, dgamma_dbeta, dout, x, mean, var, gamma, rows, channels, train, eps): dgamma/dbeta
//   (f32, [2, C]) and dx += …; one block per 32 channels, rows walked in order: deterministic.
// attention_pool_forward_bf16(out, logits, x, batch, len, channels): out[b, j, c] = Σ_p softmax_p(logits)·x
//   over positions 2j, 2j+1 (an odd tail has one); logits = x·Wᵀ comes from a GEMM, in f32.
// attention_pool_backward_bf16(dx, dlogits_hi, dlogits_lo, dout, x, logits, batch, len, channels): dx += the
//   direct term; the softmax gradient dlogits as two bf16 terms hi + lo (hi = bf16(g), lo = bf16(g − hi)), so
//   the GEMMs that follow (dx += dlogits·W, dW += dlogitsᵀ·x) keep its f32 accuracy.
#include "common.cuh"

#define GRID_STRIDE(i, n) for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

extern "C" __global__ void im2col_bf16(bf16* __restrict__ cols, const bf16* __restrict__ x, int batch, int len, int cin, int k) {
    long long width = (long long)cin * k;
    GRID_STRIDE(i, (long long)batch * len * width) {
        long long r = i / width;
        int col = (int)(i % width), ci = col / k, t = col % k;
        int b = (int)(r / len), l = (int)(r % len), src = l + t - k / 2;
        cols[i] = (src >= 0 && src < len) ? x[((size_t)b * len + src) * cin + ci] : to_bf16(0.0f);
    }
}

extern "C" __global__ void col2im_bf16(bf16* __restrict__ dx, const float* __restrict__ dcols, int batch, int len, int cin, int k) {
    GRID_STRIDE(i, (long long)batch * len * cin) {
        int ci = (int)(i % cin);
        long long r = i / cin;
        int b = (int)(r / len), l = (int)(r % len);
        float s = 0.0f;
        for (int t = 0; t < k; ++t) {
            int out_l = l - t + k / 2;
            if (out_l >= 0 && out_l < len) s += dcols[((size_t)b * len + out_l) * cin * k + (size_t)ci * k + t];
        }
        dx[i] = to_bf16(to_f32(dx[i]) + s);
    }
}

extern "C" __global__ void column_sum_bf16_f32(float* __restrict__ out, const bf16* __restrict__ m, long long rows, int cols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (long long r = 0; r < rows; ++r) s += to_f32(m[r * cols + c]);
    out[c] += s;
}

extern "C" __global__ void batchnorm_stats_f32(float* __restrict__ mean, float* __restrict__ var, const bf16* __restrict__ x,
                                               long long rows, int channels) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    float s = 0.0f;
    for (long long r = 0; r < rows; ++r) s += to_f32(x[r * channels + c]);
    float mu = s / rows, q = 0.0f;
    for (long long r = 0; r < rows; ++r) {
        float d = to_f32(x[r * channels + c]) - mu;
        q += d * d;
    }
    mean[c] = mu;
    var[c] = q / rows;
}

// running = (1 − momentum)·running + momentum·batch, with the unbiased batch variance (PyTorch's rule).
extern "C" __global__ void batchnorm_running_update_f32(float* __restrict__ running_mean, float* __restrict__ running_var,
                                                        const float* __restrict__ mean, const float* __restrict__ var,
                                                        long long rows, int channels, float momentum) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    float unbias = rows > 1 ? (float)rows / (float)(rows - 1) : 1.0f;
    running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * mean[c];
    running_var[c] = (1.0f - momentum) * running_var[c] + momentum * var[c] * unbias;
}

extern "C" __global__ void batchnorm_forward_bf16(bf16* __restrict__ out, const bf16* __restrict__ x, const float* __restrict__ mean,
                                                  const float* __restrict__ var, const bf16* __restrict__ gamma,
                                                  const bf16* __restrict__ beta, long long rows, int channels, float eps) {
    GRID_STRIDE(i, rows * channels) {
        int c = (int)(i % channels);
        out[i] = to_bf16((to_f32(x[i]) - mean[c]) * rsqrtf(var[c] + eps) * to_f32(gamma[c]) + to_f32(beta[c]));
    }
}

extern "C" __global__ void batchnorm_backward_bf16(bf16* __restrict__ dx, float* __restrict__ dgamma_dbeta, const bf16* __restrict__ dout,
                                                   const bf16* __restrict__ x, const float* __restrict__ mean,
                                                   const float* __restrict__ var, const bf16* __restrict__ gamma, long long rows,
                                                   int channels, int train, float eps) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    const float rs = rsqrtf(var[c] + eps);
    float sum_d = 0.0f, sum_dxhat = 0.0f;
    for (long long r = 0; r < rows; ++r) {
        float d = to_f32(dout[r * channels + c]);
        sum_d += d;
        sum_dxhat += d * (to_f32(x[r * channels + c]) - mean[c]) * rs;
    }
    dgamma_dbeta[c] += sum_dxhat;
    dgamma_dbeta[channels + c] += sum_d;
    float g = to_f32(gamma[c]) * rs;
    for (long long r = 0; r < rows; ++r) {
        size_t i = r * channels + c;
        float d = to_f32(dout[i]);
        float v = train ? g * (d - sum_d / rows - (to_f32(x[i]) - mean[c]) * rs * sum_dxhat / rows) : g * d;
        dx[i] = to_bf16(to_f32(dx[i]) + v);
    }
}

__device__ __forceinline__ void pool_weights(float l0, float l1, bool pair, float* a0, float* a1) {
    if (!pair) {
        *a0 = 1.0f;
        *a1 = 0.0f;
        return;
    }
    float m = fmaxf(l0, l1), e0 = expf(l0 - m), e1 = expf(l1 - m);
    *a0 = e0 / (e0 + e1);
    *a1 = e1 / (e0 + e1);
}

extern "C" __global__ void attention_pool_forward_bf16(bf16* __restrict__ out, const float* __restrict__ logits, const bf16* __restrict__ x,
                                                       int batch, int len, int channels) {
    int out_len = (len + 1) / 2;
    GRID_STRIDE(i, (long long)batch * out_len * channels) {
        int c = (int)(i % channels);
        long long r = i / channels;
        int b = (int)(r / out_len), j = (int)(r % out_len);
        size_t p0 = ((size_t)b * len + 2 * j) * channels + c;
        bool pair = 2 * j + 1 < len;
        float a0, a1;
        pool_weights(logits[p0], pair ? logits[p0 + channels] : 0.0f, pair, &a0, &a1);
        out[i] = to_bf16(a0 * to_f32(x[p0]) + (pair ? a1 * to_f32(x[p0 + channels]) : 0.0f));
    }
}

extern "C" __global__ void attention_pool_backward_bf16(bf16* __restrict__ dx, bf16* __restrict__ dlogits_hi, bf16* __restrict__ dlogits_lo,
                                                        const bf16* __restrict__ dout, const bf16* __restrict__ x,
                                                        const float* __restrict__ logits, int batch, int len, int channels) {
    int out_len = (len + 1) / 2;
    GRID_STRIDE(i, (long long)batch * out_len * channels) {
        int c = (int)(i % channels);
        long long r = i / channels;
        int b = (int)(r / out_len), j = (int)(r % out_len);
        size_t p0 = ((size_t)b * len + 2 * j) * channels + c;
        bool pair = 2 * j + 1 < len;
        float a0, a1;
        pool_weights(logits[p0], pair ? logits[p0 + channels] : 0.0f, pair, &a0, &a1);
        float g = to_f32(dout[i]), x0 = to_f32(x[p0]);
        dx[p0] = to_bf16(to_f32(dx[p0]) + g * a0);
        if (pair) {
            float x1 = to_f32(x[p0 + channels]), y = a0 * x0 + a1 * x1;
            dx[p0 + channels] = to_bf16(to_f32(dx[p0 + channels]) + g * a1);
            float d0 = g * a0 * (x0 - y), d1 = g * a1 * (x1 - y);
            dlogits_hi[p0] = to_bf16(d0);
            dlogits_lo[p0] = to_bf16(d0 - to_f32(dlogits_hi[p0]));
            dlogits_hi[p0 + channels] = to_bf16(d1);
            dlogits_lo[p0 + channels] = to_bf16(d1 - to_f32(dlogits_hi[p0 + channels]));
        } else {
            dlogits_hi[p0] = to_bf16(0.0f);
            dlogits_lo[p0] = to_bf16(0.0f);
        }
    }
}

EMU_REGISTER(im2col_bf16)
EMU_REGISTER(col2im_bf16)
EMU_REGISTER(column_sum_bf16_f32)
EMU_REGISTER(batchnorm_stats_f32)
EMU_REGISTER(batchnorm_running_update_f32)
EMU_REGISTER(batchnorm_forward_bf16)
EMU_REGISTER(batchnorm_backward_bf16)
EMU_REGISTER(attention_pool_forward_bf16)
EMU_REGISTER(attention_pool_backward_bf16)
