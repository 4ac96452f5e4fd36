//! Runs a hot loop compiled for the best vector extension this CPU has (AVX-512, else AVX2+FMA, else the
//! baseline), chosen at run time, so one binary is both portable and fast. The closure is inlined into a
//! function carrying the target features, which is what lets LLVM vectorise it with those instructions.
//! LLVM decides that inlining by size: a closure holding whole loops may stay a call, compiled for the
//! baseline (the attention pool's window loop ran as 4-wide SSE that way). Such a body goes in an
//! `#[inline(always)]` function called from a `#[target_feature]` one instead (`ops::pool`).
//!
//! Results of elementwise loops do not depend on the choice; reductions may differ in the last bits
//! between machines, never between runs on one machine.

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[inline(always)]
pub(crate) fn dispatch<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected on this CPU.
            return unsafe { avx512(f) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Independent partial sums in the reductions below: enough lanes for two 512-bit vectors, so the loop
/// vectorises and two add chains hide the add latency. (`iter().sum()` on floats cannot be reordered by the
/// compiler, so it runs one scalar add after another.) The order is fixed, so results are deterministic.
const LANES: usize = 32;

/// Σ x.
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was detected on this CPU.
        return unsafe { lanes_avx512::sum(x) };
    }
    sum_in_lanes(x)
}

/// [`sum`] as the lane arrays say it, whatever the vector width: lane `l` adds `x[32i + l]` in order of
/// `i`, the lanes fold by halves, then the tail is added.
#[inline(always)]
fn sum_in_lanes(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    fold_lanes(acc, |a, b| a + b) + tail
}

/// Σ aᵢ·bᵢ (fused multiply-adds).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let split = n - n % LANES;
    for (ca, cb) in a[..split]
        .chunks_exact(LANES)
        .zip(b[..split].chunks_exact(LANES))
    {
        for ((s, x), y) in acc.iter_mut().zip(ca).zip(cb) {
            *s = x.mul_add(*y, *s);
        }
    }
    let tail: f32 = a[split..].iter().zip(&b[split..]).map(|(x, y)| x * y).sum();
    fold_lanes(acc, |a, b| a + b) + tail
}

/// Σ (xᵢ − c)².
#[inline(always)]
pub(crate) fn sum_sq_dev(x: &[f32], c: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was detected on this CPU.
        return unsafe { lanes_avx512::sum_sq_dev(x, c) };
    }
    sum_sq_dev_in_lanes(x, c)
}

/// [`sum_sq_dev`] in the lane order of [`sum_in_lanes`].
#[inline(always)]
fn sum_sq_dev_in_lanes(x: &[f32], c: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|v| (v - c) * (v - c)).sum();
    for ch in chunks {
        for (a, v) in acc.iter_mut().zip(ch) {
            let d = v - c;
            *a = d.mul_add(d, *a);
        }
    }
    fold_lanes(acc, |a, b| a + b) + tail
}

/// [`sum`] and [`sum_sq_dev`] with the 32 lanes as two AVX-512 vectors: the same operations in the same
/// order, so the same bits. Written out because, inlined into a caller compiled for AVX-512 (a layer
/// norm's rows), the lane arrays were vectorised two lanes at a time (`vmovsd` loads and 128-bit adds).
/// With these and [`crate::ops::output::OutElem::normalize_row`], a layer norm of 8,192 × 768 f32 rows
/// into bf16 took 1.11–1.14 ms against 1.31–1.34 (2 threads, alternating), 256 rows in L2 on one thread
/// 0.049 against 0.069–0.070 ms (Xeon model 167).
#[cfg(target_arch = "x86_64")]
mod lanes_avx512 {
    use super::{fold_lanes, LANES};
    use std::arch::x86_64::*;

    /// The two vectors of lane sums, as the lane array.
    #[target_feature(enable = "avx512f")]
    fn lanes(low: __m512, high: __m512) -> [f32; LANES] {
        let mut acc = [0.0f32; LANES];
        // SAFETY: 16 lanes each, at 0 and 16 of the 32.
        unsafe {
            _mm512_storeu_ps(acc.as_mut_ptr(), low);
            _mm512_storeu_ps(acc.as_mut_ptr().add(16), high);
        }
        acc
    }

    /// [`super::sum`].
    #[target_feature(enable = "avx512f")]
    pub(super) fn sum(x: &[f32]) -> f32 {
        let chunks = x.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().sum();
        let (mut low, mut high) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for c in chunks {
            // SAFETY: 32 values of the chunk.
            unsafe {
                low = _mm512_add_ps(low, _mm512_loadu_ps(c.as_ptr()));
                high = _mm512_add_ps(high, _mm512_loadu_ps(c.as_ptr().add(16)));
            }
        }
        fold_lanes(lanes(low, high), |a, b| a + b) + tail
    }

    /// [`super::sum_sq_dev`].
    #[target_feature(enable = "avx512f")]
    pub(super) fn sum_sq_dev(x: &[f32], c: f32) -> f32 {
        let chunks = x.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().map(|v| (v - c) * (v - c)).sum();
        let (mut low, mut high) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let centre = _mm512_set1_ps(c);
        for ch in chunks {
            // SAFETY: 32 values of the chunk.
            unsafe {
                let d0 = _mm512_sub_ps(_mm512_loadu_ps(ch.as_ptr()), centre);
                let d1 = _mm512_sub_ps(_mm512_loadu_ps(ch.as_ptr().add(16)), centre);
                low = _mm512_fmadd_ps(d0, d0, low);
                high = _mm512_fmadd_ps(d1, d1, high);
            }
        }
        fold_lanes(lanes(low, high), |a, b| a + b) + tail
    }
}

/// max x (−∞ for an empty slice; NaN-ignoring like `f32::max`).
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    fold_lanes(acc, f32::max).max(tail)
}

/// One f32 as bf16 bits, rounded to nearest even (NaN stays a quiet NaN): the same bits as
/// `half::bf16::from_f32`, written without branches so loops over it vectorise.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    let nan = (b & 0x7FFF_FFFF) > 0x7F80_0000;
    (if nan { (b >> 16) | 0x0040 } else { rounded }) as u16
}

/// [`bf16_bits`] of 16 lanes at once (the same bits: nearest even, NaN quieted, subnormals rounded),
/// narrowed to 16 words. `vcvtneps2bf16` rounds to nearest even and quiets a NaN as [`bf16_bits`] does, in
/// one instruction where the integer rounding takes about ten, but reads a subnormal as zero: only lanes
/// holding one (rare in activations) take the integer rounding.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
#[inline]
pub(crate) fn bf16_bits_16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: both types are 256 bits of plain data.
    let words: __m256i = unsafe { std::mem::transmute(_mm512_cvtneps_pbh(x)) };
    // fpclass category 0x20: subnormal.
    let subnormal = _mm512_fpclass_ps_mask::<0x20>(x);
    if subnormal == 0 {
        return words;
    }
    _mm256_mask_mov_epi16(words, subnormal, bf16_bits_16_integer(x))
}

/// [`bf16_bits`] of 16 lanes in integer arithmetic: the add of `0x7FFF` plus the lowest kept bit, the
/// shift, and the quiet bit for NaNs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn bf16_bits_16_integer(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let b = _mm512_castps_si512(x);
    let high = _mm512_srli_epi32::<16>(b);
    let bias = _mm512_add_epi32(
        _mm512_set1_epi32(0x7FFF),
        _mm512_and_si512(high, _mm512_set1_epi32(1)),
    );
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, bias));
    let nan = _mm512_cmpgt_epu32_mask(
        _mm512_and_si512(b, _mm512_set1_epi32(0x7FFF_FFFF)),
        _mm512_set1_epi32(0x7F80_0000),
    );
    let quiet = _mm512_or_si512(high, _mm512_set1_epi32(0x0040));
    _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet))
}

/// Elements per rayon task of the conversions below.
const CONVERT_CHUNK: usize = 1 << 16;

/// `dst[i] = f(src[i])`, parallel over chunks, each loop compiled for the CPU's vector extension.
fn convert<S: Copy + Sync, D: Send>(dst: &mut [D], src: &[S], f: impl Fn(S) -> D + Sync) {
    use rayon::prelude::*;
    dst.par_chunks_mut(CONVERT_CHUNK)
        .zip(src.par_chunks(CONVERT_CHUNK))
        .for_each(|(d, s)| dispatch(|| d.iter_mut().zip(s).for_each(|(o, v)| *o = f(*v))));
}

/// `dst = bf16(src)`, rounded to nearest even: [`round_to_bf16_finite`], whose finiteness answer costs a
/// class test a vector.
pub(crate) fn round_to_bf16(dst: &mut [half::bf16], src: &[f32]) {
    round_to_bf16_finite(dst, src);
}

/// `dst = bf16(src)`, rounded to nearest even, and whether every value was finite, found in the same pass
/// (a weight copy to bf16 checks the values as it reads them rather than in a pass of its own): 16 values
/// an instruction by [`bf16_bits_16`] where the CPU has AVX512-BF16 (NT-v2 250M's bf16 weight copy, 230
/// million values: its upload took 168–171 ms instead of 176–181 with the scalar rounding on the Xeon
/// model 167, alternating four times), else the scalar rounding, vectorised by the compiler.
pub(crate) fn round_to_bf16_finite(dst: &mut [half::bf16], src: &[f32]) -> bool {
    use rayon::prelude::*;
    let chunks = dst
        .par_chunks_mut(CONVERT_CHUNK)
        .zip(src.par_chunks(CONVERT_CHUNK));
    #[cfg(target_arch = "x86_64")]
    if crate::ops::gemm_bf16::has_native_bf16() {
        return chunks
            // SAFETY: the features were detected.
            .map(|(d, s)| unsafe { round_to_bf16_avx512(d, s) })
            .reduce(|| true, |a, b| a && b);
    }
    chunks
        .map(|(d, s)| {
            dispatch(|| {
                d.iter_mut().zip(s).fold(true, |finite, (o, v)| {
                    *o = half::bf16::from_bits(bf16_bits(*v));
                    finite & v.is_finite()
                })
            })
        })
        .reduce(|| true, |a, b| a && b)
}

/// [`round_to_bf16`] of one chunk, 16 values at a time, the last `len % 16` one by one; whether every
/// value was finite.
///
/// # Safety
/// AVX-512F, BW, VL, DQ and BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
unsafe fn round_to_bf16_avx512(dst: &mut [half::bf16], src: &[f32]) -> bool {
    use std::arch::x86_64::*;
    let mut d = dst.chunks_exact_mut(16);
    let mut s = src.chunks_exact(16);
    // fpclass categories: quiet NaN 0x01, +∞ 0x08, −∞ 0x10, signalling NaN 0x80.
    let mut non_finite: __mmask16 = 0;
    for (d, s) in (&mut d).zip(&mut s) {
        // SAFETY: 16 values of `s` read, 16 words of `d` written.
        unsafe {
            let x = _mm512_loadu_ps(s.as_ptr());
            non_finite |= _mm512_fpclass_ps_mask::<0x99>(x);
            _mm256_storeu_si256(d.as_mut_ptr().cast(), bf16_bits_16(x));
        }
    }
    let mut finite = non_finite == 0;
    for (o, v) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *o = half::bf16::from_bits(bf16_bits(*v));
        finite &= v.is_finite();
    }
    finite
}

/// `dst = f32(src)` (exact).
pub(crate) fn widen_bf16(dst: &mut [f32], src: &[half::bf16]) {
    convert(dst, src, |v| f32::from_bits((v.to_bits() as u32) << 16));
}

/// Pairwise fold of the lane accumulators (a fixed tree).
#[inline(always)]
fn fold_lanes(mut acc: [f32; LANES], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] = f(acc[i], acc[i + width]);
        }
        width /= 2;
    }
    acc[0]
}

/// Rows ahead that [`prefetch_row`] callers fetch: far enough to cover a miss to L3 while a row is
/// converted, near enough that the lines are still in L1 when it is read. With it, attention at ESM-2 35M
/// shapes (8 × 512 tokens, 20 heads of 24) took 8–12% less time on AMX tiles (which convert each head's
/// q, k and v rows) and 2–5% less in the f32 lane kernel (which copies k and v), alternating in one process
/// on a quiet machine.
pub(crate) const ROWS_AHEAD: usize = 8;

/// Asks for every cache line of `row` ahead of a strided pass that reads one such slice per row (a head's
/// slice of a token row: 96 bytes at ESM-2's head dim of 24 spans up to 3 lines, 192 at NT-v2's 48 up to
/// 4; its first and last element alone left NT-v2's middle line to a demand miss). A hint only: no fault,
/// no effect on results.
#[inline(always)]
pub(crate) fn prefetch_row(row: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for at in cache_lines(row) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: prefetch never faults; `at` points into `row`.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(at.cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// One address inside `row` in each 64-byte line that `row` touches: its start, then the start of each
/// later line up to its last element's.
#[inline(always)]
fn cache_lines(row: &[f32]) -> impl Iterator<Item = *const f32> + '_ {
    const LINE: usize = 64;
    let start = row.as_ptr() as usize;
    let last_line = row.last().map(|v| v as *const f32 as usize | (LINE - 1));
    std::iter::successors(last_line.map(|_| start), |&at| Some((at | (LINE - 1)) + 1))
        .take_while(move |&at| last_line.is_some_and(|end| at <= end))
        .map(move |at| row.as_ptr().wrapping_byte_add(at - start))
}

/// `2ᵗ` on 16 lanes for `t < 128` (attention's shifted base-2 scores, `t ≤ 0`; the GELU's erf tail):
/// `t = n + f` with `n` the nearest integer (so `f = t − n` is exact and `|f| ≤ ½`), `2ᶠ = e^(f·ln2)` by
/// its degree-6 Taylor polynomial (truncation below 1.2e-7 relative, about an ulp), and `vscalefps` for
/// the `2ⁿ`. Inputs below −126 (whose results would be subnormal), −∞ and NaN give 0. 11 vector ops,
/// where the integer exponent assembly of [`crate::ops::elementwise::fast_exp`] takes 21: the
/// exponentials are a third of the attention lane kernel's work at head dim 24. The attention kernels
/// and the vector GELU use it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub(crate) unsafe fn exp2_16(t: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    // SAFETY: this function's features.
    unsafe { exp2_16xn([t])[0] }
}

/// [`exp2_16`] of `N` vectors, each step applied to all of them before the next, so that `N` independent
/// chains of dependent operations are interleaved in program order (the same operations, so the same
/// bits, as `N` calls).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub(crate) unsafe fn exp2_16xn<const N: usize>(
    t: [std::arch::x86_64::__m512; N],
) -> [std::arch::x86_64::__m512; N] {
    // ln2ᵏ / k!, highest first.
    const TAYLOR_6: [f32; 6] = [
        1.540_353e-4,
        1.333_355_8e-3,
        9.618_129e-3,
        5.550_411e-2,
        0.240_226_5,
        std::f32::consts::LN_2,
    ];
    // SAFETY: this function's features.
    unsafe { exp2_16xn_polynomial(t, &TAYLOR_6) }
}

/// SwiGLU's `silu(g)·v = g·σ(g)·v` on 16 lanes, `σ(g) = 1 / (1 + 2^(−g·log₂e))`: the exponential by
/// [`exp2_16`] and the reciprocal by `vrcp14ps` with one Newton step (about 2⁻²⁸ relative) rather than a
/// division, which a 512-bit `vdivps` issues once per 10 or more cycles; about 20 vector ops in all, where
/// the scalar formula vectorised to 45 and the division (NT-v2's FFN). Within 5e-7 relative of exact. `σ`
/// is 0 where `2^(−g·log₂e)` would pass 2¹²⁶ (`g < −87.3`, where it is below f32's normal range), so
/// that `g = −∞` gives NaN as `−∞·0`, NaN stays NaN, and `g = +∞` gives `+∞·v`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
pub(crate) unsafe fn swiglu_16(
    g: std::arch::x86_64::__m512,
    v: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let s = _mm512_set1_ps;
    let t = _mm512_mul_ps(g, s(-std::f32::consts::LOG2_E));
    // A NaN gate's lane is NaN through `g` in the product below, whatever σ is.
    // SAFETY: this function's features.
    let e = unsafe { exp2_16(_mm512_min_ps(t, s(126.0))) };
    let d = _mm512_add_ps(e, s(1.0));
    let r0 = _mm512_rcp14_ps(d);
    let r = _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(d, r0, s(1.0)), r0);
    let sigma = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_LE_OQ>(t, s(126.0)), r);
    _mm512_mul_ps(_mm512_mul_ps(g, sigma), v)
}

/// `2ᵗ` on 16 lanes to 3.0e-6 relative, for values that are rounded to bf16 next (whose half-ulp is 2⁻⁹ ≈
/// 2e-3): the bf16 attention's probabilities. A degree-4 polynomial for `2ᶠ` on `0 ≤ f < 1` (coefficients
/// fitted for the least maximum relative error, 2.90e-6, with `p(0) = 1`), two FMAs fewer than
/// [`exp2_16`]'s degree 6; and one step of range reduction rather than two: `vreduceps` gives
/// `f = t − ⌊t⌋` exactly, and `vscalefps` scales by `2^⌊t⌋` of `t` itself (it floors its second operand),
/// so `⌊t⌋` is never formed: 8 vector ops, where a pair of keys for 16 rows costs about 20 in all. The
/// bf16 attention at NT-v2's shapes (8 × 16 heads × 1,024² × 48, head-major with rotary tables, Xeon
/// model 167, best of 10, alternating three times) went from 28.1–28.3 to 26.5–26.9 ms with it (the
/// rounding to nearest and the subtraction before). Not degree 3 (1.03e-4): the row sums, and the
/// log-sum-exp that the backward recomputes the probabilities from, come from these values, and a sum
/// 1e-4 off shows in the gradients that vanish in exact arithmetic (a key bias's: a per-query constant
/// added to every score). Inputs below −126, −∞ and NaN give 0, as [`exp2_16`]'s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,fma")]
#[inline]
pub(crate) unsafe fn exp2_16_bf16_precision(
    t: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // 2ᶠ on [0, 1), highest first.
    const MINIMAX_4: [f32; 4] = [1.342_670_1e-2, 5.224_244_7e-2, 0.241_280_21, 0.693_044_84];
    let s = _mm512_set1_ps;
    // imm8: keep no fraction bits (bits 7–4), suppress exceptions (bit 3), round down (bits 1–0).
    let f = _mm512_reduce_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(t);
    let mut p = s(MINIMAX_4[0]);
    for c in &MINIMAX_4[1..] {
        p = _mm512_fmadd_ps(p, f, s(*c));
    }
    p = _mm512_fmadd_ps(p, f, s(1.0));
    let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(t, s(-126.0));
    _mm512_maskz_scalef_ps(keep, p, t)
}

/// `2ᵗ = 2ⁿ·2ᶠ` with `2ᶠ ≈ 1 + f·(c₀fᴰ⁻¹ + … + c_{D−1})` (`coefficients` highest first, `n` the nearest
/// integer), the body of [`exp2_16xn`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[inline]
unsafe fn exp2_16xn_polynomial<const N: usize, const D: usize>(
    t: [std::arch::x86_64::__m512; N],
    coefficients: &[f32; D],
) -> [std::arch::x86_64::__m512; N] {
    use std::arch::x86_64::*;
    let s = _mm512_set1_ps;
    let n = t.map(|t| _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t));
    let f: [__m512; N] = std::array::from_fn(|i| _mm512_sub_ps(t[i], n[i]));
    let mut p = [s(coefficients[0]); N];
    for c in &coefficients[1..] {
        for (p, f) in p.iter_mut().zip(&f) {
            *p = _mm512_fmadd_ps(*p, *f, s(*c));
        }
    }
    for (p, f) in p.iter_mut().zip(&f) {
        *p = _mm512_fmadd_ps(*p, *f, s(1.0));
    }
    std::array::from_fn(|i| {
        let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(t[i], s(-126.0));
        _mm512_maskz_scalef_ps(keep, p[i], n[i])
    })
}

/// `dst[r·ld_dst + c] = src[c·ld_src + r]` for a 16×16 block of 32-bit words (f32 values as their bits),
/// in AVX-512 registers: the bf16 GEMM packs weights with it; the AMX attention turns its values and
/// query blocks around with it and its transposed output into rows.
///
/// # Safety
/// AVX-512F; the 16 rows of 16 words at `src` (stride `ld_src`) and at `dst` (stride `ld_dst`) are valid.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose16x16(src: *const u32, ld_src: usize, dst: *mut u32, ld_dst: usize) {
    use std::arch::x86_64::*;
    // SAFETY: (caller) every row read and written is inside its buffer.
    unsafe {
        let mut r = [_mm512_setzero_si512(); 16];
        for (i, v) in r.iter_mut().enumerate() {
            *v = _mm512_loadu_si512(src.add(i * ld_src).cast());
        }
        for (i, v) in transpose16x16_regs(r).iter().enumerate() {
            _mm512_storeu_si512(dst.add(i * ld_dst).cast(), *v);
        }
    }
}

/// The 16×16 word transpose of [`transpose16x16`] on registers: lane `r` of output `c` is lane `c` of
/// input `r`. For packers whose rows come from elsewhere than 16 loads (converted, or fewer than 16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) fn transpose16x16_regs(
    mut r: [std::arch::x86_64::__m512i; 16],
) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    // Interleave words, then pairs of words, within 128-bit lanes.
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    // Each 128-bit lane now holds a 4×4 block transposed; exchange lanes between groups of four
    // rows, then between halves.
    for i in 0..4 {
        for q in 0..2 {
            let (a, b) = (r[i + 8 * q], r[i + 4 + 8 * q]);
            t[i + 8 * q] = _mm512_shuffle_i32x4::<0x88>(a, b);
            t[i + 4 + 8 * q] = _mm512_shuffle_i32x4::<0xdd>(a, b);
        }
    }
    for i in 0..8 {
        let (a, b) = (t[i], t[i + 8]);
        r[i] = _mm512_shuffle_i32x4::<0x88>(a, b);
        r[i + 8] = _mm512_shuffle_i32x4::<0xdd>(a, b);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sum` and `sum_sq_dev` (the AVX-512 ones where the CPU has it) have the bits of the lane arrays'
    /// order at every length around the 32-lane chunks, and are within f32's rounding of f64 sums.
    #[test]
    fn sums_keep_the_lane_order_and_match_f64() {
        for n in (0..=100).chain([767, 768, 769, 3072 + 5]) {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 1000) as f32 / 100.0 - 5.0) * (1.0 + (i % 3) as f32))
                .collect();
            let c = 0.375f32;
            assert_eq!(
                sum(&x).to_bits(),
                sum_in_lanes(&x).to_bits(),
                "sum, n = {n}"
            );
            assert_eq!(
                sum_sq_dev(&x, c).to_bits(),
                sum_sq_dev_in_lanes(&x, c).to_bits(),
                "sum_sq_dev, n = {n}"
            );
            let exact: f64 = x.iter().map(|v| *v as f64).sum();
            let magnitude: f64 = x.iter().map(|v| v.abs() as f64).sum();
            let bound = (n as f64 + 2.0) * f32::EPSILON as f64 * magnitude;
            assert!((sum(&x) as f64 - exact).abs() <= bound, "sum, n = {n}");
            let exact: f64 = x.iter().map(|v| (*v as f64 - c as f64).powi(2)).sum();
            assert!(
                (sum_sq_dev(&x, c) as f64 - exact).abs()
                    <= (n as f64 + 3.0) * f32::EPSILON as f64 * exact,
                "sum_sq_dev, n = {n}"
            );
        }
    }

    /// Both vector exponentials against f64 over the attention's range (shifted scores, `t ≤ 0`) and past
    /// it, with the edge cases: the full one within 2.5e-7 relative, the bf16-precision one within 3.2e-6
    /// (its fit's 2.90e-6 and the f32 rounding of its steps); −∞, NaN and anything below −126 give 0.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn vector_exponentials_match_f64() {
        use std::arch::x86_64::*;
        if !(std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("fma"))
        {
            return;
        }
        let mut t: Vec<f32> = (0..=40_000).map(|i| -126.0 + i as f32 * 3.3e-3).collect();
        t.extend([
            -126.5,
            -200.0,
            f32::NEG_INFINITY,
            f32::NAN,
            -0.5,
            0.5,
            -0.25,
            0.0,
            1.0,
        ]);
        t.resize(t.len().div_ceil(16) * 16, 0.0);
        let mut full = vec![0.0f32; t.len()];
        let mut coarse = vec![0.0f32; t.len()];
        for ((t, full), coarse) in t
            .chunks(16)
            .zip(full.chunks_mut(16))
            .zip(coarse.chunks_mut(16))
        {
            // SAFETY: the features were detected above; 16 values in each slice.
            unsafe {
                let v = _mm512_loadu_ps(t.as_ptr());
                _mm512_storeu_ps(full.as_mut_ptr(), exp2_16(v));
                _mm512_storeu_ps(coarse.as_mut_ptr(), exp2_16_bf16_precision(v));
            }
        }
        for ((&t, &full), &coarse) in t.iter().zip(&full).zip(&coarse) {
            if t.is_nan() || t < -126.0 {
                assert_eq!((full, coarse), (0.0, 0.0), "2^{t}");
                continue;
            }
            let want = (t as f64).exp2();
            let relative = |got: f32| (got as f64 - want).abs() / want;
            assert!(
                relative(full) <= 2.5e-7,
                "exp2_16({t}) = {full}, want {want}"
            );
            assert!(
                relative(coarse) <= 3.2e-6,
                "exp2_16_bf16_precision({t}) = {coarse}, want {want}"
            );
        }
    }

    /// Every start offset and length of a short row: exactly the lines its elements touch, in order, each
    /// once, every address inside the row.
    #[test]
    fn cache_lines_names_each_line_of_a_row_once() {
        let buffer = vec![0.0f32; 256];
        for skip in 0..20 {
            for len in 0..80 {
                let row = &buffer[skip..skip + len];
                let got: Vec<usize> = cache_lines(row).map(|p| p as usize / 64).collect();
                let mut want: Vec<usize> =
                    row.iter().map(|v| v as *const f32 as usize / 64).collect();
                want.dedup();
                assert_eq!(got, want, "{len} values from {skip}");
                assert!(cache_lines(row).all(|p| row.as_ptr_range().contains(&p)));
            }
        }
    }

    #[test]
    fn reductions_match_f64_sums() {
        for n in [0usize, 1, 5, 31, 32, 33, 64, 100, 517] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let y: Vec<f32> = (0..n)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 3.0)
                .collect();
            let s: f64 = x.iter().map(|&v| v as f64).sum();
            let d: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
            let c = 0.25f32;
            let q: f64 = x.iter().map(|&v| (v as f64 - c as f64).powi(2)).sum();
            let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let tol = |want: f64| 1e-5 * (1.0 + want.abs());
            assert!(
                (dispatch(|| sum(&x)) as f64 - s).abs() < tol(s),
                "sum n={n}"
            );
            assert!(
                (dispatch(|| dot(&x, &y)) as f64 - d).abs() < tol(d),
                "dot n={n}"
            );
            assert!(
                (dispatch(|| sum_sq_dev(&x, c)) as f64 - q).abs() < tol(q),
                "sq n={n}"
            );
            assert_eq!(dispatch(|| max(&x)), m, "max n={n}");
        }
    }

    /// The branch-free rounding gives `half`'s bits on ties, carries into the exponent, overflow to
    /// infinity, subnormals, signed zeros and NaNs; widening is exact.
    #[test]
    fn bf16_conversions_match_half() {
        let mut xs: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            f32::from_bits(0x3F80_8000), // a tie, even below
            f32::from_bits(0x3F81_8000), // a tie, odd below
            f32::from_bits(0x3F80_8001),
            f32::from_bits(0x7F7F_FFFF), // rounds up to infinity
            f32::from_bits(0x0000_8001), // subnormal
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7F80_0001), // signalling NaN
        ];
        xs.extend((0..200_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))));
        let mut got = vec![half::bf16::ZERO; xs.len()];
        round_to_bf16(&mut got, &xs);
        // The checking form writes the same words and finds a NaN or infinity wherever one lies: in a
        // vector, in the ragged tail, or nowhere.
        let mut checked = vec![half::bf16::ZERO; xs.len()];
        assert!(!round_to_bf16_finite(&mut checked, &xs));
        assert!(checked
            .iter()
            .zip(&got)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let mut finite: Vec<f32> = xs.iter().copied().filter(|x| x.is_finite()).collect();
        // Five values past the last whole vector; the last but one is in that tail.
        finite.truncate((finite.len() / 16 - 1) * 16 + 5);
        for (bad, at) in [(f32::NAN, 70_000), (f32::NEG_INFINITY, finite.len() - 2)] {
            let mut values = finite.clone();
            let mut out = vec![half::bf16::ZERO; values.len()];
            assert!(round_to_bf16_finite(&mut out, &values), "all finite");
            values[at] = bad;
            assert!(!round_to_bf16_finite(&mut out, &values), "{bad} at {at}");
        }
        for (x, g) in xs.iter().zip(&got) {
            let want = half::bf16::from_f32(*x);
            if x.is_nan() {
                assert!(g.is_nan(), "{x:e} must stay NaN");
            } else {
                assert_eq!(g.to_bits(), want.to_bits(), "{x:e}");
            }
        }
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512bf16")
        {
            for chunk in xs.chunks_exact(16) {
                let (mut words, mut integer) = ([0u16; 16], [0u16; 16]);
                // SAFETY: the features were detected; `chunk` holds 16 values and `words` 16 words.
                unsafe {
                    use std::arch::x86_64::*;
                    let v = _mm512_loadu_ps(chunk.as_ptr());
                    _mm256_storeu_si256(words.as_mut_ptr().cast(), bf16_bits_16(v));
                    _mm256_storeu_si256(integer.as_mut_ptr().cast(), bf16_bits_16_integer(v));
                }
                for ((x, w), i) in chunk.iter().zip(words).zip(integer) {
                    assert_eq!(w, bf16_bits(*x), "16 lanes at once: {x:e}");
                    assert_eq!(i, bf16_bits(*x), "16 lanes in integers: {x:e}");
                }
            }
        }
        let mut back = vec![0.0f32; got.len()];
        widen_bf16(&mut back, &got);
        for (b, g) in back.iter().zip(&got) {
            assert_eq!(b.to_bits(), g.to_f32().to_bits());
        }
    }
}
