//! Learning-rate schedule: linear warmup from 0, then a cosine decay to `min_ratio` at `total` steps.

/// The factor on the base learning rates at optimiser step `step` (1-based).
pub fn lr_factor(step: usize, warmup: usize, total: usize, min_ratio: f32) -> f32 {
    if warmup > 0 && step <= warmup {
        return step as f32 / warmup as f32;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup.min(step)) as f32 / span as f32).min(1.0);
    min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::lr_factor;

    #[test]
    fn warmup_then_cosine() {
        assert_eq!(lr_factor(5, 10, 110, 0.0), 0.5);
        assert_eq!(lr_factor(10, 10, 110, 0.0), 1.0);
        assert!((lr_factor(60, 10, 110, 0.0) - 0.5).abs() < 1e-6);
        assert!((lr_factor(110, 10, 110, 0.1) - 0.1).abs() < 1e-6);
    }
}
