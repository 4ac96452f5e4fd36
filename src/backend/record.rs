//! A backend that runs no arithmetic: it hands out address ranges and counts bytes. Running the real model
//! code on it gives the memory a step of that code allocates — per allocation, live and peak — at any size,
//! in well under a second and with no weights (the `plan` command). It is the first piece of the planner:
//! the same code that runs is what gets measured, never a second hand-kept list.
//!
//! Reads return zeros, reductions return 0, and every op checks nothing: it is for sizing, not results.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use super::{
    Act, AttentionDims, Backend, BatchNormStats, Conv1dDims, LinearDims, Memory, PoolDims, View,
    ViewMut,
};
use crate::ops::optim::AdamWStep;
use crate::runtime::DType;
use crate::Result;

#[derive(Default, Debug)]
struct Counters {
    live: AtomicUsize,
    peak: AtomicUsize,
    allocations: AtomicUsize,
    next_addr: AtomicU64,
}

/// A recorded allocation: an address range that exists only in the counters.
pub struct RecordedMem {
    addr: u64,
    bytes: usize,
    counters: Arc<Counters>,
}

impl Memory for RecordedMem {
    fn addr(&self) -> u64 {
        self.addr
    }
    fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for RecordedMem {
    fn drop(&mut self) {
        self.counters.live.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The recording backend, with the compute dtype of the backend it stands for (f32 for the CPU, bf16 for
/// kernel devices).
pub struct RecordingBackend {
    compute: DType,
    counters: Arc<Counters>,
}

impl RecordingBackend {
    pub fn new(compute: DType) -> Self {
        RecordingBackend {
            compute,
            counters: Arc::new(Counters {
                next_addr: AtomicU64::new(1 << 20),
                ..Default::default()
            }),
        }
    }

    /// Bytes allocated and not yet freed.
    pub fn live_bytes(&self) -> usize {
        self.counters.live.load(Ordering::Relaxed)
    }

    /// The most bytes live at once since the last [`Self::reset_peak`].
    pub fn peak_bytes(&self) -> usize {
        self.counters.peak.load(Ordering::Relaxed)
    }

    /// Starts a new peak from what is live now.
    pub fn reset_peak(&self) {
        self.counters
            .peak
            .store(self.live_bytes(), Ordering::Relaxed);
    }
}

impl Backend for RecordingBackend {
    type Mem = RecordedMem;

    fn name(&self) -> String {
        format!("recording ({} compute)", self.compute)
    }
    fn compute_dtype(&self) -> DType {
        self.compute
    }
    fn alloc(&self, bytes: usize) -> Result<RecordedMem> {
        let c = &self.counters;
        c.allocations.fetch_add(1, Ordering::Relaxed);
        let live = c.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        c.peak.fetch_max(live, Ordering::Relaxed);
        // Distinct, aligned, never-dereferenced addresses.
        let addr = c
            .next_addr
            .fetch_add((bytes as u64).div_ceil(256) * 256 + 256, Ordering::Relaxed);
        Ok(RecordedMem {
            addr,
            bytes,
            counters: c.clone(),
        })
    }
    fn allocations(&self) -> usize {
        self.counters.allocations.load(Ordering::Relaxed)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn write_f32(&self, _: ViewMut<'_, Self>, _: &[f32]) -> Result<()> {
        Ok(())
    }
    fn write_i32(&self, _: ViewMut<'_, Self>, _: &[i32]) -> Result<()> {
        Ok(())
    }
    fn read_f32(&self, src: View<'_, Self>) -> Result<Vec<f32>> {
        Ok(vec![0.0; src.numel()])
    }
    fn zero(&self, _: ViewMut<'_, Self>) -> Result<()> {
        Ok(())
    }
    fn copy(&self, _: ViewMut<'_, Self>, _: View<'_, Self>) -> Result<()> {
        Ok(())
    }
    fn linear(
        &self,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: Option<View<'_, Self>>,
        _: LinearDims,
    ) -> Result<()> {
        Ok(())
    }
    fn linear_act(
        &self,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: Act,
        _: LinearDims,
    ) -> Result<()> {
        Ok(())
    }
    fn linear_backward(
        &self,
        _: Option<ViewMut<'_, Self>>,
        _: Option<ViewMut<'_, Self>>,
        _: Option<ViewMut<'_, Self>>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: LinearDims,
    ) -> Result<()> {
        Ok(())
    }
    fn add(&self, _: ViewMut<'_, Self>, _: View<'_, Self>, _: View<'_, Self>) -> Result<()> {
        Ok(())
    }
    fn add_row_bias(&self, _: ViewMut<'_, Self>, _: View<'_, Self>) -> Result<()> {
        Ok(())
    }
    fn scale_rows(&self, _: ViewMut<'_, Self>, _: View<'_, Self>) -> Result<()> {
        Ok(())
    }
    fn activation(&self, _: ViewMut<'_, Self>, _: View<'_, Self>, _: Act) -> Result<()> {
        Ok(())
    }
    fn activation_backward(
        &self,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: Act,
    ) -> Result<()> {
        Ok(())
    }
    fn swiglu(&self, _: ViewMut<'_, Self>, _: View<'_, Self>, _: usize) -> Result<()> {
        Ok(())
    }
    fn swiglu_backward(
        &self,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: usize,
    ) -> Result<()> {
        Ok(())
    }
    fn layernorm(
        &self,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: f32,
    ) -> Result<()> {
        Ok(())
    }
    fn residual_layernorm(
        &self,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: f32,
    ) -> Result<()> {
        Ok(())
    }
    fn layernorm_backward(
        &self,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
    ) -> Result<()> {
        Ok(())
    }
    fn rotary(
        &self,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<()> {
        Ok(())
    }
    fn rotary_backward(
        &self,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<()> {
        Ok(())
    }
    fn embedding(&self, _: ViewMut<'_, Self>, _: View<'_, Self>, _: View<'_, Self>) -> Result<()> {
        Ok(())
    }
    fn embedding_backward(
        &self,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
    ) -> Result<()> {
        Ok(())
    }
    fn attention(
        &self,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: Option<View<'_, Self>>,
        _: Option<(View<'_, Self>, bool)>,
        _: &AttentionDims,
    ) -> Result<()> {
        Ok(())
    }
    fn attention_backward(
        &self,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: Option<ViewMut<'_, Self>>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: Option<View<'_, Self>>,
        _: Option<(View<'_, Self>, bool)>,
        _: &AttentionDims,
    ) -> Result<()> {
        Ok(())
    }
    fn sum_rows(&self, _: ViewMut<'_, Self>, _: View<'_, Self>) -> Result<()> {
        Ok(())
    }
    fn softmax(&self, _: ViewMut<'_, Self>, _: View<'_, Self>, _: usize) -> Result<()> {
        Ok(())
    }
    fn softmax_backward(
        &self,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: usize,
    ) -> Result<()> {
        Ok(())
    }
    fn conv1d(
        &self,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: Option<View<'_, Self>>,
        _: &Conv1dDims,
    ) -> Result<()> {
        Ok(())
    }
    fn conv1d_backward(
        &self,
        _: Option<ViewMut<'_, Self>>,
        _: ViewMut<'_, Self>,
        _: Option<ViewMut<'_, Self>>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: &Conv1dDims,
    ) -> Result<()> {
        Ok(())
    }
    fn batchnorm(
        &self,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: BatchNormStats<'_, Self>,
        _: f32,
    ) -> Result<()> {
        Ok(())
    }
    fn batchnorm_running_update(
        &self,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: usize,
        _: f32,
    ) -> Result<()> {
        Ok(())
    }
    fn batchnorm_backward(
        &self,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: f32,
        _: bool,
    ) -> Result<()> {
        Ok(())
    }
    fn attention_pool(
        &self,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: &PoolDims,
    ) -> Result<()> {
        Ok(())
    }
    fn attention_pool_backward(
        &self,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: &PoolDims,
    ) -> Result<()> {
        Ok(())
    }
    fn relative_logits(
        &self,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<()> {
        Ok(())
    }
    fn relative_logits_backward(
        &self,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<()> {
        Ok(())
    }
    fn mse(&self, _: View<'_, Self>, _: View<'_, Self>) -> Result<f32> {
        Ok(0.0)
    }
    fn mse_backward(
        &self,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: f32,
    ) -> Result<()> {
        Ok(())
    }
    fn sum_squares(&self, _: View<'_, Self>) -> Result<f32> {
        Ok(0.0)
    }
    fn adamw(
        &self,
        _: ViewMut<'_, Self>,
        _: Option<ViewMut<'_, Self>>,
        _: ViewMut<'_, Self>,
        _: ViewMut<'_, Self>,
        _: View<'_, Self>,
        _: &AdamWStep,
    ) -> Result<()> {
        Ok(())
    }
}
