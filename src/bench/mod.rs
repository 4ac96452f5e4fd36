//! Measurements shared by the `bench` CLI command and the criterion benchmarks, so both report the same
//! numbers from the same code.

pub mod gemm;
pub mod gpu;

use std::time::{Duration, Instant};

/// Timing summary of repeated runs.
#[derive(Clone, Debug)]
pub struct Timing {
    pub median: Duration,
    pub min: Duration,
    pub max: Duration,
    pub runs: usize,
}

/// Runs `f` `warmup` times untimed, then `repeats` times timed; returns the median and spread.
pub fn time_runs(warmup: usize, repeats: usize, mut f: impl FnMut()) -> Timing {
    for _ in 0..warmup {
        f();
    }
    let mut times: Vec<Duration> = (0..repeats.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    Timing {
        median: times[times.len() / 2],
        min: times[0],
        max: times[times.len() - 1],
        runs: times.len(),
    }
}
