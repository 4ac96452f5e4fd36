//! Elementwise ops: residual add, GELU (exact erf and Enformer's sigmoid approximation), ReLU, SwiGLU
//! (NT-v2's gated FFN) and softplus (Enformer's heads).

use rayon::prelude::*;

use super::output::OutElem;
use super::simd::dispatch;
use crate::error::check_len;
use crate::Result;

const CHUNK: usize = 8 * 1024;

/// `out = a + b`.
pub fn add(out: &mut [f32], a: &[f32], b: &[f32]) -> Result<()> {
    check_len("add", "a", a.len(), out.len())?;
    check_len("add", "b", b.len(), out.len())?;
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .zip(b.par_chunks(CHUNK))
        .for_each(|((o, a), b)| {
            for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        });
    Ok(())
}

/// `acc += x`: the backward of [`add`] for each operand, and of every residual connection.
pub fn accumulate(acc: &mut [f32], x: &[f32]) -> Result<()> {
    check_len("accumulate", "x", x.len(), acc.len())?;
    acc.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(acc, x)| {
            for (a, x) in acc.iter_mut().zip(x) {
                *a += x;
            }
        });
    Ok(())
}

/// A pointwise activation: its value and its derivative.
pub trait Activation: Sync {
    const NAME: &'static str;
    fn f(x: f32) -> f32;
    fn df(x: f32) -> f32;

    /// `out[i] = f(x[i])` over one chunk (equal lengths): [`Self::f`] element by element, vectorised by
    /// the compiler. An activation may run an explicit vector kernel instead.
    fn f_chunk(out: &mut [f32], x: &[f32]) {
        f_elementwise::<Self>(out, x)
    }
}

/// [`Activation::f`] element by element, compiled for the CPU's vector extension.
fn f_elementwise<A: Activation + ?Sized>(out: &mut [f32], x: &[f32]) {
    dispatch(
        #[inline(always)]
        || {
            for (o, &x) in out.iter_mut().zip(x) {
                *o = A::f(x);
            }
        },
    );
}

/// `out[i] = A(x[i])`, written as f32 or rounded once to bf16 ([`OutElem`]).
pub fn activation<A: Activation, O: OutElem>(out: &mut [O], x: &[f32]) -> Result<()> {
    check_len(A::NAME, "x", x.len(), out.len())?;
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| O::fill(o, |values, at| A::f_chunk(values, &x[at..])));
    Ok(())
}

/// An activation's body over a run of f32 values: `out[i] = f(x[i])` for the common length
/// ([`Activation::f_chunk`]).
pub type ActChunk = fn(&mut [f32], &[f32]);

/// Columns a run of [`bias_activation`] handles at once: its biased values stay in L1.
const RUN: usize = 256;

/// A linear layer's bias and activation after its product, one pass over rows of `bias.len()` values
/// (an f32 GEMM gives no epilogue, and filling its output with the bias first cost a pass of its own):
/// - with `pre` (a training forward keeps it): `pre[r] += bias`, then `out[r] = act(pre[r])`;
/// - without: `out[r] = act(out[r] + bias)` in place (inference: the product was written to `out`).
///
/// `act` is the activation op's own vector body, so `out` is what the activation op gives on the biased
/// values.
pub fn bias_activation(
    out: &mut [f32],
    pre: Option<&mut [f32]>,
    bias: &[f32],
    act: ActChunk,
) -> Result<()> {
    let width = bias.len();
    if width == 0 {
        return check_len("bias_activation", "out", out.len(), 0);
    }
    check_len("bias_activation", "out (whole rows)", out.len() % width, 0)?;
    // Rows per task: about CHUNK values, at least one row.
    let rows = (CHUNK / width).max(1);
    let add_bias = |dst: &mut [f32], src: &[f32], bias: &[f32]| {
        dispatch(
            #[inline(always)]
            || {
                for ((d, &s), &b) in dst.iter_mut().zip(src).zip(bias) {
                    *d = s + b;
                }
            },
        )
    };
    match pre {
        Some(pre) => {
            check_len("bias_activation", "pre", pre.len(), out.len())?;
            out.par_chunks_mut(rows * width)
                .zip(pre.par_chunks_mut(rows * width))
                .for_each(|(out, pre)| {
                    for (out, pre) in out.chunks_mut(width).zip(pre.chunks_mut(width)) {
                        dispatch(
                            #[inline(always)]
                            || pre.iter_mut().zip(bias).for_each(|(p, &b)| *p += b),
                        );
                        act(out, pre);
                    }
                });
        }
        None => out.par_chunks_mut(rows * width).for_each(|out| {
            let mut biased = [0.0f32; RUN];
            for row in out.chunks_mut(width) {
                for (run, bias) in row.chunks_mut(RUN).zip(bias.chunks(RUN)) {
                    let biased = &mut biased[..run.len()];
                    add_bias(biased, run, bias);
                    act(run, biased);
                }
            }
        }),
    }
    Ok(())
}

/// `dx[i] += dout[i] · A'(x[i])`.
pub fn activation_backward<A: Activation>(dx: &mut [f32], dout: &[f32], x: &[f32]) -> Result<()> {
    check_len(A::NAME, "x", x.len(), dx.len())?;
    check_len(A::NAME, "dout", dout.len(), dx.len())?;
    dx.par_chunks_mut(CHUNK)
        .zip(dout.par_chunks(CHUNK))
        .zip(x.par_chunks(CHUNK))
        .for_each(|((dx, d), x)| {
            dispatch(
                #[inline(always)]
                || {
                    for ((dx, &d), &x) in dx.iter_mut().zip(d).zip(x) {
                        *dx += d * A::df(x);
                    }
                },
            );
        });
    Ok(())
}

/// `eˣ` in f32 without a libm call, so loops over it vectorise: `2ⁿ·p(r)` with `x = n·ln2 + r`,
/// |r| ≤ ln2/2, and a degree-7 Taylor polynomial (truncation error below 6e-9 relative, under half an ulp).
/// Inputs below −87.3 give 0; above 88.7, +∞.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.7);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n sits in the low mantissa bits of t (|n| ≤ 128 ≪ 2²²): reading it from there avoids the saturating
    // float-to-int conversion, which costs several extra vector instructions.
    let n_int = t.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_int.wrapping_add(127) << 23);
    let y = p * scale;
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else {
        y
    }
}

/// The coefficients of `P(t)` in [`erf`]'s fit, highest power first (Numerical Recipes' `erfcc`).
const ERF_FIT: [f32; 10] = [
    0.170_872_77,
    -0.822_152_2,
    1.488_515_9,
    -1.135_204,
    0.278_868_07,
    -0.186_288_06,
    0.096_784_18,
    0.374_091_96,
    1.000_023_7,
    -1.265_512_2,
];

/// The error function in f32: `1 − t·exp(−x² + P(t))`, `t = 1/(1 + |x|/2)` (Numerical Recipes' Chebyshev
/// fit, fractional error below 1.2e-7), with the sign of x. Branch-free, so it vectorises.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let ax = x.abs();
    let t = 1.0 / (1.0 + 0.5 * ax);
    let poly = ERF_FIT[1..].iter().fold(ERF_FIT[0], |p, &c| p * t + c);
    (1.0 - t * fast_exp(-ax * ax + poly)).copysign(x)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-x))
}

/// `x · Φ(x)` with the exact normal CDF (ESM-2, NT-v2, PyTorch's default `F.gelu`).
pub struct GeluErf;

impl Activation for GeluErf {
    const NAME: &'static str = "gelu";
    #[inline(always)]
    fn f(x: f32) -> f32 {
        0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
    }

    #[inline(always)]
    fn df(x: f32) -> f32 {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
            + x * INV_SQRT_2PI * (-0.5 * x * x).exp()
    }

    fn f_chunk(out: &mut [f32], x: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if gelu_erf_avx512::available() {
            // SAFETY: the features were detected on this CPU (`chunk` maps the common length, as
            // `zip` does).
            return unsafe { gelu_erf_avx512::chunk(out, x) };
        }
        f_elementwise::<Self>(out, x)
    }
}

/// [`GeluErf`] on AVX-512, 16 values a step: the same erf fit as [`erf`], with `vrcp14ps` and one Newton
/// step for `1 / (1 + |z|/2)` and [`crate::ops::simd::exp2_16`] for the exponential. Below zero it forms
/// `1 + erf(z)` as the fit's tail `t·e^(…)` itself, where `1 + erf` in f32 cancels (the scalar form is 8%
/// off at x = −5.5, this within 3.4e-6 relative). Measured on 4,096 × 1,920 values (ESM-2 35M's FFN), 2
/// threads: 5.0–5.6 ms, against 9.4–11.7 ms for the scalar form vectorised by the compiler, whose
/// integer exponent assembly and division take most of its instructions.
#[cfg(target_arch = "x86_64")]
mod gelu_erf_avx512 {
    use std::arch::x86_64::*;

    use super::ERF_FIT;
    use crate::ops::simd::exp2_16xn;

    pub(super) fn available() -> bool {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma")
    }

    /// `out[i] = gelu(x[i])` for the common length of both.
    ///
    /// # Safety
    /// AVX-512F and FMA.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn chunk(out: &mut [f32], x: &[f32]) {
        let len = out.len().min(x.len());
        let (out, x) = (&mut out[..len], &x[..len]);
        // Eight vectors a step, interleaved ([`gelu16xn`]): one vector's chain of about 35 dependent
        // operations is longer than the out-of-order window covers. On 256 values in cache (a fused GEMM
        // epilogue's run), Zen 5: 29 cycles a vector as four separate calls a step, 16 interleaved.
        const STEP: usize = 8 * 16;
        let whole = x.len() / STEP * STEP;
        let (out_n, out_rest) = out.split_at_mut(whole);
        let (x_n, x_rest) = x.split_at(whole);
        for (o, x) in out_n.chunks_exact_mut(STEP).zip(x_n.chunks_exact(STEP)) {
            // SAFETY: STEP values in both slices.
            unsafe {
                let v: [__m512; 8] =
                    std::array::from_fn(|i| _mm512_loadu_ps(x.as_ptr().add(16 * i)));
                for (i, g) in gelu16xn(v).iter().enumerate() {
                    _mm512_storeu_ps(o.as_mut_ptr().add(16 * i), *g);
                }
            }
        }
        for (o, x) in out_rest.chunks_mut(16).zip(x_rest.chunks(16)) {
            let lanes: __mmask16 = ((1u32 << x.len()) - 1) as __mmask16;
            // SAFETY: the mask covers the chunk's `x.len() ≤ 16` values, in both slices.
            unsafe {
                let v = _mm512_maskz_loadu_ps(lanes, x.as_ptr());
                _mm512_mask_storeu_ps(o.as_mut_ptr(), lanes, gelu16(v));
            }
        }
    }

    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    fn gelu16(x: __m512) -> __m512 {
        gelu16xn([x])[0]
    }

    /// [`gelu16`] of `N` vectors, each step applied to all of them before the next (independent chains
    /// interleaved in program order; the same operations, so the same bits, as `N` calls).
    #[target_feature(enable = "avx512f,fma")]
    #[inline]
    fn gelu16xn<const N: usize>(x: [__m512; N]) -> [__m512; N] {
        let s = _mm512_set1_ps;
        let z = x.map(|x| _mm512_mul_ps(x, s(std::f32::consts::FRAC_1_SQRT_2)));
        // Past 10, erf is ±1 in f32 and the tail 0; the bound keeps the reciprocal finite. (`min` turns
        // a NaN into 10; the final product with x gives NaN back.)
        let az = z.map(|z| _mm512_min_ps(_mm512_abs_ps(z), s(10.0)));
        let d = az.map(|az| _mm512_fmadd_ps(az, s(0.5), s(1.0)));
        let r = d.map(|d| _mm512_rcp14_ps(d));
        let t: [__m512; N] = std::array::from_fn(|i| {
            _mm512_fmadd_ps(r[i], _mm512_fnmadd_ps(d[i], r[i], s(1.0)), r[i])
        });
        let mut poly = [s(ERF_FIT[0]); N];
        for c in &ERF_FIT[1..] {
            for (p, t) in poly.iter_mut().zip(&t) {
                *p = _mm512_fmadd_ps(*p, *t, s(*c));
            }
        }
        // 1 − erf(|z|) = t·e^(−z² + poly).
        let exponent: [__m512; N] = std::array::from_fn(|i| {
            _mm512_mul_ps(
                _mm512_fnmadd_ps(az[i], az[i], poly[i]),
                s(std::f32::consts::LOG2_E),
            )
        });
        // SAFETY: AVX-512F and FMA, this function's features.
        let e = unsafe { exp2_16xn(exponent) };
        std::array::from_fn(|i| {
            let tail = _mm512_mul_ps(t[i], e[i]);
            // 1 + erf(z): 2 − tail above zero, the tail itself below.
            let positive = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(z[i], _mm512_setzero_ps());
            let one_plus_erf = _mm512_mask_sub_ps(tail, positive, s(2.0), tail);
            _mm512_mul_ps(_mm512_mul_ps(s(0.5), x[i]), one_plus_erf)
        })
    }
}

/// `x · σ(1.702 x)`, Enformer's GELU.
pub struct GeluSigmoid;

impl Activation for GeluSigmoid {
    const NAME: &'static str = "gelu_sigmoid";
    #[inline(always)]
    fn f(x: f32) -> f32 {
        x * sigmoid(1.702 * x)
    }
    #[inline(always)]
    fn df(x: f32) -> f32 {
        let s = sigmoid(1.702 * x);
        s + 1.702 * x * s * (1.0 - s)
    }
}

pub struct Relu;

impl Activation for Relu {
    const NAME: &'static str = "relu";
    #[inline(always)]
    fn f(x: f32) -> f32 {
        x.max(0.0)
    }
    #[inline(always)]
    fn df(x: f32) -> f32 {
        if x > 0.0 {
            1.0
        } else {
            0.0
        }
    }
}

/// `log(1 + eˣ)`, returning `x` above 20 as PyTorch's `softplus(beta=1, threshold=20)` does.
pub struct Softplus;

impl Activation for Softplus {
    const NAME: &'static str = "softplus";
    #[inline(always)]
    fn f(x: f32) -> f32 {
        if x > 20.0 {
            x
        } else {
            x.exp().ln_1p()
        }
    }
    #[inline(always)]
    fn df(x: f32) -> f32 {
        if x > 20.0 {
            1.0
        } else {
            sigmoid(x)
        }
    }
}

/// `silu(gate) · value` where the CPU lacks AVX-512 ([`swiglu_f32`]).
#[inline(always)]
fn swiglu_value(gate: f32, value: f32) -> f32 {
    gate * sigmoid(gate) * value
}

/// `out[j] = silu(gate[j]) · value[j]` in f32: with AVX-512F and FMA, 16 lanes at a time by
/// [`super::simd::swiglu_16`], which the bf16 GEMM's SwiGLU output ([`super::gemm_bf16::GemmOut::SwiGlu`])
/// computes with too, so that the fused and the two-step forms give the same bits; else by
/// [`swiglu_value`] (the fused form needs AVX-512).
fn swiglu_f32(out: &mut [f32], gate: &[f32], value: &[f32]) {
    debug_assert!(gate.len() >= out.len() && value.len() >= out.len());
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the features were detected on this CPU; gate and value hold out.len() values.
        unsafe { swiglu_f32_avx512(out, gate, value) };
        return;
    }
    dispatch(
        #[inline(always)]
        || {
            for ((o, &g), &v) in out.iter_mut().zip(gate).zip(value) {
                *o = swiglu_value(g, v);
            }
        },
    );
}

/// [`swiglu_f32`]'s AVX-512 body: masked loads and stores for the last `out.len() % 16` values.
///
/// # Safety
/// AVX-512F and FMA; `gate` and `value` hold at least `out.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn swiglu_f32_avx512(out: &mut [f32], gate: &[f32], value: &[f32]) {
    use std::arch::x86_64::*;
    for j in (0..out.len()).step_by(16) {
        let lanes = (out.len() - j).min(16);
        let mask = ((1u32 << lanes) - 1) as __mmask16;
        // SAFETY: the mask selects lanes j..j + lanes, inside all three slices (caller's contract).
        unsafe {
            let g = _mm512_maskz_loadu_ps(mask, gate.as_ptr().add(j));
            let v = _mm512_maskz_loadu_ps(mask, value.as_ptr().add(j));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(j), mask, super::simd::swiglu_16(g, v));
        }
    }
}

/// SwiGLU on rows of `[gate | value]`: `u` is `[rows, 2·width]`, `out[r, j] = silu(u[r, j]) · u[r, width + j]`,
/// written as f32 or rounded once to bf16 ([`OutElem`]).
pub fn swiglu<O: OutElem>(out: &mut [O], u: &[f32], width: usize) -> Result<()> {
    check_len("swiglu", "u", u.len(), 2 * out.len())?;
    if width == 0 {
        return Ok(());
    }
    check_len(
        "swiglu",
        "out (a whole number of rows)",
        out.len() % width,
        0,
    )?;
    out.par_chunks_mut(width)
        .zip(u.par_chunks(2 * width))
        .for_each(|(o, u)| {
            let (gate, value) = u.split_at(width);
            O::fill(o, |values, at| {
                swiglu_f32(values, &gate[at..], &value[at..])
            });
        });
    Ok(())
}

/// Gradient of [`swiglu`]: adds into `du`, laid out like `u`.
pub fn swiglu_backward(du: &mut [f32], dout: &[f32], u: &[f32], width: usize) -> Result<()> {
    check_len("swiglu_backward", "u", u.len(), du.len())?;
    check_len("swiglu_backward", "dout", 2 * dout.len(), du.len())?;
    if width == 0 {
        return Ok(());
    }
    du.par_chunks_mut(2 * width)
        .zip(u.par_chunks(2 * width))
        .zip(dout.par_chunks(width))
        .for_each(|((du, u), d)| {
            let (dgate, dvalue) = du.split_at_mut(width);
            let (gate, value) = u.split_at(width);
            dispatch(
                #[inline(always)]
                || {
                    for j in 0..width {
                        let (g, v) = (gate[j], value[j]);
                        let s = sigmoid(g);
                        dgate[j] += d[j] * v * s * (1.0 + g * (1.0 - s));
                        dvalue[j] += d[j] * g * s;
                    }
                },
            );
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    /// erfc(x) for x ≥ 2 by its continued fraction, `e^(−x²)/√π / (x + ½/(x + 1/(x + 3/2/(x + …))))`,
    /// evaluated from 200 terms back (converged to f64 precision there).
    fn erfc_continued_fraction(x: f64) -> f64 {
        let tail = (1..=200).rev().fold(x, |k, n| x + n as f64 / 2.0 / k);
        (-x * x).exp() / std::f64::consts::PI.sqrt() / tail
    }

    fn sig(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    fn check_activation<A: Activation>(naive: fn(f64) -> f64, lo: f32, hi: f32) {
        let mut r = rng(7);
        let x = uniform(&mut r, 1001, lo, hi);
        let mut y = vec![0.0; x.len()];
        activation::<A, f32>(&mut y, &x).unwrap();
        let want: Vec<f64> = x.iter().map(|&v| naive(v as f64)).collect();
        assert_close(A::NAME, &y, &want, 2e-6);
        let dout = uniform(&mut r, x.len(), -1.0, 1.0);
        let mut dx = vec![0.0; x.len()];
        activation_backward::<A>(&mut dx, &dout, &x).unwrap();
        check_gradients(
            A::NAME,
            &[&x],
            &[Some(&dx)],
            &dout,
            |v| v[0].iter().map(|&t| naive(t)).collect(),
            1e-4,
        );
    }

    #[test]
    fn fast_exp_is_within_two_ulps() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (fast_exp(x) as f64, (x as f64).exp());
            assert!(
                (got - want).abs() <= 2.0 * f32::EPSILON as f64 * want,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
        assert_eq!(fast_exp(-100.0), 0.0);
        assert_eq!(fast_exp(100.0), f32::INFINITY);
        assert_eq!(fast_exp(0.0), 1.0);
    }

    #[test]
    fn erf_matches_series() {
        for i in -400..=400 {
            let x = i as f32 / 100.0;
            assert!(
                (erf(x) as f64 - erf_series(x as f64)).abs() < 3e-7,
                "erf({x})"
            );
        }
    }

    #[test]
    fn gelu_erf() {
        check_activation::<GeluErf>(|x| 0.5 * x * (1.0 + erf_series(x / 2f64.sqrt())), -4.0, 4.0);
    }

    /// The AVX-512 GELU over the whole f32 range: within 4e-6 relative (plus 1e-12 absolute) of the f64
    /// value down to x = −5.6, where `1 + erf` is 1.5e-8 (the scalar form's cancellation is far outside
    /// that), every length's masked tail, and the special values.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn gelu_erf_vector_kernel_matches_f64_into_the_tails() {
        if !gelu_erf_avx512::available() {
            return;
        }
        let x: Vec<f32> = (0..13_601).map(|i| -5.6 + i as f32 * 1e-3).collect();
        for len in [x.len(), 17, 15, 1] {
            let mut y = vec![f32::NAN; len];
            // SAFETY: the features were detected above; equal lengths.
            unsafe { gelu_erf_avx512::chunk(&mut y, &x[..len]) };
            for (&x, &y) in x.iter().zip(&y) {
                let z = x as f64 / 2f64.sqrt();
                // 1 + erf(z): the series where it does not cancel, erfc's continued fraction below −2,
                // and 2 above 4 (erfc(4) = 1.5e-8).
                let one_plus_erf = match z {
                    z if z < -2.0 => erfc_continued_fraction(-z),
                    z if z <= 4.0 => 1.0 + erf_series(z),
                    _ => 2.0,
                };
                let want = 0.5 * x as f64 * one_plus_erf;
                let err = (y as f64 - want).abs();
                assert!(
                    err <= 4e-6 * want.abs() + 1e-12,
                    "gelu({x}) = {y}, want {want}"
                );
            }
        }
        let special = [f32::NAN, f32::INFINITY, -1e30, 1e30, 0.0, -20.0, 20.0];
        let mut y = [0.0f32; 7];
        // SAFETY: as above.
        unsafe { gelu_erf_avx512::chunk(&mut y, &special) };
        assert!(y[0].is_nan());
        assert_eq!(&y[1..], &[f32::INFINITY, 0.0, 1e30, 0.0, 0.0, 20.0]);
    }

    #[test]
    fn gelu_sigmoid() {
        check_activation::<GeluSigmoid>(|x| x * sig(1.702 * x), -6.0, 6.0);
    }

    #[test]
    fn relu() {
        check_activation::<Relu>(|x| x.max(0.0), -2.0, 2.0);
    }

    #[test]
    fn softplus_both_sides_of_the_threshold() {
        check_activation::<Softplus>(
            |x| if x > 20.0 { x } else { (1.0 + x.exp()).ln() },
            -25.0,
            19.5,
        );
        let mut y = [0.0];
        activation::<Softplus, f32>(&mut y, &[25.0]).unwrap();
        assert_eq!(y[0], 25.0);
    }

    #[test]
    fn add_and_accumulate() {
        let mut r = rng(8);
        let (a, b) = (
            uniform(&mut r, 20_001, -1.0, 1.0),
            uniform(&mut r, 20_001, -1.0, 1.0),
        );
        let mut out = vec![0.0; a.len()];
        add(&mut out, &a, &b).unwrap();
        let want: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| *x as f64 + *y as f64)
            .collect();
        assert_close("add", &out, &want, 1e-7);
        accumulate(&mut out, &a).unwrap();
        let want: Vec<f64> = want.iter().zip(&a).map(|(w, x)| w + *x as f64).collect();
        assert_close("accumulate", &out, &want, 1e-7);
        assert!(add(&mut out, &a, &b[1..]).is_err());
    }

    #[test]
    fn swiglu_forward_and_backward() {
        let mut r = rng(9);
        let (rows, width) = (5, 7);
        let u = uniform(&mut r, rows * 2 * width, -3.0, 3.0);
        let naive = |x: &[Vec<f64>]| {
            let u = &x[0];
            let mut o = Vec::new();
            for row in u.chunks(2 * width) {
                for j in 0..width {
                    o.push(row[j] * sig(row[j]) * row[width + j]);
                }
            }
            o
        };
        let mut out = vec![0.0; rows * width];
        swiglu(&mut out, &u, width).unwrap();
        assert_close("swiglu", &out, &naive(&[to_f64(&u)]), 1e-6);
        let dout = uniform(&mut r, out.len(), -1.0, 1.0);
        let mut du = vec![0.0; u.len()];
        swiglu_backward(&mut du, &dout, &u, width).unwrap();
        check_gradients("swiglu", &[&u], &[Some(&du)], &dout, naive, 1e-4);
    }

    /// The forward against f64 on rows wide enough for whole vectors and a ragged tail (the AVX-512 path
    /// where the CPU has it), gates over the whole range where σ moves, and the edges: where `e^(−g)`
    /// leaves f32's range σ is 0 (a result of 0 of the right sign), NaN and `−∞` give NaN, `+∞` gives
    /// `+∞·v`; bf16 output is the f32 output rounded.
    #[test]
    fn swiglu_forward_matches_f64_on_wide_rows_and_at_the_edges() {
        let mut r = rng(19);
        let edges = [
            -1e4, -100.0, -88.0, -87.5, -87.0, -80.0, -20.0, -1e-3, -0.0, 0.0, 1e-3, 20.0, 88.0,
            100.0,
        ];
        for width in [1, 16, 45, 100] {
            let rows = 3;
            let mut u = uniform(&mut r, rows * 2 * width, -12.0, 12.0);
            for (j, e) in edges.iter().enumerate().filter(|(j, _)| *j < width) {
                u[j] = *e;
            }
            let mut out = vec![f32::NAN; rows * width];
            swiglu(&mut out, &u, width).unwrap();
            for (i, &got) in out.iter().enumerate() {
                let (row, j) = (i / width, i % width);
                let (g, v) = (
                    u[row * 2 * width + j] as f64,
                    u[row * 2 * width + width + j] as f64,
                );
                let want = g * sig(g) * v;
                let what = format!("width {width}: swiglu({g}, {v}) = {got}, want {want:e}");
                if want.abs() < 1e-30 {
                    assert!(got.abs() < 1e-30, "{what}");
                } else {
                    assert!(((got as f64 - want) / want).abs() <= 1e-6, "{what}");
                }
            }
            let mut rounded = vec![half::bf16::ZERO; out.len()];
            swiglu(&mut rounded, &u, width).unwrap();
            for (o, x) in rounded.iter().zip(&out) {
                assert_eq!(o.to_bits(), half::bf16::from_f32(*x).to_bits());
            }
        }
        let specials = [f32::NAN, f32::NEG_INFINITY, f32::INFINITY];
        let u: Vec<f32> = specials.iter().chain(&[2.0, 2.0, 2.0]).copied().collect();
        let mut out = vec![0.0; 3];
        swiglu(&mut out, &u, 3).unwrap();
        assert!(out[0].is_nan() && out[1].is_nan(), "{out:?}");
        assert_eq!(out[2], f32::INFINITY);
    }

    /// The fused pass gives the activation op's bits on the biased values, and with `pre` leaves exactly
    /// the biased values there: widths around the run of 256 columns and past a task's 8,192 values,
    /// ragged row counts, every activation's vector body. Lengths that are not whole rows are errors.
    #[test]
    fn bias_activation_is_the_activation_op_on_the_biased_values() {
        fn check<A: Activation>(r: &mut rand::rngs::StdRng, rows: usize, width: usize) {
            let product = uniform(r, rows * width, -4.0, 4.0);
            let bias = uniform(r, width, -1.0, 1.0);
            let biased: Vec<f32> = product
                .chunks(width)
                .flat_map(|row| row.iter().zip(&bias).map(|(p, b)| p + b))
                .collect();
            let mut want = vec![0.0; biased.len()];
            activation::<A, f32>(&mut want, &biased).unwrap();
            let mut in_place = product.clone();
            bias_activation(&mut in_place, None, &bias, A::f_chunk).unwrap();
            let (mut pre, mut out) = (product.clone(), vec![f32::NAN; product.len()]);
            bias_activation(&mut out, Some(&mut pre), &bias, A::f_chunk).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let what = format!("{} {rows}x{width}", A::NAME);
            assert_eq!(bits(&in_place), bits(&want), "{what} in place");
            assert_eq!(bits(&out), bits(&want), "{what} out");
            assert_eq!(bits(&pre), bits(&biased), "{what} pre");
        }
        let mut r = rng(13);
        for (rows, width) in [
            (1, 1),
            (3, 7),
            (37, 255),
            (5, 256),
            (9, 257),
            (70, 600),
            (3, 8193),
        ] {
            check::<GeluErf>(&mut r, rows, width);
            check::<GeluSigmoid>(&mut r, rows, width);
            check::<Relu>(&mut r, rows, width);
            check::<Softplus>(&mut r, rows, width);
        }
        let (mut out, bias) = (vec![0.0; 10], vec![0.0; 3]);
        assert!(bias_activation(&mut out, None, &bias, Relu::f_chunk).is_err());
        let mut pre = [0.0; 9];
        assert!(bias_activation(&mut out[..9], Some(&mut pre[..6]), &bias, Relu::f_chunk).is_err());
    }
}
