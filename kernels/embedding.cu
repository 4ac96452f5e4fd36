// Embedding lookup and its scatter-add backward; mean-squared-error loss.
// embedding_forward_bf16(out, ids, table, tokens, dim, vocab): out[t, :] = table[ids[t], :]; an id outside
//   the vocabulary writes zeros (the launch code validates ids on the host first).
// embedding_backward_f32(dtable, dout, ids, tokens, dim, vocab): dtable[ids[t], c] += dout[t, c], one thread
//   per column walking the tokens in order: deterministic, no atomics. dtable is f32 (master gradients).
// mse_partial_f32(partial, pred, target, n): per-block Σ (pred − target)² (bf16 pred, f32 target);
//   the launch code sums the partials in order (sum_partials_f32) and divides by n.
// mse_backward_bf16(dpred, pred, target, n, scale): dpred += scale·(pred − target), scale = 2·dloss/n.
#include "common.cuh"

extern "C" __global__ void embedding_forward_bf16(bf16* __restrict__ out, const int* __restrict__ ids, const bf16* __restrict__ table,
                                                  long long tokens, int dim, int vocab) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < tokens * dim; i += (long long)gridDim.x * blockDim.x) {
        long long t = i / dim;
        int c = (int)(i % dim), id = ids[t];
        out[i] = (id >= 0 && id < vocab) ? table[(size_t)id * dim + c] : to_bf16(0.0f);
    }
}

extern "C" __global__ void embedding_backward_f32(float* __restrict__ dtable, const bf16* __restrict__ dout, const int* __restrict__ ids,
                                                  long long tokens, int dim, int vocab) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    for (long long t = 0; t < tokens; ++t) {
        int id = ids[t];
        if (id >= 0 && id < vocab) dtable[(size_t)id * dim + c] += to_f32(dout[(size_t)t * dim + c]);
    }
}

extern "C" __global__ void mse_partial_f32(float* __restrict__ partial, const bf16* __restrict__ pred, const float* __restrict__ target,
                                           long long n) {
    __shared__ float warp_sums[32];
    float s = 0.0f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float d = to_f32(pred[i]) - target[i];
        s += d * d;
    }
    s = warp_sum(s);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.0f;
        for (int w = 0; w < (int)CEIL_DIV(blockDim.x, 32); ++w) t += warp_sums[w];
        partial[blockIdx.x] = t;
    }
}

extern "C" __global__ void mse_backward_bf16(bf16* __restrict__ dpred, const bf16* __restrict__ pred, const float* __restrict__ target,
                                             long long n, float scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        dpred[i] = to_bf16(to_f32(dpred[i]) + scale * (to_f32(pred[i]) - target[i]));
}

EMU_REGISTER(embedding_forward_bf16)
EMU_REGISTER(embedding_backward_f32)
EMU_REGISTER(mse_partial_f32)
EMU_REGISTER(mse_backward_bf16)
