//! The element types a forward op writes its f32 results as: f32 itself, or bf16 rounded once to nearest
//! even. The CPU's bf16 backend stores the inputs of linear layers in bf16 (`Role::LinearInput`), and the
//! ops that make them (layer norm, activations, SwiGLU) write bf16 directly rather than an f32 copy that
//! is read again to be rounded.

use half::bf16;

use super::simd::{bf16_bits, dispatch};

/// Values per block of [`OutElem::fill`] for narrow types: 4 KiB of f32 on the stack, in L1.
const BLOCK: usize = 1024;

/// An element type an op's output can be.
pub trait OutElem: Copy + Send + Sync + 'static {
    /// `v` as this type (rounded to nearest even for bf16; NaN stays NaN).
    fn from_f32(v: f32) -> Self;

    /// Computes `dst` through `f(values, offset)`, which writes the f32 results for
    /// `dst[offset..offset + values.len()]`: in place for f32, block by block through a buffer in L1 for
    /// narrower types.
    fn fill(dst: &mut [Self], f: impl FnMut(&mut [f32], usize));

    /// A layer norm's row: `dst[i] = (x[i] − mean)·rstd·gamma[i] + beta[i]`, each value rounded as
    /// [`OutElem::from_f32`] rounds it.
    #[inline(always)]
    fn normalize_row(dst: &mut [Self], x: &[f32], stats: (f32, f32), gamma: &[f32], beta: &[f32]) {
        normalize_row_scalar(dst, x, stats, gamma, beta)
    }
}

/// [`OutElem::normalize_row`] value by value (vectorised by the compiler where the caller's features
/// allow).
#[inline(always)]
fn normalize_row_scalar<O: OutElem>(
    dst: &mut [O],
    x: &[f32],
    (mean, rstd): (f32, f32),
    gamma: &[f32],
    beta: &[f32],
) {
    for (((o, &v), g), b) in dst.iter_mut().zip(x).zip(gamma).zip(beta) {
        *o = O::from_f32((v - mean) * rstd * g + b);
    }
}

impl OutElem for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> f32 {
        v
    }

    fn fill(dst: &mut [f32], mut f: impl FnMut(&mut [f32], usize)) {
        f(dst, 0)
    }
}

impl OutElem for bf16 {
    #[inline(always)]
    fn from_f32(v: f32) -> bf16 {
        bf16::from_bits(bf16_bits(v))
    }

    /// With AVX512-BF16, 16 values at a time rounded by [`crate::ops::simd::bf16_bits_16`] (the same
    /// bits, in one instruction where the vectorised integer rounding takes about ten).
    #[inline(always)]
    fn normalize_row(dst: &mut [bf16], x: &[f32], stats: (f32, f32), gamma: &[f32], beta: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::ops::gemm_bf16::has_native_bf16() {
            // SAFETY: the features were detected on this CPU.
            return unsafe { normalize_row_bf16_avx512(dst, x, stats, gamma, beta) };
        }
        normalize_row_scalar(dst, x, stats, gamma, beta)
    }

    fn fill(dst: &mut [bf16], mut f: impl FnMut(&mut [f32], usize)) {
        let mut buf = [0.0f32; BLOCK];
        for (i, d) in dst.chunks_mut(BLOCK).enumerate() {
            let values = &mut buf[..d.len()];
            f(values, i * BLOCK);
            dispatch(
                #[inline(always)]
                || {
                    d.iter_mut()
                        .zip(values.iter())
                        .for_each(|(o, v)| *o = <Self as OutElem>::from_f32(*v))
                },
            );
        }
    }
}

/// [`OutElem::normalize_row`] for bf16 on AVX512-BF16: the products and sum in the order of the scalar
/// formula (no fused multiply-add), so the f32 values are the same before they are rounded. For the
/// AVX-512 subsets with BF16 ([`crate::ops::gemm_bf16::has_native_bf16`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")]
fn normalize_row_bf16_avx512(
    dst: &mut [bf16],
    x: &[f32],
    (mean, rstd): (f32, f32),
    gamma: &[f32],
    beta: &[f32],
) {
    use std::arch::x86_64::*;
    let n = dst.len().min(x.len()).min(gamma.len()).min(beta.len());
    let (m, r) = (_mm512_set1_ps(mean), _mm512_set1_ps(rstd));
    for c in (0..n).step_by(16) {
        let mask = (u32::MAX >> (32 - (n - c).min(16))) as __mmask16;
        // SAFETY: the mask keeps lanes c.. below n, inside every slice.
        unsafe {
            let v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(c));
            let g = _mm512_maskz_loadu_ps(mask, gamma.as_ptr().add(c));
            let b = _mm512_maskz_loadu_ps(mask, beta.as_ptr().add(c));
            let y = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(v, m), r), g), b);
            let words = crate::ops::simd::bf16_bits_16(y);
            _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(c).cast(), mask, words);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_output_rounds_to_nearest_even_block_by_block() {
        // Values around rounding ties, specials, and enough of them to span several blocks with a
        // ragged last one.
        let src: Vec<f32> = (0..2 * BLOCK + 37)
            .map(|i| match i % 7 {
                0 => f32::from_bits(0x3F80_8000 + ((i as u32 & 1) << 16)), // ties, odd and even
                1 => f32::from_bits(0x3F80_8001),
                2 => -(i as f32) * 1.000_1,
                3 => f32::NAN,
                4 => f32::INFINITY,
                5 => 1e-40,
                _ => (i as f32).sin(),
            })
            .collect();
        let mut dst = vec![bf16::ZERO; src.len()];
        bf16::fill(&mut dst, |values, offset| {
            values.copy_from_slice(&src[offset..offset + values.len()])
        });
        for (i, (d, s)) in dst.iter().zip(&src).enumerate() {
            let want = bf16::from_f32(*s);
            assert!(
                d.to_bits() == want.to_bits() || (d.is_nan() && want.is_nan()),
                "[{i}] {s:e}: {d} vs {want}"
            );
        }
        let mut same = src.clone();
        f32::fill(&mut same, |values, offset| {
            assert_eq!(offset, 0);
            values.iter_mut().for_each(|v| *v *= 2.0)
        });
        assert!(same
            .iter()
            .zip(&src)
            .all(|(a, b)| a.to_bits() == (b * 2.0).to_bits()));
    }

    /// A layer norm's bf16 row (16 lanes at a time where the CPU has AVX512-BF16) has the bits of the
    /// scalar formula rounded once, for every length up to a few vectors and a ragged long one, with
    /// results that are subnormal, infinite and NaN among them.
    #[test]
    fn bf16_layernorm_rows_are_the_scalar_formula_rounded() {
        for n in (1..=50).chain([768 + 7]) {
            let x: Vec<f32> = (0..n)
                .map(|i| match i % 11 {
                    3 => f32::NAN,
                    7 => 3.0e38,
                    _ => ((i * 7919 % 1000) as f32 / 100.0 - 5.0) * (1.0 + (i % 3) as f32),
                })
                .collect();
            let gamma: Vec<f32> = (0..n)
                .map(|i| {
                    if i % 5 == 1 {
                        1e-40
                    } else {
                        0.5 + i as f32 / 64.0
                    }
                })
                .collect();
            let beta: Vec<f32> = (0..n)
                .map(|i| if i % 5 == 1 { 0.0 } else { -0.25 * i as f32 })
                .collect();
            let stats = (0.125f32, 1.75f32);
            let mut got = vec![bf16::ZERO; n];
            bf16::normalize_row(&mut got, &x, stats, &gamma, &beta);
            for i in 0..n {
                let want = bf16::from_f32((x[i] - stats.0) * stats.1 * gamma[i] + beta[i]);
                assert!(
                    got[i].to_bits() == want.to_bits() || (got[i].is_nan() && want.is_nan()),
                    "n = {n}, [{i}]: {} vs {want}",
                    got[i]
                );
            }
            let subnormal = (0..n).any(|i| {
                let v = (x[i] - stats.0) * stats.1 * gamma[i] + beta[i];
                v != 0.0 && v.abs() < f32::MIN_POSITIVE
            });
            assert!(n < 2 || subnormal, "n = {n}: no subnormal result was tried");
        }
        // Many ordinary rows: a sum or product rounded otherwise than the formula's (a fused
        // multiply-add, say) moves some values across a bf16 rounding boundary.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        };
        let n = 768 + 7;
        let (mut got, mut x, mut gamma, mut beta) = (
            vec![bf16::ZERO; n],
            vec![0.0; n],
            vec![0.0; n],
            vec![0.0; n],
        );
        for _ in 0..400 {
            for i in 0..n {
                (x[i], gamma[i], beta[i]) = (next(), next(), next());
            }
            let stats = (next() / 8.0, 1.0 + next().abs());
            bf16::normalize_row(&mut got, &x, stats, &gamma, &beta);
            for i in 0..n {
                let want = bf16::from_f32((x[i] - stats.0) * stats.1 * gamma[i] + beta[i]);
                assert_eq!(got[i].to_bits(), want.to_bits(), "[{i}] of a random row");
            }
        }
    }

    /// Every op that writes [`OutElem`]: its bf16 output is its f32 output rounded once, bit for bit.
    #[test]
    fn ops_write_bf16_as_their_f32_results_rounded() {
        use crate::ops::elementwise::{activation, swiglu, GeluErf};
        use crate::ops::norm::layernorm;
        let (rows, dim) = (37, 96);
        let x: Vec<f32> = (0..rows * 2 * dim)
            .map(|i| ((i * 7919 % 1000) as f32 / 100.0 - 5.0) * (1.0 + (i % 3) as f32))
            .collect();
        let rounded = |v: &[f32]| {
            v.iter()
                .map(|v| bf16::from_f32(*v).to_bits())
                .collect::<Vec<_>>()
        };
        let bits = |v: &[bf16]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();

        let (gamma, beta) = (vec![1.5f32; dim], vec![-0.25f32; dim]);
        let (mut mean, mut rstd) = (vec![0.0; rows], vec![0.0; rows]);
        let (mut y32, mut y16) = (vec![0.0f32; rows * dim], vec![bf16::ZERO; rows * dim]);
        let xs = &x[..rows * dim];
        layernorm(&mut y32, &mut mean, &mut rstd, xs, &gamma, &beta, dim, 1e-5).unwrap();
        layernorm(&mut y16, &mut mean, &mut rstd, xs, &gamma, &beta, dim, 1e-5).unwrap();
        assert_eq!(bits(&y16), rounded(&y32), "layernorm");

        // Longer than an activation chunk, so that blocks and chunks both have ragged ends.
        let long: Vec<f32> = x.iter().chain(&x).chain(&x).copied().collect();
        let (mut a32, mut a16) = (vec![0.0f32; long.len()], vec![bf16::ZERO; long.len()]);
        activation::<GeluErf, f32>(&mut a32, &long).unwrap();
        activation::<GeluErf, bf16>(&mut a16, &long).unwrap();
        assert_eq!(bits(&a16), rounded(&a32), "gelu");

        let (mut s32, mut s16) = (vec![0.0f32; rows * dim], vec![bf16::ZERO; rows * dim]);
        swiglu(&mut s32, &x, dim).unwrap();
        swiglu(&mut s16, &x, dim).unwrap();
        assert_eq!(bits(&s16), rounded(&s32), "swiglu");
    }
}
