//! Regression metrics per tissue: R² (1 − SSE/SST), Pearson's r and Spearman's ρ (Pearson of average
//! ranks), accumulated in f64, and their means over tissues.

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct SplitMetrics {
    pub loss: f64,
    pub r2_mean: f64,
    pub pearson_mean: f64,
    pub spearman_mean: f64,
    pub r2: Vec<(String, f64)>,
    pub pearson: Vec<(String, f64)>,
    pub spearman: Vec<(String, f64)>,
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    if x.len() < 2 {
        return 0.0;
    }
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        0.0
    } else {
        sxy / (sxx * syy).sqrt()
    }
}

/// Average ranks (ties share the mean of their positions).
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0; x.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

fn r2(pred: &[f64], truth: &[f64]) -> f64 {
    let n = truth.len() as f64;
    let m = truth.iter().sum::<f64>() / n;
    let sst: f64 = truth.iter().map(|t| (t - m) * (t - m)).sum();
    let sse: f64 = pred.iter().zip(truth).map(|(p, t)| (p - t) * (p - t)).sum();
    if sst == 0.0 {
        0.0
    } else {
        1.0 - sse / sst
    }
}

/// Metrics of row-major `[samples, tissues]` predictions against targets (same units).
pub fn evaluate(pred: &[f32], truth: &[f32], tissues: &[String], loss: f64) -> SplitMetrics {
    let t = tissues.len();
    let n = pred.len().checked_div(t).unwrap_or(0);
    let col = |v: &[f32], j: usize| -> Vec<f64> { (0..n).map(|i| v[i * t + j] as f64).collect() };
    let mut m = SplitMetrics {
        loss,
        r2_mean: 0.0,
        pearson_mean: 0.0,
        spearman_mean: 0.0,
        r2: Vec::new(),
        pearson: Vec::new(),
        spearman: Vec::new(),
    };
    for (j, name) in tissues.iter().enumerate() {
        let (p, y) = (col(pred, j), col(truth, j));
        m.r2.push((name.clone(), r2(&p, &y)));
        m.pearson.push((name.clone(), pearson(&p, &y)));
        m.spearman
            .push((name.clone(), pearson(&ranks(&p), &ranks(&y))));
    }
    let mean = |v: &[(String, f64)]| v.iter().map(|x| x.1).sum::<f64>() / v.len().max(1) as f64;
    m.r2_mean = mean(&m.r2);
    m.pearson_mean = mean(&m.pearson);
    m.spearman_mean = mean(&m.spearman);
    m
}

impl SplitMetrics {
    /// The JSON object of `metrics.json`: means, plus per-tissue objects keyed by tissue name.
    pub fn to_json(&self) -> serde_json::Value {
        let obj = |v: &[(String, f64)]| -> serde_json::Value {
            serde_json::Value::Object(
                v.iter()
                    .map(|(k, x)| (k.clone(), serde_json::json!(x)))
                    .collect(),
            )
        };
        serde_json::json!({
            "loss": self.loss,
            "r2_mean": self.r2_mean,
            "pearson_mean": self.pearson_mean,
            "spearman_mean": self.spearman_mean,
            "r2": obj(&self.r2),
            "pearson": obj(&self.pearson),
            "spearman": obj(&self.spearman),
        })
    }

    /// A readable per-tissue table.
    pub fn table(&self, split: &str) -> String {
        let mut s = format!(
            "{split}: R² {:.3}  Pearson {:.3}  Spearman {:.3}  (means over {} tissues)\n",
            self.r2_mean,
            self.pearson_mean,
            self.spearman_mean,
            self.r2.len()
        );
        s.push_str(&format!(
            "{:<18} {:>7} {:>8} {:>9}\n",
            "tissue", "R²", "Pearson", "Spearman"
        ));
        for ((r, p), sp) in self.r2.iter().zip(&self.pearson).zip(&self.spearman) {
            s.push_str(&format!(
                "{:<18} {:>7.3} {:>8.3} {:>9.3}\n",
                r.0, r.1, p.1, sp.1
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_match_hand_computed_values() {
        let truth = [1.0f32, 2.0, 3.0, 4.0];
        let pred = [1.5f32, 1.5, 3.5, 3.5];
        let m = evaluate(&pred, &truth, &["t".into()], 0.0);
        // SSE = 4·0.25 = 1, SST = 5 → R² = 0.8.
        assert!((m.r2_mean - 0.8).abs() < 1e-12);
        // Spearman with ties: ranks of pred are 1.5, 1.5, 3.5, 3.5.
        let expected = pearson(&[1.5, 1.5, 3.5, 3.5], &[1.0, 2.0, 3.0, 4.0]);
        assert!((m.spearman_mean - expected).abs() < 1e-12);
        assert!(
            (m.pearson_mean - pearson(&[1.5, 1.5, 3.5, 3.5], &[1.0, 2.0, 3.0, 4.0])).abs() < 1e-12
        );
        assert_eq!(ranks(&[3.0, 1.0, 3.0]), vec![2.5, 1.0, 2.5]);
    }
}
