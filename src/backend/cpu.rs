//! The CPU backend: the reference. f32 everywhere (activations, statistics, gradients), over the op bodies
//! of [`crate::ops`], which are themselves checked against naive f64 code and finite differences.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::arena::ArenaSlot;
use super::meter::{ByteMeter, Metered};
use super::scratch::{Scratch, ScratchPool};
use super::unfused;
use super::{
    check_view, rows_of, Act, AdamWStep, AttentionDims, Backend, BatchNormStats, Conv1dDims,
    Epilogue, LinearDims, Memory, PoolDims, ScratchUse, View, ViewMut,
};
use crate::error::{check_len, checked_product};
use crate::ops;
use crate::ops::attention::{AttentionBias, AttentionInputs, AttentionRope};
use crate::ops::elementwise::{GeluErf, GeluSigmoid, Relu, Softplus};
use crate::runtime::{ArenaPlan, DType};
use crate::{Error, Result};
use half::bf16;

/// Host memory, 64-byte aligned and zero-filled. Ops reach it only through views. Either its own
/// allocation or a range of an arena it keeps alive.
pub struct HostMem {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
    owner: Owner,
}

/// Where a [`HostMem`]'s bytes come from.
enum Owner {
    /// Its own allocator block, and the bytes from the block's start to `ptr` (see [`HostMem::zeroed`]).
    Block(std::alloc::Layout, usize),
    /// A range of an arena, kept alive while this value lives.
    Arena { _keep_alive: Arc<HostArena> },
}

/// Bytes past a block at the allocator's natural alignment (16) to reach a 64-byte boundary, at most.
const ALIGN_SLACK: usize = 48;

/// The block [`HostMem::zeroed`] asks the allocator for, `bytes` visible: natural alignment, with slack.
fn block_layout(bytes: usize) -> Result<std::alloc::Layout> {
    bytes
        .max(1)
        .checked_add(ALIGN_SLACK)
        .and_then(|size| std::alloc::Layout::from_size_align(size, 16).ok())
        .ok_or_else(|| Error::invalid("allocation", format!("{bytes} bytes overflow")))
}

/// One arena allocation (metered once, as one allocation) that step buffers are carved from.
pub struct HostArena {
    mem: HostMem,
    _meter: Metered<()>,
}

// SAFETY: HostMem is a plain heap allocation; access goes through views whose borrows the type system tracks.
unsafe impl Send for HostMem {}
unsafe impl Sync for HostMem {}

impl HostMem {
    /// `bytes` of zeros, 64-byte aligned. The block is asked for at the allocator's natural alignment and
    /// aligned up by hand: then `alloc_zeroed` is `calloc`, which takes fresh pages from the kernel
    /// already zero, where at an alignment of 64 the standard allocator allocates and then writes every
    /// byte, so every page of an activation arena was faulted in and cleared before its first use (4% of a
    /// bf16 Enformer forward on Zen 5).
    fn zeroed(bytes: usize) -> Result<Self> {
        let layout = std::alloc::Layout::from_size_align(bytes.max(1), 64)
            .map_err(|e| Error::invalid("allocation", format!("{bytes} bytes: {e}")))?;
        let block = block_layout(bytes)?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(block) };
        if raw.is_null() {
            return Err(Error::invalid(
                "allocation",
                format!("out of memory for {bytes} bytes"),
            ));
        }
        let shift = raw.align_offset(64);
        if shift > ALIGN_SLACK {
            // SAFETY: allocated just above with this layout.
            unsafe { std::alloc::dealloc(raw, block) };
            return Err(Error::invalid(
                "allocation",
                "a block below 16-byte alignment",
            ));
        }
        // SAFETY: `shift ≤ ALIGN_SLACK`, so `shift + bytes` lies within the block, and the pointer is
        // not null (inside a non-null block).
        let ptr = unsafe { std::ptr::NonNull::new_unchecked(raw.add(shift)) };
        Ok(HostMem {
            ptr,
            layout,
            owner: Owner::Block(block, shift),
        })
    }

    /// `bytes` at `offset` of `arena`, zero-filled when `zero` (when the plan says its zeros are read;
    /// otherwise its bytes may still hold another buffer's live value until its first write).
    fn carve(arena: Arc<HostArena>, offset: usize, bytes: usize, zero: bool) -> Result<Self> {
        let layout = std::alloc::Layout::from_size_align(bytes.max(1), 64)
            .map_err(|e| Error::invalid("allocation", format!("{bytes} bytes: {e}")))?;
        if offset
            .checked_add(bytes)
            .is_none_or(|end| end > arena.mem.layout.size())
        {
            return Err(Error::invalid("arena", "a buffer past the arena's end"));
        }
        // SAFETY: `offset + bytes` lies within the arena (checked above), which this value keeps alive.
        let ptr = unsafe {
            let p = arena.mem.ptr.as_ptr().add(offset);
            if zero {
                std::ptr::write_bytes(p, 0, bytes);
            }
            std::ptr::NonNull::new_unchecked(p)
        };
        Ok(HostMem {
            ptr,
            layout,
            owner: Owner::Arena { _keep_alive: arena },
        })
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        if let Owner::Block(block, shift) = self.owner {
            // SAFETY: allocated in `zeroed` with this layout, `ptr` being `shift` bytes into it.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr().sub(shift), block) }
        }
    }
}

impl Memory for HostMem {
    fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }
    fn bytes(&self) -> usize {
        self.layout.size()
    }
}

/// The CPU backend (multi-threaded with rayon): f32 activations (the reference), or bf16 activations and
/// compute copies of the weights with f32 accumulation and statistics ([`CpuBackend::bf16`]).
#[derive(Default)]
pub struct CpuBackend {
    allocations: AtomicUsize,
    meter: Arc<ByteMeter>,
    /// An arena plan for the next run of steps, then its replay.
    arena: ArenaSlot<HostArena>,
    /// Attention scratch, grown on demand and kept.
    workspace: Mutex<Vec<f32>>,
    /// Rounds every activation (and activation gradient) an op writes to bf16, as kernel devices store
    /// them, while computing in f32: the "bf16-rounded reference" of FlashAttention's accuracy criterion,
    /// applied to whole models.
    bf16_storage: bool,
    /// Activations and weight compute copies in bf16 memory (`compute_dtype` bf16).
    bf16_activations: bool,
    /// Weight compute copies in bf16 memory, activations f32 (`weight_dtype` bf16).
    bf16_weights: bool,
    /// f32 copies of bf16 operands while an op runs (bf16 activations only).
    scratch: ScratchPool,
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// The reference with bf16 activation storage (see the `bf16_storage` field).
    pub fn with_bf16_storage() -> Self {
        CpuBackend {
            bf16_storage: true,
            ..Self::default()
        }
    }

    /// The bf16 backend, as `--dtype bf16` runs it: the compute copies of the weights are bf16 and every
    /// linear layer runs on the bf16 GEMM ([`ops::gemm_bf16`]: AMX tiles, else `vdpbf16ps`) with f32
    /// accumulation. Its activation operand is bf16: stored so by the op that makes it where the model
    /// marks it [`super::Role::LinearInput`] (layer norms, attention, the FFN's activation), else rounded as it
    /// is packed; either way the same values. Attention's two products (`Q·Kᵀ`, `P·V`) take bf16 operands
    /// too (the values in two parts), on AMX tiles where the CPU has them, else as `vdpbf16ps` vector
    /// code (AVX512-BF16) or in f32 without it; other activations,
    /// statistics, the softmax and the residual stream stay f32. Half the weight memory and about twice
    /// the GEMM rate of f32, at the accuracy of bf16 matrix products (the same as PyTorch's CPU
    /// autocast).
    pub fn bf16() -> Self {
        CpuBackend {
            bf16_weights: true,
            ..Self::default()
        }
    }

    /// bf16 everywhere kernel devices use it: activations and the compute copies of the weights are bf16
    /// in memory; linear layers run on the bf16 GEMM and attention's products on bf16 operands; the other
    /// ops widen their inputs to f32, compute in f32 and round their outputs once. Statistics, parameter
    /// gradients and optimiser state stay f32.
    pub fn bf16_activations() -> Self {
        CpuBackend {
            bf16_activations: true,
            ..Self::default()
        }
    }

    /// The backend for activations of `dtype` (f32 or bf16).
    pub fn with_dtype(dtype: DType) -> Result<Self> {
        match dtype {
            DType::F32 => Ok(Self::new()),
            DType::BF16 => Ok(Self::bf16()),
            other => Err(Error::invalid(
                "dtype",
                format!("the CPU backend computes in f32 or bf16, not {other}"),
            )),
        }
    }

    /// An activation output that the op adds into or updates: rounded to bf16 when dropped (or
    /// [`Stored::settle`]d) in bf16-storage mode; for bf16 memory, widened first and rounded back.
    fn act<'a>(
        &'a self,
        op: &'static str,
        name: &str,
        v: ViewMut<'a, CpuBackend>,
    ) -> Result<Stored<'a>> {
        self.stored(op, name, v, true)
    }

    /// An activation output that the op overwrites entirely (a forward): for bf16 memory, the f32 values
    /// start unspecified instead of widened.
    fn out<'a>(
        &'a self,
        op: &'static str,
        name: &str,
        v: ViewMut<'a, CpuBackend>,
    ) -> Result<Stored<'a>> {
        self.stored(op, name, v, false)
    }

    /// An output that the op overwrites entirely and writes in its memory's type: bf16 memory directly
    /// (the op rounds each value once), f32 as [`CpuBackend::out`] (rounded in place in bf16-storage mode).
    fn output<'a>(
        &'a self,
        op: &'static str,
        name: &str,
        v: ViewMut<'a, CpuBackend>,
    ) -> Result<Output<'a>> {
        Ok(match v.dtype() {
            DType::BF16 => Output::Bf16(bf16s_mut(v)),
            _ => Output::F32(self.out(op, name, v)?),
        })
    }

    fn stored<'a>(
        &'a self,
        op: &'static str,
        name: &str,
        v: ViewMut<'a, CpuBackend>,
        read_old: bool,
    ) -> Result<Stored<'a>> {
        let slot = match v.dtype() {
            DType::BF16 => {
                let target = bf16s_mut(v);
                let mut values = self.scratch.take(target.len());
                if read_old {
                    ops::simd::widen_bf16(&mut values, target);
                }
                Slot::Widened(values, target)
            }
            _ => Slot::Host(f32s_mut(op, name, v)?),
        };
        Ok(Stored {
            slot,
            round: self.bf16_storage,
        })
    }

    fn act_opt<'a>(
        &'a self,
        op: &'static str,
        name: &str,
        v: Option<ViewMut<'a, CpuBackend>>,
    ) -> Result<Option<Stored<'a>>> {
        v.map(|v| self.act(op, name, v)).transpose()
    }

    /// The shared scratch, grown to at least `len` f32 elements; a size the allocator refuses is an error
    /// naming `op`, not an abort.
    fn workspace(
        &self,
        op: &'static str,
        len: usize,
    ) -> Result<std::sync::MutexGuard<'_, Vec<f32>>> {
        let mut ws = self
            .workspace
            .lock()
            .map_err(|_| Error::invalid(op, "workspace poisoned"))?;
        let have = ws.len();
        if have < len {
            ws.try_reserve_exact(len - have)
                .map_err(|e| Error::invalid(op, format!("a workspace of {len} f32 values: {e}")))?;
            ws.resize(len, 0.0);
        }
        Ok(ws)
    }

    /// An input as f32 values: in place for f32 memory, widened into scratch for bf16.
    fn f32s<'a>(
        &'a self,
        op: &'static str,
        name: &str,
        v: View<'a, CpuBackend>,
    ) -> Result<Input<'a>> {
        match v.dtype() {
            DType::F32 => Ok(Input::Host(exact(op, name, v)?)),
            DType::BF16 => {
                let src = bf16s(v);
                let mut values = self.scratch.take(src.len());
                ops::simd::widen_bf16(&mut values, src);
                Ok(Input::Widened(values))
            }
            other => Err(Error::shape(
                op,
                format!("{name} is {other}, expected f32 or bf16"),
            )),
        }
    }

    /// `y = x·Wᵀ + bias` on the path the dtypes select: the bf16 GEMM when the weights are bf16 (bf16
    /// activations in and out, or f32 activations rounded as they are packed), the f32 GEMM otherwise.
    fn linear_fwd(
        &self,
        op: &'static str,
        y: ViewMut<'_, CpuBackend>,
        x: View<'_, CpuBackend>,
        w: View<'_, CpuBackend>,
        bias: Option<View<'_, CpuBackend>>,
        dims: LinearDims,
    ) -> Result<()> {
        use ops::gemm_bf16::{GemmOut, Lhs};
        let bias = bias.map(|b| self.f32s(op, "bias", b)).transpose()?;
        match (y.dtype(), x.dtype(), w.dtype()) {
            (DType::BF16, DType::BF16, DType::BF16) => ops::matmul::linear_bf16_weights(
                GemmOut::Bf16 {
                    c: bf16s_mut(y),
                    bias: bias.as_deref(),
                },
                Lhs::Bf16(bf16s(x)),
                bf16s(w),
                dims,
            ),
            (DType::F32, x_dtype @ (DType::F32 | DType::BF16), DType::BF16) => {
                let mut y = self.out(op, "y", y)?;
                let x = lhs_of(op, x_dtype, x)?;
                ops::matmul::linear_bf16_weights(
                    GemmOut::F32 {
                        c: &mut y,
                        accumulate: false,
                        bias: bias.as_deref(),
                    },
                    x,
                    bf16s(w),
                    dims,
                )
            }
            _ => ops::matmul::linear(
                &mut self.out(op, "y", y)?,
                &self.f32s(op, "x", x)?,
                &self.f32s(op, "w", w)?,
                bias.as_deref(),
                dims,
            ),
        }
    }

    /// A view of host f32 values (for example parameters mapped from a weight file).
    pub fn host_view(values: &[f32]) -> View<'_, CpuBackend> {
        // SAFETY: the slice is readable and borrowed for the view's life.
        unsafe { View::from_raw(values.as_ptr() as u64, values.len(), DType::F32) }
    }

    /// A mutable view of host f32 values.
    pub fn host_view_mut(values: &mut [f32]) -> ViewMut<'_, CpuBackend> {
        // SAFETY: the slice is borrowed mutably for the view's life.
        unsafe { ViewMut::from_raw(values.as_mut_ptr() as u64, values.len(), DType::F32) }
    }

    /// The left operand of a feed-forward input projection whose activation the bf16 GEMM applies on
    /// its way out (`linear_act`, `linear_swiglu`): where the caller does not keep `pre`, this backend
    /// skips it ([`skips_epilogue_pre`]), and the weights and `out` are bf16. None where the op runs in
    /// two steps.
    #[allow(clippy::too_many_arguments)]
    fn fused_epilogue_lhs<'a>(
        &self,
        op: &'static str,
        epilogue: Epilogue,
        keep_pre: bool,
        out: DType,
        x: View<'a, CpuBackend>,
        w: DType,
    ) -> Result<Option<ops::gemm_bf16::Lhs<'a>>> {
        use ops::gemm_bf16::Lhs;
        if keep_pre
            || !self.linear_epilogue_skips_pre(epilogue)
            || (out, w) != (DType::BF16, DType::BF16)
        {
            return Ok(None);
        }
        Ok(match x.dtype() {
            DType::BF16 => Some(Lhs::Bf16(bf16s(x))),
            DType::F32 => Some(Lhs::F32(exact(op, "x", x)?)),
            _ => None,
        })
    }

    /// The attention's operands as host f32 (bf16 activations widened), the key lengths and the bias: what
    /// both passes read.
    fn attention_operands<'a>(
        &'a self,
        op: &'static str,
        [q, k, v]: [View<'a, Self>; 3],
        kv_lens: Option<View<'a, Self>>,
        bias: Option<(View<'a, Self>, bool)>,
    ) -> Result<AttentionOperands<'a>> {
        Ok(AttentionOperands {
            q: self.f32s(op, "q", q)?,
            k: self.f32s(op, "k", k)?,
            v: self.f32s(op, "v", v)?,
            lens: lens_of(op, kv_lens)?,
            bias: bias
                .map(|(b, per_batch)| {
                    Ok::<_, Error>(AttentionBias {
                        data: exact(op, "bias", b)?,
                        per_batch,
                    })
                })
                .transpose()?,
        })
    }

    /// The attention forward of both [`Backend::attention`] and [`Backend::rotary_attention`] (where
    /// `rope` holds the cos and sin tables, the bf16 products apply them).
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: ViewMut<'_, Self>,
        lse: ViewMut<'_, Self>,
        [q, k, v]: [View<'_, Self>; 3],
        kv_lens: Option<View<'_, Self>>,
        bias: Option<(View<'_, Self>, bool)>,
        rope: Option<(View<'_, Self>, View<'_, Self>)>,
        head_major: bool,
        dims: &AttentionDims,
    ) -> Result<()> {
        const OP: &str = "attention";
        let operands = self.attention_operands(OP, [q, k, v], kv_lens, bias)?;
        let tables = match rope {
            Some((cos, sin)) => Some((self.f32s(OP, "cos", cos)?, self.f32s(OP, "sin", sin)?)),
            None => None,
        };
        let inputs = AttentionInputs {
            rope: tables.as_ref().map(|(cos, sin)| AttentionRope { cos, sin }),
            head_major,
            ..operands.inputs()
        };
        let need = dims.checked_workspace_len(OP, rayon::current_num_threads())?;
        let mut ws = self.workspace(OP, need)?;
        // The bf16 backend runs both products on bf16 operands, as PyTorch's bf16 SDPA does.
        let products = if self.weight_dtype() == DType::BF16 {
            ops::attention::Products::Bf16
        } else {
            ops::attention::Products::F32
        };
        // Its bf16 output (the output projection's input) is written directly where the bf16 products run.
        if products == ops::attention::Products::Bf16
            && out.dtype() == DType::BF16
            && ops::attention::writes_bf16(&inputs, dims)
        {
            return ops::attention::attention_bf16_out(
                bf16s_mut(out),
                f32s_mut(OP, "lse", lse)?,
                inputs,
                dims,
                &mut ws,
            );
        }
        ops::attention::attention_with(
            &mut self.out(OP, "out", out)?,
            f32s_mut(OP, "lse", lse)?,
            inputs,
            dims,
            &mut ws,
            products,
        )
    }
}

/// Whether the CPU backend with these dtypes fuses [`Backend::linear_act`] or [`Backend::linear_swiglu`]
/// for inference and leaves their `pre` untouched:
/// - bf16 weights and f32 activations, both ops: the bf16 GEMM applies the epilogue to each block of its
///   product, where the two-step form would round nothing between the product (f32) and the
///   activation, so the bits are the same;
/// - f32 throughout, the activation: the product goes to `out`, which the bias and the activation then
///   overwrite in place. SwiGLU's output is half its product's width, so it keeps `pre`.
pub(crate) fn skips_epilogue_pre(weight: DType, compute: DType, epilogue: Epilogue) -> bool {
    match (weight, compute) {
        (DType::BF16, DType::F32) => true,
        (DType::F32, DType::F32) => epilogue == Epilogue::Activation,
        _ => false,
    }
}

/// What [`CpuBackend::attention_operands`] holds while an attention pass reads it.
struct AttentionOperands<'a> {
    q: Input<'a>,
    k: Input<'a>,
    v: Input<'a>,
    lens: Option<Vec<usize>>,
    bias: Option<AttentionBias<'a>>,
}

impl AttentionOperands<'_> {
    /// The inputs of [`ops::attention`], without rotary tables.
    fn inputs(&self) -> AttentionInputs<'_> {
        AttentionInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            kv_lens: self.lens.as_deref(),
            bias: self.bias,
            rope: None,
            head_major: false,
        }
    }
}

/// Whether the CPU backend (and the planner recording for it) reads q, k and v head-major for an inference
/// attention of `dims` ([`Backend::reads_heads_contiguously`]): bf16 weights with f32 activations (the
/// bf16 GEMM writes the f32 projections head-major), where its rotary attention runs the bf16 products,
/// which turn the rows themselves. Not the kernel devices, whose activations are bf16.
pub(crate) fn reads_heads(weight_dtype: DType, compute_dtype: DType, dims: &AttentionDims) -> bool {
    (weight_dtype, compute_dtype) == (DType::BF16, DType::F32)
        && ops::attention::rotates_inside(dims)
}

/// Whether the CPU backend (and the planner recording for it) adds a residual inside the product for
/// weights and activations of these dtypes: bf16 weights with f32 activations, the bf16 GEMM writing f32
/// ([`Backend::fuses_linear_residual`]).
pub(crate) fn fuses_residual(weight: DType, compute: DType) -> bool {
    (weight, compute) == (DType::BF16, DType::F32)
}

/// Where an op's output values live while it writes them.
enum Slot<'a> {
    /// In place, in host f32 memory.
    Host(&'a mut [f32]),
    /// In an f32 copy of bf16 memory, rounded back when the output is settled.
    Widened(Scratch<'a>, &'a mut [bf16]),
}

/// An op's input as f32 values; see [`CpuBackend::f32s`].
enum Input<'a> {
    Host(&'a [f32]),
    Widened(Scratch<'a>),
}

impl std::ops::Deref for Input<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Input::Host(v) => v,
            Input::Widened(v) => v,
        }
    }
}

/// An activation output being written; see [`CpuBackend::act`].
struct Stored<'a> {
    slot: Slot<'a>,
    round: bool,
}

impl Stored<'_> {
    /// Rounds now (before a later step of the same op reads the values, as a kernel would).
    fn settle(&mut self) {
        self.store();
        if let Slot::Widened(values, target) = &mut self.slot {
            ops::simd::widen_bf16(values, target);
        }
    }

    /// Writes the values to their storage: rounded in place in bf16-storage mode, to bf16 memory.
    fn store(&mut self) {
        match &mut self.slot {
            Slot::Host(values) => {
                if self.round {
                    values
                        .iter_mut()
                        .for_each(|v| *v = bf16::from_f32(*v).to_f32());
                }
            }
            Slot::Widened(values, target) => ops::simd::round_to_bf16(target, values),
        }
    }
}

impl std::ops::Deref for Stored<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &self.slot {
            Slot::Host(v) => v,
            Slot::Widened(v, _) => v,
        }
    }
}

impl std::ops::DerefMut for Stored<'_> {
    fn deref_mut(&mut self) -> &mut [f32] {
        match &mut self.slot {
            Slot::Host(v) => v,
            Slot::Widened(v, _) => v,
        }
    }
}

impl Drop for Stored<'_> {
    fn drop(&mut self) {
        self.store();
    }
}

/// The output of an op that can write bf16 itself ([`ops::output::OutElem`]): f32 values (see
/// [`CpuBackend::out`]), or bf16 memory written directly, with no f32 copy to round afterwards.
enum Output<'a> {
    F32(Stored<'a>),
    Bf16(&'a mut [bf16]),
}

/// Runs `$body` with `$o` bound to the output's values, `&mut [f32]` or `&mut [bf16]`: the op is generic
/// over [`ops::output::OutElem`], and this picks its instance.
macro_rules! with_output {
    ($output:expr, |$o:ident| $body:expr) => {
        match $output {
            Output::F32(mut stored) => {
                let $o: &mut [f32] = &mut stored;
                $body
            }
            Output::Bf16($o) => $body,
        }
    };
}

fn bf16s<'a>(v: View<'a, CpuBackend>) -> &'a [bf16] {
    // SAFETY: a bf16 CPU view addresses `numel` host bf16 values, shared for `'a`.
    unsafe { std::slice::from_raw_parts(v.addr() as *const bf16, v.numel()) }
}

fn bf16s_mut<'a>(v: ViewMut<'a, CpuBackend>) -> &'a mut [bf16] {
    // SAFETY: a bf16 CPU mutable view addresses `numel` host bf16 values no other view reaches for `'a`.
    unsafe { std::slice::from_raw_parts_mut(v.addr() as *mut bf16, v.numel()) }
}

/// `dst = src`, rounded to nearest even where `dst` is bf16.
fn store(op: &'static str, dst: ViewMut<'_, CpuBackend>, src: &[f32]) -> Result<()> {
    check_len(op, "src", src.len(), dst.numel())?;
    match dst.dtype() {
        DType::BF16 => ops::simd::round_to_bf16(bf16s_mut(dst), src),
        _ => f32s_mut(op, "dst", dst)?.copy_from_slice(src),
    }
    Ok(())
}

/// The left operand of a product with bf16 weights: bf16 activations as they are, f32 ones rounded as
/// the GEMM packs them.
fn lhs_of<'a>(
    op: &'static str,
    dtype: DType,
    x: View<'a, CpuBackend>,
) -> Result<ops::gemm_bf16::Lhs<'a>> {
    use ops::gemm_bf16::Lhs;
    Ok(match dtype {
        DType::BF16 => Lhs::Bf16(bf16s(x)),
        _ => Lhs::F32(exact(op, "x", x)?),
    })
}

/// An input that is always f32 (statistics, biases of scores).
fn exact<'a>(op: &'static str, name: &str, v: View<'a, CpuBackend>) -> Result<&'a [f32]> {
    if v.dtype() != DType::F32 {
        return Err(Error::shape(
            op,
            format!("{name} is {}, expected f32", v.dtype()),
        ));
    }
    // SAFETY: a CPU view addresses `numel` host f32 values, shared for `'a`.
    Ok(unsafe { std::slice::from_raw_parts(v.addr() as *const f32, v.numel()) })
}

/// An f32 output (statistics, parameter gradients, optimiser state: always f32).
fn f32s_mut<'a>(op: &'static str, name: &str, v: ViewMut<'a, CpuBackend>) -> Result<&'a mut [f32]> {
    if v.dtype() != DType::F32 {
        return Err(Error::shape(
            op,
            format!("{name} is {}, expected f32", v.dtype()),
        ));
    }
    // SAFETY: a CPU mutable view addresses `numel` host f32 values that no other view reaches for `'a`.
    Ok(unsafe { std::slice::from_raw_parts_mut(v.addr() as *mut f32, v.numel()) })
}

fn i32s<'a>(op: &'static str, name: &str, v: View<'a, CpuBackend>) -> Result<&'a [i32]> {
    if v.dtype() != DType::I32 {
        return Err(Error::shape(
            op,
            format!("{name} is {}, expected i32", v.dtype()),
        ));
    }
    // SAFETY: as for `f32s`.
    Ok(unsafe { std::slice::from_raw_parts(v.addr() as *const i32, v.numel()) })
}

fn opt_mut<'a>(
    op: &'static str,
    name: &str,
    v: Option<ViewMut<'a, CpuBackend>>,
) -> Result<Option<&'a mut [f32]>> {
    v.map(|v| f32s_mut(op, name, v)).transpose()
}

fn lens_of(op: &'static str, v: Option<View<'_, CpuBackend>>) -> Result<Option<Vec<usize>>> {
    v.map(|v| {
        i32s(op, "kv_lens", v)?
            .iter()
            .map(|&l| {
                usize::try_from(l)
                    .map_err(|_| Error::invalid(op, format!("negative key length {l}")))
            })
            .collect()
    })
    .transpose()
}

fn activation_fwd<O: ops::output::OutElem>(act: Act, out: &mut [O], x: &[f32]) -> Result<()> {
    match act {
        Act::GeluErf => ops::elementwise::activation::<GeluErf, O>(out, x),
        Act::GeluSigmoid => ops::elementwise::activation::<GeluSigmoid, O>(out, x),
        Act::Relu => ops::elementwise::activation::<Relu, O>(out, x),
        Act::Softplus => ops::elementwise::activation::<Softplus, O>(out, x),
    }
}

/// `act`'s vector body over f32 values, as [`activation_fwd`] runs it: a fused GEMM epilogue calling it
/// gives the same bits.
fn activation_chunk(act: Act) -> ops::gemm_bf16::ActChunk {
    use ops::elementwise::Activation;
    match act {
        Act::GeluErf => GeluErf::f_chunk,
        Act::GeluSigmoid => GeluSigmoid::f_chunk,
        Act::Relu => Relu::f_chunk,
        Act::Softplus => Softplus::f_chunk,
    }
}

fn activation_bwd(act: Act, dx: &mut [f32], dout: &[f32], x: &[f32]) -> Result<()> {
    use ops::elementwise::activation_backward as bw;
    match act {
        Act::GeluErf => bw::<GeluErf>(dx, dout, x),
        Act::GeluSigmoid => bw::<GeluSigmoid>(dx, dout, x),
        Act::Relu => bw::<Relu>(dx, dout, x),
        Act::Softplus => bw::<Softplus>(dx, dout, x),
    }
}

impl Backend for CpuBackend {
    type Mem = Metered<HostMem>;

    fn name(&self) -> String {
        let dtypes = match (self.weight_dtype(), self.compute_dtype()) {
            (DType::F32, _) => "f32".to_string(),
            (w, a) if w == a => w.to_string(),
            (w, a) => format!("{w} weights, {a} activations"),
        };
        format!("cpu {dtypes} ({} threads)", rayon::current_num_threads())
    }

    fn compute_dtype(&self) -> DType {
        if self.bf16_activations {
            DType::BF16
        } else {
            DType::F32
        }
    }

    fn weight_dtype(&self) -> DType {
        if self.bf16_activations || self.bf16_weights {
            DType::BF16
        } else {
            DType::F32
        }
    }

    fn alloc(&self, bytes: usize) -> Result<Metered<HostMem>> {
        if let Some(place) = self.arena.take(bytes)? {
            // Carved from the arena, which is metered (and counted) once.
            let part = HostMem::carve(place.arena, place.offset, place.capacity, place.zero)?;
            return Ok(Metered::new(part, 0, &self.meter));
        }
        self.allocations.fetch_add(1, Ordering::Relaxed);
        Ok(Metered::new(HostMem::zeroed(bytes)?, bytes, &self.meter))
    }

    fn begin_steps(&self) -> Result<()> {
        self.arena.begin(|bytes| {
            self.allocations.fetch_add(1, Ordering::Relaxed);
            Ok(HostArena {
                mem: HostMem::zeroed(bytes)?,
                _meter: Metered::new((), bytes, &self.meter),
            })
        })
    }

    fn use_arena(&self, plan: ArenaPlan) -> Result<()> {
        self.arena.set_plan(plan)
    }

    fn warm_step(&self) {
        self.arena.end();
    }

    fn scratch_bytes(&self, op: &ScratchUse) -> usize {
        match op {
            ScratchUse::Attention(dims) | ScratchUse::AttentionBackward { dims, .. } => dims
                .workspace_len(rayon::current_num_threads())
                .saturating_mul(4),
            // The bf16 convolution's padded input and reordered weight (2 bytes a value, rounded up to
            // whole f32 words of the workspace).
            ScratchUse::Conv1d(dims) if self.bf16_weights => {
                ops::conv::conv1d_bf16_scratch_len(dims)
                    .map_or(usize::MAX, |values| values.div_ceil(2).saturating_mul(4))
            }
            _ => 0,
        }
    }

    fn reserve_scratch(&self, bytes: usize) -> Result<()> {
        self.workspace("scratch", bytes.div_ceil(4)).map(drop)
    }

    fn meter(&self) -> &ByteMeter {
        &self.meter
    }

    fn allocations(&self) -> usize {
        self.allocations.load(Ordering::Relaxed)
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn write_f32(&self, dst: ViewMut<'_, Self>, src: &[f32]) -> Result<()> {
        match dst.dtype() {
            DType::I32 => {
                let ints: Vec<i32> = src.iter().map(|&v| v as i32).collect();
                self.write_i32(dst, &ints)
            }
            _ => store("write", dst, src),
        }
    }

    /// bf16 destinations round and check in one pass ([`ops::simd::round_to_bf16_finite`]).
    fn write_f32_finite(&self, dst: ViewMut<'_, Self>, src: &[f32]) -> Result<Option<usize>> {
        if dst.dtype() != DType::BF16 {
            return super::write_f32_finite_in_two_passes(self, dst, src);
        }
        check_len("write", "src", src.len(), dst.numel())?;
        Ok(if ops::simd::round_to_bf16_finite(bf16s_mut(dst), src) {
            None
        } else {
            crate::runtime::finite::first_non_finite(src)
        })
    }

    fn write_i32(&self, dst: ViewMut<'_, Self>, src: &[i32]) -> Result<()> {
        check_view(
            "write",
            "dst",
            dst.numel(),
            dst.dtype(),
            src.len(),
            DType::I32,
        )?;
        // SAFETY: an i32 view of `numel` host values, exclusively borrowed.
        let d = unsafe { std::slice::from_raw_parts_mut(dst.addr() as *mut i32, dst.numel()) };
        d.copy_from_slice(src);
        Ok(())
    }

    fn read_f32(&self, src: View<'_, Self>) -> Result<Vec<f32>> {
        match src.dtype() {
            DType::I32 => Ok(i32s("read", "src", src)?
                .iter()
                .map(|&v| v as f32)
                .collect()),
            _ => Ok(self.f32s("read", "src", src)?.to_vec()),
        }
    }

    fn with_host_f32<R>(&self, src: View<'_, Self>, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        Ok(f(&self.f32s("read", "src", src)?))
    }

    fn zero(&self, dst: ViewMut<'_, Self>) -> Result<()> {
        // SAFETY: the view's bytes are exclusively borrowed host memory; zero is valid for f32 and i32.
        unsafe { std::ptr::write_bytes(dst.addr() as *mut u8, 0, dst.bytes()) };
        Ok(())
    }

    fn copy(&self, dst: ViewMut<'_, Self>, src: View<'_, Self>) -> Result<()> {
        store("copy", dst, &self.f32s("copy", "src", src)?)
    }

    fn linear(
        &self,
        y: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        bias: Option<View<'_, Self>>,
        dims: LinearDims,
    ) -> Result<()> {
        self.linear_fwd("linear", y, x, w, bias, dims)
    }

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
        const OP: &str = "linear_residual";
        use ops::gemm_bf16::{GemmOut, Lhs};
        // The bf16 GEMM writing f32 (bf16 weights, f32 activations) adds the residual as it writes.
        let fused = !self.bf16_storage
            && (y.dtype(), w.dtype(), residual.dtype()) == (DType::F32, DType::BF16, DType::F32);
        let lhs = match x.dtype() {
            DType::BF16 if fused => Some(Lhs::Bf16(bf16s(x))),
            DType::F32 if fused => Some(Lhs::F32(exact(OP, "x", x)?)),
            _ => None,
        };
        let Some(lhs) = lhs else {
            return unfused::linear_residual(self, y, x, w, bias, residual, scratch, dims);
        };
        let bias = bias.map(|b| self.f32s(OP, "bias", b)).transpose()?;
        let residual = exact(OP, "residual", residual)?;
        let out = GemmOut::Residual {
            c: f32s_mut(OP, "y", y)?,
            residual,
            bias: bias.as_deref(),
        };
        ops::matmul::linear_bf16_weights(out, lhs, bf16s(w), dims)
    }

    fn linear_act(
        &self,
        mut pre: ViewMut<'_, Self>,
        out: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        bias: View<'_, Self>,
        act: Act,
        dims: LinearDims,
        keep_pre: bool,
    ) -> Result<()> {
        const OP: &str = "linear_act";
        let epilogue = Epilogue::Activation;
        if let Some(x) =
            self.fused_epilogue_lhs(OP, epilogue, keep_pre, out.dtype(), x, w.dtype())?
        {
            let bias = self.f32s(OP, "bias", bias)?;
            let out = ops::gemm_bf16::GemmOut::Activated {
                c: bf16s_mut(out),
                bias: Some(&bias),
                act: activation_chunk(act),
            };
            return ops::matmul::linear_bf16_weights(out, x, bf16s(w), dims);
        }
        if !self.bf16_storage && [out.dtype(), x.dtype(), w.dtype()] == [DType::F32; 3] {
            // f32: the product alone, then the bias and the activation in one pass over each row.
            let bias = self.f32s(OP, "bias", bias)?;
            check_len(OP, "bias", bias.len(), dims.d_out)?;
            let (x, w) = (self.f32s(OP, "x", x)?, self.f32s(OP, "w", w)?);
            let mut out = self.out(OP, "out", out)?;
            let act = activation_chunk(act);
            // Without `keep_pre` this backend skips `pre` here ([`skips_epilogue_pre`]).
            if keep_pre {
                let mut pre = self.out(OP, "pre", pre)?;
                ops::matmul::linear(&mut pre, &x, &w, None, dims)?;
                return ops::elementwise::bias_activation(&mut out, Some(&mut pre), &bias, act);
            }
            ops::matmul::linear(&mut out, &x, &w, None, dims)?;
            return ops::elementwise::bias_activation(&mut out, None, &bias, act);
        }
        self.linear_fwd(OP, pre.rb(), x, w, Some(bias), dims)?;
        // `pre` as stored (rounded where activations are bf16), as a kernel reads it back.
        let pre = self.f32s(OP, "pre", pre.view())?;
        with_output!(self.output(OP, "out", out)?, |o| activation_fwd(
            act, o, &pre
        ))
    }

    fn linear_backward(
        &self,
        dx: Option<ViewMut<'_, Self>>,
        dw: Option<ViewMut<'_, Self>>,
        dbias: Option<ViewMut<'_, Self>>,
        dy: View<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        dims: LinearDims,
    ) -> Result<()> {
        const OP: &str = "linear_backward";
        ops::matmul::linear_backward(
            self.act_opt(OP, "dx", dx)?.as_deref_mut(),
            opt_mut(OP, "dw", dw)?,
            opt_mut(OP, "dbias", dbias)?,
            &self.f32s(OP, "dy", dy)?,
            &self.f32s(OP, "x", x)?,
            &self.f32s(OP, "w", w)?,
            dims,
        )
    }

    fn add(&self, out: ViewMut<'_, Self>, a: View<'_, Self>, b: View<'_, Self>) -> Result<()> {
        ops::elementwise::add(
            &mut self.out("add", "out", out)?,
            &self.f32s("add", "a", a)?,
            &self.f32s("add", "b", b)?,
        )
    }

    fn add_row_bias(&self, x: ViewMut<'_, Self>, bias: View<'_, Self>) -> Result<()> {
        const OP: &str = "add_row_bias";
        let (mut x, bias) = (self.act(OP, "x", x)?, &self.f32s(OP, "bias", bias)?);
        rows_of(OP, "x", x.len(), bias.len())?;
        x.chunks_mut(bias.len())
            .for_each(|row| row.iter_mut().zip(bias.iter()).for_each(|(o, b)| *o += b));
        Ok(())
    }

    fn scale_rows(&self, x: ViewMut<'_, Self>, scales: View<'_, Self>) -> Result<()> {
        const OP: &str = "scale_rows";
        let (mut x, scales) = (self.act(OP, "x", x)?, &self.f32s(OP, "scales", scales)?);
        if scales.is_empty() || x.len() % scales.len() != 0 {
            return Err(Error::shape(
                OP,
                format!("{} values in {} rows", x.len(), scales.len()),
            ));
        }
        let cols = x.len() / scales.len();
        if cols > 0 {
            x.chunks_mut(cols)
                .zip(scales.iter())
                .for_each(|(row, &s)| row.iter_mut().for_each(|v| *v *= s));
        }
        Ok(())
    }

    fn activation(&self, out: ViewMut<'_, Self>, x: View<'_, Self>, act: Act) -> Result<()> {
        let x = self.f32s("activation", "x", x)?;
        with_output!(self.output("activation", "out", out)?, |o| {
            activation_fwd(act, o, &x)
        })
    }

    fn activation_backward(
        &self,
        dx: ViewMut<'_, Self>,
        dout: View<'_, Self>,
        x: View<'_, Self>,
        act: Act,
    ) -> Result<()> {
        const OP: &str = "activation_backward";
        activation_bwd(
            act,
            &mut self.act(OP, "dx", dx)?,
            &self.f32s(OP, "dout", dout)?,
            &self.f32s(OP, "x", x)?,
        )
    }

    fn fuses_linear_residual(&self) -> bool {
        !self.bf16_storage && fuses_residual(self.weight_dtype(), self.compute_dtype())
    }

    fn linear_epilogue_skips_pre(&self, epilogue: Epilogue) -> bool {
        // The bf16-storage reference rounds `pre` as kernel devices store it: always two steps.
        !self.bf16_storage
            && skips_epilogue_pre(self.weight_dtype(), self.compute_dtype(), epilogue)
    }

    fn linear_swiglu(
        &self,
        mut pre: ViewMut<'_, Self>,
        out: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        dims: LinearDims,
        keep_pre: bool,
    ) -> Result<()> {
        const OP: &str = "linear_swiglu";
        let epilogue = Epilogue::SwiGlu;
        let Some(x) = self.fused_epilogue_lhs(OP, epilogue, keep_pre, out.dtype(), x, w.dtype())?
        else {
            self.linear_fwd(OP, pre.rb(), x, w, None, dims)?;
            return self.swiglu(out, pre.view(), dims.d_out / 2);
        };
        let out = ops::gemm_bf16::GemmOut::SwiGlu { c: bf16s_mut(out) };
        ops::matmul::linear_bf16_weights(out, x, bf16s(w), dims)
    }

    fn swiglu(&self, out: ViewMut<'_, Self>, u: View<'_, Self>, width: usize) -> Result<()> {
        let u = self.f32s("swiglu", "u", u)?;
        with_output!(self.output("swiglu", "out", out)?, |o| {
            ops::elementwise::swiglu(o, &u, width)
        })
    }

    fn swiglu_backward(
        &self,
        du: ViewMut<'_, Self>,
        dout: View<'_, Self>,
        u: View<'_, Self>,
        width: usize,
    ) -> Result<()> {
        const OP: &str = "swiglu_backward";
        ops::elementwise::swiglu_backward(
            &mut self.act(OP, "du", du)?,
            &self.f32s(OP, "dout", dout)?,
            &self.f32s(OP, "u", u)?,
            width,
        )
    }

    fn layernorm(
        &self,
        out: ViewMut<'_, Self>,
        mean: ViewMut<'_, Self>,
        rstd: ViewMut<'_, Self>,
        x: View<'_, Self>,
        gamma: View<'_, Self>,
        beta: View<'_, Self>,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "layernorm";
        let (mean, rstd) = (f32s_mut(OP, "mean", mean)?, f32s_mut(OP, "rstd", rstd)?);
        let (x, dim) = (self.f32s(OP, "x", x)?, gamma.numel());
        let (gamma, beta) = (self.f32s(OP, "gamma", gamma)?, self.f32s(OP, "beta", beta)?);
        with_output!(self.output(OP, "out", out)?, |o| {
            ops::norm::layernorm(o, mean, rstd, &x, &gamma, &beta, dim, eps)
        })
    }

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
    ) -> Result<()> {
        const OP: &str = "residual_layernorm";
        let mut sum = self.out(OP, "sum", sum)?;
        ops::elementwise::add(
            &mut sum,
            &self.f32s(OP, "x", x)?,
            &self.f32s(OP, "delta", delta)?,
        )?;
        sum.settle();
        let (mean, rstd) = (f32s_mut(OP, "mean", mean)?, f32s_mut(OP, "rstd", rstd)?);
        let dim = gamma.numel();
        let (gamma, beta) = (self.f32s(OP, "gamma", gamma)?, self.f32s(OP, "beta", beta)?);
        with_output!(self.output(OP, "out", out)?, |o| {
            ops::norm::layernorm(o, mean, rstd, &sum, &gamma, &beta, dim, eps)
        })
    }

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
    ) -> Result<()> {
        const OP: &str = "layernorm_backward";
        ops::norm::layernorm_backward(
            &mut self.act(OP, "dx", dx)?,
            f32s_mut(OP, "dgamma", dgamma)?,
            f32s_mut(OP, "dbeta", dbeta)?,
            &self.f32s(OP, "dout", dout)?,
            &self.f32s(OP, "x", x)?,
            &self.f32s(OP, "gamma", gamma)?,
            &self.f32s(OP, "mean", mean)?,
            &self.f32s(OP, "rstd", rstd)?,
            gamma.numel(),
        )
    }

    fn rotary(
        &self,
        out: ViewMut<'_, Self>,
        x: View<'_, Self>,
        cos: View<'_, Self>,
        sin: View<'_, Self>,
        len: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        const OP: &str = "rotary";
        ops::rotary::rotary_with_tables(
            &mut self.out(OP, "out", out)?,
            &self.f32s(OP, "x", x)?,
            &self.f32s(OP, "cos", cos)?,
            &self.f32s(OP, "sin", sin)?,
            len,
            heads,
            head_dim,
            false,
        )
    }

    fn rotary_backward(
        &self,
        dx: ViewMut<'_, Self>,
        dout: View<'_, Self>,
        cos: View<'_, Self>,
        sin: View<'_, Self>,
        len: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        const OP: &str = "rotary_backward";
        ops::rotary::rotary_with_tables(
            &mut self.act(OP, "dx", dx)?,
            &self.f32s(OP, "dout", dout)?,
            &self.f32s(OP, "cos", cos)?,
            &self.f32s(OP, "sin", sin)?,
            len,
            heads,
            head_dim,
            true,
        )
    }

    fn embedding(
        &self,
        out: ViewMut<'_, Self>,
        ids: View<'_, Self>,
        table: View<'_, Self>,
    ) -> Result<()> {
        const OP: &str = "embedding";
        let ids = token_ids(OP, ids)?;
        let dim = rows_of(OP, "out", out.numel(), ids.len().max(1))?;
        ops::embedding::embedding(
            &mut self.out(OP, "out", out)?,
            &ids,
            &self.f32s(OP, "table", table)?,
            dim,
        )
    }

    fn embedding_backward(
        &self,
        dtable: ViewMut<'_, Self>,
        dout: View<'_, Self>,
        ids: View<'_, Self>,
    ) -> Result<()> {
        const OP: &str = "embedding_backward";
        let ids = token_ids(OP, ids)?;
        let dim = rows_of(OP, "dout", dout.numel(), ids.len().max(1))?;
        ops::embedding::embedding_backward(
            f32s_mut(OP, "dtable", dtable)?,
            &self.f32s(OP, "dout", dout)?,
            &ids,
            dim,
        )
    }

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
    ) -> Result<()> {
        self.attention_forward(out, lse, [q, k, v], kv_lens, bias, None, false, dims)
    }

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
        // The bf16 products turn the rows as they round them; the other kernels read rotated copies.
        if self.weight_dtype() != DType::BF16 || !ops::attention::rotates_inside(dims) {
            let qkv = [q, k, v];
            return unfused::rotary_attention(self, out, lse, rotated, qkv, tables, kv_lens, dims);
        }
        self.attention_forward(
            out,
            lse,
            [q, k, v],
            kv_lens,
            None,
            Some(tables),
            false,
            dims,
        )
    }

    fn reads_heads_contiguously(&self, dims: &AttentionDims) -> bool {
        !self.bf16_storage && reads_heads(self.weight_dtype(), self.compute_dtype(), dims)
    }

    fn linear_heads(
        &self,
        y: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        bias: Option<View<'_, Self>>,
        dims: LinearDims,
        rows: ops::gemm_bf16::HeadRows,
    ) -> Result<()> {
        const OP: &str = "linear_heads";
        use ops::gemm_bf16::GemmOut;
        if self.bf16_storage
            || (y.dtype(), w.dtype()) != (DType::F32, DType::BF16)
            || !matches!(x.dtype(), DType::F32 | DType::BF16)
        {
            return Err(Error::invalid(
                OP,
                "head-major outputs are written by the bf16 GEMM with f32 outputs",
            ));
        }
        let bias = bias.map(|b| self.f32s(OP, "bias", b)).transpose()?;
        let lhs = lhs_of(OP, x.dtype(), x)?;
        let out = GemmOut::F32Heads {
            c: f32s_mut(OP, "y", y)?,
            bias: bias.as_deref(),
            rows,
        };
        ops::matmul::linear_bf16_weights(out, lhs, bf16s(w), dims)
    }

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
        if !self.reads_heads_contiguously(dims) {
            return Err(Error::invalid(
                "rotary_attention_heads",
                "head-major inputs are read only by the bf16 products' forward",
            ));
        }
        self.attention_forward(out, lse, [q, k, v], kv_lens, None, Some(tables), true, dims)
    }

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
    ) -> Result<()> {
        const OP: &str = "attention_backward";
        let operands = self.attention_operands(OP, [q, k, v], kv_lens, bias)?;
        let inputs = operands.inputs();
        let need = dims.checked_workspace_len(OP, rayon::current_num_threads())?;
        let mut ws = self.workspace(OP, need)?;
        ops::attention::attention_backward(
            &mut self.act(OP, "dq", dq)?,
            &mut self.act(OP, "dk", dk)?,
            &mut self.act(OP, "dv", dv)?,
            opt_mut(OP, "dbias", dbias)?,
            &self.f32s(OP, "dout", dout)?,
            &self.f32s(OP, "out", out)?,
            &self.f32s(OP, "lse", lse)?,
            inputs,
            dims,
            &mut ws,
        )
    }

    fn sum_rows(&self, out: ViewMut<'_, Self>, m: View<'_, Self>) -> Result<()> {
        const OP: &str = "sum_rows";
        let (out, m) = (f32s_mut(OP, "out", out)?, &self.f32s(OP, "m", m)?);
        rows_of(OP, "m", m.len(), out.len())?;
        ops::matmul::sum_rows_into(out, m, out.len());
        Ok(())
    }

    fn softmax(&self, out: ViewMut<'_, Self>, x: View<'_, Self>, dim: usize) -> Result<()> {
        ops::softmax::softmax(
            &mut self.out("softmax", "out", out)?,
            &self.f32s("softmax", "x", x)?,
            dim,
        )
    }

    fn softmax_backward(
        &self,
        dx: ViewMut<'_, Self>,
        dy: View<'_, Self>,
        y: View<'_, Self>,
        dim: usize,
    ) -> Result<()> {
        const OP: &str = "softmax_backward";
        ops::softmax::softmax_backward(
            &mut self.act(OP, "dx", dx)?,
            &self.f32s(OP, "dy", dy)?,
            &self.f32s(OP, "y", y)?,
            dim,
        )
    }

    fn conv1d(
        &self,
        out: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        bias: Option<View<'_, Self>>,
        dims: &Conv1dDims,
    ) -> Result<()> {
        const OP: &str = "conv1d";
        let bias = bias.map(|b| self.f32s(OP, "bias", b)).transpose()?;
        if (out.dtype(), w.dtype()) == (DType::F32, DType::BF16) {
            // The input as the GEMM reads it: bf16 storage in place (a GELU output the model marks
            // `Role::LinearInput`), f32 rounded as it is copied or packed.
            let x = match x.dtype() {
                DType::BF16 => ops::gemm_bf16::Lhs::Bf16(bf16s(x)),
                _ => ops::gemm_bf16::Lhs::F32(exact(OP, "x", x)?),
            };
            let values = ops::conv::conv1d_bf16_scratch_len(dims)?;
            let mut workspace = self.workspace(OP, values.div_ceil(2))?;
            let scratch: &mut [bf16] =
                bytemuck::cast_slice_mut(&mut workspace[..values.div_ceil(2)]);
            return ops::conv::conv1d_bf16_weights(
                &mut self.out(OP, "out", out)?,
                x,
                bf16s(w),
                bias.as_deref(),
                *dims,
                scratch,
            );
        }
        ops::conv::conv1d(
            &mut self.out(OP, "out", out)?,
            &self.f32s(OP, "x", x)?,
            &self.f32s(OP, "w", w)?,
            bias.as_deref(),
            *dims,
        )
    }

    fn conv1d_backward(
        &self,
        dx: Option<ViewMut<'_, Self>>,
        dw: ViewMut<'_, Self>,
        dbias: Option<ViewMut<'_, Self>>,
        dout: View<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        dims: &Conv1dDims,
    ) -> Result<()> {
        const OP: &str = "conv1d_backward";
        ops::conv::conv1d_backward(
            self.act_opt(OP, "dx", dx)?.as_deref_mut(),
            Some(f32s_mut(OP, "dw", dw)?),
            opt_mut(OP, "dbias", dbias)?,
            &self.f32s(OP, "dout", dout)?,
            &self.f32s(OP, "x", x)?,
            &self.f32s(OP, "w", w)?,
            *dims,
        )
    }

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
    ) -> Result<()> {
        const OP: &str = "batchnorm";
        let (mean, var) = (f32s_mut(OP, "mean", mean)?, f32s_mut(OP, "var", var)?);
        let channels = gamma.numel();
        check_len(OP, "var", var.len(), channels)?;
        let mut rstd = vec![0.0f32; channels];
        let (x, gamma, beta) = (
            &self.f32s(OP, "x", x)?,
            &self.f32s(OP, "gamma", gamma)?,
            &self.f32s(OP, "beta", beta)?,
        );
        let mut out = self.out(OP, "out", out)?;
        match stats {
            BatchNormStats::Running { mean: rm, var: rv } => {
                let (rm, rv) = (
                    &self.f32s(OP, "running_mean", rm)?,
                    &self.f32s(OP, "running_var", rv)?,
                );
                ops::norm::batchnorm_eval(
                    &mut out, mean, &mut rstd, x, gamma, beta, rm, rv, channels, eps,
                )?;
                var.copy_from_slice(rv);
            }
            BatchNormStats::Batch => {
                ops::norm::batchnorm_train(
                    &mut out, mean, &mut rstd, x, gamma, beta, channels, eps, None,
                )?;
                var.iter_mut()
                    .zip(&rstd)
                    .for_each(|(v, r)| *v = 1.0 / (r * r) - eps);
            }
        }
        Ok(())
    }

    fn batchnorm_running_update(
        &self,
        running_mean: ViewMut<'_, Self>,
        running_var: ViewMut<'_, Self>,
        mean: View<'_, Self>,
        var: View<'_, Self>,
        rows: usize,
        momentum: f32,
    ) -> Result<()> {
        const OP: &str = "batchnorm_running_update";
        let (rm, rv) = (
            f32s_mut(OP, "running_mean", running_mean)?,
            f32s_mut(OP, "running_var", running_var)?,
        );
        let (mean, var) = (&self.f32s(OP, "mean", mean)?, &self.f32s(OP, "var", var)?);
        for (name, len) in [
            ("running_var", rv.len()),
            ("mean", mean.len()),
            ("var", var.len()),
        ] {
            check_len(OP, name, len, rm.len())?;
        }
        let unbias = if rows > 1 {
            rows as f32 / (rows - 1) as f32
        } else {
            1.0
        };
        for c in 0..rm.len() {
            rm[c] = (1.0 - momentum) * rm[c] + momentum * mean[c];
            rv[c] = (1.0 - momentum) * rv[c] + momentum * var[c] * unbias;
        }
        Ok(())
    }

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
    ) -> Result<()> {
        const OP: &str = "batchnorm_backward";
        let rstd: Vec<f32> = self
            .f32s(OP, "var", var)?
            .iter()
            .map(|v| 1.0 / (v + eps).sqrt())
            .collect();
        ops::norm::batchnorm_backward(
            &mut self.act(OP, "dx", dx)?,
            f32s_mut(OP, "dgamma", dgamma)?,
            f32s_mut(OP, "dbeta", dbeta)?,
            &self.f32s(OP, "dout", dout)?,
            &self.f32s(OP, "x", x)?,
            &self.f32s(OP, "gamma", gamma)?,
            &self.f32s(OP, "mean", mean)?,
            &rstd,
            gamma.numel(),
            train,
        )
    }

    fn attention_pool(
        &self,
        out: ViewMut<'_, Self>,
        logits: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        dims: &PoolDims,
    ) -> Result<()> {
        const OP: &str = "attention_pool";
        if (logits.dtype(), x.dtype(), w.dtype()) == (DType::F32, DType::F32, DType::BF16) {
            return ops::pool::attention_pool_bf16_weights(
                &mut self.out(OP, "out", out)?,
                f32s_mut(OP, "logits", logits)?,
                exact(OP, "x", x)?,
                bf16s(w),
                *dims,
            );
        }
        ops::pool::attention_pool(
            &mut self.out(OP, "out", out)?,
            f32s_mut(OP, "logits", logits)?,
            &self.f32s(OP, "x", x)?,
            &self.f32s(OP, "w", w)?,
            *dims,
        )
    }

    fn attention_pool_backward(
        &self,
        dx: ViewMut<'_, Self>,
        dw: ViewMut<'_, Self>,
        dout: View<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        logits: View<'_, Self>,
        dims: &PoolDims,
    ) -> Result<()> {
        const OP: &str = "attention_pool_backward";
        let mut scratch = vec![0.0f32; logits.numel()];
        ops::pool::attention_pool_backward(
            &mut self.act(OP, "dx", dx)?,
            f32s_mut(OP, "dw", dw)?,
            &mut scratch,
            &self.f32s(OP, "dout", dout)?,
            &self.f32s(OP, "x", x)?,
            &self.f32s(OP, "w", w)?,
            &self.f32s(OP, "logits", logits)?,
            *dims,
        )
    }

    fn relative_logits(
        &self,
        bias: ViewMut<'_, Self>,
        q_pos: View<'_, Self>,
        rel_k: View<'_, Self>,
        batch: usize,
        heads: usize,
        n: usize,
    ) -> Result<()> {
        const OP: &str = "relative_logits";
        let dk = rows_of(
            OP,
            "q_pos",
            q_pos.numel(),
            checked_product(OP, &[batch, n, heads])?.max(1),
        )?;
        ops::relative::relative_logits(
            f32s_mut(OP, "bias", bias)?,
            &self.f32s(OP, "q_pos", q_pos)?,
            &self.f32s(OP, "rel_k", rel_k)?,
            batch,
            heads,
            n,
            dk,
        )
    }

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
    ) -> Result<()> {
        const OP: &str = "relative_logits_backward";
        let dk = rows_of(
            OP,
            "q_pos",
            q_pos.numel(),
            checked_product(OP, &[batch, n, heads])?.max(1),
        )?;
        ops::relative::relative_logits_backward(
            &mut self.act(OP, "dq_pos", dq_pos)?,
            &mut self.act(OP, "drel_k", drel_k)?,
            &self.f32s(OP, "dbias", dbias)?,
            &self.f32s(OP, "q_pos", q_pos)?,
            &self.f32s(OP, "rel_k", rel_k)?,
            batch,
            heads,
            n,
            dk,
        )
    }

    fn mse(&self, pred: View<'_, Self>, target: View<'_, Self>) -> Result<f32> {
        ops::loss::mse(
            &self.f32s("mse", "pred", pred)?,
            &self.f32s("mse", "target", target)?,
        )
    }

    fn mse_backward(
        &self,
        dpred: ViewMut<'_, Self>,
        pred: View<'_, Self>,
        target: View<'_, Self>,
        dloss: f32,
    ) -> Result<()> {
        const OP: &str = "mse_backward";
        ops::loss::mse_backward(
            &mut self.act(OP, "dpred", dpred)?,
            &self.f32s(OP, "pred", pred)?,
            &self.f32s(OP, "target", target)?,
            dloss,
        )
    }

    fn sum_squares(&self, x: View<'_, Self>) -> Result<f32> {
        let x = &self.f32s("sum_squares", "x", x)?;
        Ok(x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() as f32)
    }

    fn adamw(
        &self,
        params: ViewMut<'_, Self>,
        compute_copy: Option<ViewMut<'_, Self>>,
        m: ViewMut<'_, Self>,
        v: ViewMut<'_, Self>,
        grads: View<'_, Self>,
        s: &AdamWStep,
    ) -> Result<()> {
        const OP: &str = "adamw";
        let t = s.step.max(1) as i32;
        let p = f32s_mut(OP, "params", params)?;
        ops::optim::adamw_update(
            p,
            f32s_mut(OP, "m", m)?,
            f32s_mut(OP, "v", v)?,
            &self.f32s(OP, "grads", grads)?,
            &ops::optim::AdamWUpdate {
                lr: s.lr,
                beta1: s.beta1,
                beta2: s.beta2,
                eps: s.eps,
                weight_decay: s.weight_decay,
                bias_corr1: 1.0 - s.beta1.powi(t),
                bias_corr2: 1.0 - s.beta2.powi(t),
                grad_scale: s.grad_scale,
            },
        )?;
        if let Some(copy) = compute_copy {
            let mut c = self.act(OP, "compute copy", copy)?;
            check_len(OP, "compute copy", c.len(), p.len())?;
            c.copy_from_slice(p);
        }
        Ok(())
    }
}

fn token_ids(op: &'static str, ids: View<'_, CpuBackend>) -> Result<Vec<u32>> {
    i32s(op, "ids", ids)?
        .iter()
        .map(|&i| {
            u32::try_from(i).map_err(|_| Error::invalid(op, format!("negative token id {i}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Own allocations are 64-byte aligned and zero over every byte, whatever the allocator's block
    /// alignment; absurd sizes are errors, not aborts.
    #[test]
    fn host_memory_is_aligned_zeroed_and_refuses_absurd_sizes() {
        let blocks: Vec<HostMem> = [0, 1, 17, 63, 64, 1000, 4096 + 8, 3 << 20]
            .iter()
            .map(|&bytes| HostMem::zeroed(bytes).unwrap())
            .collect();
        for mem in &blocks {
            assert_eq!(mem.addr() % 64, 0, "{} bytes", mem.bytes());
            // SAFETY: `bytes()` bytes from `ptr` belong to this allocation.
            let all = unsafe { std::slice::from_raw_parts(mem.ptr.as_ptr(), mem.bytes()) };
            assert!(all.iter().all(|&b| b == 0), "{} bytes", mem.bytes());
        }
        for absurd in [usize::MAX, usize::MAX - 40, 1 << 62] {
            assert!(HostMem::zeroed(absurd).is_err(), "{absurd} bytes");
        }
    }

    /// The f32 `linear_act` (the product, then bias and activation in one pass) against naive f64, keeping
    /// `pre` (which must hold the biased product) and not (an empty `pre`, as inference passes it).
    #[test]
    fn f32_linear_act_is_the_activation_of_the_biased_product() {
        use crate::backend::{Role, Tensor};
        use crate::testing::{assert_close, erf_series, rng, uniform};
        let b = CpuBackend::new();
        assert!(b.linear_epilogue_skips_pre(Epilogue::Activation));
        assert!(!b.linear_epilogue_skips_pre(Epilogue::SwiGlu));
        assert!(!CpuBackend::with_bf16_storage().linear_epilogue_skips_pre(Epilogue::Activation));
        let dims = LinearDims {
            rows: 19,
            d_in: 45,
            d_out: 300,
        };
        let mut r = rng(3);
        let x = uniform(&mut r, dims.rows * dims.d_in, -1.0, 1.0);
        let w = uniform(&mut r, dims.d_out * dims.d_in, -0.3, 0.3);
        let bias = uniform(&mut r, dims.d_out, -1.0, 1.0);
        let pre_want: Vec<f64> = (0..dims.rows * dims.d_out)
            .map(|i| {
                let (row, col) = (i / dims.d_out, i % dims.d_out);
                (0..dims.d_in).fold(bias[col] as f64, |acc, k| {
                    acc + x[row * dims.d_in + k] as f64 * w[col * dims.d_in + k] as f64
                })
            })
            .collect();
        let gelu = |v: f64| 0.5 * v * (1.0 + erf_series(v / std::f64::consts::SQRT_2));
        let out_want: Vec<f64> = pre_want.iter().map(|&v| gelu(v)).collect();
        let upload = |v: &[f32]| Tensor::from_f32(&b, Role::Activation, v).unwrap();
        let (x, w, bias) = (upload(&x), upload(&w), upload(&bias));
        for keep_pre in [true, false] {
            let pre_len = if keep_pre { pre_want.len() } else { 0 };
            let mut pre = Tensor::new(&b, Role::Activation, pre_len).unwrap();
            let mut out = Tensor::new(&b, Role::LinearInput, out_want.len()).unwrap();
            b.linear_act(
                pre.view_mut(),
                out.view_mut(),
                x.view(),
                w.view(),
                bias.view(),
                Act::GeluErf,
                dims,
                keep_pre,
            )
            .unwrap();
            let what = format!("linear_act keep_pre={keep_pre}");
            assert_close(&what, &b.read_f32(out.view()).unwrap(), &out_want, 1e-5);
            if keep_pre {
                assert_close(&what, &b.read_f32(pre.view()).unwrap(), &pre_want, 1e-5);
            }
        }
    }
}
