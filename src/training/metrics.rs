//! Regression metrics per tissue: R² (1 − SSE/SST), Pearson's r and Spearman's ρ (Pearson of average
//! ranks), accumulated in f64, and their means over tissues.
//!
//! A tissue whose targets are all equal in a split (or a split of fewer than two rows) has no R² and no
//! correlation: every model would score the same there. Such a tissue is `None` (`null` in
//! `metrics.json`, "n/a" in the table) and left out of the means, which say over how many tissues they
//! are. Predictions that are all equal, with varying targets, have a defined R² (at most 0) and are
//! given correlation 0: no association, which is how a collapsed model should count in the mean.

use serde::Serialize;

/// One metric per tissue, `None` where it is undefined (see the module comment).
pub type PerTissue = Vec<(String, Option<f64>)>;

#[derive(Clone, Debug, Serialize)]
pub struct SplitMetrics {
    pub loss: f64,
    /// Means over the tissues where each metric is defined; `None` when it is defined for none.
    pub r2_mean: Option<f64>,
    pub pearson_mean: Option<f64>,
    pub spearman_mean: Option<f64>,
    pub r2: PerTissue,
    pub pearson: PerTissue,
    pub spearman: PerTissue,
}

/// Whether a split's targets for one tissue can rank models at all: two rows or more, not all equal.
fn varies(truth: &[f64]) -> bool {
    truth.len() >= 2 && truth.iter().any(|&t| t != truth[0])
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

/// R² of varying targets (the caller checks [`varies`]).
fn r2(pred: &[f64], truth: &[f64]) -> f64 {
    let n = truth.len() as f64;
    let m = truth.iter().sum::<f64>() / n;
    let sst: f64 = truth.iter().map(|t| (t - m) * (t - m)).sum();
    let sse: f64 = pred.iter().zip(truth).map(|(p, t)| (p - t) * (p - t)).sum();
    1.0 - sse / sst
}

/// The mean of the defined values, `None` when there are none.
fn mean_defined(v: &PerTissue) -> Option<f64> {
    let defined: Vec<f64> = v.iter().filter_map(|x| x.1).collect();
    (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64)
}

/// Metrics of row-major `[samples, tissues]` predictions against targets (same units).
pub fn evaluate(pred: &[f32], truth: &[f32], tissues: &[String], loss: f64) -> SplitMetrics {
    let t = tissues.len();
    let n = pred.len().checked_div(t).unwrap_or(0);
    let col = |v: &[f32], j: usize| -> Vec<f64> { (0..n).map(|i| v[i * t + j] as f64).collect() };
    let (mut r2s, mut pearsons, mut spearmans) = (Vec::new(), Vec::new(), Vec::new());
    for (j, name) in tissues.iter().enumerate() {
        let (p, y) = (col(pred, j), col(truth, j));
        let defined = varies(&y);
        r2s.push((name.clone(), defined.then(|| r2(&p, &y))));
        pearsons.push((name.clone(), defined.then(|| pearson(&p, &y))));
        spearmans.push((
            name.clone(),
            defined.then(|| pearson(&ranks(&p), &ranks(&y))),
        ));
    }
    SplitMetrics {
        loss,
        r2_mean: mean_defined(&r2s),
        pearson_mean: mean_defined(&pearsons),
        spearman_mean: mean_defined(&spearmans),
        r2: r2s,
        pearson: pearsons,
        spearman: spearmans,
    }
}

/// A metric for people: three decimals, or "n/a" where it is undefined.
pub fn show(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |x| format!("{x:.3}"))
}

impl SplitMetrics {
    /// The JSON object of `metrics.json`: means, plus per-tissue objects keyed by tissue name (`null`
    /// where a metric is undefined).
    pub fn to_json(&self) -> serde_json::Value {
        let obj = |v: &PerTissue| -> serde_json::Value {
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
            "tissues_evaluated": self.tissues_evaluated(),
            "r2": obj(&self.r2),
            "pearson": obj(&self.pearson),
            "spearman": obj(&self.spearman),
        })
    }

    /// How many tissues the means are over (those whose targets vary in this split).
    pub fn tissues_evaluated(&self) -> usize {
        self.r2.iter().filter(|x| x.1.is_some()).count()
    }

    /// What the means are over, for the table and the log: "30 tissues", or "29 of 30 tissues; n/a: Bladder
    /// (targets all equal in this split)".
    pub fn means_over(&self) -> String {
        let total = self.r2.len();
        let undefined: Vec<&str> = self
            .r2
            .iter()
            .filter(|x| x.1.is_none())
            .map(|x| x.0.as_str())
            .collect();
        if undefined.is_empty() {
            format!("{total} tissues")
        } else {
            format!(
                "{} of {total} tissues; n/a: {} (targets all equal in this split)",
                total - undefined.len(),
                undefined.join(", ")
            )
        }
    }

    /// A readable per-tissue table.
    pub fn table(&self, split: &str) -> String {
        let mut s = format!(
            "{split}: R² {}  Pearson {}  Spearman {}  (means over {})\n",
            show(self.r2_mean),
            show(self.pearson_mean),
            show(self.spearman_mean),
            self.means_over()
        );
        s.push_str(&format!(
            "{:<18} {:>7} {:>8} {:>9}\n",
            "tissue", "R²", "Pearson", "Spearman"
        ));
        for ((r, p), sp) in self.r2.iter().zip(&self.pearson).zip(&self.spearman) {
            s.push_str(&format!(
                "{:<18} {:>7} {:>8} {:>9}\n",
                r.0,
                show(r.1),
                show(p.1),
                show(sp.1)
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
        assert!((m.r2_mean.unwrap() - 0.8).abs() < 1e-12);
        // Spearman with ties: ranks of pred are 1.5, 1.5, 3.5, 3.5.
        let expected = pearson(&[1.5, 1.5, 3.5, 3.5], &[1.0, 2.0, 3.0, 4.0]);
        assert!((m.spearman_mean.unwrap() - expected).abs() < 1e-12);
        assert!(
            (m.pearson_mean.unwrap() - pearson(&[1.5, 1.5, 3.5, 3.5], &[1.0, 2.0, 3.0, 4.0])).abs()
                < 1e-12
        );
        assert_eq!(ranks(&[3.0, 1.0, 3.0]), vec![2.5, 1.0, 2.5]);
    }

    #[test]
    fn tissues_with_equal_targets_are_undefined_and_left_out_of_the_means() {
        // Two tissues, four rows: the second's targets are all 2.0.
        let truth = [1.0f32, 2.0, 2.0, 2.0, 3.0, 2.0, 4.0, 2.0];
        let pred = [1.5f32, 0.0, 1.5, 5.0, 3.5, 1.0, 3.5, 2.0];
        let names = ["a".to_string(), "flat".to_string()];
        let m = evaluate(&pred, &truth, &names, 0.0);
        assert_eq!(m.r2[1], ("flat".to_string(), None));
        assert_eq!(m.pearson[1].1, None);
        assert_eq!(m.spearman[1].1, None);
        assert!((m.r2_mean.unwrap() - 0.8).abs() < 1e-12, "{:?}", m.r2_mean);
        assert_eq!(m.pearson_mean, m.pearson[0].1);
        assert_eq!(m.tissues_evaluated(), 1);
        let json = m.to_json();
        assert!(json["r2"]["flat"].is_null() && json["r2"]["a"].is_number());
        assert_eq!(json["tissues_evaluated"], 1);
        let table = m.table("test");
        assert!(
            table.contains("means over 1 of 2 tissues; n/a: flat"),
            "{table}"
        );
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("flat") && l.contains("n/a")),
            "{table}"
        );
        // One row: nothing is defined, and the means say so.
        let one = evaluate(&[1.0, 2.0], &[0.5, 0.7], &names, 0.0);
        assert_eq!((one.r2_mean, one.pearson_mean), (None, None));
        // Constant predictions against varying targets: R² defined (≤ 0), correlation 0.
        let flat_pred = evaluate(
            &[2.0, 2.0, 2.0, 2.0],
            &[1.0, 2.0, 3.0, 4.0],
            &names[..1],
            0.0,
        );
        assert!(flat_pred.r2_mean.unwrap() <= 0.0);
        assert_eq!(flat_pred.pearson_mean, Some(0.0));
    }
}
