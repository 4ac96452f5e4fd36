// Self-test kernels for the execution model itself (used by the emulator tests, compiled for GPUs too):
// warp shuffles over partial warps, block-level shared memory with barriers, atomics, a kernel whose
// barrier is divergent, which the emulator must report instead of hanging, and a kernel with a race that
// the emulator's two thread orders must disagree on.
#include "common.cuh"

// out[t] = sum over the thread's warp of (t + 1) via xor shuffles, plus the block total via shared memory,
// plus an atomic count of threads in the grid in *count.
extern "C" __global__ void selftest_reduce_f32(float* __restrict__ out, int* __restrict__ count, int n) {
    __shared__ float partial[32];
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    float v = t < n ? float(t + 1) : 0.0f;
    float w = warp_sum(v);
    int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) partial[warp] = w;
    __syncthreads();
    float block_total = 0.0f;
    for (int i = 0; i < (int)CEIL_DIV(blockDim.x, 32); ++i) block_total += partial[i];
    if (t < n) {
        out[2 * t] = w;
        out[2 * t + 1] = block_total;
        atomicAdd(count, 1);
    }
}

// Odd and even threads wait at two different barriers: undefined on a GPU, reported by the emulator.
extern "C" __global__ void selftest_divergent_barrier(int* flag) {
    if (threadIdx.x % 2 == 1) {
        __syncthreads();
        flag[0] = 1;
    } else {
        __syncthreads();
        flag[0] = 2;
    }
}

// ballot[w] = mask of lanes of warp w with an odd thread index (ballot, any, all, popc);
// half_bits[t] = the fp16 bits of values[t] (conversion check against the host's RNE).
extern "C" __global__ void selftest_ballot_half(unsigned* __restrict__ ballot, int* __restrict__ flags, unsigned short* __restrict__ half_bits,
                                                const float* __restrict__ values, int n) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned m = __ballot_sync(0xffffffffu, t % 2 == 1);
    int any = __any_sync(0xffffffffu, t == 5);
    int all = __all_sync(0xffffffffu, t < n);
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    int sum = __reduce_add_sync(0xffffffffu, t % 32);  // 0 + 1 + … + 31 = 496
    int mx = __reduce_max_sync(0xffffffffu, t);
#else
    int sum = 496, mx = t | 31;
#endif
    if (threadIdx.x % 32 == 0) {
        int w = t / 32;
        ballot[w] = m;
        flags[2 * w] = any + 1000 * (sum == 496) + 10000 * (mx == t + 31);
        flags[2 * w + 1] = all + 2 * __popc(m);
    }
    if (t < n) {
        __half h = __float2half(values[t]);
        half_bits[t] = *reinterpret_cast<unsigned short*>(&h);
    }
}

// A deliberate race: each thread writes its slot of shared memory and reads its lower neighbour's with no
// __syncthreads between. out[t] = t when the neighbour happened to write first (the emulator's ascending
// thread order), something else when it did not (descending order; on a GPU, whatever the warps did).
// Launch one block of at most 256 threads.
extern "C" __global__ void selftest_unsynchronised_read(int* out) {
    __shared__ int slot[256];
    int t = threadIdx.x;
    slot[t] = t + 1;
    out[t] = t > 0 ? slot[t - 1] : 0;
}

EMU_REGISTER(selftest_reduce_f32)
EMU_REGISTER(selftest_ballot_half)
EMU_REGISTER(selftest_divergent_barrier)
EMU_REGISTER(selftest_unsynchronised_read)
