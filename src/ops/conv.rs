//! 1-D convolution with 'same' padding (odd width `k`, `k/2` zeros each side), channels-last:
//! `x [B, L, Cin]`, `out [B, L, Cout]`, weight in PyTorch's layout `[Cout, Cin, k]`, bias `[Cout]`.
//! Each tap is one GEMM of the shifted input rows against that tap's weight slice (no im2col copy).

use super::matmul::{gemm_views, sum_rows_into, View};
use crate::error::{check_len, checked_product};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv1dDims {
    pub batch: usize,
    pub len: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub width: usize,
}

impl Conv1dDims {
    fn check(&self, op: &'static str, x: usize, w: usize, out: usize) -> Result<()> {
        if self.width.is_multiple_of(2) {
            return Err(Error::invalid(
                "conv1d width",
                format!("{} ('same' padding needs an odd width)", self.width),
            ));
        }
        let (sx, sw, so) = self.checked_sizes(op)?;
        check_len(op, "x", x, sx)?;
        check_len(op, "weight", w, sw)?;
        check_len(op, "out", out, so)
    }

    /// Elements of x, the weight and the output (with the im2col columns checked too), or an error when a
    /// product overflows.
    pub fn checked_sizes(&self, op: &'static str) -> Result<(usize, usize, usize)> {
        checked_product(op, &[self.batch, self.len, self.c_in, self.width.max(1)])?;
        Ok((
            checked_product(op, &[self.batch, self.len, self.c_in])?,
            checked_product(op, &[self.c_out, self.c_in, self.width])?,
            checked_product(op, &[self.batch, self.len, self.c_out])?,
        ))
    }

    /// Output rows `l0..l1` that tap `t` reads from input rows `l0+t−pad..`, clipped to the sequence.
    fn tap_rows(&self, t: usize) -> (usize, usize, usize) {
        let pad = self.width / 2;
        let l0 = pad.saturating_sub(t);
        let l1 = (self.len + pad).saturating_sub(t).min(self.len);
        (l0, l1.max(l0), l0 + t - pad)
    }

    /// Tap `t` of the weight as a `[Cin, Cout]` matrix.
    fn tap_weight(&self) -> View {
        View {
            rows: self.c_in,
            cols: self.c_out,
            rs: self.width as isize,
            cs: (self.c_in * self.width) as isize,
        }
    }
}

pub fn conv1d(
    out: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    d: Conv1dDims,
) -> Result<()> {
    d.check("conv1d", x.len(), w.len(), out.len())?;
    conv1d_taps(out, x, bias, d, |o, ov, xs, xv, t| {
        gemm_views(o, ov, true, xs, xv, &w[t..], d.tap_weight(), None);
        Ok(())
    })
}

/// bf16 values of scratch that [`conv1d_bf16_weights`] needs for `d`: one batch entry's input,
/// zero-padded, and the weight in tap-major order; none for a pointwise convolution.
pub fn conv1d_bf16_scratch_len(d: &Conv1dDims) -> Result<usize> {
    const OP: &str = "conv1d";
    if d.width <= 1 {
        return Ok(0);
    }
    let padded_rows = d
        .len
        .checked_add(d.width - 1)
        .ok_or_else(|| Error::invalid(OP, format!("a length of {} overflows", d.len)))?;
    let padded = checked_product(OP, &[padded_rows, d.c_in])?;
    let taps = checked_product(OP, &[d.width, d.c_in, d.c_out])?;
    padded
        .checked_add(taps)
        .ok_or_else(|| Error::invalid(OP, format!("the scratch of {d:?} overflows")))
}

/// [`conv1d`] with bf16 weights, as one bf16 GEMM with f32 accumulation per batch entry (the bias added
/// as the sums are written), in `scratch` of [`conv1d_bf16_scratch_len`] values.
///
/// The input is copied once into bf16 (f32 rounded, bf16 as it is), with `width/2` zero rows at each
/// end. Output row `l` then reads the `width·c_in` contiguous values from padded row `l` on: the im2col
/// row in tap-major order, so the rows of the im2col matrix overlap in the copy and the kernel reads them
/// in place, with no im2col buffer and no packing. The weight is reordered to the same tap-major order
/// (`tap_major`). Against a GEMM per tap, this packs the input once rather than `width` times, writes
/// the output once rather than accumulating into it `width` times, and packs the weight from contiguous
/// columns rather than gathering it with two strides: 5.0% of a bf16 Enformer forward for packing the
/// input and 4.3% for the weight, on Zen 5.
pub fn conv1d_bf16_weights(
    out: &mut [f32],
    x: super::gemm_bf16::Lhs<'_>,
    w: &[half::bf16],
    bias: Option<&[f32]>,
    d: Conv1dDims,
    scratch: &mut [half::bf16],
) -> Result<()> {
    use super::gemm_bf16::{gemm_bf16, GemmOut, Lhs};
    use super::matmul::View;
    const OP: &str = "conv1d";
    d.check(OP, x.len(), w.len(), out.len())?;
    if let Some(b) = bias {
        check_len(OP, "bias", b.len(), d.c_out)?;
    }
    if d.width == 1 {
        // Already one GEMM: the input rows (rounded as they are packed) times the weight [c_out, c_in].
        let rows = d.batch * d.len;
        let c = GemmOut::F32 {
            c: out,
            accumulate: false,
            bias,
        };
        let xv = View::strided(rows, d.c_in, d.c_in);
        return gemm_bf16(c, x, xv, w, d.tap_weight(), None);
    }
    let need = conv1d_bf16_scratch_len(&d)?;
    if scratch.len() < need {
        return Err(Error::shape(
            OP,
            format!("scratch holds {} values, {need} needed", scratch.len()),
        ));
    }
    let (pad, k) = (d.width / 2, d.width * d.c_in);
    let (padded, taps) = scratch[..need].split_at_mut((d.len + d.width - 1) * d.c_in);
    tap_major(taps, w, &d);
    padded[..pad * d.c_in].fill(half::bf16::ZERO);
    padded[(pad + d.len) * d.c_in..].fill(half::bf16::ZERO);
    let (xs, outs) = (d.len * d.c_in, d.len * d.c_out);
    for b in 0..d.batch {
        let rows = &mut padded[pad * d.c_in..][..xs];
        match x {
            Lhs::F32(x) => super::simd::round_to_bf16(rows, &x[b * xs..][..xs]),
            Lhs::Bf16(x) => rows.copy_from_slice(&x[b * xs..][..xs]),
        }
        let c = GemmOut::F32 {
            c: &mut out[b * outs..][..outs],
            accumulate: false,
            bias,
        };
        // Row l starts at padded row l: the input rows l − pad .. l + pad, tap by tap.
        let im2col = View::strided(d.len, k, d.c_in);
        gemm_bf16(
            c,
            Lhs::Bf16(padded),
            im2col,
            taps,
            View::row_major(k, d.c_out, true),
            None,
        )?;
    }
    Ok(())
}

/// `taps[o·width·c_in + t·c_in + c] = w[(o·c_in + c)·width + t]`: each row of PyTorch's
/// `[c_out, c_in, width]` weight with its taps outermost, which is the `[width·c_in, c_out]` matrix of a
/// tap-major im2col product stored by columns. The GEMM packs contiguous columns 16×16 blocks of pairs at
/// a time, and each row here is reordered on its own, within one short span. (Reordered to
/// `[width·c_in, c_out]` rows instead, each value was a store to another row `2·c_out` bytes on, in few
/// L1 sets when that is a multiple of 1 KiB: 4% of a bf16 Enformer forward on Zen 5, against about 3% for
/// this reorder and its packing together.)
fn tap_major(taps: &mut [half::bf16], w: &[half::bf16], d: &Conv1dDims) {
    use rayon::prelude::*;
    let (c_in, width) = (d.c_in, d.width);
    let per_channel = c_in * width;
    if per_channel == 0 {
        return;
    }
    taps.par_chunks_mut(per_channel)
        .zip(w.par_chunks(per_channel))
        .for_each(|(out, row)| {
            for (t, run) in out.chunks_exact_mut(c_in).enumerate() {
                for (o, v) in run.iter_mut().zip(row[t..].iter().step_by(width)) {
                    *o = *v;
                }
            }
        });
}

/// The tap loop of a forward convolution: `out` starts as the bias (or zero), then
/// `tap(out_rows, out_view, x_rows, x_view, t)` adds tap `t`'s product for each batch entry.
fn conv1d_taps(
    out: &mut [f32],
    x: &[f32],
    bias: Option<&[f32]>,
    d: Conv1dDims,
    tap: impl Fn(&mut [f32], View, &[f32], View, usize) -> Result<()>,
) -> Result<()> {
    match bias {
        Some(b) => {
            check_len("conv1d", "bias", b.len(), d.c_out)?;
            out.chunks_mut(d.c_out.max(1))
                .for_each(|row| row.copy_from_slice(b));
        }
        None => out.iter_mut().for_each(|v| *v = 0.0),
    }
    for b in 0..d.batch {
        let (xb, ob) = (
            &x[b * d.len * d.c_in..(b + 1) * d.len * d.c_in],
            &mut out[b * d.len * d.c_out..(b + 1) * d.len * d.c_out],
        );
        for t in 0..d.width {
            let (l0, l1, src) = d.tap_rows(t);
            let rows = l1 - l0;
            tap(
                &mut ob[l0 * d.c_out..],
                View::strided(rows, d.c_out, d.c_out),
                &xb[src * d.c_in..],
                View::strided(rows, d.c_in, d.c_in),
                t,
            )?;
        }
    }
    Ok(())
}

/// Gradients of [`conv1d`], added into `dx`, `dw` and `dbias`.
pub fn conv1d_backward(
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    d: Conv1dDims,
) -> Result<()> {
    d.check("conv1d_backward", x.len(), w.len(), dout.len())?;
    if let Some(dx) = dx {
        check_len("conv1d_backward", "dx", dx.len(), x.len())?;
        for b in 0..d.batch {
            let (dxb, db) = (
                &mut dx[b * d.len * d.c_in..(b + 1) * d.len * d.c_in],
                &dout[b * d.len * d.c_out..(b + 1) * d.len * d.c_out],
            );
            for t in 0..d.width {
                let (l0, l1, src) = d.tap_rows(t);
                let rows = l1 - l0;
                gemm_views(
                    &mut dxb[src * d.c_in..],
                    View::strided(rows, d.c_in, d.c_in),
                    true,
                    &db[l0 * d.c_out..],
                    View::strided(rows, d.c_out, d.c_out),
                    &w[t..],
                    d.tap_weight().t(),
                    None,
                );
            }
        }
    }
    if let Some(dw) = dw {
        check_len("conv1d_backward", "dw", dw.len(), w.len())?;
        for b in 0..d.batch {
            let (xb, db) = (
                &x[b * d.len * d.c_in..(b + 1) * d.len * d.c_in],
                &dout[b * d.len * d.c_out..(b + 1) * d.len * d.c_out],
            );
            for t in 0..d.width {
                let (l0, l1, src) = d.tap_rows(t);
                let rows = l1 - l0;
                gemm_views(
                    &mut dw[t..],
                    d.tap_weight().t(),
                    true,
                    &db[l0 * d.c_out..],
                    View::strided(rows, d.c_out, d.c_out).t(),
                    &xb[src * d.c_in..],
                    View::strided(rows, d.c_in, d.c_in),
                    None,
                );
            }
        }
    }
    if let Some(dbias) = dbias {
        check_len("conv1d_backward", "dbias", dbias.len(), d.c_out)?;
        sum_rows_into(dbias, dout, d.c_out);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gemm_bf16::Lhs;
    use crate::testing::*;

    fn naive(x: &[f64], w: &[f64], bias: &[f64], d: Conv1dDims) -> Vec<f64> {
        let pad = (d.width / 2) as isize;
        let mut out = vec![0.0; d.batch * d.len * d.c_out];
        for b in 0..d.batch {
            for l in 0..d.len {
                for co in 0..d.c_out {
                    let mut s = bias[co];
                    for t in 0..d.width {
                        let src = l as isize + t as isize - pad;
                        if src < 0 || src >= d.len as isize {
                            continue;
                        }
                        for ci in 0..d.c_in {
                            s += x[(b * d.len + src as usize) * d.c_in + ci]
                                * w[(co * d.c_in + ci) * d.width + t];
                        }
                    }
                    out[(b * d.len + l) * d.c_out + co] = s;
                }
            }
        }
        out
    }

    #[test]
    fn conv1d_forward_and_backward() {
        let mut r = rng(71);
        for d in [
            Conv1dDims {
                batch: 2,
                len: 9,
                c_in: 3,
                c_out: 4,
                width: 5,
            },
            Conv1dDims {
                batch: 1,
                len: 3,
                c_in: 2,
                c_out: 3,
                width: 7,
            },
            Conv1dDims {
                batch: 2,
                len: 6,
                c_in: 5,
                c_out: 2,
                width: 1,
            },
        ] {
            let x = uniform(&mut r, d.batch * d.len * d.c_in, -1.0, 1.0);
            let w = uniform(&mut r, d.c_out * d.c_in * d.width, -1.0, 1.0);
            let b = uniform(&mut r, d.c_out, -1.0, 1.0);
            let mut out = vec![0.0; d.batch * d.len * d.c_out];
            conv1d(&mut out, &x, &w, Some(&b), d).unwrap();
            let nv = |v: &[Vec<f64>]| naive(&v[0], &v[1], &v[2], d);
            assert_close(
                &format!("conv1d {d:?}"),
                &out,
                &nv(&[to_f64(&x), to_f64(&w), to_f64(&b)]),
                1e-6,
            );
            // bf16 weights: the product of the bf16-rounded input and weights, accumulated in f32.
            let round = |v: &[f32]| -> Vec<half::bf16> {
                v.iter().map(|x| half::bf16::from_f32(*x)).collect()
            };
            let widen = |v: &[half::bf16]| -> Vec<f64> { v.iter().map(|x| x.to_f64()).collect() };
            let w16 = round(&w);
            let mut out16 = vec![f32::NAN; out.len()];
            let mut scratch = vec![half::bf16::ZERO; conv1d_bf16_scratch_len(&d).unwrap()];
            conv1d_bf16_weights(&mut out16, Lhs::F32(&x), &w16, Some(&b), d, &mut scratch).unwrap();
            assert_close(
                &format!("conv1d bf16 weights {d:?}"),
                &out16,
                &nv(&[widen(&round(&x)), widen(&w16), to_f64(&b)]),
                1e-6,
            );
            let dout = uniform(&mut r, out.len(), -1.0, 1.0);
            let (mut dx, mut dw, mut db) =
                (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; b.len()]);
            conv1d_backward(
                Some(&mut dx),
                Some(&mut dw),
                Some(&mut db),
                &dout,
                &x,
                &w,
                d,
            )
            .unwrap();
            check_gradients(
                &format!("conv1d {d:?}"),
                &[&x, &w, &b],
                &[Some(&dx), Some(&dw), Some(&db)],
                &dout,
                nv,
                1e-4,
            );
        }
    }

    /// The bf16 path at sizes where its GEMM reads the overlapping im2col rows in place (even `c_in`),
    /// across whole and ragged register strips, within one k-block and across two (k = 5 · 224 = 1,120),
    /// and at the stem's shape (4 channels, 15 taps, packed); against the f64 product of the rounded
    /// operands.
    #[test]
    fn conv1d_bf16_weights_one_gemm_matches_f64() {
        let mut r = rng(72);
        for d in [
            Conv1dDims {
                batch: 2,
                len: 40,
                c_in: 64,
                c_out: 48,
                width: 5,
            },
            Conv1dDims {
                batch: 1,
                len: 30,
                c_in: 224,
                c_out: 80,
                width: 5,
            },
            Conv1dDims {
                batch: 1,
                len: 50,
                c_in: 4,
                c_out: 24,
                width: 15,
            },
        ] {
            let x = uniform(&mut r, d.batch * d.len * d.c_in, -1.0, 1.0);
            let w: Vec<half::bf16> = uniform(&mut r, d.c_out * d.c_in * d.width, -1.0, 1.0)
                .into_iter()
                .map(half::bf16::from_f32)
                .collect();
            let b = uniform(&mut r, d.c_out, -1.0, 1.0);
            let x16: Vec<f64> = x
                .iter()
                .map(|v| half::bf16::from_f32(*v).to_f64())
                .collect();
            let w64: Vec<f64> = w.iter().map(|v| v.to_f64()).collect();
            let want = naive(&x16, &w64, &to_f64(&b), d);
            let mut out = vec![f32::NAN; want.len()];
            let need = conv1d_bf16_scratch_len(&d).unwrap();
            let mut scratch = vec![half::bf16::from_f32(7.0); need];
            conv1d_bf16_weights(&mut out, Lhs::F32(&x), &w, Some(&b), d, &mut scratch).unwrap();
            assert_close(&format!("conv1d bf16 {d:?}"), &out, &want, 1e-5);
            // A bf16 input holds the values an f32 one is rounded to: the same output, bit for bit.
            let x_bf16: Vec<half::bf16> = x.iter().map(|v| half::bf16::from_f32(*v)).collect();
            let mut from_bf16 = vec![f32::NAN; want.len()];
            let input = Lhs::Bf16(&x_bf16);
            conv1d_bf16_weights(&mut from_bf16, input, &w, Some(&b), d, &mut scratch).unwrap();
            assert!(
                from_bf16
                    .iter()
                    .zip(&out)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "bf16 input {d:?}"
            );
            let mut short = vec![half::bf16::ZERO; need - 1];
            let err = conv1d_bf16_weights(&mut out, Lhs::F32(&x), &w, Some(&b), d, &mut short);
            assert!(err.is_err(), "a short scratch must be refused");
        }
    }

    #[test]
    fn even_width_is_refused() {
        let d = Conv1dDims {
            batch: 1,
            len: 4,
            c_in: 1,
            c_out: 1,
            width: 2,
        };
        assert!(conv1d(&mut [0.0; 4], &[0.0; 4], &[0.0; 2], None, d).is_err());
    }
}
