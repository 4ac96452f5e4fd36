//! Runs a hot loop compiled for the best vector extension this CPU has (AVX-512, else AVX2+FMA, else the
//! baseline), chosen at run time, so one binary is both portable and fast. The closure is inlined into a
//! function carrying the target features, which is what lets LLVM vectorise it with those instructions.
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
