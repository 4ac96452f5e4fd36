//! Enformer's attention pooling over windows of 2, channels-last `x [B, L, C]` → `out [B, ⌈L/2⌉, C]`:
//! `logits = x·Wᵀ` (`W [C, C]`, no bias), then per output channel `o` a softmax over the two positions of
//! each window, and `out[j, o] = Σ_p a[j, p, o]·x[2j+p, o]`. An odd length's last window has one real
//! position (the reference pads with a masked slot), so its output is that position's value.

use rayon::prelude::*;

use super::elementwise::fast_exp;
use super::matmul::{linear, linear_backward, LinearDims};
use crate::error::{check_len, checked_product};
use crate::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolDims {
    pub batch: usize,
    pub len: usize,
    pub channels: usize,
}

impl PoolDims {
    pub fn out_len(&self) -> usize {
        self.len.div_ceil(2)
    }

    fn linear(&self) -> LinearDims {
        LinearDims {
            rows: self.batch * self.len,
            d_in: self.channels,
            d_out: self.channels,
        }
    }

    fn check(&self, op: &'static str, x: usize, w: usize, out: usize, logits: usize) -> Result<()> {
        let (sx, sw, so) = self.checked_sizes(op)?;
        check_len(op, "x", x, sx)?;
        check_len(op, "weight", w, sw)?;
        check_len(op, "out", out, so)?;
        check_len(op, "logits", logits, x)
    }

    /// Elements of x (and the logits), the weight and the output, or an error when a product overflows.
    pub fn checked_sizes(&self, op: &'static str) -> Result<(usize, usize, usize)> {
        Ok((
            checked_product(op, &[self.batch, self.len, self.channels])?,
            checked_product(op, &[self.channels, self.channels])?,
            checked_product(op, &[self.batch, self.out_len(), self.channels])?,
        ))
    }
}

/// The two softmax weights of window position 0 and 1 (the second is 0 when the window has one position).
/// The exponentials are [`fast_exp`], so that the loops over channels vectorise: with libm's `expf` they
/// ran a call per value, 3% of an Enformer forward.
#[inline(always)]
fn window_weights(l0: f32, l1: Option<f32>) -> (f32, f32) {
    match l1 {
        None => (1.0, 0.0),
        Some(l1) => {
            let m = l0.max(l1);
            let (e0, e1) = (fast_exp(l0 - m), fast_exp(l1 - m));
            (e0 / (e0 + e1), e1 / (e0 + e1))
        }
    }
}

/// Forward; `logits [B, L, C]` is written and must be kept for the backward.
pub fn attention_pool(
    out: &mut [f32],
    logits: &mut [f32],
    x: &[f32],
    w: &[f32],
    d: PoolDims,
) -> Result<()> {
    d.check("attention_pool", x.len(), w.len(), out.len(), logits.len())?;
    linear(logits, x, w, None, d.linear())?;
    pool_windows(out, logits, x, d);
    Ok(())
}

/// [`attention_pool`] with bf16 weights: the logits on the bf16 GEMM (x rounded to bf16 as it is packed,
/// f32 accumulation), the pooling in f32. At Enformer's stem this product is as large as a convolution.
pub fn attention_pool_bf16_weights(
    out: &mut [f32],
    logits: &mut [f32],
    x: &[f32],
    w: &[half::bf16],
    d: PoolDims,
) -> Result<()> {
    use super::gemm_bf16::{GemmOut, Lhs};
    d.check("attention_pool", x.len(), w.len(), out.len(), logits.len())?;
    super::matmul::linear_bf16_weights(
        GemmOut::F32 {
            c: logits,
            accumulate: false,
            bias: None,
        },
        Lhs::F32(x),
        w,
        d.linear(),
    )?;
    pool_windows(out, logits, x, d);
    Ok(())
}

/// `out[b, j] = a0·x[b, 2j] + a1·x[b, 2j+1]` with the window weights of the logits.
fn pool_windows(out: &mut [f32], logits: &[f32], x: &[f32], d: PoolDims) {
    let (c, lo) = (d.channels, d.out_len());
    // Detected once per call, not per row.
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma");
    out.par_chunks_mut(c.max(1))
        .enumerate()
        .for_each(|(row, o)| {
            let (b, j) = (row / lo, row % lo);
            let p0 = (b * d.len + 2 * j) * c;
            let has_pair = 2 * j + 1 < d.len;
            let row = |p: usize| (&logits[p..p + c], &x[p..p + c]);
            let pair = has_pair.then(|| row(p0 + c));
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: the features were detected on this CPU.
                return unsafe { pool_row_avx512(o, row(p0), pair) };
            }
            pool_row(o, row(p0), pair)
        });
}

/// One output row of [`pool_windows`] from its window's first row `(logits, x)` and, if there is one, its
/// second; one loop per window shape, over zipped rows (no index checks), so that it vectorises.
#[inline(always)]
fn pool_row(o: &mut [f32], (l0, x0): (&[f32], &[f32]), pair: Option<(&[f32], &[f32])>) {
    match pair {
        Some((l1, x1)) => {
            for ((o, (l0, x0)), (l1, x1)) in
                o.iter_mut().zip(l0.iter().zip(x0)).zip(l1.iter().zip(x1))
            {
                let (a0, a1) = window_weights(*l0, Some(*l1));
                *o = a0 * x0 + a1 * x1;
            }
        }
        None => {
            for (o, (l0, x0)) in o.iter_mut().zip(l0.iter().zip(x0)) {
                let (a0, _) = window_weights(*l0, None);
                // `+ 0.0` as the two-position sum has it (a −0 product comes out +0 either way).
                *o = a0 * x0 + 0.0;
            }
        }
    }
}

/// [`pool_row`] compiled for AVX-512 (a closure through `simd::dispatch` was not inlined into its
/// feature-enabled frame, and ran as 4-wide SSE).
///
/// # Safety
/// AVX-512F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn pool_row_avx512(o: &mut [f32], first: (&[f32], &[f32]), pair: Option<(&[f32], &[f32])>) {
    pool_row(o, first, pair)
}

/// Gradients, added into `dx` and `dw`. `dlogits` is scratch of the logits' size.
pub fn attention_pool_backward(
    dx: &mut [f32],
    dw: &mut [f32],
    dlogits: &mut [f32],
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    logits: &[f32],
    d: PoolDims,
) -> Result<()> {
    d.check(
        "attention_pool_backward",
        x.len(),
        w.len(),
        dout.len(),
        logits.len(),
    )?;
    check_len("attention_pool_backward", "dx", dx.len(), x.len())?;
    check_len("attention_pool_backward", "dlogits", dlogits.len(), x.len())?;
    let c = d.channels;
    if c == 0 || d.len == 0 {
        return Ok(());
    }
    // Detected once per call, not per window.
    #[cfg(target_arch = "x86_64")]
    let avx512 = std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma");
    // Each output row owns the (one or two) input rows of its window: disjoint chunks of dx and dlogits,
    // in parallel over batches and, within one, over windows (a batch of one is the Enformer step's case).
    let (per_batch, window) = (d.len * c, 2 * c);
    dx.par_chunks_mut(per_batch)
        .zip(dlogits.par_chunks_mut(per_batch))
        .enumerate()
        .for_each(|(b, (dxb, dlb))| {
            dxb.par_chunks_mut(window)
                .zip(dlb.par_chunks_mut(window))
                .enumerate()
                .for_each(|(j, (dxw, dlw))| {
                    let p0 = (b * d.len + 2 * j) * c;
                    let rows = dxw.len();
                    let g = &dout[(b * d.out_len() + j) * c..][..c];
                    let (l, xw) = (&logits[p0..p0 + rows], &x[p0..p0 + rows]);
                    #[cfg(target_arch = "x86_64")]
                    if avx512 {
                        // SAFETY: the features were detected on this CPU.
                        return unsafe { window_backward_avx512(dxw, dlw, g, l, xw) };
                    }
                    window_backward(dxw, dlw, g, l, xw)
                });
        });
    linear_backward(Some(dx), Some(dw), None, dlogits, x, w, d.linear())
}

/// One window of [`attention_pool_backward`]: `dx += g·a_p` for its rows and `dlogits_p = g·a_p·(x_p − out)`
/// (zero for a window of one row, whose weight is constant). `dxw`, `dlw`, `l` and `xw` hold the window's one
/// or two rows of `g.len()` channels.
#[inline(always)]
fn window_backward(dxw: &mut [f32], dlw: &mut [f32], g: &[f32], l: &[f32], xw: &[f32]) {
    let c = g.len();
    if dxw.len() < 2 * c {
        for ((dx, dl), (g, l)) in dxw.iter_mut().zip(dlw.iter_mut()).zip(g.iter().zip(l)) {
            let (a0, _) = window_weights(*l, None);
            *dx += g * a0;
            *dl = 0.0;
        }
        return;
    }
    let ((dx0, dx1), (dl0, dl1)) = (dxw.split_at_mut(c), dlw.split_at_mut(c));
    let ((l0, l1), (x0, x1)) = (l.split_at(c), xw.split_at(c));
    let (dx1, dl1, l1, x1) = (&mut dx1[..c], &mut dl1[..c], &l1[..c], &x1[..c]);
    for i in 0..c {
        let (a0, a1) = window_weights(l0[i], Some(l1[i]));
        dx0[i] += g[i] * a0;
        dx1[i] += g[i] * a1;
        // d out / d logit_p = a_p (x_p − out)
        let y = a0 * x0[i] + a1 * x1[i];
        dl0[i] = g[i] * a0 * (x0[i] - y);
        dl1[i] = g[i] * a1 * (x1[i] - y);
    }
}

/// [`window_backward`] compiled for AVX-512, as [`pool_row_avx512`].
///
/// # Safety
/// AVX-512F and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn window_backward_avx512(
    dxw: &mut [f32],
    dlw: &mut [f32],
    g: &[f32],
    l: &[f32],
    xw: &[f32],
) {
    window_backward(dxw, dlw, g, l, xw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    fn naive(x: &[f64], w: &[f64], d: PoolDims) -> Vec<f64> {
        let c = d.channels;
        let mut out = Vec::new();
        for b in 0..d.batch {
            for j in 0..d.out_len() {
                for o in 0..c {
                    let pos: Vec<usize> = (2 * j..(2 * j + 2).min(d.len)).collect();
                    let logit = |p: usize| {
                        (0..c)
                            .map(|i| w[o * c + i] * x[(b * d.len + p) * c + i])
                            .sum::<f64>()
                    };
                    let ls: Vec<f64> = pos.iter().map(|&p| logit(p)).collect();
                    let m = ls.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = ls.iter().map(|l| (l - m).exp()).sum();
                    out.push(
                        pos.iter()
                            .zip(&ls)
                            .map(|(&p, l)| (l - m).exp() / z * x[(b * d.len + p) * c + o])
                            .sum(),
                    );
                }
            }
        }
        out
    }

    #[test]
    fn attention_pool_even_and_odd_lengths() {
        let mut r = rng(81);
        for d in [
            PoolDims {
                batch: 2,
                len: 6,
                channels: 3,
            },
            PoolDims {
                batch: 2,
                len: 7,
                channels: 4,
            },
        ] {
            let x = uniform(&mut r, d.batch * d.len * d.channels, -1.0, 1.0);
            // Enformer initialises W as 2·I; perturb it so every entry matters.
            let mut w = uniform(&mut r, d.channels * d.channels, -0.5, 0.5);
            (0..d.channels).for_each(|i| w[i * d.channels + i] += 2.0);
            let (mut out, mut logits) = (
                vec![0.0; d.batch * d.out_len() * d.channels],
                vec![0.0; x.len()],
            );
            attention_pool(&mut out, &mut logits, &x, &w, d).unwrap();
            let nv = |v: &[Vec<f64>]| naive(&v[0], &v[1], d);
            assert_close(
                &format!("attention_pool {d:?}"),
                &out,
                &nv(&[to_f64(&x), to_f64(&w)]),
                1e-6,
            );
            let dout = uniform(&mut r, out.len(), -1.0, 1.0);
            let (mut dx, mut dw, mut scratch) =
                (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; x.len()]);
            attention_pool_backward(&mut dx, &mut dw, &mut scratch, &dout, &x, &w, &logits, d)
                .unwrap();
            check_gradients(
                &format!("attention_pool {d:?}"),
                &[&x, &w],
                &[Some(&dx), Some(&dw)],
                &dout,
                nv,
                1e-4,
            );
        }
    }
}
