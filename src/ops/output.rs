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
