//! The kernel-device backend: one implementation of [`Backend`] for every [`KernelDevice`] (the host
//! emulator and CUDA), over the launchers in `gpu::ops`. Activations are bf16; statistics, the
//! log-sum-exp, parameter gradients, master weights and optimiser state are f32.
//!
//! Fusions live here, inside the ops: the linear bias rides in the GEMM epilogue (cuBLASLt), residual add
//! and LayerNorm are one kernel. Per-op scratch (LayerNorm partial sums, the flash backward's row dots,
//! reductions) comes from one buffer that grows to the largest request and is then reused, so a step
//! allocates nothing once warm.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use half::bf16;

use super::arena::ArenaSlot;
use super::meter::{ByteMeter, Metered};
use super::{
    check_view, rows_of, Act, AdamWStep, AttentionDims, Backend, BatchNormStats, Conv1dDims,
    LinearDims, Memory, PoolDims, ScratchUse, View, ViewMut,
};
use crate::error::checked_product;
use crate::gpu::ops::{self as launch, Act as KernelAct};
use crate::gpu::{DeviceBuffer, KernelDevice, MatmulDims};
use crate::runtime::{ArenaPlan, DType};
use crate::{Error, Result};

/// Device memory of a kernel device: its own buffer, or a range of an arena it keeps alive.
pub enum DeviceMem<Buf> {
    Own(Buf),
    Part {
        ptr: u64,
        bytes: usize,
        _arena: Arc<DeviceArena<Buf>>,
    },
}

/// One arena allocation (metered once) that step buffers are carved from.
pub struct DeviceArena<Buf> {
    buf: Buf,
    _meter: Metered<()>,
}

impl<Buf: DeviceBuffer> Memory for DeviceMem<Buf> {
    fn addr(&self) -> u64 {
        match self {
            DeviceMem::Own(b) => b.ptr(),
            DeviceMem::Part { ptr, .. } => *ptr,
        }
    }
    fn bytes(&self) -> usize {
        match self {
            DeviceMem::Own(b) => b.len_bytes(),
            DeviceMem::Part { bytes, .. } => *bytes,
        }
    }
}

impl<B> DeviceBuffer for View<'_, B> {
    fn ptr(&self) -> u64 {
        self.addr()
    }
    fn len_bytes(&self) -> usize {
        self.bytes()
    }
}

impl<B> DeviceBuffer for ViewMut<'_, B> {
    fn ptr(&self) -> u64 {
        self.addr()
    }
    fn len_bytes(&self) -> usize {
        self.bytes()
    }
}

/// A byte range of scratch memory.
struct Raw {
    ptr: u64,
    bytes: usize,
}

impl DeviceBuffer for Raw {
    fn ptr(&self) -> u64 {
        self.ptr
    }
    fn len_bytes(&self) -> usize {
        self.bytes
    }
}

impl Raw {
    fn at(&self, offset: usize, bytes: usize) -> Raw {
        Raw {
            ptr: self.ptr + offset as u64,
            bytes,
        }
    }
}

pub struct KernelBackend<D: KernelDevice> {
    dev: D,
    allocations: AtomicUsize,
    meter: Arc<ByteMeter>,
    /// An arena plan for the next run of steps, then its replay.
    arena: ArenaSlot<DeviceArena<D::Buffer>>,
    scratch: Mutex<Option<D::Buffer>>,
}

impl<D: KernelDevice> KernelBackend<D> {
    pub fn new(dev: D) -> Self {
        KernelBackend {
            dev,
            allocations: AtomicUsize::new(0),
            meter: Arc::default(),
            arena: ArenaSlot::default(),
            scratch: Mutex::new(None),
        }
    }

    pub fn device(&self) -> &D {
        &self.dev
    }

    /// Runs `f` with at least `bytes` of scratch (not zeroed).
    fn with_scratch<R>(&self, bytes: usize, f: impl FnOnce(&Raw) -> Result<R>) -> Result<R> {
        let mut guard = self
            .scratch
            .lock()
            .map_err(|_| Error::Device("scratch lock poisoned".into()))?;
        if guard.as_ref().is_none_or(|b| b.len_bytes() < bytes) {
            self.allocations.fetch_add(1, Ordering::Relaxed);
            *guard = Some(self.dev.alloc_zeroed(bytes.max(256))?);
        }
        let buf = guard.as_ref().expect("allocated above");
        f(&Raw {
            ptr: buf.ptr(),
            bytes: buf.len_bytes(),
        })
    }

    /// `out += x` over `n` f32 values.
    fn add_f32(&self, out: &dyn DeviceBuffer, x: &dyn DeviceBuffer, n: usize) -> Result<()> {
        launch::sum_over_batch(&self.dev, out, x, 1, n)
    }
}

fn expect(op: &'static str, name: &str, got: DType, want: DType) -> Result<()> {
    if got != want {
        return Err(Error::shape(
            op,
            format!("{name} is {got}, expected {want}"),
        ));
    }
    Ok(())
}

fn expect_bf16(op: &'static str, views: &[(&str, DType)]) -> Result<()> {
    views
        .iter()
        .try_for_each(|(n, d)| expect(op, n, *d, DType::BF16))
}

fn expect_f32(op: &'static str, views: &[(&str, DType)]) -> Result<()> {
    views
        .iter()
        .try_for_each(|(n, d)| expect(op, n, *d, DType::F32))
}

fn kernel_act(act: Act) -> KernelAct {
    match act {
        Act::GeluErf => KernelAct::GeluErf,
        Act::GeluSigmoid => KernelAct::GeluSigmoid,
        Act::Relu => KernelAct::Relu,
        Act::Softplus => KernelAct::Softplus,
    }
}

fn forward_dims(d: LinearDims) -> MatmulDims {
    MatmulDims {
        batch: 1,
        m: d.rows,
        n: d.d_out,
        k: d.d_in,
        trans_a: false,
        trans_b: true,
    }
}

impl<D: KernelDevice> Backend for KernelBackend<D> {
    type Mem = Metered<DeviceMem<D::Buffer>>;

    fn name(&self) -> String {
        self.dev.name()
    }

    fn compute_dtype(&self) -> DType {
        DType::BF16
    }

    fn alloc(&self, bytes: usize) -> Result<Self::Mem> {
        if let Some(place) = self.arena.take(bytes)? {
            let ptr = place.arena.buf.ptr() + place.offset as u64;
            let bytes = place.capacity;
            // Zero-filled only where the plan says its zeros are read: until its first write, its bytes
            // may still hold another buffer's live value.
            if place.zero {
                self.dev.zero(&Raw { ptr, bytes })?;
            }
            let part = DeviceMem::Part {
                ptr,
                bytes,
                _arena: place.arena,
            };
            // Carved from the arena, which is metered (and counted) once.
            return Ok(Metered::new(part, 0, &self.meter));
        }
        self.allocations.fetch_add(1, Ordering::Relaxed);
        Ok(Metered::new(
            DeviceMem::Own(self.dev.alloc_zeroed(bytes)?),
            bytes,
            &self.meter,
        ))
    }

    fn begin_steps(&self) -> Result<()> {
        self.arena.begin(|bytes| {
            self.allocations.fetch_add(1, Ordering::Relaxed);
            Ok(DeviceArena {
                buf: self.dev.alloc_zeroed(bytes)?,
                _meter: Metered::new((), bytes, &self.meter),
            })
        })
    }

    fn use_arena(&self, plan: ArenaPlan) -> Result<()> {
        self.arena.set_plan(plan)
    }

    fn scratch_bytes(&self, op: &ScratchUse) -> usize {
        match *op {
            // The flash forward keeps its tiles on chip.
            ScratchUse::Attention(_) => 0,
            ScratchUse::AttentionBackward {
                dims,
                broadcast_dbias,
            } => launch::flash_backward_scratch_bytes(&dims, broadcast_dbias),
            // Per-block partial sums, then dgamma and dbeta as one [2, dim] f32 row.
            ScratchUse::LayerNormBackward { rows, dim } => {
                launch::layernorm_backward_scratch_bytes(rows, dim) + 2 * dim * 4
            }
            ScratchUse::Conv1d(dims) => launch::conv1d_scratch_bytes(&dims),
            ScratchUse::Conv1dBackward { dims, dx } => {
                launch::conv1d_scratch_bytes(&dims)
                    + if dx {
                        launch::conv1d_dcols_bytes(&dims)
                    } else {
                        0
                    }
            }
            ScratchUse::BatchNormBackward { channels } => 2 * channels * 4,
            // Two bf16 copies and one f32 copy of the logits.
            ScratchUse::AttentionPoolBackward { logits } => 2 * (logits * 2) + logits * 4,
            ScratchUse::Reduction => launch::NORM_BLOCKS * 4 + 4,
        }
    }

    fn reserve_scratch(&self, bytes: usize) -> Result<()> {
        self.with_scratch(bytes, |_| Ok(()))
    }

    fn warm_step(&self) {
        self.arena.end();
    }

    fn meter(&self) -> &ByteMeter {
        &self.meter
    }

    fn allocations(&self) -> usize {
        self.allocations.load(Ordering::Relaxed)
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    fn write_f32(&self, dst: ViewMut<'_, Self>, src: &[f32]) -> Result<()> {
        check_view(
            "write",
            "dst",
            dst.numel(),
            dst.dtype(),
            src.len(),
            dst.dtype(),
        )?;
        match dst.dtype() {
            DType::F32 => self.dev.write(&dst, bytemuck::cast_slice(src)),
            DType::BF16 => {
                let v: Vec<bf16> = src.iter().map(|&x| bf16::from_f32(x)).collect();
                self.dev.write(&dst, bytemuck::cast_slice(&v))
            }
            DType::I32 => {
                let v: Vec<i32> = src.iter().map(|&x| x as i32).collect();
                self.dev.write(&dst, bytemuck::cast_slice(&v))
            }
            other => Err(Error::invalid(
                "write",
                format!("{other} views are not used on kernel devices"),
            )),
        }
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
        self.dev.write(&dst, bytemuck::cast_slice(src))
    }

    fn read_f32(&self, src: View<'_, Self>) -> Result<Vec<f32>> {
        let bytes = self.dev.read(&src)?;
        Ok(match src.dtype() {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::I32 => bytes
                .chunks_exact(4)
                .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]) as f32)
                .collect(),
            _ => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_ne_bytes([c[0], c[1]]).to_f32())
                .collect(),
        })
    }

    fn zero(&self, dst: ViewMut<'_, Self>) -> Result<()> {
        self.dev.zero(&dst)
    }

    fn copy(&self, dst: ViewMut<'_, Self>, src: View<'_, Self>) -> Result<()> {
        const OP: &str = "copy";
        if dst.numel() != src.numel() {
            return Err(Error::shape(
                OP,
                format!("{} elements into {}", src.numel(), dst.numel()),
            ));
        }
        let n = src.numel();
        match (src.dtype(), dst.dtype()) {
            (a, b) if a == b => {
                // A bit-exact move of 16-bit words, whatever the element type.
                launch::copy_at(&self.dev, &dst, 0, &src, 0, src.bytes() / 2)
            }
            (DType::F32, DType::BF16) => launch::cast_to_bf16(&self.dev, &dst, &src, n),
            (DType::BF16, DType::F32) => launch::cast_to_f32(&self.dev, &dst, &src, n),
            (a, b) => Err(Error::invalid(OP, format!("{a} → {b}"))),
        }
    }

    fn linear(
        &self,
        y: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        bias: Option<View<'_, Self>>,
        dims: LinearDims,
    ) -> Result<()> {
        expect_bf16(
            "linear",
            &[("y", y.dtype()), ("x", x.dtype()), ("w", w.dtype())],
        )?;
        match bias {
            Some(b) => {
                expect("linear", "bias", b.dtype(), DType::BF16)?;
                self.dev
                    .linear_bias(&y, &x, &w, &b, dims.rows, dims.d_in, dims.d_out, false)
            }
            None => self.dev.gemm(&y, false, &x, &w, forward_dims(dims), false),
        }
    }

    fn linear_act(
        &self,
        pre: ViewMut<'_, Self>,
        out: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        bias: View<'_, Self>,
        act: Act,
        dims: LinearDims,
        _keep_pre: bool,
    ) -> Result<()> {
        forward_dims(dims).checked_sizes("linear_act")?;
        expect_bf16(
            "linear_act",
            &[
                ("pre", pre.dtype()),
                ("out", out.dtype()),
                ("x", x.dtype()),
                ("w", w.dtype()),
                ("bias", bias.dtype()),
            ],
        )?;
        // The bias rides in the GEMM epilogue; the activation (erf or sigmoid GELU, which cuBLASLt's tanh
        // epilogue does not compute) is one pointwise pass that keeps `pre` for the backward.
        self.dev
            .linear_bias(&pre, &x, &w, &bias, dims.rows, dims.d_in, dims.d_out, false)?;
        launch::act_forward(
            &self.dev,
            &out,
            &pre,
            dims.rows * dims.d_out,
            kernel_act(act),
        )
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
        forward_dims(dims).checked_sizes(OP)?;
        expect_bf16(
            OP,
            &[("dy", dy.dtype()), ("x", x.dtype()), ("w", w.dtype())],
        )?;
        let LinearDims { rows, d_in, d_out } = dims;
        if let Some(dx) = dx {
            expect(OP, "dx", dx.dtype(), DType::BF16)?;
            let d = MatmulDims {
                batch: 1,
                m: rows,
                n: d_in,
                k: d_out,
                trans_a: false,
                trans_b: false,
            };
            self.dev.gemm(&dx, false, &dy, &w, d, true)?;
        }
        if let Some(dw) = dw {
            expect(OP, "dw", dw.dtype(), DType::F32)?;
            let d = MatmulDims {
                batch: 1,
                m: d_out,
                n: d_in,
                k: rows,
                trans_a: true,
                trans_b: false,
            };
            self.dev.gemm(&dw, true, &dy, &x, d, true)?;
        }
        if let Some(db) = dbias {
            expect(OP, "dbias", db.dtype(), DType::F32)?;
            launch::column_sum(&self.dev, &db, &dy, rows, d_out)?;
        }
        Ok(())
    }

    fn add(&self, out: ViewMut<'_, Self>, a: View<'_, Self>, b: View<'_, Self>) -> Result<()> {
        expect_bf16(
            "add",
            &[("out", out.dtype()), ("a", a.dtype()), ("b", b.dtype())],
        )?;
        launch::add(&self.dev, &out, &a, &b, out.numel())
    }

    fn add_row_bias(&self, x: ViewMut<'_, Self>, bias: View<'_, Self>) -> Result<()> {
        expect_bf16("add_row_bias", &[("x", x.dtype()), ("bias", bias.dtype())])?;
        let rows = rows_of("add_row_bias", "x", x.numel(), bias.numel())?;
        launch::bias_add(&self.dev, &x, &bias, rows, bias.numel())
    }

    fn scale_rows(&self, x: ViewMut<'_, Self>, scales: View<'_, Self>) -> Result<()> {
        expect("scale_rows", "x", x.dtype(), DType::BF16)?;
        expect("scale_rows", "scales", scales.dtype(), DType::F32)?;
        let cols = rows_of("scale_rows", "x", x.numel(), scales.numel())?;
        launch::scale_rows(&self.dev, &x, &scales, scales.numel(), cols)
    }

    fn activation(&self, out: ViewMut<'_, Self>, x: View<'_, Self>, act: Act) -> Result<()> {
        expect_bf16("activation", &[("out", out.dtype()), ("x", x.dtype())])?;
        launch::act_forward(&self.dev, &out, &x, x.numel(), kernel_act(act))
    }

    fn activation_backward(
        &self,
        dx: ViewMut<'_, Self>,
        dout: View<'_, Self>,
        x: View<'_, Self>,
        act: Act,
    ) -> Result<()> {
        expect_bf16(
            "activation_backward",
            &[("dx", dx.dtype()), ("dout", dout.dtype()), ("x", x.dtype())],
        )?;
        launch::act_backward(&self.dev, &dx, &dout, &x, x.numel(), kernel_act(act))
    }

    fn swiglu(&self, out: ViewMut<'_, Self>, u: View<'_, Self>, width: usize) -> Result<()> {
        expect_bf16("swiglu", &[("out", out.dtype()), ("u", u.dtype())])?;
        let rows = rows_of("swiglu", "out", out.numel(), width)?;
        launch::swiglu_forward(&self.dev, &out, &u, rows, width)
    }

    fn swiglu_backward(
        &self,
        du: ViewMut<'_, Self>,
        dout: View<'_, Self>,
        u: View<'_, Self>,
        width: usize,
    ) -> Result<()> {
        expect_bf16(
            "swiglu_backward",
            &[("du", du.dtype()), ("dout", dout.dtype()), ("u", u.dtype())],
        )?;
        let rows = rows_of("swiglu_backward", "dout", dout.numel(), width)?;
        launch::swiglu_backward(&self.dev, &du, &dout, &u, rows, width)
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
        expect_bf16(
            OP,
            &[
                ("out", out.dtype()),
                ("x", x.dtype()),
                ("gamma", gamma.dtype()),
                ("beta", beta.dtype()),
            ],
        )?;
        expect_f32(OP, &[("mean", mean.dtype()), ("rstd", rstd.dtype())])?;
        let dim = gamma.numel();
        let rows = rows_of(OP, "x", x.numel(), dim)?;
        launch::layernorm_forward(
            &self.dev, &out, &mean, &rstd, &x, &gamma, &beta, rows, dim, eps,
        )
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
        expect_bf16(
            OP,
            &[
                ("sum", sum.dtype()),
                ("out", out.dtype()),
                ("x", x.dtype()),
                ("delta", delta.dtype()),
                ("gamma", gamma.dtype()),
                ("beta", beta.dtype()),
            ],
        )?;
        expect_f32(OP, &[("mean", mean.dtype()), ("rstd", rstd.dtype())])?;
        let dim = gamma.numel();
        let rows = rows_of(OP, "x", x.numel(), dim)?;
        launch::residual_layernorm_forward(
            &self.dev, &sum, &out, &mean, &rstd, &x, &delta, &gamma, &beta, rows, dim, eps,
        )
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
        expect_bf16(
            OP,
            &[
                ("dx", dx.dtype()),
                ("dout", dout.dtype()),
                ("x", x.dtype()),
                ("gamma", gamma.dtype()),
            ],
        )?;
        expect_f32(
            OP,
            &[
                ("dgamma", dgamma.dtype()),
                ("dbeta", dbeta.dtype()),
                ("mean", mean.dtype()),
                ("rstd", rstd.dtype()),
            ],
        )?;
        let dim = gamma.numel();
        check_view(OP, "dgamma", dgamma.numel(), DType::F32, dim, DType::F32)?;
        check_view(OP, "dbeta", dbeta.numel(), DType::F32, dim, DType::F32)?;
        let rows = rows_of(OP, "x", x.numel(), dim)?;
        // The kernel sums dgamma and dbeta as one [2, dim] f32 row; the parameters' gradients need not be
        // adjacent, so it sums into scratch and the two halves are added where they belong.
        let partial = launch::layernorm_backward_scratch_bytes(rows, dim);
        let both = 2 * dim * 4;
        let total = self.scratch_bytes(&ScratchUse::LayerNormBackward { rows, dim });
        self.with_scratch(total, |s| {
            let (partials, sums) = (s.at(0, partial), s.at(partial, both));
            self.dev.zero(&sums)?;
            launch::layernorm_backward(
                &self.dev, &dx, &sums, &partials, &dout, &x, &gamma, &mean, &rstd, rows, dim,
            )?;
            self.add_f32(&dgamma, &sums.at(0, dim * 4), dim)?;
            self.add_f32(&dbeta, &sums.at(dim * 4, dim * 4), dim)
        })
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
        expect_bf16("rotary", &[("out", out.dtype()), ("x", x.dtype())])?;
        expect_f32("rotary", &[("cos", cos.dtype()), ("sin", sin.dtype())])?;
        let batch = rows_of(
            "rotary",
            "x",
            x.numel(),
            checked_product("rotary", &[len, heads, head_dim])?,
        )?;
        launch::rotary(
            &self.dev, &out, &x, &cos, &sin, batch, len, heads, head_dim, false,
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
        expect_bf16(
            "rotary_backward",
            &[("dx", dx.dtype()), ("dout", dout.dtype())],
        )?;
        expect_f32(
            "rotary_backward",
            &[("cos", cos.dtype()), ("sin", sin.dtype())],
        )?;
        let batch = rows_of(
            "rotary_backward",
            "dout",
            dout.numel(),
            len * heads * head_dim,
        )?;
        launch::rotary(
            &self.dev, &dx, &dout, &cos, &sin, batch, len, heads, head_dim, true,
        )
    }

    fn embedding(
        &self,
        out: ViewMut<'_, Self>,
        ids: View<'_, Self>,
        table: View<'_, Self>,
    ) -> Result<()> {
        const OP: &str = "embedding";
        expect_bf16(OP, &[("out", out.dtype()), ("table", table.dtype())])?;
        expect(OP, "ids", ids.dtype(), DType::I32)?;
        let dim = rows_of(OP, "out", out.numel(), ids.numel().max(1))?;
        let vocab = rows_of(OP, "table", table.numel(), dim)?;
        launch::embedding_forward(&self.dev, &out, &ids, &table, ids.numel(), dim, vocab)
    }

    fn embedding_backward(
        &self,
        dtable: ViewMut<'_, Self>,
        dout: View<'_, Self>,
        ids: View<'_, Self>,
    ) -> Result<()> {
        const OP: &str = "embedding_backward";
        expect(OP, "dtable", dtable.dtype(), DType::F32)?;
        expect(OP, "dout", dout.dtype(), DType::BF16)?;
        expect(OP, "ids", ids.dtype(), DType::I32)?;
        let dim = rows_of(OP, "dout", dout.numel(), ids.numel().max(1))?;
        let vocab = rows_of(OP, "dtable", dtable.numel(), dim)?;
        launch::embedding_backward(&self.dev, &dtable, &dout, &ids, ids.numel(), dim, vocab)
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
        const OP: &str = "attention";
        dims.checked_sizes(OP)?;
        expect_bf16(
            OP,
            &[
                ("out", out.dtype()),
                ("q", q.dtype()),
                ("k", k.dtype()),
                ("v", v.dtype()),
            ],
        )?;
        expect(OP, "lse", lse.dtype(), DType::F32)?;
        if let Some(l) = &kv_lens {
            expect(OP, "kv_lens", l.dtype(), DType::I32)?;
        }
        if let Some((b, _)) = &bias {
            expect(OP, "bias", b.dtype(), DType::F32)?;
        }
        launch::flash_attention_forward(
            &self.dev,
            &out,
            &lse,
            &q,
            &k,
            &v,
            kv_lens.as_ref().map(|l| l as &dyn DeviceBuffer),
            bias.as_ref().map(|(b, p)| (b as &dyn DeviceBuffer, *p)),
            dims,
        )
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
        dims.checked_sizes(OP)?;
        expect_bf16(
            OP,
            &[
                ("dq", dq.dtype()),
                ("dk", dk.dtype()),
                ("dv", dv.dtype()),
                ("dout", dout.dtype()),
                ("out", out.dtype()),
                ("q", q.dtype()),
                ("k", k.dtype()),
                ("v", v.dtype()),
            ],
        )?;
        expect(OP, "lse", lse.dtype(), DType::F32)?;
        if let Some(db) = &dbias {
            expect(OP, "dbias", db.dtype(), DType::F32)?;
        }
        let broadcast = bias.as_ref().is_some_and(|(_, per_batch)| !per_batch) && dbias.is_some();
        let bytes = self.scratch_bytes(&ScratchUse::AttentionBackward {
            dims: *dims,
            broadcast_dbias: broadcast,
        });
        self.with_scratch(bytes, |s| {
            launch::flash_attention_backward(
                &self.dev,
                &dq,
                &dk,
                &dv,
                dbias.as_ref().map(|d| d as &dyn DeviceBuffer),
                &s.at(0, bytes),
                &dout,
                &out,
                &lse,
                &q,
                &k,
                &v,
                kv_lens.as_ref().map(|l| l as &dyn DeviceBuffer),
                bias.as_ref().map(|(b, p)| (b as &dyn DeviceBuffer, *p)),
                dims,
            )
        })
    }

    fn sum_rows(&self, out: ViewMut<'_, Self>, m: View<'_, Self>) -> Result<()> {
        expect("sum_rows", "out", out.dtype(), DType::F32)?;
        expect("sum_rows", "m", m.dtype(), DType::BF16)?;
        let rows = rows_of("sum_rows", "m", m.numel(), out.numel())?;
        launch::column_sum(&self.dev, &out, &m, rows, out.numel())
    }

    fn softmax(&self, out: ViewMut<'_, Self>, x: View<'_, Self>, dim: usize) -> Result<()> {
        expect_bf16("softmax", &[("out", out.dtype()), ("x", x.dtype())])?;
        let rows = rows_of("softmax", "x", x.numel(), dim)?;
        launch::softmax_forward(&self.dev, &out, &x, rows, dim)
    }

    fn softmax_backward(
        &self,
        dx: ViewMut<'_, Self>,
        dy: View<'_, Self>,
        y: View<'_, Self>,
        dim: usize,
    ) -> Result<()> {
        expect_bf16(
            "softmax_backward",
            &[("dx", dx.dtype()), ("dy", dy.dtype()), ("y", y.dtype())],
        )?;
        let rows = rows_of("softmax_backward", "y", y.numel(), dim)?;
        launch::softmax_backward(&self.dev, &dx, &dy, &y, rows, dim)
    }

    fn conv1d(
        &self,
        out: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        bias: Option<View<'_, Self>>,
        dims: &Conv1dDims,
    ) -> Result<()> {
        expect_bf16(
            "conv1d",
            &[("out", out.dtype()), ("x", x.dtype()), ("w", w.dtype())],
        )?;
        if let Some(b) = &bias {
            expect("conv1d", "bias", b.dtype(), DType::BF16)?;
        }
        let cols = self.scratch_bytes(&ScratchUse::Conv1d(*dims));
        self.with_scratch(cols, |s| {
            launch::conv1d_forward(
                &self.dev,
                &out,
                &s.at(0, cols),
                &x,
                &w,
                bias.as_ref().map(|b| b as &dyn DeviceBuffer),
                *dims,
            )
        })
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
        dims.checked_sizes(OP)?;
        expect_bf16(
            OP,
            &[("dout", dout.dtype()), ("x", x.dtype()), ("w", w.dtype())],
        )?;
        expect(OP, "dw", dw.dtype(), DType::F32)?;
        if let Some(d) = &dx {
            expect(OP, "dx", d.dtype(), DType::BF16)?;
        }
        if let Some(d) = &dbias {
            expect(OP, "dbias", d.dtype(), DType::F32)?;
        }
        // The im2col columns of x are rebuilt here rather than kept from the forward (no extra saved
        // activation; the copy is cheap next to the GEMMs).
        let cols = launch::conv1d_scratch_bytes(dims);
        let dcols = if dx.is_some() {
            launch::conv1d_dcols_bytes(dims)
        } else {
            0
        };
        let total = self.scratch_bytes(&ScratchUse::Conv1dBackward {
            dims: *dims,
            dx: dx.is_some(),
        });
        self.with_scratch(total, |s| {
            let (c, dc) = (s.at(0, cols), s.at(cols, dcols));
            launch::im2col(&self.dev, &c, &x, *dims)?;
            launch::conv1d_backward(
                &self.dev,
                dx.as_ref()
                    .map(|d| (d as &dyn DeviceBuffer, &dc as &dyn DeviceBuffer)),
                &dw,
                dbias.as_ref().map(|d| d as &dyn DeviceBuffer),
                &c,
                &dout,
                &w,
                *dims,
            )
        })
    }

    fn batchnorm(
        &self,
        out: ViewMut<'_, Self>,
        mut mean: ViewMut<'_, Self>,
        mut var: ViewMut<'_, Self>,
        x: View<'_, Self>,
        gamma: View<'_, Self>,
        beta: View<'_, Self>,
        stats: BatchNormStats<'_, Self>,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "batchnorm";
        expect_bf16(
            OP,
            &[
                ("out", out.dtype()),
                ("x", x.dtype()),
                ("gamma", gamma.dtype()),
                ("beta", beta.dtype()),
            ],
        )?;
        expect_f32(OP, &[("mean", mean.dtype()), ("var", var.dtype())])?;
        let channels = gamma.numel();
        let rows = rows_of(OP, "x", x.numel(), channels)?;
        check_view(OP, "mean", mean.numel(), DType::F32, channels, DType::F32)?;
        check_view(OP, "var", var.numel(), DType::F32, channels, DType::F32)?;
        match stats {
            BatchNormStats::Running { mean: rm, var: rv } => {
                self.copy(mean.rb(), rm)?;
                self.copy(var.rb(), rv)?;
            }
            BatchNormStats::Batch => {
                launch::batchnorm_stats(&self.dev, &mean, &var, &x, rows, channels)?
            }
        }
        launch::batchnorm_forward(
            &self.dev, &out, &x, &mean, &var, &gamma, &beta, rows, channels, eps,
        )
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
        expect_f32(
            OP,
            &[
                ("running_mean", running_mean.dtype()),
                ("running_var", running_var.dtype()),
                ("mean", mean.dtype()),
                ("var", var.dtype()),
            ],
        )?;
        let channels = running_mean.numel();
        launch::batchnorm_running_update(
            &self.dev,
            &running_mean,
            &running_var,
            &mean,
            &var,
            rows,
            channels,
            momentum,
        )
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
        expect_bf16(
            OP,
            &[
                ("dx", dx.dtype()),
                ("dout", dout.dtype()),
                ("x", x.dtype()),
                ("gamma", gamma.dtype()),
            ],
        )?;
        expect_f32(
            OP,
            &[
                ("dgamma", dgamma.dtype()),
                ("dbeta", dbeta.dtype()),
                ("mean", mean.dtype()),
                ("var", var.dtype()),
            ],
        )?;
        let channels = gamma.numel();
        let rows = rows_of(OP, "x", x.numel(), channels)?;
        let both = self.scratch_bytes(&ScratchUse::BatchNormBackward { channels });
        self.with_scratch(both, |s| {
            let sums = s.at(0, both);
            self.dev.zero(&sums)?;
            launch::batchnorm_backward(
                &self.dev, &dx, &sums, &dout, &x, &mean, &var, &gamma, rows, channels, train, eps,
            )?;
            self.add_f32(&dgamma, &sums.at(0, channels * 4), channels)?;
            self.add_f32(&dbeta, &sums.at(channels * 4, channels * 4), channels)
        })
    }

    fn attention_pool(
        &self,
        out: ViewMut<'_, Self>,
        logits: ViewMut<'_, Self>,
        x: View<'_, Self>,
        w: View<'_, Self>,
        dims: &PoolDims,
    ) -> Result<()> {
        expect_bf16(
            "attention_pool",
            &[("out", out.dtype()), ("x", x.dtype()), ("w", w.dtype())],
        )?;
        expect("attention_pool", "logits", logits.dtype(), DType::F32)?;
        launch::attention_pool_forward(&self.dev, &out, &logits, &x, &w, *dims)
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
        dims.checked_sizes(OP)?;
        expect_bf16(
            OP,
            &[
                ("dx", dx.dtype()),
                ("dout", dout.dtype()),
                ("x", x.dtype()),
                ("w", w.dtype()),
            ],
        )?;
        expect_f32(OP, &[("dw", dw.dtype()), ("logits", logits.dtype())])?;
        let n = logits.numel();
        let (half, full) = (n * 2, n * 4);
        let total = self.scratch_bytes(&ScratchUse::AttentionPoolBackward { logits: n });
        self.with_scratch(total, |s| {
            launch::attention_pool_backward(
                &self.dev,
                &dx,
                &dw,
                &s.at(0, half),
                &s.at(half, half),
                &dout,
                &x,
                &w,
                &logits,
                &s.at(2 * half, full),
                *dims,
            )
        })
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
        expect(OP, "bias", bias.dtype(), DType::F32)?;
        expect_bf16(OP, &[("q_pos", q_pos.dtype()), ("rel_k", rel_k.dtype())])?;
        checked_product(OP, &[batch, heads, n, n])?;
        checked_product(OP, &[2 * n, heads])?;
        let dk = rows_of(
            OP,
            "q_pos",
            q_pos.numel(),
            checked_product(OP, &[batch, n, heads])?.max(1),
        )?;
        launch::relative_logits(&self.dev, &bias, &q_pos, &rel_k, batch, heads, n, dk)
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
        expect(OP, "dbias", dbias.dtype(), DType::F32)?;
        expect_bf16(
            OP,
            &[
                ("dq_pos", dq_pos.dtype()),
                ("drel_k", drel_k.dtype()),
                ("q_pos", q_pos.dtype()),
                ("rel_k", rel_k.dtype()),
            ],
        )?;
        checked_product(OP, &[batch, heads, n, n])?;
        checked_product(OP, &[2 * n, heads])?;
        let dk = rows_of(
            OP,
            "q_pos",
            q_pos.numel(),
            checked_product(OP, &[batch, n, heads])?.max(1),
        )?;
        launch::relative_logits_backward(
            &self.dev, &dq_pos, &drel_k, &dbias, &q_pos, &rel_k, batch, heads, n, dk,
        )
    }

    fn mse(&self, pred: View<'_, Self>, target: View<'_, Self>) -> Result<f32> {
        expect("mse", "pred", pred.dtype(), DType::BF16)?;
        expect("mse", "target", target.dtype(), DType::F32)?;
        let n = pred.numel();
        if n == 0 {
            return Err(Error::invalid("mse", "empty input"));
        }
        let partial = launch::NORM_BLOCKS * 4;
        let sum = self.with_scratch(self.scratch_bytes(&ScratchUse::Reduction), |s| {
            let out = s.at(partial, 4);
            launch::mse_sum(&self.dev, &out, &s.at(0, partial), &pred, &target, n)?;
            let b = self.dev.read(&out)?;
            Ok(f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        })?;
        Ok(sum / n as f32)
    }

    fn mse_backward(
        &self,
        dpred: ViewMut<'_, Self>,
        pred: View<'_, Self>,
        target: View<'_, Self>,
        dloss: f32,
    ) -> Result<()> {
        expect_bf16(
            "mse_backward",
            &[("dpred", dpred.dtype()), ("pred", pred.dtype())],
        )?;
        expect("mse_backward", "target", target.dtype(), DType::F32)?;
        launch::mse_backward(&self.dev, &dpred, &pred, &target, pred.numel(), dloss)
    }

    fn sum_squares(&self, x: View<'_, Self>) -> Result<f32> {
        expect("sum_squares", "x", x.dtype(), DType::F32)?;
        let partial = launch::NORM_BLOCKS * 4;
        self.with_scratch(self.scratch_bytes(&ScratchUse::Reduction), |s| {
            let out = s.at(partial, 4);
            launch::global_norm_squared(&self.dev, &out, &s.at(0, partial), &x, x.numel())?;
            let b = self.dev.read(&out)?;
            Ok(f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        })
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
        expect_f32(
            OP,
            &[
                ("params", params.dtype()),
                ("m", m.dtype()),
                ("v", v.dtype()),
                ("grads", grads.dtype()),
            ],
        )?;
        let copy = compute_copy.ok_or_else(|| {
            Error::invalid(OP, "kernel devices keep a bf16 compute copy of the weights")
        })?;
        expect(OP, "compute copy", copy.dtype(), DType::BF16)?;
        let step = launch::AdamWStep {
            lr: s.lr,
            beta1: s.beta1,
            beta2: s.beta2,
            eps: s.eps,
            weight_decay: s.weight_decay,
            step: s.step,
            grad_scale: s.grad_scale,
        };
        launch::adamw(
            &self.dev,
            &params,
            &copy,
            &m,
            &v,
            &grads,
            params.numel(),
            step,
        )
    }
}
