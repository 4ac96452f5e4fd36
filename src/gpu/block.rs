//! One pre-LN transformer block (the ESM-2 / NT-v2 layer with a GELU FFN) on a [`KernelDevice`], forward and
//! backward, composed from the kernels in [`super::ops`]: the whole-step check that the GPU path computes what
//! the CPU backend computes (`tests/emu_block.rs`).
//!
//! ```text
//! h = LN₁(x); q,k,v = h·Wᵀ + b; q,k = RoPE; a = FlashAttention(q, k, v; key padding)
//! m = x + a·W_oᵀ + b_o;  y = m + GELU(LN₂(m)·W₁ᵀ + b₁)·W₂ᵀ + b₂
//! ```
//! Weights and activations are bf16; weight gradients f32 (master gradients), activation gradients bf16.

use super::ops::{self, Act, AttentionDims};
use super::{Arg, KernelDevice, LaunchConfig, MatmulDims};
use crate::models::transformer::FeedForward;
use crate::Result;

/// A linear layer's buffers: weight `[out, in]` and bias `[out]` (bf16), their gradients (f32).
pub struct Linear<B> {
    pub w: B,
    /// Absent for NT-v2's bias-free FFN.
    pub b: Option<B>,
    pub dw: B,
    pub db: Option<B>,
    pub d_in: usize,
    pub d_out: usize,
}

/// LayerNorm parameters (bf16) and gradients `[2, dim]` (f32: dgamma then dbeta).
pub struct Norm<B> {
    pub gamma: B,
    pub beta: B,
    pub dgamma_dbeta: B,
}

pub struct BlockParams<B> {
    pub ln1: Norm<B>,
    pub q: Linear<B>,
    pub k: Linear<B>,
    pub v: Linear<B>,
    pub o: Linear<B>,
    pub ln2: Norm<B>,
    pub ff1: Linear<B>,
    pub ff2: Linear<B>,
    /// Rotary tables `[max_len, head_dim/2]` (f32).
    pub cos: B,
    pub sin: B,
}

/// Geometry of a block call.
#[derive(Clone, Copy, Debug)]
pub struct BlockDims {
    pub batch: usize,
    pub len: usize,
    pub hidden: usize,
    pub heads: usize,
    /// FFN inner width F.
    pub ffn: usize,
    pub ffn_kind: FeedForward,
    pub eps: f32,
}

impl BlockDims {
    /// Width of the first FFN projection (SwiGLU's holds gate and value).
    pub fn ffn_in(&self) -> usize {
        match self.ffn_kind {
            FeedForward::Gelu => self.ffn,
            FeedForward::SwiGlu => 2 * self.ffn,
        }
    }
}

/// Saved activations (and scratch) for one call; allocate with [`BlockActs::new`].
pub struct BlockActs<B> {
    pub x: B,
    pub ln1: B,
    pub mean1: B,
    pub rstd1: B,
    pub q: B,
    pub k: B,
    pub v: B,
    pub q_rot: B,
    pub k_rot: B,
    pub attn: B,
    pub lse: B,
    pub proj: B,
    pub mid: B,
    pub ln2: B,
    pub mean2: B,
    pub rstd2: B,
    pub ff_lin: B,
    pub ff_pre: B,
    pub ff_act: B,
    pub out: B,
}

impl<B> BlockActs<B> {
    pub fn new<D: KernelDevice<Buffer = B>>(dev: &D, d: &BlockDims) -> Result<Self> {
        let n = d.batch * d.len;
        let bf = |elems: usize| dev.alloc_zeroed(elems * 2);
        let f32s = |elems: usize| dev.alloc_zeroed(elems * 4);
        Ok(BlockActs {
            x: bf(n * d.hidden)?,
            ln1: bf(n * d.hidden)?,
            mean1: f32s(n)?,
            rstd1: f32s(n)?,
            q: bf(n * d.hidden)?,
            k: bf(n * d.hidden)?,
            v: bf(n * d.hidden)?,
            q_rot: bf(n * d.hidden)?,
            k_rot: bf(n * d.hidden)?,
            attn: bf(n * d.hidden)?,
            lse: f32s(d.batch * d.heads * d.len)?,
            proj: bf(n * d.hidden)?,
            mid: bf(n * d.hidden)?,
            ln2: bf(n * d.hidden)?,
            mean2: f32s(n)?,
            rstd2: f32s(n)?,
            ff_lin: bf(n * d.ffn_in())?,
            ff_pre: bf(n * d.ffn_in())?,
            ff_act: bf(n * d.ffn)?,
            out: bf(n * d.hidden)?,
        })
    }
}

fn linear_forward<D: KernelDevice>(
    dev: &D,
    y: &D::Buffer,
    x: &D::Buffer,
    l: &Linear<D::Buffer>,
    rows: usize,
) -> Result<()> {
    match &l.b {
        // Bias fused into the GEMM's epilogue (cuBLASLt on the GPU).
        Some(b) => dev.linear_bias(y, x, &l.w, b, rows, l.d_in, l.d_out, false),
        None => dev.gemm(
            y,
            false,
            x,
            &l.w,
            MatmulDims {
                batch: 1,
                m: rows,
                n: l.d_out,
                k: l.d_in,
                trans_a: false,
                trans_b: true,
            },
            false,
        ),
    }
}

/// `dx += dy·W`, `dW += dyᵀ·x`, `db += Σ dy`.
fn linear_backward<D: KernelDevice>(
    dev: &D,
    dx: &D::Buffer,
    dy: &D::Buffer,
    x: &D::Buffer,
    l: &Linear<D::Buffer>,
    rows: usize,
) -> Result<()> {
    use super::DeviceBuffer;
    dev.gemm(
        dx,
        false,
        dy,
        &l.w,
        MatmulDims {
            batch: 1,
            m: rows,
            n: l.d_in,
            k: l.d_out,
            trans_a: false,
            trans_b: false,
        },
        true,
    )?;
    dev.gemm(
        &l.dw,
        true,
        dy,
        x,
        MatmulDims {
            batch: 1,
            m: l.d_out,
            n: l.d_in,
            k: rows,
            trans_a: true,
            trans_b: false,
        },
        true,
    )?;
    match &l.db {
        Some(db) => dev.launch(
            "column_sum_bf16_f32",
            LaunchConfig::linear(l.d_out.div_ceil(128) as u32, 128, 0),
            &[
                Arg::Ptr(db.ptr()),
                Arg::Ptr(dy.ptr()),
                Arg::I64(rows as i64),
                Arg::I32(l.d_out as i32),
            ],
        ),
        None => Ok(()),
    }
}

fn attention_dims(d: &BlockDims) -> AttentionDims {
    AttentionDims::new(d.batch, d.heads, d.len, d.len, d.hidden / d.heads)
}

/// Forward of one block; `a.x` holds the input, `a.out` receives the output. `kv_lens`: i32 per batch entry.
pub fn forward<D: KernelDevice>(
    dev: &D,
    p: &BlockParams<D::Buffer>,
    a: &BlockActs<D::Buffer>,
    kv_lens: &D::Buffer,
    d: &BlockDims,
) -> Result<()> {
    let (n, h) = (d.batch * d.len, d.hidden);
    ops::layernorm_forward(
        dev,
        &a.ln1,
        &a.mean1,
        &a.rstd1,
        &a.x,
        &p.ln1.gamma,
        &p.ln1.beta,
        n,
        h,
        d.eps,
    )?;
    linear_forward(dev, &a.q, &a.ln1, &p.q, n)?;
    linear_forward(dev, &a.k, &a.ln1, &p.k, n)?;
    linear_forward(dev, &a.v, &a.ln1, &p.v, n)?;
    let hd = h / d.heads;
    ops::rotary(
        dev, &a.q_rot, &a.q, &p.cos, &p.sin, d.batch, d.len, d.heads, hd, false,
    )?;
    ops::rotary(
        dev, &a.k_rot, &a.k, &p.cos, &p.sin, d.batch, d.len, d.heads, hd, false,
    )?;
    ops::flash_attention_forward(
        dev,
        &a.attn,
        &a.lse,
        &a.q_rot,
        &a.k_rot,
        &a.v,
        Some(kv_lens),
        None,
        &attention_dims(d),
    )?;
    // m = x + attn·W_oᵀ + b_o and LN₂(m) in one fused kernel.
    linear_forward(dev, &a.proj, &a.attn, &p.o, n)?;
    ops::residual_layernorm_forward(
        dev,
        &a.mid,
        &a.ln2,
        &a.mean2,
        &a.rstd2,
        &a.x,
        &a.proj,
        &p.ln2.gamma,
        &p.ln2.beta,
        n,
        h,
        d.eps,
    )?;
    match d.ffn_kind {
        FeedForward::Gelu => {
            // ff_lin = ln2·W₁ᵀ, then the fused bias + GELU keeps the pre-activation.
            let dims = MatmulDims {
                batch: 1,
                m: n,
                n: d.ffn,
                k: h,
                trans_a: false,
                trans_b: true,
            };
            dev.gemm(&a.ff_lin, false, &a.ln2, &p.ff1.w, dims, false)?;
            let b1 = p
                .ff1
                .b
                .as_ref()
                .ok_or_else(|| crate::Error::invalid("block", "the GELU FFN needs a bias"))?;
            ops::bias_act_forward(
                dev,
                &a.ff_pre,
                &a.ff_act,
                &a.ff_lin,
                b1,
                n,
                d.ffn,
                Act::GeluErf,
            )?;
        }
        FeedForward::SwiGlu => {
            linear_forward(dev, &a.ff_lin, &a.ln2, &p.ff1, n)?;
            ops::swiglu_forward(dev, &a.ff_act, &a.ff_lin, n, d.ffn)?;
        }
    }
    linear_forward(dev, &a.out, &a.ff_act, &p.ff2, n)?;
    ops::bias_add(dev, &a.out, &a.mid, 1, n * h)
}

/// Backward of one block: from `dout` (bf16), adds parameter gradients and writes the input gradient into
/// `dx` (bf16, overwritten).
pub fn backward<D: KernelDevice>(
    dev: &D,
    p: &BlockParams<D::Buffer>,
    a: &BlockActs<D::Buffer>,
    kv_lens: &D::Buffer,
    dout: &D::Buffer,
    dx: &D::Buffer,
    d: &BlockDims,
) -> Result<()> {
    let (n, h) = (d.batch * d.len, d.hidden);
    let bf = |elems: usize| dev.alloc_zeroed(elems * 2);
    // FFN: y = m + GELU(pre)·W₂ᵀ + b₂
    let d_act = bf(n * d.ffn)?;
    linear_backward(dev, &d_act, dout, &a.ff_act, &p.ff2, n)?;
    let d_pre = bf(n * d.ffn_in())?;
    match d.ffn_kind {
        FeedForward::Gelu => {
            ops::act_backward(dev, &d_pre, &d_act, &a.ff_pre, n * d.ffn, Act::GeluErf)?
        }
        FeedForward::SwiGlu => ops::swiglu_backward(dev, &d_pre, &d_act, &a.ff_lin, n, d.ffn)?,
    }
    let d_ln2 = bf(n * h)?;
    linear_backward(dev, &d_ln2, &d_pre, &a.ln2, &p.ff1, n)?;
    let d_mid = bf(n * h)?;
    ops::copy_at(dev, &d_mid, 0, dout, 0, n * h)?;
    let scratch = dev.alloc_zeroed(ops::layernorm_backward_scratch_bytes(n, h))?;
    ops::layernorm_backward(
        dev,
        &d_mid,
        &p.ln2.dgamma_dbeta,
        &scratch,
        &d_ln2,
        &a.mid,
        &p.ln2.gamma,
        &a.mean2,
        &a.rstd2,
        n,
        h,
    )?;
    // Attention: m = x + attn·W_oᵀ + b_o
    let d_attn = bf(n * h)?;
    linear_backward(dev, &d_attn, &d_mid, &a.attn, &p.o, n)?;
    let (dq_rot, dk_rot, dv) = (bf(n * h)?, bf(n * h)?, bf(n * h)?);
    let ad = attention_dims(d);
    let fscratch = dev.alloc_zeroed(ops::flash_backward_scratch_bytes(&ad, false))?;
    ops::flash_attention_backward(
        dev,
        &dq_rot,
        &dk_rot,
        &dv,
        None,
        &fscratch,
        &d_attn,
        &a.attn,
        &a.lse,
        &a.q_rot,
        &a.k_rot,
        &a.v,
        Some(kv_lens),
        None,
        &ad,
    )?;
    let (dq, dk) = (bf(n * h)?, bf(n * h)?);
    let hd = h / d.heads;
    ops::rotary(
        dev, &dq, &dq_rot, &p.cos, &p.sin, d.batch, d.len, d.heads, hd, true,
    )?;
    ops::rotary(
        dev, &dk, &dk_rot, &p.cos, &p.sin, d.batch, d.len, d.heads, hd, true,
    )?;
    let d_ln1 = bf(n * h)?;
    linear_backward(dev, &d_ln1, &dq, &a.ln1, &p.q, n)?;
    linear_backward(dev, &d_ln1, &dk, &a.ln1, &p.k, n)?;
    linear_backward(dev, &d_ln1, &dv, &a.ln1, &p.v, n)?;
    ops::copy_at(dev, dx, 0, &d_mid, 0, n * h)?;
    ops::layernorm_backward(
        dev,
        dx,
        &p.ln1.dgamma_dbeta,
        &scratch,
        &d_ln1,
        &a.x,
        &p.ln1.gamma,
        &a.mean1,
        &a.rstd1,
        n,
        h,
    )
}
