//! A backend that runs no arithmetic: it hands out address ranges and counts bytes. Running the real model
//! code on it gives the memory a step of that code allocates — per allocation, live and peak — at any size,
//! in well under a second and with no weights (the `plan` command). It is the first piece of the planner:
//! the same code that runs is what gets measured, never a second hand-kept list.
//!
//! Reads return zeros, reductions return 0, and every op checks nothing: it is for sizing, not results.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
    /// Floating-point operations of the matrix products (linear layers, convolutions, attention): what a
    /// recompute policy adds is read from here.
    flops: AtomicU64,
    modules: Mutex<ModuleBytes>,
}

/// Bytes per module (as named by [`Backend::enter_module`]): live now, and live at the latest peak.
#[derive(Default, Debug)]
struct ModuleBytes {
    current: &'static str,
    live: BTreeMap<&'static str, usize>,
    at_peak: BTreeMap<&'static str, usize>,
}

/// A recorded allocation: an address range that exists only in the counters.
pub struct RecordedMem {
    addr: u64,
    bytes: usize,
    module: &'static str,
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
        let mut m = self
            .counters
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(live) = m.live.get_mut(self.module) {
            *live = live.saturating_sub(self.bytes);
        }
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

    /// Matrix-product FLOPs of every op run so far (forward and backward).
    pub fn flops(&self) -> u64 {
        self.counters.flops.load(Ordering::Relaxed)
    }

    fn count(&self, flops: usize) {
        self.counters
            .flops
            .fetch_add(flops as u64, Ordering::Relaxed);
    }

    /// Starts a new peak from what is live now.
    pub fn reset_peak(&self) {
        self.counters
            .peak
            .store(self.live_bytes(), Ordering::Relaxed);
        let mut m = self.modules();
        m.at_peak = m.live.clone();
    }

    /// Bytes allocated by each module (see [`Backend::enter_module`]; `""` before any) and live at the
    /// peak.
    pub fn bytes_at_peak(&self) -> Vec<(&'static str, usize)> {
        self.modules()
            .at_peak
            .iter()
            .map(|(&k, &v)| (k, v))
            .collect()
    }

    fn modules(&self) -> std::sync::MutexGuard<'_, ModuleBytes> {
        self.counters
            .modules
            .lock()
            .unwrap_or_else(|e| e.into_inner())
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
        let previous_peak = c.peak.fetch_max(live, Ordering::Relaxed);
        let module = {
            let mut m = self.modules();
            let module = m.current;
            *m.live.entry(module).or_default() += bytes;
            if live > previous_peak {
                m.at_peak = m.live.clone();
            }
            module
        };
        // Distinct, aligned, never-dereferenced addresses.
        let addr = c
            .next_addr
            .fetch_add((bytes as u64).div_ceil(256) * 256 + 256, Ordering::Relaxed);
        Ok(RecordedMem {
            addr,
            bytes,
            module,
            counters: c.clone(),
        })
    }
    fn enter_module(&self, module: &'static str) {
        self.modules().current = module;
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
        dims: LinearDims,
    ) -> Result<()> {
        self.count(linear_flops(&dims));
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
        dims: LinearDims,
    ) -> Result<()> {
        self.count(linear_flops(&dims));
        Ok(())
    }
    fn linear_backward(
        &self,
        dx: Option<ViewMut<'_, Self>>,
        dw: Option<ViewMut<'_, Self>>,
        _: Option<ViewMut<'_, Self>>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        dims: LinearDims,
    ) -> Result<()> {
        self.count(linear_flops(&dims) * (dx.is_some() as usize + dw.is_some() as usize));
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
        dims: &AttentionDims,
    ) -> Result<()> {
        // QKᵀ and PV.
        self.count(attention_products(dims) * 2);
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
        dims: &AttentionDims,
    ) -> Result<()> {
        // QKᵀ again, dV, dP, dQ and dK (FlashAttention-2's count: 2.5× the forward).
        self.count(attention_products(dims) * 5);
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
        dims: &Conv1dDims,
    ) -> Result<()> {
        self.count(conv_flops(dims));
        Ok(())
    }
    fn conv1d_backward(
        &self,
        dx: Option<ViewMut<'_, Self>>,
        _: ViewMut<'_, Self>,
        _: Option<ViewMut<'_, Self>>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        _: View<'_, Self>,
        dims: &Conv1dDims,
    ) -> Result<()> {
        self.count(conv_flops(dims) * (1 + dx.is_some() as usize));
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

/// `2·rows·d_in·d_out`.
fn linear_flops(d: &LinearDims) -> usize {
    2usize
        .saturating_mul(d.rows)
        .saturating_mul(d.d_in)
        .saturating_mul(d.d_out)
}

/// `2·batch·len·c_in·c_out·width`.
fn conv_flops(d: &Conv1dDims) -> usize {
    2usize
        .saturating_mul(d.batch)
        .saturating_mul(d.len)
        .saturating_mul(d.c_in)
        .saturating_mul(d.c_out)
        .saturating_mul(d.width)
}

/// FLOPs of one attention matrix product (`QKᵀ` or `PV`, taking the wider head dim).
fn attention_products(d: &AttentionDims) -> usize {
    2usize
        .saturating_mul(d.batch)
        .saturating_mul(d.heads)
        .saturating_mul(d.q_len)
        .saturating_mul(d.kv_len)
        .saturating_mul(d.head_dim.max(d.v_head_dim))
}
