//! Mean-squared-error loss, accumulated in f64 so the result does not depend on the thread count.

use rayon::prelude::*;

use crate::error::check_len;
use crate::{Error, Result};

/// `mean((pred − target)²)` over all elements. Non-finite predictions or targets are an error, naming the
/// first offending index.
pub fn mse(pred: &[f32], target: &[f32]) -> Result<f32> {
    check_len("mse", "target", target.len(), pred.len())?;
    if pred.is_empty() {
        return Err(Error::invalid("mse", "empty input"));
    }
    if let Some(i) = pred.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: "mse prediction".into(),
            index: i,
        });
    }
    if let Some(i) = target.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: "mse target".into(),
            index: i,
        });
    }
    const CHUNK: usize = 4096;
    let partial: Vec<f64> = pred
        .par_chunks(CHUNK)
        .zip(target.par_chunks(CHUNK))
        .map(|(p, t)| {
            p.iter()
                .zip(t)
                .map(|(&p, &t)| ((p - t) as f64).powi(2))
                .sum()
        })
        .collect();
    Ok((partial.iter().sum::<f64>() / pred.len() as f64) as f32)
}

/// `dpred += dloss · 2 (pred − target) / N`.
pub fn mse_backward(dpred: &mut [f32], pred: &[f32], target: &[f32], dloss: f32) -> Result<()> {
    check_len("mse_backward", "target", target.len(), pred.len())?;
    check_len("mse_backward", "dpred", dpred.len(), pred.len())?;
    let scale = 2.0 * dloss / pred.len().max(1) as f32;
    dpred
        .par_iter_mut()
        .zip(pred.par_iter().zip(target.par_iter()))
        .for_each(|(d, (&p, &t))| *d += scale * (p - t));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[test]
    fn mse_forward_and_backward() {
        let mut r = rng(61);
        let pred = uniform(&mut r, 10_007, -2.0, 2.0);
        let target = uniform(&mut r, pred.len(), -2.0, 2.0);
        let naive = |x: &[Vec<f64>]| {
            vec![
                x[0].iter()
                    .zip(&x[1])
                    .map(|(p, t)| (p - t).powi(2))
                    .sum::<f64>()
                    / x[0].len() as f64,
            ]
        };
        let l = mse(&pred, &target).unwrap();
        assert_close("mse", &[l], &naive(&[to_f64(&pred), to_f64(&target)]), 1e-6);
        let (p, t) = (&pred[..31], &target[..31]);
        let mut dp = vec![0.0; 31];
        mse_backward(&mut dp, p, t, 0.7).unwrap();
        check_gradients("mse", &[p, t], &[Some(&dp), None], &[0.7], naive, 1e-5);
    }

    #[test]
    fn nan_is_an_error_not_a_loss() {
        let err = mse(&[1.0, f32::NAN], &[0.0, 0.0]).unwrap_err();
        assert!(err.to_string().contains("index 1"), "{err}");
        assert!(mse(&[1.0], &[f32::INFINITY]).is_err());
        assert!(mse(&[], &[]).is_err());
    }
}
