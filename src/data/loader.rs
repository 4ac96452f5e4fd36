//! The training loader: a background thread reads samples into a bounded queue of batches.
//!
//! - Order is a deterministic function of (seed, epoch): a seeded shuffle, then length bucketing (rows are
//!   sorted by RNA length within pools of `batch_size × POOL_BATCHES`, cut into batches, and the batches
//!   shuffled again), so batches hold similar lengths and padding stays small.
//! - Memory is bounded: at most `prefetch` batches wait in the queue, whatever the dataset's size.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::dataset::{Dataset, RowRef, Sample, Split, TargetStats};
use crate::{Error, Result};

/// Batches per bucketing pool: large enough to find similar lengths, small enough to keep randomness.
const POOL_BATCHES: usize = 50;

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub split: Split,
    pub batch_size: usize,
    pub seed: u64,
    pub epoch: u64,
    pub shuffle: bool,
    pub bucket_by_length: bool,
    /// Batches read ahead.
    pub prefetch: usize,
    /// Drop a last batch smaller than `batch_size`.
    pub drop_last: bool,
    /// Z-score the targets with these statistics (from the training split).
    pub normalize_targets: Option<TargetStats>,
}

impl LoaderConfig {
    pub fn new(split: Split, batch_size: usize) -> Self {
        LoaderConfig {
            split,
            batch_size,
            seed: 0,
            epoch: 0,
            shuffle: split == Split::Train,
            bucket_by_length: true,
            prefetch: 4,
            drop_last: false,
            normalize_targets: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Batch {
    pub samples: Vec<Sample>,
}

/// The batches of one epoch, as row lists, in the order the loader yields them.
pub fn epoch_plan(rows: &[RowRef], cfg: &LoaderConfig) -> Vec<Vec<RowRef>> {
    let mut order: Vec<RowRef> = rows.to_vec();
    let bs = cfg.batch_size.max(1);
    let mut rng = StdRng::seed_from_u64(cfg.seed ^ cfg.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    if cfg.shuffle {
        order.shuffle(&mut rng);
    }
    let mut batches: Vec<Vec<RowRef>> = Vec::with_capacity(order.len().div_ceil(bs));
    if cfg.bucket_by_length {
        for pool in order.chunks_mut(bs * POOL_BATCHES) {
            // Stable sort: ties keep the shuffled order, so the plan stays a function of the seed.
            pool.sort_by_key(|r| (r.rna_len, r.protein_len));
            batches.extend(pool.chunks(bs).map(<[RowRef]>::to_vec));
        }
        if cfg.shuffle {
            batches.shuffle(&mut rng);
        }
    } else {
        batches.extend(order.chunks(bs).map(<[RowRef]>::to_vec));
    }
    if cfg.drop_last {
        batches.retain(|b| b.len() == bs);
    }
    batches
}

/// Iterator over the batches of one epoch, filled by a background thread.
pub struct Loader {
    rx: Option<Receiver<Result<Batch>>>,
    worker: Option<JoinHandle<()>>,
    batches: usize,
    yielded: usize,
}

impl Loader {
    pub fn new(dataset: Arc<Dataset>, cfg: LoaderConfig) -> Result<Self> {
        if cfg.batch_size == 0 {
            return Err(Error::invalid("batch size", "must be positive"));
        }
        let plan = epoch_plan(&dataset.split_rows(cfg.split), &cfg);
        let normalize = cfg.normalize_targets.clone();
        Self::spawn(plan, cfg.prefetch, move |r: &RowRef| {
            let mut s = dataset.sample(r)?;
            if let Some(stats) = &normalize {
                stats.normalize(&mut s.targets);
            }
            Ok(s)
        })
    }

    /// Runs `fetch` on every row of `plan`, batch by batch, on a background thread that stays at most
    /// `prefetch` batches ahead. An error ends the epoch with that error; a panic in `fetch` ends it with an
    /// error that says so (never with a short epoch that looks complete).
    pub fn spawn(
        plan: Vec<Vec<RowRef>>,
        prefetch: usize,
        fetch: impl Fn(&RowRef) -> Result<Sample> + Send + 'static,
    ) -> Result<Self> {
        let batches = plan.len();
        let (tx, rx) = sync_channel(prefetch.max(1));
        let worker = std::thread::Builder::new()
            .name("isoformer-loader".into())
            .spawn(move || {
                for rows in plan {
                    let batch = rows
                        .iter()
                        .map(&fetch)
                        .collect::<Result<Vec<_>>>()
                        .map(|samples| Batch { samples });
                    let failed = batch.is_err();
                    // A closed receiver means the consumer stopped early: end quietly.
                    if tx.send(batch).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| Error::io("loader thread", e))?;
        Ok(Loader {
            rx: Some(rx),
            worker: Some(worker),
            batches,
            yielded: 0,
        })
    }

    /// Batches this epoch will yield.
    pub fn len(&self) -> usize {
        self.batches
    }

    pub fn is_empty(&self) -> bool {
        self.batches == 0
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.rx.as_ref()?.recv() {
            Ok(batch) => {
                self.yielded += 1;
                if batch.is_err() {
                    self.rx = None;
                }
                Some(batch)
            }
            Err(_) => {
                // The channel closed: normal after the last batch; otherwise the worker died (a panic in
                // reading a sample), which must be an error, not a short epoch that looks complete.
                self.rx = None;
                let worker = self.worker.take();
                let panic = worker.and_then(|w| w.join().err());
                if self.yielded == self.batches && panic.is_none() {
                    return None;
                }
                let why = panic
                    .map(|p| {
                        p.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "unknown panic".into())
                    })
                    .map_or("it stopped early".to_string(), |m| {
                        format!("it panicked: {m}")
                    });
                Some(Err(Error::invalid(
                    "data loader",
                    format!(
                        "the loader thread delivered {} of {} batches: {why}",
                        self.yielded, self.batches
                    ),
                )))
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the channel first unblocks a worker waiting to send.
        self.rx.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
