//! One model, every device: the [`Backend`] op trait that every model and the training step are written
//! against, once. Three implementations sit behind it:
//! - [`cpu::CpuBackend`]: the reference, f32, over the CPU op bodies in [`crate::ops`];
//! - [`kernel::KernelBackend`] over any [`crate::gpu::KernelDevice`]: the host emulator and CUDA, with bf16
//!   activations and f32 statistics, gradients and master weights.
//!
//! Memory is reached through [`View`] / [`ViewMut`]: (address, element count, dtype) borrowed from a
//! [`Tensor`] (one allocation) or split from a larger view, and tagged with the backend type so a CPU view
//! cannot reach a GPU kernel. A `ViewMut` is only made from `&mut Tensor` or by splitting another
//! `ViewMut`, so two live mutable views never overlap and an output never aliases an input.
//!
//! Conventions of every op (as in [`crate::ops`]): a forward overwrites its output; a backward **adds** into
//! its gradients. Activations are in the backend's [`Backend::compute_dtype`]; norm statistics, the
//! log-sum-exp, scales, attention biases, parameter gradients and optimiser state are always f32. Model
//! code never names a dtype: it asks for [`Role`]s.

// Kernel-style signatures (outputs, saved statistics, inputs, dims) are long by nature.
#![allow(clippy::too_many_arguments)]

pub mod any;
mod arena;
pub mod cpu;
pub mod kernel;
pub mod meter;
pub mod record;
pub mod run_plan;
pub mod scratch;
pub mod state;

use std::marker::PhantomData;

pub use crate::ops::attention::AttentionDims;
pub use crate::ops::conv::Conv1dDims;
pub use crate::ops::gemm_bf16::HeadRows;
pub use crate::ops::matmul::LinearDims;
pub use crate::ops::optim::AdamWStep;
pub use crate::ops::pool::PoolDims;
use crate::runtime::DType;
use crate::{Error, Result};

/// The pointwise activations of the models.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// Exact erf GELU (ESM-2).
    GeluErf,
    /// `x·σ(1.702x)` (Enformer).
    GeluSigmoid,
    Relu,
    Softplus,
}

/// The two feed-forward input projections that end in a pointwise epilogue, as a backend may fuse them
/// ([`Backend::linear_epilogue_skips_pre`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    /// [`Backend::linear_act`]: bias, then an activation.
    Activation,
    /// [`Backend::linear_swiglu`]: SwiGLU over the product's two halves.
    SwiGlu,
}

/// What a tensor holds; the backend picks its dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Activations and their gradients: the compute dtype.
    Activation,
    /// The compute copy of parameters (what the forward reads): the weight dtype.
    Weight,
    /// An activation that the forward reads only as the input of linear layers (a layer norm's output,
    /// attention's, the FFN's activation): the weight dtype, since the product rounds it to that dtype
    /// anyway. The CPU's bf16 backend then stores it once in bf16, which its GEMM reads in place, rather
    /// than writing f32 that every linear layer reading it rounds again as it packs.
    LinearInput,
    /// Statistics, scales, biases of scores, gradients of parameters, master weights, optimiser state: f32.
    Exact,
    /// Token ids and lengths: i32.
    Index,
}

/// An op's use of the scratch a backend keeps for itself, outside its allocations (the CPU's attention
/// workspace, kernel devices' column buffers and partial sums): noted by the recording backend, so a
/// run of steps can reserve, before its first step, the most that any of its ops needs
/// ([`Backend::scratch_bytes`], [`Backend::reserve_scratch`]) instead of growing it in a later step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScratchUse {
    Attention(AttentionDims),
    AttentionBackward {
        dims: AttentionDims,
        broadcast_dbias: bool,
    },
    LayerNormBackward {
        rows: usize,
        dim: usize,
    },
    Conv1d(Conv1dDims),
    Conv1dBackward {
        dims: Conv1dDims,
        dx: bool,
    },
    BatchNormBackward {
        channels: usize,
    },
    AttentionPoolBackward {
        logits: usize,
    },
    /// A reduction to one value (MSE, sum of squares).
    Reduction,
}

/// An allocation of backend memory (host memory on the CPU and the emulator, device memory on CUDA).
pub trait Memory {
    fn addr(&self) -> u64;
    fn bytes(&self) -> usize;
}

/// The op trait. Every op checks the sizes and dtypes of its views and returns an error, never panics.
/// [`Backend::write_f32_finite`] as two passes: the check, then [`Backend::write_f32`]. What a backend
/// without a fused form does.
pub fn write_f32_finite_in_two_passes<B: Backend>(
    backend: &B,
    dst: ViewMut<'_, B>,
    src: &[f32],
) -> Result<Option<usize>> {
    if let Some(i) = crate::runtime::finite::first_non_finite(src) {
        return Ok(Some(i));
    }
    backend.write_f32(dst, src)?;
    Ok(None)
}

pub trait Backend: Sized {
    type Mem: Memory;

    fn name(&self) -> String;
    /// The dtype of activations (f32 on the CPU reference, bf16 on kernel devices).
    fn compute_dtype(&self) -> DType;
    /// Zero-filled memory.
    fn alloc(&self, bytes: usize) -> Result<Self::Mem>;
    /// How many allocations this backend has made (the planned-memory tests count them).
    fn allocations(&self) -> usize;
    /// The bytes its allocations hold, live and at the peak (scratch that ops keep for themselves, such
    /// as the CPU's attention workspace and kernel devices' scratch buffer, is not counted).
    fn meter(&self) -> &meter::ByteMeter;
    /// Waits for queued work (a no-op on synchronous backends).
    fn synchronize(&self) -> Result<()>;

    /// Names the part of the model (an encoder, the aggregator) whose allocations follow, so a planner
    /// can attribute memory to modules. Backends that compute ignore it.
    fn enter_module(&self, _module: &'static str) {}

    /// Starts a run of steps (of one shape, or of shapes up to the planned one): the allocations that
    /// follow are its step buffers. The recording backend notes their lifetimes from here; a backend
    /// given an arena plan ([`Backend::use_arena`]) makes the arena and places them by it.
    fn begin_steps(&self) -> Result<()> {
        Ok(())
    }

    /// Bytes of this backend's own scratch that `op` needs (0 where it keeps none).
    fn scratch_bytes(&self, _op: &ScratchUse) -> usize {
        0
    }

    /// Grows this backend's own scratch to at least `bytes` now, so that no step grows it later.
    fn reserve_scratch(&self, _bytes: usize) -> Result<()> {
        Ok(())
    }

    /// Marks the start of the run's second (warm) step. A backend placing buffers by an arena plan stops
    /// there: the first step made every step buffer, and anything allocated later (an evaluation
    /// between steps, say) comes from the heap.
    fn warm_step(&self) {}

    /// Places the step buffers of the next run of steps ([`Backend::begin_steps`]) by `plan`: one
    /// allocation instead of one per buffer, and bytes shared between buffers never needed together.
    fn use_arena(&self, _plan: crate::runtime::ArenaPlan) -> Result<()> {
        Err(Error::invalid(
            "arena",
            format!("{} does not place buffers by a plan", self.name()),
        ))
    }

    /// The dtype of the compute copy of parameters: the compute dtype, unless the backend keeps weights
    /// narrower than its activations (the CPU's bf16 backend).
    fn weight_dtype(&self) -> DType {
        self.compute_dtype()
    }

    fn dtype_of(&self, role: Role) -> DType {
        match role {
            Role::Activation => self.compute_dtype(),
            Role::Weight | Role::LinearInput => self.weight_dtype(),
            Role::Exact => DType::F32,
            Role::Index => DType::I32,
        }
    }

    // ---- transfers ----
    /// Writes host values into `dst`, converting to its dtype (f32, bf16; i32 from integral values).
    fn write_f32(&self, dst: ViewMut<'_, Self>, src: &[f32]) -> Result<()>;
    /// [`Backend::write_f32`] of values that must all be finite (weights as they are copied): the index of
    /// the first NaN or infinity, if there is one (then `dst` holds nothing useful), else `None` with every
    /// value written. This checks, then writes; a backend may do both in one pass over `src`.
    fn write_f32_finite(&self, dst: ViewMut<'_, Self>, src: &[f32]) -> Result<Option<usize>> {
        write_f32_finite_in_two_passes(self, dst, src)
    }
    fn write_i32(&self, dst: ViewMut<'_, Self>, src: &[i32]) -> Result<()>;
    /// Reads `src` to the host as f32.
    fn read_f32(&self, src: View<'_, Self>) -> Result<Vec<f32>>;
    /// Calls `f` with `src` as host f32 values: in place where the memory is host f32 (the CPU backend),
    /// through a copy otherwise.
    fn with_host_f32<R>(&self, src: View<'_, Self>, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        Ok(f(&self.read_f32(src)?))
    }
    fn zero(&self, dst: ViewMut<'_, Self>) -> Result<()>;
    /// `dst = src`, converting between f32 and the compute dtype where they differ.
    fn copy(&self, dst: ViewMut<'_, Self>, src: View<'_, Self>) -> Result<()>;

    // ---- linear algebra ----
    /// `y[rows, out] = x[rows, in]·Wᵀ + bias` with `w [out, in]`.
    fn linear(
        &self,
        y: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        bias: Option<View<'_, Self>>,
        dims: LinearDims,
    ) -> Result<()>;
    /// Linear with a bias and activation epilogue: `pre = x·Wᵀ + bias`, `out = act(pre)`. With `keep_pre`
    /// false the caller will not read `pre` (an inference forward), and a backend may leave it unwritten:
    /// the bf16 CPU backend then applies the activation to each block of the product while it is in cache,
    /// the f32 one writes the product to `out` and activates it in place, and `pre` may be empty
    /// ([`Backend::linear_epilogue_skips_pre`]).
    #[allow(clippy::too_many_arguments)]
    fn linear_act(
        &self,
        pre: ViewMut<'_, Self>,
        out: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        bias: View<'_, Self>,
        act: Act,
        dims: LinearDims,
        keep_pre: bool,
    ) -> Result<()>;
    /// Whether [`Backend::linear_residual`] adds the residual inside the product here (with f32
    /// activations), so that a model may end an attention block with it and a plain LayerNorm rather than
    /// [`Backend::linear`] then [`Backend::residual_layernorm`] (which the kernel devices fuse instead).
    fn fuses_linear_residual(&self) -> bool {
        false
    }
    /// `y = residual + (x·Wᵀ + bias)`, as a residual block ends: [`Backend::linear`] into `scratch` (the
    /// size of `y`), then [`Backend::add`] of the residual. A backend may instead add the residual as it
    /// writes the product and leave `scratch` unwritten (the bf16 CPU backend: the same bits, without
    /// storing the product and reading it back in a pass of its own). By default, the two ops.
    #[allow(clippy::too_many_arguments)]
    fn linear_residual(
        &self,
        y: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        bias: Option<View<'_, Self>>,
        residual: View<'_, Self>,
        scratch: ViewMut<'_, Self>,
        dims: LinearDims,
    ) -> Result<()> {
        unfused::linear_residual(self, y, x, w, bias, residual, scratch, dims)
    }
    /// Gradients of [`Backend::linear`]: `dx += dy·W`, `dw += dyᵀ·x`, `dbias += Σ_rows dy` (dw, dbias f32).
    fn linear_backward(
        &self,
        dx: Option<ViewMut<'_, Self>>,
        dw: Option<ViewMut<'_, Self>>,
        dbias: Option<ViewMut<'_, Self>>,
        dy: View<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        dims: LinearDims,
    ) -> Result<()>;

    // ---- pointwise ----
    /// `out = a + b`.
    fn add(&self, out: ViewMut<'_, Self>, a: View<'_, Self>, b: View<'_, Self>) -> Result<()>;
    /// `x[r, :] += bias` for every row of `x [rows, bias.len]`.
    fn add_row_bias(&self, x: ViewMut<'_, Self>, bias: View<'_, Self>) -> Result<()>;
    /// `x[r, :] *= scales[r]` (f32 scales, one per row of `x [scales.len, cols]`).
    fn scale_rows(&self, x: ViewMut<'_, Self>, scales: View<'_, Self>) -> Result<()>;
    fn activation(&self, out: ViewMut<'_, Self>, x: View<'_, Self>, act: Act) -> Result<()>;
    /// `dx += dout · act'(x)`.
    fn activation_backward(
        &self,
        dx: ViewMut<'_, Self>,
        dout: View<'_, Self>,
        x: View<'_, Self>,
        act: Act,
    ) -> Result<()>;
    /// SwiGLU on rows `[gate | value]` of `u [rows, 2·width]`: `out = silu(gate)·value`.
    fn swiglu(&self, out: ViewMut<'_, Self>, u: View<'_, Self>, width: usize) -> Result<()>;
    /// Whether [`Backend::linear_act`] (`Epilogue::Activation`) or [`Backend::linear_swiglu`]
    /// (`Epilogue::SwiGlu`) without `keep_pre` leaves `pre` untouched, so that an inference forward may pass
    /// an empty one instead of allocating the widest activation of a feed-forward layer.
    fn linear_epilogue_skips_pre(&self, epilogue: Epilogue) -> bool {
        let _ = epilogue;
        false
    }
    /// A SwiGLU feed-forward's input projection: `pre = x·Wᵀ` (`[rows, d_out]`, the gate half then the
    /// value half; no bias) and `out = swiglu(pre)` (`[rows, d_out/2]`). With `keep_pre` false the caller
    /// will not read `pre` (an inference forward), and a backend may leave it unwritten: the bf16 CPU
    /// backend then keeps each block of the product in cache and writes only `out`, the same values, and
    /// `pre` may be empty ([`Backend::linear_epilogue_skips_pre`]). By default, [`Backend::linear`] then
    /// [`Backend::swiglu`].
    fn linear_swiglu(
        &self,
        mut pre: ViewMut<'_, Self>,
        out: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        dims: LinearDims,
        keep_pre: bool,
    ) -> Result<()> {
        let _ = keep_pre;
        self.linear(pre.rb(), x, w, None, dims)?;
        self.swiglu(out, pre.view(), dims.d_out / 2)
    }
    fn swiglu_backward(
        &self,
        du: ViewMut<'_, Self>,
        dout: View<'_, Self>,
        u: View<'_, Self>,
        width: usize,
    ) -> Result<()>;

    // ---- normalisation ----
    /// `out = LN(x)·gamma + beta` over rows of `gamma.len`, saving `mean`, `rstd` (f32, one per row).
    fn layernorm(
        &self,
        out: ViewMut<'_, Self>,
        mean: ViewMut<'_, Self>,
        rstd: ViewMut<'_, Self>,
        x: View<'_, Self>,
        gamma: View<'_, Self>,
        beta: View<'_, Self>,
        eps: f32,
    ) -> Result<()>;
    /// Residual add fused with the LayerNorm that follows it: `sum = x + delta`, `out = LN(sum)`.
    fn residual_layernorm(
        &self,
        sum: ViewMut<'_, Self>,
        out: ViewMut<'_, Self>,
        mean: ViewMut<'_, Self>,
        rstd: ViewMut<'_, Self>,
        x: View<'_, Self>,
        delta: View<'_, Self>,
        gamma: View<'_, Self>,
        beta: View<'_, Self>,
        eps: f32,
    ) -> Result<()>;
    /// `dx += …`, `dgamma += …`, `dbeta += …` (f32).
    fn layernorm_backward(
        &self,
        dx: ViewMut<'_, Self>,
        dgamma: ViewMut<'_, Self>,
        dbeta: ViewMut<'_, Self>,
        dout: View<'_, Self>,
        x: View<'_, Self>,
        gamma: View<'_, Self>,
        mean: View<'_, Self>,
        rstd: View<'_, Self>,
    ) -> Result<()>;

    // ---- positions and tokens ----
    /// Split-half rotary embedding of `x [batch, len, heads, head_dim]` with f32 tables `[≥len, head_dim/2]`.
    fn rotary(
        &self,
        out: ViewMut<'_, Self>,
        x: View<'_, Self>,
        cos: View<'_, Self>,
        sin: View<'_, Self>,
        len: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()>;
    /// `dx += ropeᵀ(dout)`.
    fn rotary_backward(
        &self,
        dx: ViewMut<'_, Self>,
        dout: View<'_, Self>,
        cos: View<'_, Self>,
        sin: View<'_, Self>,
        len: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()>;
    /// `out[t, :] = table[ids[t], :]` (`table [vocab, dim]`); ids out of the vocabulary are an error.
    fn embedding(
        &self,
        out: ViewMut<'_, Self>,
        ids: View<'_, Self>,
        table: View<'_, Self>,
    ) -> Result<()>;
    /// `dtable[ids[t], :] += dout[t, :]` (f32).
    fn embedding_backward(
        &self,
        dtable: ViewMut<'_, Self>,
        dout: View<'_, Self>,
        ids: View<'_, Self>,
    ) -> Result<()>;

    // ---- attention ----
    /// FlashAttention-2's contract: `out` and the f32 log-sum-exp `lse [B, H, Lq]` are saved, never the
    /// probabilities. `kv_lens` (i32 per batch) masks keys; `bias` (f32 `[1 or B, H, Lq, Lk]`, with
    /// whether it is per batch) is added to the scores.
    fn attention(
        &self,
        out: ViewMut<'_, Self>,
        lse: ViewMut<'_, Self>,
        q: View<'_, Self>,
        k: View<'_, Self>,
        v: View<'_, Self>,
        kv_lens: Option<View<'_, Self>>,
        bias: Option<(View<'_, Self>, bool)>,
        dims: &AttentionDims,
    ) -> Result<()>;
    /// [`Backend::rotary`] of `q` and `k` into `q_rot` and `k_rot`, then [`Backend::attention`] of them
    /// (no score bias), for a forward that keeps neither (inference): a backend may instead turn each
    /// head's rows by their angles as its attention reads them and leave `q_rot` and `k_rot` unwritten (the
    /// bf16 CPU backend, with the same bits and without the rotary passes over memory). By default, the
    /// three ops.
    #[allow(clippy::too_many_arguments)]
    fn rotary_attention(
        &self,
        out: ViewMut<'_, Self>,
        lse: ViewMut<'_, Self>,
        rotated: (ViewMut<'_, Self>, ViewMut<'_, Self>),
        q: View<'_, Self>,
        k: View<'_, Self>,
        v: View<'_, Self>,
        tables: (View<'_, Self>, View<'_, Self>),
        kv_lens: Option<View<'_, Self>>,
        dims: &AttentionDims,
    ) -> Result<()> {
        unfused::rotary_attention(self, out, lse, rotated, [q, k, v], tables, kv_lens, dims)
    }
    /// Whether this backend's inference attention reads q, k and v head-major for `dims`: then a model may
    /// project them with [`Backend::linear_heads`] and attend with [`Backend::rotary_attention_heads`],
    /// so that each head's rows are contiguous (the bf16 CPU backend's AMX attention: a head's rows 3 KiB
    /// apart at NT-v2's shapes cost it about 9%). Elsewhere false, and those two ops refuse to run.
    fn reads_heads_contiguously(&self, dims: &AttentionDims) -> bool {
        let _ = dims;
        false
    }
    /// [`Backend::linear`] with `y` written head-major ([`HeadRows`]: row `b·len + l`, column `h·hd + i`
    /// at `((b·heads + h)·len + l)·hd + i`), the same values. Only where
    /// [`Backend::reads_heads_contiguously`] holds.
    fn linear_heads(
        &self,
        y: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        bias: Option<View<'_, Self>>,
        dims: LinearDims,
        rows: HeadRows,
    ) -> Result<()> {
        let _ = (y, x, w, bias, dims, rows);
        Err(Error::invalid(
            "linear_heads",
            "this backend does not lay out attention heads",
        ))
    }
    /// [`Backend::rotary_attention`] of head-major `q`, `k` and `v` ([`Backend::linear_heads`]), the output
    /// `[B, L, H, Dv]` as there, and the same bits. Only where [`Backend::reads_heads_contiguously`] holds.
    #[allow(clippy::too_many_arguments)]
    fn rotary_attention_heads(
        &self,
        out: ViewMut<'_, Self>,
        lse: ViewMut<'_, Self>,
        q: View<'_, Self>,
        k: View<'_, Self>,
        v: View<'_, Self>,
        tables: (View<'_, Self>, View<'_, Self>),
        kv_lens: Option<View<'_, Self>>,
        dims: &AttentionDims,
    ) -> Result<()> {
        let _ = (out, lse, q, k, v, tables, kv_lens, dims);
        Err(Error::invalid(
            "rotary_attention_heads",
            "this backend does not read head-major attention inputs",
        ))
    }
    /// Adds into `dq`, `dk`, `dv` and, when given, `dbias` (f32, laid out like the bias).
    fn attention_backward(
        &self,
        dq: ViewMut<'_, Self>,
        dk: ViewMut<'_, Self>,
        dv: ViewMut<'_, Self>,
        dbias: Option<ViewMut<'_, Self>>,
        dout: View<'_, Self>,
        out: View<'_, Self>,
        lse: View<'_, Self>,
        q: View<'_, Self>,
        k: View<'_, Self>,
        v: View<'_, Self>,
        kv_lens: Option<View<'_, Self>>,
        bias: Option<(View<'_, Self>, bool)>,
        dims: &AttentionDims,
    ) -> Result<()>;

    // ---- reductions and rows ----
    /// `out[c] += Σ_r m[r, c]` over the rows of `m [rows, out.len]` into f32 (bias gradients).
    fn sum_rows(&self, out: ViewMut<'_, Self>, m: View<'_, Self>) -> Result<()>;
    /// Row softmax over the last dimension `dim`.
    fn softmax(&self, out: ViewMut<'_, Self>, x: View<'_, Self>, dim: usize) -> Result<()>;
    /// `dx += y ∘ (dy − rowsum(dy ∘ y))`.
    fn softmax_backward(
        &self,
        dx: ViewMut<'_, Self>,
        dy: View<'_, Self>,
        y: View<'_, Self>,
        dim: usize,
    ) -> Result<()>;

    // ---- Enformer ----
    /// 'same'-padded 1-D convolution, channels last: `x [B, L, Cin]`, `w [Cout, Cin, width]`.
    fn conv1d(
        &self,
        out: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        bias: Option<View<'_, Self>>,
        dims: &Conv1dDims,
    ) -> Result<()>;
    fn conv1d_backward(
        &self,
        dx: Option<ViewMut<'_, Self>>,
        dw: ViewMut<'_, Self>,
        dbias: Option<ViewMut<'_, Self>>,
        dout: View<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        dims: &Conv1dDims,
    ) -> Result<()>;
    /// Batch normalisation over the channels of `x [rows, C]`, with the running statistics (eval) or the
    /// batch's own (train: biased variance). The statistics used are saved in `mean` and `var` (f32) for the
    /// backward; after a training step [`Backend::batchnorm_running_update`] folds them into the running
    /// ones.
    fn batchnorm(
        &self,
        out: ViewMut<'_, Self>,
        mean: ViewMut<'_, Self>,
        var: ViewMut<'_, Self>,
        x: View<'_, Self>,
        gamma: View<'_, Self>,
        beta: View<'_, Self>,
        stats: BatchNormStats<'_, Self>,
        eps: f32,
    ) -> Result<()>;
    /// `running = (1 − momentum)·running + momentum·batch`, with the batch variance made unbiased over
    /// `rows` (PyTorch's convention).
    fn batchnorm_running_update(
        &self,
        running_mean: ViewMut<'_, Self>,
        running_var: ViewMut<'_, Self>,
        mean: View<'_, Self>,
        var: View<'_, Self>,
        rows: usize,
        momentum: f32,
    ) -> Result<()>;
    /// `dx += …`, `dgamma += …`, `dbeta += …`; `train` says whether the statistics came from the batch (and
    /// so carry gradient).
    fn batchnorm_backward(
        &self,
        dx: ViewMut<'_, Self>,
        dgamma: ViewMut<'_, Self>,
        dbeta: ViewMut<'_, Self>,
        dout: View<'_, Self>,
        x: View<'_, Self>,
        gamma: View<'_, Self>,
        mean: View<'_, Self>,
        var: View<'_, Self>,
        eps: f32,
        train: bool,
    ) -> Result<()>;
    /// Enformer's attention pooling by 2 along the length: softmax over pairs of `x·W` logits (saved, f32).
    fn attention_pool(
        &self,
        out: ViewMut<'_, Self>,
        logits: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        dims: &PoolDims,
    ) -> Result<()>;
    fn attention_pool_backward(
        &self,
        dx: ViewMut<'_, Self>,
        dw: ViewMut<'_, Self>,
        dout: View<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        logits: View<'_, Self>,
        dims: &PoolDims,
    ) -> Result<()>;
    /// Enformer's relative-position logits `bias [B, H, n, n]` (f32) from `q_pos [B, n, H, dk]` and
    /// `rel_k [2n−1, H, dk]`: `bias[b,h,i,j] = q_pos[b,i,h]·rel_k[j−i+n−1, h]`.
    fn relative_logits(
        &self,
        bias: ViewMut<'_, Self>,
        q_pos: View<'_, Self>,
        rel_k: View<'_, Self>,
        batch: usize,
        heads: usize,
        n: usize,
    ) -> Result<()>;
    /// Adds into `dq_pos` and `drel_k`.
    fn relative_logits_backward(
        &self,
        dq_pos: ViewMut<'_, Self>,
        drel_k: ViewMut<'_, Self>,
        dbias: View<'_, Self>,
        q_pos: View<'_, Self>,
        rel_k: View<'_, Self>,
        batch: usize,
        heads: usize,
        n: usize,
    ) -> Result<()>;

    // ---- loss and optimiser ----
    /// Mean squared error of `pred` (compute dtype) against `target` (f32).
    fn mse(&self, pred: View<'_, Self>, target: View<'_, Self>) -> Result<f32>;
    /// `dpred += dloss · 2(pred − target)/n`.
    fn mse_backward(
        &self,
        dpred: ViewMut<'_, Self>,
        pred: View<'_, Self>,
        target: View<'_, Self>,
        dloss: f32,
    ) -> Result<()>;
    /// `Σ x²` over f32 values, in a fixed order.
    fn sum_squares(&self, x: View<'_, Self>) -> Result<f32>;
    /// One AdamW step over f32 master weights, refreshing their compute copy (`None` where the master is
    /// the compute copy, as on the f32 CPU backend).
    fn adamw(
        &self,
        params: ViewMut<'_, Self>,
        compute_copy: Option<ViewMut<'_, Self>>,
        m: ViewMut<'_, Self>,
        v: ViewMut<'_, Self>,
        grads: View<'_, Self>,
        step: &AdamWStep,
    ) -> Result<()>;
}

/// The statistics a batchnorm normalises with.
pub enum BatchNormStats<'a, B> {
    /// The running statistics (evaluation).
    Running { mean: View<'a, B>, var: View<'a, B> },
    /// The batch's own (training).
    Batch,
}

/// One allocation of backend memory with a dtype and an element count.
pub struct Tensor<B: Backend> {
    mem: B::Mem,
    dtype: DType,
    numel: usize,
}

impl<B: Backend> Tensor<B> {
    /// A zero-filled tensor of `numel` elements of `dtype`; the byte size is checked before allocating.
    pub fn zeros(backend: &B, dtype: DType, numel: usize) -> Result<Self> {
        let bytes = numel.checked_mul(dtype.size_in_bytes()).ok_or_else(|| {
            Error::invalid(
                "tensor size",
                format!("{numel} elements of {dtype} overflow the address space"),
            )
        })?;
        Ok(Tensor {
            mem: backend.alloc(bytes)?,
            dtype,
            numel,
        })
    }

    /// A zero-filled tensor for `role` (its dtype is the backend's choice).
    pub fn new(backend: &B, role: Role, numel: usize) -> Result<Self> {
        Self::zeros(backend, backend.dtype_of(role), numel)
    }

    /// A tensor holding host values, converted to the dtype of `role`.
    pub fn from_f32(backend: &B, role: Role, values: &[f32]) -> Result<Self> {
        let mut t = Self::new(backend, role, values.len())?;
        backend.write_f32(t.view_mut(), values)?;
        Ok(t)
    }

    pub fn numel(&self) -> usize {
        self.numel
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn view(&self) -> View<'_, B> {
        View {
            addr: self.mem.addr(),
            numel: self.numel,
            dtype: self.dtype,
            _p: PhantomData,
        }
    }

    pub fn view_mut(&mut self) -> ViewMut<'_, B> {
        ViewMut {
            addr: self.mem.addr(),
            numel: self.numel,
            dtype: self.dtype,
            _p: PhantomData,
        }
    }

    /// Makes the tensor hold exactly `numel` elements of `role`, reallocating only when it must (a new
    /// shape or role; a new allocation is zero-filled, a kept one keeps its contents).
    pub fn ensure(&mut self, backend: &B, role: Role, numel: usize) -> Result<()> {
        let dtype = backend.dtype_of(role);
        let fits = numel
            .checked_mul(dtype.size_in_bytes())
            .is_some_and(|bytes| bytes <= self.mem.bytes());
        if self.dtype != dtype || !fits {
            *self = Self::zeros(backend, dtype, numel)?;
        }
        self.numel = numel;
        Ok(())
    }
}

fn slice_check(what: &str, numel: usize, start: usize, len: usize) -> Result<()> {
    match start.checked_add(len) {
        Some(end) if end <= numel => Ok(()),
        _ => Err(Error::shape(
            "view",
            format!("{what}: elements {start}..+{len} of a view of {numel}"),
        )),
    }
}

/// Borrow and backend markers of the views: a view borrows memory of backend `B` for `'a`.
type ReadMarker<'a, B> = (&'a [u8], fn() -> B);
type WriteMarker<'a, B> = (&'a mut [u8], fn() -> B);

/// A read-only view: `numel` elements of `dtype` at an address of backend `B`'s memory.
pub struct View<'a, B> {
    addr: u64,
    numel: usize,
    dtype: DType,
    _p: PhantomData<ReadMarker<'a, B>>,
}

impl<B> Clone for View<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for View<'_, B> {}

impl<'a, B> View<'a, B> {
    /// # Safety
    /// `addr` must address `numel` elements of `dtype` of `B`'s memory, readable and not written for `'a`.
    pub(crate) unsafe fn from_raw(addr: u64, numel: usize, dtype: DType) -> Self {
        View {
            addr,
            numel,
            dtype,
            _p: PhantomData,
        }
    }

    pub fn numel(&self) -> usize {
        self.numel
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn bytes(&self) -> usize {
        self.numel * self.dtype.size_in_bytes()
    }

    /// Elements `start .. start + len`.
    pub fn slice(self, start: usize, len: usize) -> Result<View<'a, B>> {
        slice_check("slice", self.numel, start, len)?;
        Ok(View {
            addr: self.addr + (start * self.dtype.size_in_bytes()) as u64,
            numel: len,
            ..self
        })
    }
}

/// A mutable view; never overlaps another live view (see the module comment).
pub struct ViewMut<'a, B> {
    addr: u64,
    numel: usize,
    dtype: DType,
    _p: PhantomData<WriteMarker<'a, B>>,
}

impl<'a, B> ViewMut<'a, B> {
    /// # Safety
    /// `addr` must address `numel` elements of `dtype` of `B`'s memory, reachable by no other view for `'a`.
    pub(crate) unsafe fn from_raw(addr: u64, numel: usize, dtype: DType) -> Self {
        ViewMut {
            addr,
            numel,
            dtype,
            _p: PhantomData,
        }
    }

    pub fn numel(&self) -> usize {
        self.numel
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn bytes(&self) -> usize {
        self.numel * self.dtype.size_in_bytes()
    }

    /// A shorter-lived mutable view of the same elements (to pass to an op and keep this one).
    pub fn rb(&mut self) -> ViewMut<'_, B> {
        ViewMut {
            addr: self.addr,
            numel: self.numel,
            dtype: self.dtype,
            _p: PhantomData,
        }
    }

    /// Read access while this view is borrowed.
    pub fn view(&self) -> View<'_, B> {
        View {
            addr: self.addr,
            numel: self.numel,
            dtype: self.dtype,
            _p: PhantomData,
        }
    }

    /// Gives up write access for good.
    pub fn into_view(self) -> View<'a, B> {
        View {
            addr: self.addr,
            numel: self.numel,
            dtype: self.dtype,
            _p: PhantomData,
        }
    }

    /// Elements `start .. start + len`, for the rest of this view's life.
    pub fn slice_mut(self, start: usize, len: usize) -> Result<ViewMut<'a, B>> {
        slice_check("slice", self.numel, start, len)?;
        Ok(ViewMut {
            addr: self.addr + (start * self.dtype.size_in_bytes()) as u64,
            numel: len,
            ..self
        })
    }

    /// Two disjoint views: elements `..mid` and `mid..`.
    pub fn split_at(self, mid: usize) -> Result<(ViewMut<'a, B>, ViewMut<'a, B>)> {
        slice_check("split", self.numel, 0, mid)?;
        let size = self.dtype.size_in_bytes();
        Ok((
            ViewMut {
                addr: self.addr,
                numel: mid,
                dtype: self.dtype,
                _p: PhantomData,
            },
            ViewMut {
                addr: self.addr + (mid * size) as u64,
                numel: self.numel - mid,
                dtype: self.dtype,
                _p: PhantomData,
            },
        ))
    }

    /// Disjoint views at the given `(start, len)` element ranges, which must be sorted and not overlap.
    pub fn split_ranges(self, ranges: &[(usize, usize)]) -> Result<Vec<ViewMut<'a, B>>> {
        let mut out = Vec::with_capacity(ranges.len());
        let mut end = 0;
        for &(start, len) in ranges {
            if start < end {
                return Err(Error::shape(
                    "view",
                    format!("ranges overlap or are unsorted at element {start}"),
                ));
            }
            slice_check("split", self.numel, start, len)?;
            out.push(ViewMut {
                addr: self.addr + (start * self.dtype.size_in_bytes()) as u64,
                numel: len,
                dtype: self.dtype,
                _p: PhantomData,
            });
            end = start + len;
        }
        Ok(out)
    }
}

/// Checks that a view has `want` elements of `dtype`.
pub(crate) fn check_view(
    op: &'static str,
    name: &str,
    numel: usize,
    dtype: DType,
    want: usize,
    want_dtype: DType,
) -> Result<()> {
    if dtype != want_dtype {
        return Err(Error::shape(
            op,
            format!("{name} is {dtype}, expected {want_dtype}"),
        ));
    }
    if numel != want {
        return Err(Error::shape(
            op,
            format!("{name} has {numel} elements, expected {want}"),
        ));
    }
    Ok(())
}

/// `rows` of a `[rows, cols]` matrix of `numel` elements, or an error naming the op.
pub(crate) fn rows_of(op: &'static str, name: &str, numel: usize, cols: usize) -> Result<usize> {
    if cols == 0 || !numel.is_multiple_of(cols) {
        return Err(Error::shape(
            op,
            format!("{name} has {numel} elements, not whole rows of {cols}"),
        ));
    }
    Ok(numel / cols)
}

/// The unfused forms of the trait's fused ops: their default bodies, and what a backend that fuses some
/// cases runs for the others.
pub mod unfused {
    use super::{AttentionDims, Backend, LinearDims, Result, View, ViewMut};

    /// [`Backend::linear_residual`] as two ops: the product into `scratch`, then the residual added.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_residual<B: Backend>(
        b: &B,
        y: ViewMut<'_, B>,
        x: View<'_, B>,
        w: View<'_, B>,
        bias: Option<View<'_, B>>,
        residual: View<'_, B>,
        mut scratch: ViewMut<'_, B>,
        dims: LinearDims,
    ) -> Result<()> {
        b.linear(scratch.rb(), x, w, bias, dims)?;
        b.add(y, residual, scratch.view())
    }

    /// [`Backend::rotary_attention`] as three ops: q and k rotated into `q_rot` and `k_rot`, then the
    /// attention of those.
    #[allow(clippy::too_many_arguments)]
    pub fn rotary_attention<B: Backend>(
        b: &B,
        out: ViewMut<'_, B>,
        lse: ViewMut<'_, B>,
        (mut q_rot, mut k_rot): (ViewMut<'_, B>, ViewMut<'_, B>),
        [q, k, v]: [View<'_, B>; 3],
        (cos, sin): (View<'_, B>, View<'_, B>),
        kv_lens: Option<View<'_, B>>,
        dims: &AttentionDims,
    ) -> Result<()> {
        let (heads, hd) = (dims.heads, dims.head_dim);
        b.rotary(q_rot.rb(), q, cos, sin, dims.q_len, heads, hd)?;
        b.rotary(k_rot.rb(), k, cos, sin, dims.kv_len, heads, hd)?;
        b.attention(out, lse, q_rot.view(), k_rot.view(), v, kv_lens, None, dims)
    }
}
