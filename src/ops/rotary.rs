//! Rotary position embedding, split-half (GPT-NeoX) convention as in ESM-2 and NT-v2: with `h = d/2`,
//! `inv_freq[j] = base^(−2j/d)`, `θ[p, j] = θ[p, j+h] = p·inv_freq[j]`, and
//! `x' = x·cos θ + rotate_half(x)·sin θ`, `rotate_half(x) = [−x[h..], x[..h]]`. Positions start at 0 for the
//! first token of every sequence. Layout `[batch, len, heads, head_dim]`.

use rayon::prelude::*;

use super::simd::dispatch;
use crate::error::check_len;
use crate::{Error, Result};

/// cos/sin of the angles, `[max_len, head_dim/2]`, computed as the references do (f32 angles).
#[derive(Clone, Debug)]
pub struct RotaryTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    max_len: usize,
}

impl RotaryTable {
    pub fn new(max_len: usize, head_dim: usize, base: f32) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::invalid(
                "rotary head_dim",
                format!("{head_dim} (must be even and positive)"),
            ));
        }
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|j| 1.0 / base.powf((2 * j) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for p in 0..max_len {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(RotaryTable {
            cos,
            sin,
            half,
            max_len,
        })
    }

    /// cos of the angles, `[max_len, head_dim/2]` (what the GPU kernels read).
    pub fn cos(&self) -> &[f32] {
        &self.cos
    }

    pub fn sin(&self) -> &[f32] {
        &self.sin
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn head_dim(&self) -> usize {
        2 * self.half
    }

    fn check(&self, op: &'static str, n: usize, len: usize, heads: usize) -> Result<()> {
        if len > self.max_len {
            return Err(Error::invalid(
                "rotary length",
                format!("{len} exceeds the table's {}", self.max_len),
            ));
        }
        let row = heads * self.head_dim();
        if row == 0 || !n.is_multiple_of(len.max(1) * row) {
            return Err(Error::shape(
                op,
                format!(
                    "{n} elements is not a whole [batch, {len}, {heads}, {}]",
                    self.head_dim()
                ),
            ));
        }
        Ok(())
    }

    fn rotate(
        &self,
        out: &mut [f32],
        x: &[f32],
        len: usize,
        heads: usize,
        sign: f32,
        accumulate: bool,
    ) {
        rotate(
            &self.cos, &self.sin, self.half, out, x, len, heads, sign, accumulate,
        )
    }
}

/// Rotates every head vector of `x [.., len, heads, 2·half]` by its position's angles from the
/// `[max_len, half]` tables (`sign` = −1 rotates backwards, which is the transpose, hence the backward).
fn rotate(
    cos: &[f32],
    sin: &[f32],
    h: usize,
    out: &mut [f32],
    x: &[f32],
    len: usize,
    heads: usize,
    sign: f32,
    accumulate: bool,
) {
    let (d, row_len) = (2 * h, heads * 2 * h);
    let rows_per_task = super::rows_per_task(row_len);
    out.par_chunks_mut(rows_per_task * row_len)
        .zip(x.par_chunks(rows_per_task * row_len))
        .enumerate()
        .for_each(|(task, (o, x))| {
            // `accumulate` is loop-invariant, and the compiler unswitches it.
            dispatch(
                #[inline(always)]
                || {
                    for (r, (o, x)) in o.chunks_mut(row_len).zip(x.chunks(row_len)).enumerate() {
                        let p = (task * rows_per_task + r) % len;
                        let (cos, sin) = (&cos[p * h..(p + 1) * h], &sin[p * h..(p + 1) * h]);
                        for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                            rotate_vector(o, x, (cos, sin), sign, accumulate);
                        }
                    }
                },
            )
        });
}

/// One head vector `x [2·half]` rotated by one position's angles (`cos`, `sin`: `half` each) into `o`, or
/// added into it with `accumulate`; `sign` −1 rotates backwards. The one place the rotation's arithmetic
/// is written: the rotary op and the bf16 attention, which rotates queries and keys as it packs them
/// ([`crate::ops::attention::AttentionRope`]), give the same bits. Whole-slice loops, so that it
/// vectorises inlined into a caller compiled for AVX-512 (the indexed form, with bounds checks, stayed
/// scalar: 5% of a bf16 ESM-2 profile).
#[inline(always)]
pub(crate) fn rotate_vector(
    o: &mut [f32],
    x: &[f32],
    (cos, sin): (&[f32], &[f32]),
    sign: f32,
    accumulate: bool,
) {
    let h = cos.len();
    let (o_lo, o_hi) = o.split_at_mut(h);
    let (x_lo, x_hi) = x.split_at(h);
    let pairs = o_lo.iter_mut().zip(o_hi.iter_mut());
    let terms = x_lo.iter().zip(x_hi).zip(cos.iter().zip(sin));
    for ((lo, hi), ((&a, &b), (&c, &sn))) in pairs.zip(terms) {
        let s = sign * sn;
        let (ra, rb) = (a * c - b * s, b * c + a * s);
        if accumulate {
            *lo += ra;
            *hi += rb;
        } else {
            *lo = ra;
            *hi = rb;
        }
    }
}

/// Rotary with explicit `[≥len, head_dim/2]` cos/sin tables (what the backends hold): `out = rope(x)`, or
/// with `backward`, `out += ropeᵀ(x)`.
pub fn rotary_with_tables(
    out: &mut [f32],
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    len: usize,
    heads: usize,
    head_dim: usize,
    backward: bool,
) -> Result<()> {
    let op = if backward {
        "rotary_backward"
    } else {
        "rotary"
    };
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(Error::invalid(
            op,
            format!("head_dim {head_dim} must be even and positive"),
        ));
    }
    let half = head_dim / 2;
    if cos.len() < len * half || sin.len() != cos.len() {
        return Err(Error::shape(
            op,
            format!("cos/sin tables shorter than {len} positions"),
        ));
    }
    let row = heads * head_dim;
    if row == 0 || len == 0 || !x.len().is_multiple_of(len * row) {
        return Err(Error::shape(
            op,
            format!(
                "{} elements is not a whole [batch, {len}, {heads}, {head_dim}]",
                x.len()
            ),
        ));
    }
    check_len(op, "out", out.len(), x.len())?;
    let sign = if backward { -1.0 } else { 1.0 };
    rotate(cos, sin, half, out, x, len, heads, sign, backward);
    Ok(())
}

/// `out = rope(x)` for `x [batch, len, heads, head_dim]`.
pub fn rotary(
    out: &mut [f32],
    x: &[f32],
    table: &RotaryTable,
    len: usize,
    heads: usize,
) -> Result<()> {
    table.check("rotary", x.len(), len, heads)?;
    check_len("rotary", "out", out.len(), x.len())?;
    table.rotate(out, x, len, heads, 1.0, false);
    Ok(())
}

/// `dx += ropeᵀ(dout)`.
pub fn rotary_backward(
    dx: &mut [f32],
    dout: &[f32],
    table: &RotaryTable,
    len: usize,
    heads: usize,
) -> Result<()> {
    table.check("rotary_backward", dout.len(), len, heads)?;
    check_len("rotary_backward", "dx", dx.len(), dout.len())?;
    table.rotate(dx, dout, len, heads, -1.0, true);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    /// Direct transcription of the reference: theta = cat(p·inv_freq, p·inv_freq); x·cos + rotate_half(x)·sin.
    fn naive(x: &[f64], len: usize, heads: usize, d: usize) -> Vec<f64> {
        let inv: Vec<f64> = (0..d / 2)
            .map(|j| 1.0 / 10000f64.powf(2.0 * j as f64 / d as f64))
            .collect();
        let mut out = vec![0.0; x.len()];
        for (v, chunk) in x.chunks(d).enumerate() {
            let p = (v / heads) % len;
            let theta: Vec<f64> = inv.iter().chain(inv.iter()).map(|f| p as f64 * f).collect();
            let rot: Vec<f64> = chunk[d / 2..]
                .iter()
                .map(|v| -v)
                .chain(chunk[..d / 2].iter().cloned())
                .collect();
            for j in 0..d {
                out[v * d + j] = chunk[j] * theta[j].cos() + rot[j] * theta[j].sin();
            }
        }
        out
    }

    #[test]
    fn rotary_forward_and_backward() {
        let mut r = rng(31);
        let (batch, len, heads, d) = (2, 9, 3, 8);
        let table = RotaryTable::new(16, d, 10000.0).unwrap();
        let x = uniform(&mut r, batch * len * heads * d, -1.0, 1.0);
        let mut out = vec![0.0; x.len()];
        rotary(&mut out, &x, &table, len, heads).unwrap();
        assert_close("rotary", &out, &naive(&to_f64(&x), len, heads, d), 1e-6);
        let dout = uniform(&mut r, x.len(), -1.0, 1.0);
        let mut dx = vec![0.0; x.len()];
        rotary_backward(&mut dx, &dout, &table, len, heads).unwrap();
        check_gradients(
            "rotary",
            &[&x],
            &[Some(&dx)],
            &dout,
            |v| naive(&v[0], len, heads, d),
            1e-4,
        );
        assert!(rotary(&mut out, &x, &table, 17, heads).is_err());
        assert!(RotaryTable::new(4, 7, 10000.0).is_err());
    }
}
