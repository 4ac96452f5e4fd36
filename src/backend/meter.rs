//! Bytes a backend's allocator holds: live now and at the peak. Every backend meters its allocations
//! the same way, so the planner's figure (the recording backend's peak) can be checked against the bytes
//! the CPU and kernel devices really allocate for the same step.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::Memory;

#[derive(Debug, Default)]
pub struct ByteMeter {
    live: AtomicUsize,
    peak: AtomicUsize,
}

impl ByteMeter {
    /// Bytes allocated and not yet freed.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// The most bytes live at once since the last [`Self::reset_peak`].
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Starts a new peak from what is live now.
    pub fn reset_peak(&self) {
        self.peak.store(self.live(), Ordering::Relaxed);
    }

    /// Counts `bytes` allocated; returns the live total and whether it is a new peak.
    pub(crate) fn add(&self, bytes: usize) -> (usize, bool) {
        let live = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let before = self.peak.fetch_max(live, Ordering::Relaxed);
        (live, live > before)
    }

    pub(crate) fn sub(&self, bytes: usize) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// An allocation counted by a meter while it lives.
pub struct Metered<M> {
    pub(crate) mem: M,
    bytes: usize,
    meter: Arc<ByteMeter>,
}

impl<M> Metered<M> {
    /// `mem`, of `bytes` requested bytes, counted by `meter` until dropped.
    pub(crate) fn new(mem: M, bytes: usize, meter: &Arc<ByteMeter>) -> Self {
        meter.add(bytes);
        Metered {
            mem,
            bytes,
            meter: meter.clone(),
        }
    }
}

impl<M: Memory> Memory for Metered<M> {
    fn addr(&self) -> u64 {
        self.mem.addr()
    }
    fn bytes(&self) -> usize {
        self.mem.bytes()
    }
}

impl<M> Drop for Metered<M> {
    fn drop(&mut self) {
        self.meter.sub(self.bytes);
    }
}
