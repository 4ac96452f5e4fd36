// Host emulation of the nvcuda::wmma subset our kernels use: 16×16×16 tiles, bf16 inputs (row or column
// major), f32 accumulators. Each lane keeps the whole tile (num_elements = 256), so element-wise loops over
// `x[]` behave as on the GPU (where each lane holds an unspecified part), and every lane computes the same
// product, which makes the stores of all lanes identical.
#pragma once
#ifndef __CUDACC__

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static constexpr int num_elements = 256;
    T x[256];
};

template <typename Use, int M, int N, int K, typename T, typename Layout, typename U>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, U v) {
    for (int i = 0; i < 256; ++i) f.x[i] = T(v);
}

// matrix_a / matrix_b tiles: element (r, c) of the 16×16 tile at ptr with leading dimension ld.
template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* ptr, unsigned ld) {
    constexpr bool col = std::is_same<Layout, col_major>::value;
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = col ? ptr[c * ld + r] : ptr[r * ld + c];
    __syncwarp();
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* ptr, unsigned ld, layout_t layout) {
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = layout == mem_row_major ? ptr[r * ld + c] : ptr[c * ld + r];
    __syncwarp();
}

inline void store_matrix_sync(float* ptr, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld, layout_t layout) {
    __syncwarp();
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) (layout == mem_row_major ? ptr[r * ld + c] : ptr[c * ld + r]) = f.x[r * 16 + c];
    __syncwarp();
}

template <typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
    float out[256];
    for (int r = 0; r < 16; ++r)
        for (int col = 0; col < 16; ++col) {
            float s = c.x[r * 16 + col];
            for (int k = 0; k < 16; ++k) s += __bfloat162float(a.x[r * 16 + k]) * __bfloat162float(b.x[k * 16 + col]);
            out[r * 16 + col] = s;
        }
    for (int i = 0; i < 256; ++i) d.x[i] = out[i];
}
}  // namespace wmma
}  // namespace nvcuda

#else
#include <mma.h>
#endif
