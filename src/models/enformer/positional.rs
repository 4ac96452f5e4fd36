//! Enformer's relative positional features: exponential, central-mask and gamma functions of the
//! key-minus-query distance, computed in f64 as enformer-pytorch defines them (or with DeepMind's TF gamma
//! table injected).

/// Enformer's relative positional features for transformer length `n`, `[2n−1, features]`, row r for the
/// distance `r − (n−1)`: exponential, central mask and gamma (normalised per distance, as enformer-pytorch),
/// each `features/6` wide, then the same multiplied by the distance's sign. Computed in f64.
pub fn positional_features(n: usize, features: usize) -> Vec<f32> {
    positional_features_with_gamma(n, features, None)
}

/// [`positional_features`] with the gamma block taken from `gammas` (`[2n−1, features/6]`) when given.
pub(crate) fn positional_features_with_gamma(
    n: usize,
    features: usize,
    gammas: Option<&[f32]>,
) -> Vec<f32> {
    let k = features / 6;
    let nf = n as f64;
    let linspace = |a: f64, b: f64, i: usize| {
        if k == 1 {
            a
        } else {
            a + (b - a) * i as f64 / (k - 1) as f64
        }
    };
    let half_life: Vec<f64> = (0..k)
        .map(|i| 2f64.powf(linspace(3.0, nf.ln() / 2f64.ln(), i)))
        .collect();
    let widths: Vec<f64> = (1..=k).map(|i| 2f64.powi(i as i32) - 1.0).collect();
    let std = nf / (2.0 * k as f64);
    let gamma: Vec<(f64, f64)> = (0..k)
        .map(|i| {
            let mean = linspace(nf / k as f64, nf, i);
            ((mean / std).powi(2), mean / (std * std))
        })
        .collect();
    let mut out = Vec::with_capacity((2 * n - 1) * features);
    for r in 0..2 * n - 1 {
        let delta = r as f64 - (nf - 1.0);
        let x = delta.abs();
        let mut e: Vec<f64> = half_life
            .iter()
            .map(|hl| (-(2f64.ln()) / hl * x).exp())
            .collect();
        e.extend(widths.iter().map(|w| if *w > x { 1.0 } else { 0.0 }));
        let pdf: Vec<f64> = gamma
            .iter()
            .map(|&(conc, rate)| {
                let log_unnorm = if x == 0.0 {
                    f64::NEG_INFINITY
                } else {
                    (conc - 1.0) * x.ln()
                } - rate * x;
                (log_unnorm - (ln_gamma(conc) - conc * rate.ln())).exp() + 1e-8
            })
            .collect();
        match gammas {
            Some(g) => e.extend(g[r * k..(r + 1) * k].iter().map(|&v| v as f64)),
            None => {
                let max = pdf.iter().cloned().fold(f64::MIN, f64::max);
                e.extend(pdf.iter().map(|v| v / max));
            }
        }
        let sign = delta.signum() * (delta != 0.0) as i32 as f64;
        let signed: Vec<f64> = e.iter().map(|v| v * sign).collect();
        out.extend(e.iter().chain(&signed).map(|&v| v as f32));
    }
    out
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, n = 9; relative error ~1e-15).
fn ln_gamma(x: f64) -> f64 {
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let s = C[1..]
        .iter()
        .enumerate()
        .fold(C[0], |s, (i, c)| s + c / (x + 1.0 + i as f64));
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + s.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_gamma_matches_factorials() {
        let mut fact = 1.0f64;
        for k in 1..30 {
            fact *= k as f64;
            assert!(
                (ln_gamma(k as f64 + 1.0) - fact.ln()).abs() < 1e-10 * fact.ln().max(1.0),
                "{k}"
            );
        }
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-12);
    }
}
