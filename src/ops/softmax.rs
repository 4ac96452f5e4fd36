//! Row softmax, numerically stable (max subtracted); a row of all −∞ gives zeros rather than NaN.

use rayon::prelude::*;

use super::rows_per_task;
use crate::error::check_len;
use crate::ops::matmul::require_positive;
use crate::Result;

/// Softmax of one row in place; returns its log-sum-exp (−∞ for a fully masked row).
pub(crate) fn softmax_row_in_place(row: &mut [f32]) -> f32 {
    super::simd::dispatch(
        #[inline(always)]
        || softmax_row(row),
    )
}

#[inline(always)]
fn softmax_row(row: &mut [f32]) -> f32 {
    let (max, sum) = exp_row(row);
    if max == f32::NEG_INFINITY {
        return f32::NEG_INFINITY;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
    max + sum.ln()
}

/// The unnormalised softmax of a row in place, `row[i] = exp(row[i] − max)`, in one pass; returns
/// `(max, Σ row)` (`(−∞, 0)` and a zero row when every entry is −∞). Attention divides its output rows by
/// the sum instead of every probability.
pub(crate) fn exp_row_in_place(row: &mut [f32]) -> (f32, f32) {
    super::simd::dispatch(
        #[inline(always)]
        || exp_row(row),
    )
}

#[inline(always)]
fn exp_row(row: &mut [f32]) -> (f32, f32) {
    let max = super::simd::max(row);
    if max == f32::NEG_INFINITY {
        row.iter_mut().for_each(|v| *v = 0.0);
        return (max, 0.0);
    }
    (max, exp_shifted_sum(row, max))
}

/// `row[i] = exp(row[i] − max)`, returning the sum (lane-wise partial sums, so the loop vectorises).
#[inline(always)]
fn exp_shifted_sum(row: &mut [f32], max: f32) -> f32 {
    const L: usize = 16;
    let mut acc = [0.0f32; L];
    let split = row.len() - row.len() % L;
    let (body, tail) = row.split_at_mut(split);
    for c in body.chunks_exact_mut(L) {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = crate::ops::elementwise::fast_exp(*v - max);
            *a += *v;
        }
    }
    let mut tail_sum = 0.0;
    for v in tail {
        *v = crate::ops::elementwise::fast_exp(*v - max);
        tail_sum += *v;
    }
    super::simd::sum(&acc) + tail_sum
}

/// `out[r, :] = softmax(x[r, :])` over rows of `dim`.
pub fn softmax(out: &mut [f32], x: &[f32], dim: usize) -> Result<()> {
    require_positive("softmax", "dim", dim)?;
    check_len("softmax", "x (whole rows)", x.len() % dim, 0)?;
    check_len("softmax", "out", out.len(), x.len())?;
    let step = rows_per_task(dim) * dim;
    out.par_chunks_mut(step)
        .zip(x.par_chunks(step))
        .for_each(|(o, x)| {
            o.copy_from_slice(x);
            o.chunks_mut(dim).for_each(|row| {
                softmax_row_in_place(row);
            });
        });
    Ok(())
}

/// `dx += y ∘ (dy − Σ dy∘y)` per row, from the saved output `y`.
pub fn softmax_backward(dx: &mut [f32], dy: &[f32], y: &[f32], dim: usize) -> Result<()> {
    require_positive("softmax_backward", "dim", dim)?;
    check_len("softmax_backward", "y (whole rows)", y.len() % dim, 0)?;
    check_len("softmax_backward", "dy", dy.len(), y.len())?;
    check_len("softmax_backward", "dx", dx.len(), y.len())?;
    let step = rows_per_task(dim) * dim;
    dx.par_chunks_mut(step)
        .zip(dy.par_chunks(step))
        .zip(y.par_chunks(step))
        .for_each(|((dx, dy), y)| {
            for ((dx, dy), y) in dx.chunks_mut(dim).zip(dy.chunks(dim)).zip(y.chunks(dim)) {
                let dot: f32 = dy.iter().zip(y).map(|(a, b)| a * b).sum();
                for ((dx, dy), y) in dx.iter_mut().zip(dy).zip(y) {
                    *dx += y * (dy - dot);
                }
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    fn naive(x: &[f64], dim: usize) -> Vec<f64> {
        x.chunks(dim)
            .flat_map(|row| {
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = row.iter().map(|v| (v - m).exp()).sum();
                row.iter()
                    .map(move |v| (v - m).exp() / s)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn softmax_forward_and_backward() {
        let mut r = rng(21);
        let dim = 13;
        let x = uniform(&mut r, 7 * dim, -30.0, 30.0);
        let mut y = vec![0.0; x.len()];
        softmax(&mut y, &x, dim).unwrap();
        assert_close("softmax", &y, &naive(&to_f64(&x), dim), 1e-6);
        let dy = uniform(&mut r, x.len(), -1.0, 1.0);
        let mut dx = vec![0.0; x.len()];
        softmax_backward(&mut dx, &dy, &y, dim).unwrap();
        let x_small: Vec<f32> = x.iter().map(|v| v / 10.0).collect();
        let mut y_small = vec![0.0; x.len()];
        softmax(&mut y_small, &x_small, dim).unwrap();
        let mut dx_small = vec![0.0; x.len()];
        softmax_backward(&mut dx_small, &dy, &y_small, dim).unwrap();
        check_gradients(
            "softmax",
            &[&x_small],
            &[Some(&dx_small)],
            &dy,
            |v| naive(&v[0], dim),
            1e-4,
        );
    }

    #[test]
    fn fully_masked_row_is_zero_not_nan() {
        let mut row = [f32::NEG_INFINITY; 4];
        assert_eq!(softmax_row_in_place(&mut row), f32::NEG_INFINITY);
        assert_eq!(row, [0.0; 4]);
        let mut row = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
        softmax_row_in_place(&mut row);
        assert_eq!(row, [0.0, 1.0, 0.0]);
    }
}
