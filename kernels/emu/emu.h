// Host emulation of the CUDA C++ subset our kernels use, so the very same .cu sources compile with g++ and
// run on the CPU (the "emu" device). Each block runs on one worker thread; its CUDA threads are fibers that
// switch at __syncthreads and at warp collectives (see runtime.cpp).
//
// Covered: thread/block indices, __shared__ (static thread_local: one copy per worker, which runs one block
// at a time), dynamic shared memory (EMU_DYNAMIC_SHARED), __syncthreads, __syncwarp, __shfl_*_sync (values of
// at most 8 bytes), atomicAdd/atomicMax (real atomics), CUDA's min/max overloads, fast-math intrinsics, and
// bf16 with round-to-nearest-even conversions. Not covered: code under __CUDA_ARCH__ branches.
#pragma once
#ifndef __CUDACC__

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {
struct ThreadState {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
    unsigned char* dynamic_shared;
};
// Refreshed by the scheduler every time a fiber resumes. Constant-initialised, so that reading threadIdx
// is a plain thread-local load rather than a call that first checks for dynamic initialisation.
constinit inline thread_local ThreadState tls{};

void syncthreads(int line);
void syncwarp();
// Deposits `bits` in this lane's slot, waits for the warp, returns the slot of lane `src`.
uint64_t warp_exchange(uint64_t bits, int src_lane);
// Deposits `pred`, waits for the warp, returns the bit mask of the lanes whose predicate was true.
unsigned warp_ballot(bool pred);
int lane_id();
}  // namespace emu

#define threadIdx (emu::tls.thread_idx)
#define blockIdx (emu::tls.block_idx)
#define blockDim (emu::tls.block_dim)
#define gridDim (emu::tls.grid_dim)
#define warpSize 32

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static thread_local
#define EMU_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(emu::tls.dynamic_shared)

// The line identifies the barrier, so divergent barriers (different __syncthreads) are reported.
#define __syncthreads() emu::syncthreads(__LINE__)
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }

template <typename T>
inline T emu_shfl(T v, int src) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffled values must be <= 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    uint64_t got = emu::warp_exchange(bits, src);
    T out;
    std::memcpy(&out, &got, sizeof(T));
    return out;
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    int lane = emu::lane_id();
    return emu_shfl(v, (lane & ~(width - 1)) | ((lane ^ mask) & (width - 1)));
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
    int lane = emu::lane_id();
    return emu_shfl(v, (lane & ~(width - 1)) | (src & (width - 1)));
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    int lane = emu::lane_id();
    int src = (lane & (width - 1)) + int(delta) < width ? lane + int(delta) : lane;
    return emu_shfl(v, src);
}

inline unsigned __ballot_sync(unsigned mask, int pred) { return emu::warp_ballot(pred != 0) & mask; }
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == __ballot_sync(mask, 1); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
// sm_80 warp reductions: a butterfly of exchanges, as the hardware result is defined (sum, min, max).
inline int emu_reduce(int v, int (*op)(int, int)) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        int lane = emu::lane_id();
        uint64_t got = emu::warp_exchange(uint64_t(uint32_t(v)), lane ^ offset);
        v = op(v, int(uint32_t(got)));
    }
    return v;
}
inline int __reduce_add_sync(unsigned, int v) { return emu_reduce(v, [](int a, int b) { return a + b; }); }
inline int __reduce_min_sync(unsigned, int v) { return emu_reduce(v, [](int a, int b) { return a < b ? a : b; }); }
inline int __reduce_max_sync(unsigned, int v) { return emu_reduce(v, [](int a, int b) { return a > b ? a : b; }); }

template <typename T>
inline T atomicAdd(T* addr, T v) {
    return std::atomic_ref<T>(*addr).fetch_add(v);
}
inline int atomicMax(int* addr, int v) {
    std::atomic_ref<int> a(*addr);
    int old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}

// CUDA's overload set for min/max.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }

// bf16 storage type with CUDA's round-to-nearest-even conversion.
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 v) {
    uint32_t u = uint32_t(v.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    __nv_bfloat16 out;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        out.bits = uint16_t((u >> 16) | 0x40);  // quiet NaN
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        out.bits = uint16_t(u >> 16);
    }
    return out;
}
// fp16 storage type with CUDA's round-to-nearest-even conversion (subnormals and overflow to inf included).
struct __half {
    uint16_t bits;
};
inline float __half2float(__half h) {
    uint32_t sign = uint32_t(h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {  // subnormal: normalise
            int e = -1;
            do {
                man <<= 1;
                ++e;
            } while ((man & 0x400u) == 0);
            u = sign | uint32_t(127 - 15 - e) << 23 | ((man & 0x3ffu) << 13);
        }
    } else {
        u = sign | (exp + 112) << 23 | (man << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __half __float2half(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u, abs = u & 0x7fffffffu;
    __half out;
    if (abs > 0x7f800000u) {
        out.bits = uint16_t(sign | 0x7e00u);  // NaN
    } else if (abs >= 0x477ff000u) {
        out.bits = uint16_t(sign | 0x7c00u);  // rounds to infinity
    } else if (abs < 0x38800000u) {  // subnormal or zero in fp16: scale by 2^24 and round
        float a;
        std::memcpy(&a, &abs, 4);
        out.bits = uint16_t(sign | uint32_t(std::nearbyint(a * 16777216.0f)));
    } else {
        uint32_t r = abs + 0xfffu + ((abs >> 13) & 1u);  // round to nearest even on the 13 dropped bits
        out.bits = uint16_t(sign | ((r - 0x38000000u) >> 13));
    }
    return out;
}

#define EMU_REGISTER(kernel) static emu::Registrar emu_registrar_##kernel(#kernel, kernel);

#include "registry.h"
#include "wmma.h"

#else  // __CUDACC__
#include <cuda_bf16.h>
#include <mma.h>
#define EMU_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define EMU_REGISTER(kernel)
#endif
