//! Launch code for the GPU kernels, written once for every [`KernelDevice`] (the CUDA device and the
//! emulator): grid and block sizes, argument lists, and the size checks that turn a bad call into an error.

// Kernel-style signatures: outputs, saved statistics, inputs, dims.
#![allow(clippy::too_many_arguments)]

use super::{Arg, DeviceBuffer, KernelDevice, LaunchConfig, MatmulDims};
use crate::error::check_len;
use crate::Result;

const BF16: usize = 2;
const F32: usize = 4;

fn ptr<B: DeviceBuffer + ?Sized>(b: &B) -> Arg {
    Arg::Ptr(b.ptr())
}

/// LayerNorm forward, bf16 (one warp per row, 4 rows per block).
pub fn layernorm_forward<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    mean: &dyn DeviceBuffer,
    rstd: &dyn DeviceBuffer,
    x: &dyn DeviceBuffer,
    gamma: &dyn DeviceBuffer,
    beta: &dyn DeviceBuffer,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    const ROWS_PER_BLOCK: usize = 4;
    check_len(
        "layernorm_forward (bytes)",
        "x",
        x.len_bytes(),
        rows * dim * BF16,
    )?;
    check_len(
        "layernorm_forward (bytes)",
        "out",
        out.len_bytes(),
        rows * dim * BF16,
    )?;
    check_len(
        "layernorm_forward (bytes)",
        "mean",
        mean.len_bytes(),
        rows * F32,
    )?;
    check_len(
        "layernorm_forward (bytes)",
        "rstd",
        rstd.len_bytes(),
        rows * F32,
    )?;
    check_len(
        "layernorm_forward (bytes)",
        "gamma",
        gamma.len_bytes(),
        dim * BF16,
    )?;
    check_len(
        "layernorm_forward (bytes)",
        "beta",
        beta.len_bytes(),
        dim * BF16,
    )?;
    let cfg = LaunchConfig::linear(
        rows.div_ceil(ROWS_PER_BLOCK) as u32,
        (32 * ROWS_PER_BLOCK) as u32,
        0,
    );
    let args = [
        ptr(out),
        ptr(mean),
        ptr(rstd),
        ptr(x),
        ptr(gamma),
        ptr(beta),
        Arg::I32(rows as i32),
        Arg::I32(dim as i32),
        Arg::F32(eps),
    ];
    dev.launch("layernorm_forward_bf16", cfg, &args)
}

/// LayerNorm backward, bf16: `dx += …`, and `dgamma`, `dbeta` (f32) accumulate deterministically through
/// per-block partial sums in `scratch` (see [`layernorm_backward_scratch_bytes`]).
pub fn layernorm_backward<D: KernelDevice>(
    dev: &D,
    dx: &dyn DeviceBuffer,
    dgamma_dbeta: &dyn DeviceBuffer,
    scratch: &dyn DeviceBuffer,
    dout: &dyn DeviceBuffer,
    x: &dyn DeviceBuffer,
    gamma: &dyn DeviceBuffer,
    mean: &dyn DeviceBuffer,
    rstd: &dyn DeviceBuffer,
    rows: usize,
    dim: usize,
) -> Result<()> {
    const ROWS_PER_BLOCK: usize = 4;
    for (name, b, want) in [
        ("dx", dx, rows * dim * BF16),
        ("dout", dout, rows * dim * BF16),
        ("x", x, rows * dim * BF16),
        ("gamma", gamma, dim * BF16),
        ("mean", mean, rows * F32),
        ("rstd", rstd, rows * F32),
        ("dgamma_dbeta", dgamma_dbeta, 2 * dim * F32),
    ] {
        check_len("layernorm_backward (bytes)", name, b.len_bytes(), want)?;
    }
    let blocks = rows.div_ceil(ROWS_PER_BLOCK).max(1);
    check_len(
        "layernorm_backward (bytes)",
        "scratch",
        scratch.len_bytes(),
        layernorm_backward_scratch_bytes(rows, dim),
    )?;
    let cfg = LaunchConfig::linear(
        blocks as u32,
        (32 * ROWS_PER_BLOCK) as u32,
        (2 * dim * F32) as u32,
    );
    let args = [
        ptr(dx),
        ptr(scratch),
        ptr(dout),
        ptr(x),
        ptr(gamma),
        ptr(mean),
        ptr(rstd),
        Arg::I32(rows as i32),
        Arg::I32(dim as i32),
    ];
    dev.launch("layernorm_backward_bf16", cfg, &args)?;
    let cols = 2 * dim;
    let cfg = LaunchConfig::linear(cols.div_ceil(256) as u32, 256, 0);
    dev.launch(
        "reduce_columns_f32",
        cfg,
        &[
            ptr(dgamma_dbeta),
            ptr(scratch),
            Arg::I32(blocks as i32),
            Arg::I32(cols as i32),
        ],
    )
}

pub fn layernorm_backward_scratch_bytes(rows: usize, dim: usize) -> usize {
    rows.div_ceil(4).max(1) * 2 * dim * F32
}

/// Threads per block and a grid size for a grid-stride loop over `n` elements.
fn elementwise_config(n: usize) -> LaunchConfig {
    const THREADS: usize = 256;
    LaunchConfig::linear(
        n.div_ceil(THREADS).clamp(1, 65_535) as u32,
        THREADS as u32,
        0,
    )
}

/// The pointwise activations the kernels implement (`kind` argument of `act_*_bf16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    GeluErf = 0,
    GeluSigmoid = 1,
    Relu = 2,
    Softplus = 3,
}

fn check_bf16(op: &'static str, name: &str, b: &dyn DeviceBuffer, n: usize) -> Result<()> {
    check_len(op, &format!("{name} (bytes)"), b.len_bytes(), n * BF16)
}

/// `out = act(x)` over `n` bf16 values.
pub fn act_forward<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    x: &dyn DeviceBuffer,
    n: usize,
    act: Act,
) -> Result<()> {
    check_bf16("act_forward", "out", out, n)?;
    check_bf16("act_forward", "x", x, n)?;
    dev.launch(
        "act_forward_bf16",
        elementwise_config(n),
        &[ptr(out), ptr(x), Arg::I64(n as i64), Arg::I32(act as i32)],
    )
}

/// `dx += dout · act'(x)`.
pub fn act_backward<D: KernelDevice>(
    dev: &D,
    dx: &dyn DeviceBuffer,
    dout: &dyn DeviceBuffer,
    x: &dyn DeviceBuffer,
    n: usize,
    act: Act,
) -> Result<()> {
    for (name, b) in [("dx", dx), ("dout", dout), ("x", x)] {
        check_bf16("act_backward", name, b, n)?;
    }
    dev.launch(
        "act_backward_bf16",
        elementwise_config(n),
        &[
            ptr(dx),
            ptr(dout),
            ptr(x),
            Arg::I64(n as i64),
            Arg::I32(act as i32),
        ],
    )
}

/// SwiGLU on rows of `[gate | value]` (`u [rows, 2·width]` → `out [rows, width]`).
pub fn swiglu_forward<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    u: &dyn DeviceBuffer,
    rows: usize,
    width: usize,
) -> Result<()> {
    check_bf16("swiglu_forward", "out", out, rows * width)?;
    check_bf16("swiglu_forward", "u", u, 2 * rows * width)?;
    dev.launch(
        "swiglu_forward_bf16",
        elementwise_config(rows * width),
        &[
            ptr(out),
            ptr(u),
            Arg::I64(rows as i64),
            Arg::I32(width as i32),
        ],
    )
}

pub fn swiglu_backward<D: KernelDevice>(
    dev: &D,
    du: &dyn DeviceBuffer,
    dout: &dyn DeviceBuffer,
    u: &dyn DeviceBuffer,
    rows: usize,
    width: usize,
) -> Result<()> {
    check_bf16("swiglu_backward", "du", du, 2 * rows * width)?;
    check_bf16("swiglu_backward", "dout", dout, rows * width)?;
    check_bf16("swiglu_backward", "u", u, 2 * rows * width)?;
    let args = [
        ptr(du),
        ptr(dout),
        ptr(u),
        Arg::I64(rows as i64),
        Arg::I32(width as i32),
    ];
    dev.launch(
        "swiglu_backward_bf16",
        elementwise_config(rows * width),
        &args,
    )
}

/// `out = a + b` (residual connections).
pub fn add<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    a: &dyn DeviceBuffer,
    b: &dyn DeviceBuffer,
    n: usize,
) -> Result<()> {
    for (name, buf) in [("out", out), ("a", a), ("b", b)] {
        check_bf16("add", name, buf, n)?;
    }
    dev.launch(
        "add_bf16",
        elementwise_config(n),
        &[ptr(out), ptr(a), ptr(b), Arg::I64(n as i64)],
    )
}

/// f32 → bf16 (round to nearest even).
pub fn cast_to_bf16<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    input: &dyn DeviceBuffer,
    n: usize,
) -> Result<()> {
    check_bf16("cast_to_bf16", "out", out, n)?;
    check_len("cast_to_bf16", "input (bytes)", input.len_bytes(), n * F32)?;
    dev.launch(
        "cast_f32_to_bf16",
        elementwise_config(n),
        &[ptr(out), ptr(input), Arg::I64(n as i64)],
    )
}

/// Blocks used by [`global_norm_squared`]; its scratch holds one f32 per block.
pub const NORM_BLOCKS: usize = 256;

/// `out[0] = Σ x²` over `n` f32 values, deterministically (fixed blocks, partials summed in order).
pub fn global_norm_squared<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    scratch: &dyn DeviceBuffer,
    x: &dyn DeviceBuffer,
    n: usize,
) -> Result<()> {
    check_len("global_norm_squared", "x (bytes)", x.len_bytes(), n * F32)?;
    check_len(
        "global_norm_squared",
        "scratch (bytes)",
        scratch.len_bytes(),
        NORM_BLOCKS * F32,
    )?;
    dev.launch(
        "sum_squares_partial_f32",
        LaunchConfig::linear(NORM_BLOCKS as u32, 256, 0),
        &[ptr(scratch), ptr(x), Arg::I64(n as i64)],
    )?;
    dev.launch(
        "sum_partials_f32",
        LaunchConfig::linear(1, 32, 0),
        &[ptr(out), ptr(scratch), Arg::I32(NORM_BLOCKS as i32)],
    )
}

/// Hyper-parameters of one AdamW step for one parameter group.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number (bias correction).
    pub step: u64,
    /// Multiplies the gradients (global-norm clipping coefficient, or 1).
    pub grad_scale: f32,
}

/// One fused AdamW step over `n` f32 master weights, writing their bf16 copy too.
pub fn adamw<D: KernelDevice>(
    dev: &D,
    params: &dyn DeviceBuffer,
    params_bf16: &dyn DeviceBuffer,
    m: &dyn DeviceBuffer,
    v: &dyn DeviceBuffer,
    grads: &dyn DeviceBuffer,
    n: usize,
    s: AdamWStep,
) -> Result<()> {
    for (name, b) in [("params", params), ("m", m), ("v", v), ("grads", grads)] {
        check_len("adamw", &format!("{name} (bytes)"), b.len_bytes(), n * F32)?;
    }
    check_bf16("adamw", "params_bf16", params_bf16, n)?;
    let t = s.step.max(1) as i32;
    let args = [
        ptr(params),
        ptr(params_bf16),
        ptr(m),
        ptr(v),
        ptr(grads),
        Arg::I64(n as i64),
        Arg::F32(s.lr),
        Arg::F32(s.beta1),
        Arg::F32(s.beta2),
        Arg::F32(s.eps),
        Arg::F32(s.weight_decay),
        Arg::F32(1.0 - s.beta1.powi(t)),
        Arg::F32(1.0 - s.beta2.powi(t)),
        Arg::F32(s.grad_scale),
    ];
    dev.launch("adamw_bf16", elementwise_config(n), &args)
}

/// Shape of an attention call on the GPU (same meaning as [`crate::ops::attention::AttentionDims`]).
pub use crate::ops::attention::AttentionDims;

const FA_BR: usize = 64;
const FA_BC: usize = 32;
const FA_DVC: usize = 64;

/// Dynamic shared memory of `flash_attention_forward_bf16` for head dim `d`.
pub fn flash_forward_smem_bytes(d: usize) -> usize {
    let d = d.div_ceil(16) * 16;
    (FA_BR * d + FA_BC * d + FA_BC * FA_DVC) * BF16
        + FA_BR * FA_BC * F32
        + FA_BR * FA_BC * BF16
        + FA_BR * FA_DVC * F32
        + 2 * FA_BR * F32
}

/// Flash attention forward. `kv_lens` (i32 per batch) and `bias` (f32 `[1 or B, H, Lq, Lk]`) are optional.
pub fn flash_attention_forward<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    lse: &dyn DeviceBuffer,
    q: &dyn DeviceBuffer,
    k: &dyn DeviceBuffer,
    v: &dyn DeviceBuffer,
    kv_lens: Option<&dyn DeviceBuffer>,
    bias: Option<(&dyn DeviceBuffer, bool)>,
    d: &AttentionDims,
) -> Result<()> {
    const OP: &str = "flash_attention_forward";
    if d.head_dim == 0 || d.v_head_dim == 0 {
        return Err(crate::Error::invalid(OP, "head dims must be positive"));
    }
    let (b, h) = (d.batch, d.heads);
    check_bf16(OP, "q", q, b * d.q_len * h * d.head_dim)?;
    check_bf16(OP, "k", k, b * d.kv_len * h * d.head_dim)?;
    check_bf16(OP, "v", v, b * d.kv_len * h * d.v_head_dim)?;
    check_bf16(OP, "out", out, b * d.q_len * h * d.v_head_dim)?;
    check_len(OP, "lse (bytes)", lse.len_bytes(), b * h * d.q_len * F32)?;
    if let Some(l) = kv_lens {
        check_len(OP, "kv_lens (bytes)", l.len_bytes(), b * 4)?;
    }
    if let Some((bias, per_batch)) = bias {
        check_len(
            OP,
            "bias (bytes)",
            bias.len_bytes(),
            if per_batch { b } else { 1 } * h * d.q_len * d.kv_len * F32,
        )?;
    }
    let cfg = LaunchConfig {
        grid: [
            d.q_len.div_ceil(FA_BR).max(1) as u32,
            (b * h) as u32,
            d.v_head_dim.div_ceil(FA_DVC) as u32,
        ],
        block: [128, 1, 1],
        shared_bytes: flash_forward_smem_bytes(d.head_dim) as u32,
    };
    let args = [
        ptr(out),
        ptr(lse),
        ptr(q),
        ptr(k),
        ptr(v),
        Arg::Ptr(kv_lens.map_or(0, |l| l.ptr())),
        Arg::Ptr(bias.map_or(0, |(x, _)| x.ptr())),
        Arg::I32(bias.is_some_and(|(_, p)| p) as i32),
        Arg::I32(h as i32),
        Arg::I32(d.q_len as i32),
        Arg::I32(d.kv_len as i32),
        Arg::I32(d.head_dim as i32),
        Arg::I32(d.v_head_dim as i32),
        Arg::F32(d.scale),
    ];
    dev.launch("flash_attention_forward_bf16", cfg, &args)
}

const FB: usize = 16;

/// Scratch bytes [`flash_attention_backward`] needs: the row dots D, and a per-batch dbias when the bias
/// is broadcast over the batch.
pub fn flash_backward_scratch_bytes(d: &AttentionDims, broadcast_dbias: bool) -> usize {
    let rowdot = d.batch * d.heads * d.q_len * F32;
    rowdot
        + if broadcast_dbias {
            d.batch * d.heads * d.q_len * d.kv_len * F32
        } else {
            0
        }
}

/// Flash attention backward: adds into `dq`, `dk`, `dv` (bf16) and, when given, `dbias` (f32, laid out like
/// the bias: per batch, or broadcast and summed over the batch in order).
pub fn flash_attention_backward<D: KernelDevice>(
    dev: &D,
    dq: &dyn DeviceBuffer,
    dk: &dyn DeviceBuffer,
    dv: &dyn DeviceBuffer,
    dbias: Option<&dyn DeviceBuffer>,
    scratch: &dyn DeviceBuffer,
    dout: &dyn DeviceBuffer,
    out: &dyn DeviceBuffer,
    lse: &dyn DeviceBuffer,
    q: &dyn DeviceBuffer,
    k: &dyn DeviceBuffer,
    v: &dyn DeviceBuffer,
    kv_lens: Option<&dyn DeviceBuffer>,
    bias: Option<(&dyn DeviceBuffer, bool)>,
    d: &AttentionDims,
) -> Result<()> {
    const OP: &str = "flash_attention_backward";
    if d.head_dim == 0 || d.v_head_dim == 0 {
        return Err(crate::Error::invalid(OP, "head dims must be positive"));
    }
    let (b, h) = (d.batch, d.heads);
    for (name, buf, n) in [
        ("q", q, b * d.q_len * h * d.head_dim),
        ("dq", dq, b * d.q_len * h * d.head_dim),
        ("k", k, b * d.kv_len * h * d.head_dim),
        ("dk", dk, b * d.kv_len * h * d.head_dim),
        ("v", v, b * d.kv_len * h * d.v_head_dim),
        ("dv", dv, b * d.kv_len * h * d.v_head_dim),
        ("out", out, b * d.q_len * h * d.v_head_dim),
        ("dout", dout, b * d.q_len * h * d.v_head_dim),
    ] {
        check_bf16(OP, name, buf, n)?;
    }
    check_len(OP, "lse (bytes)", lse.len_bytes(), b * h * d.q_len * F32)?;
    let broadcast = bias.is_some_and(|(_, per_batch)| !per_batch);
    if dbias.is_some() && bias.is_none() {
        return Err(crate::Error::invalid(OP, "dbias given without a bias"));
    }
    if let (Some(db), Some((_, per_batch))) = (dbias, bias) {
        check_len(
            OP,
            "dbias (bytes)",
            db.len_bytes(),
            if per_batch { b } else { 1 } * h * d.q_len * d.kv_len * F32,
        )?;
    }
    check_len(
        OP,
        "scratch (bytes)",
        scratch.len_bytes(),
        flash_backward_scratch_bytes(d, broadcast && dbias.is_some()),
    )?;
    let rowdot = scratch.ptr();
    let rows = b * d.q_len * h;
    dev.launch(
        "flash_attention_backward_rowdot_bf16",
        LaunchConfig::linear(rows.div_ceil(4).max(1) as u32, 128, 0),
        &[
            Arg::Ptr(rowdot),
            ptr(dout),
            ptr(out),
            Arg::I32(b as i32),
            Arg::I32(h as i32),
            Arg::I32(d.q_len as i32),
            Arg::I32(d.v_head_dim as i32),
        ],
    )?;
    let (dk_dim, dv_dim) = (d.head_dim, d.v_head_dim);
    // Shared-memory tiles are padded to multiples of 16 (the WMMA tile).
    let (dkp, dvp) = (dk_dim.div_ceil(16) * 16, dv_dim.div_ceil(16) * 16);
    let common = [
        ptr(q),
        ptr(k),
        ptr(v),
        ptr(dout),
        ptr(lse),
        Arg::Ptr(rowdot),
        Arg::Ptr(kv_lens.map_or(0, |l| l.ptr())),
        Arg::Ptr(bias.map_or(0, |(x, _)| x.ptr())),
        Arg::I32(bias.is_some_and(|(_, p)| p) as i32),
        Arg::I32(h as i32),
        Arg::I32(d.q_len as i32),
        Arg::I32(d.kv_len as i32),
        Arg::I32(dk_dim as i32),
        Arg::I32(dv_dim as i32),
        Arg::F32(d.scale),
    ];
    let smem_kv = (2 * FB * dkp + 2 * FB * dvp + 4 * FB * FB) * BF16
        + (FB * dkp + FB * dvp + 2 * FB * FB) * F32;
    let cfg = LaunchConfig {
        grid: [d.kv_len.div_ceil(FB).max(1) as u32, (b * h) as u32, 1],
        block: [32, 1, 1],
        shared_bytes: smem_kv as u32,
    };
    let mut args = vec![ptr(dk), ptr(dv)];
    args.extend_from_slice(&common);
    dev.launch("flash_attention_backward_dkdv_bf16", cfg, &args)?;
    // dbias goes straight to the output when it is per batch; a broadcast bias sums a per-batch scratch.
    let per_batch_scratch = scratch.ptr() + (b * h * d.q_len * F32) as u64;
    let dbias_ptr = match dbias {
        Some(db) if !broadcast => db.ptr(),
        Some(_) => {
            let n = b * h * d.q_len * d.kv_len;
            dev.launch(
                "fill_f32",
                elementwise_config(n),
                &[
                    Arg::Ptr(per_batch_scratch),
                    Arg::F32(0.0),
                    Arg::I64(n as i64),
                ],
            )?;
            per_batch_scratch
        }
        None => 0,
    };
    let smem_q =
        (2 * FB * dkp + 2 * FB * dvp + 2 * FB * FB) * BF16 + (FB * dkp + 2 * FB * FB) * F32;
    let cfg = LaunchConfig {
        grid: [d.q_len.div_ceil(FB).max(1) as u32, (b * h) as u32, 1],
        block: [32, 1, 1],
        shared_bytes: smem_q as u32,
    };
    let mut args = vec![ptr(dq), Arg::Ptr(dbias_ptr)];
    args.extend_from_slice(&common);
    dev.launch("flash_attention_backward_dq_bf16", cfg, &args)?;
    if let (Some(db), true) = (dbias, broadcast) {
        let n = h * d.q_len * d.kv_len;
        dev.launch(
            "sum_over_batch_f32",
            elementwise_config(n),
            &[
                ptr(db),
                Arg::Ptr(per_batch_scratch),
                Arg::I32(b as i32),
                Arg::I64(n as i64),
            ],
        )?;
    }
    Ok(())
}

fn rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig::linear(rows.div_ceil(4).max(1) as u32, 128, 0)
}

/// Row softmax, bf16.
pub fn softmax_forward<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    x: &dyn DeviceBuffer,
    rows: usize,
    dim: usize,
) -> Result<()> {
    check_bf16("softmax_forward", "out", out, rows * dim)?;
    check_bf16("softmax_forward", "x", x, rows * dim)?;
    dev.launch(
        "softmax_forward_bf16",
        rows_config(rows),
        &[
            ptr(out),
            ptr(x),
            Arg::I32(rows as i32),
            Arg::I32(dim as i32),
        ],
    )
}

/// `dx += y ∘ (dy − Σ dy∘y)`.
pub fn softmax_backward<D: KernelDevice>(
    dev: &D,
    dx: &dyn DeviceBuffer,
    dy: &dyn DeviceBuffer,
    y: &dyn DeviceBuffer,
    rows: usize,
    dim: usize,
) -> Result<()> {
    for (name, b) in [("dx", dx), ("dy", dy), ("y", y)] {
        check_bf16("softmax_backward", name, b, rows * dim)?;
    }
    dev.launch(
        "softmax_backward_bf16",
        rows_config(rows),
        &[
            ptr(dx),
            ptr(dy),
            ptr(y),
            Arg::I32(rows as i32),
            Arg::I32(dim as i32),
        ],
    )
}

/// Rotary embedding on `x [batch, len, heads, d]` with f32 tables `[max_len, d/2]`: `out = rope(x)`, or with
/// `backward`, `out += ropeᵀ(x)`.
pub fn rotary<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    x: &dyn DeviceBuffer,
    cos: &dyn DeviceBuffer,
    sin: &dyn DeviceBuffer,
    batch: usize,
    len: usize,
    heads: usize,
    d: usize,
    backward: bool,
) -> Result<()> {
    let vectors = batch * len * heads;
    check_bf16("rotary", "out", out, vectors * d)?;
    check_bf16("rotary", "x", x, vectors * d)?;
    if cos.len_bytes() < len * d / 2 * F32 || sin.len_bytes() != cos.len_bytes() {
        return Err(crate::Error::shape(
            "rotary",
            format!("cos/sin tables shorter than {len} positions"),
        ));
    }
    let args = [
        ptr(out),
        ptr(x),
        ptr(cos),
        ptr(sin),
        Arg::I64(vectors as i64),
        Arg::I32(len as i32),
        Arg::I32(heads as i32),
        Arg::I32(d as i32),
        Arg::F32(if backward { -1.0 } else { 1.0 }),
    ];
    dev.launch("rotary_bf16", elementwise_config(vectors * d / 2), &args)
}

/// Uploads token ids as i32 after checking them against the vocabulary (the kernels trust them).
pub fn upload_ids<D: KernelDevice>(dev: &D, ids: &[u32], vocab: usize) -> Result<D::Buffer> {
    if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(crate::Error::invalid(
            "token id",
            format!("{id} at position {i} is outside the vocabulary of {vocab}"),
        ));
    }
    let v: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    dev.upload(bytemuck::cast_slice(&v))
}

/// `out[t, :] = table[ids[t], :]`.
pub fn embedding_forward<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    ids: &dyn DeviceBuffer,
    table: &dyn DeviceBuffer,
    tokens: usize,
    dim: usize,
    vocab: usize,
) -> Result<()> {
    check_bf16("embedding_forward", "out", out, tokens * dim)?;
    check_bf16("embedding_forward", "table", table, vocab * dim)?;
    check_len(
        "embedding_forward",
        "ids (bytes)",
        ids.len_bytes(),
        tokens * 4,
    )?;
    let args = [
        ptr(out),
        ptr(ids),
        ptr(table),
        Arg::I64(tokens as i64),
        Arg::I32(dim as i32),
        Arg::I32(vocab as i32),
    ];
    dev.launch(
        "embedding_forward_bf16",
        elementwise_config(tokens * dim),
        &args,
    )
}

/// `dtable[ids[t], :] += dout[t, :]` into f32 gradients, deterministically.
pub fn embedding_backward<D: KernelDevice>(
    dev: &D,
    dtable: &dyn DeviceBuffer,
    dout: &dyn DeviceBuffer,
    ids: &dyn DeviceBuffer,
    tokens: usize,
    dim: usize,
    vocab: usize,
) -> Result<()> {
    check_len(
        "embedding_backward",
        "dtable (bytes)",
        dtable.len_bytes(),
        vocab * dim * F32,
    )?;
    check_bf16("embedding_backward", "dout", dout, tokens * dim)?;
    let args = [
        ptr(dtable),
        ptr(dout),
        ptr(ids),
        Arg::I64(tokens as i64),
        Arg::I32(dim as i32),
        Arg::I32(vocab as i32),
    ];
    dev.launch(
        "embedding_backward_f32",
        LaunchConfig::linear(dim.div_ceil(128) as u32, 128, 0),
        &args,
    )
}

/// `out[0] = Σ (pred − target)²` (divide by n for the MSE), deterministically; `scratch` holds
/// [`NORM_BLOCKS`] f32.
pub fn mse_sum<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    scratch: &dyn DeviceBuffer,
    pred: &dyn DeviceBuffer,
    target: &dyn DeviceBuffer,
    n: usize,
) -> Result<()> {
    check_bf16("mse", "pred", pred, n)?;
    check_len("mse", "target (bytes)", target.len_bytes(), n * F32)?;
    check_len(
        "mse",
        "scratch (bytes)",
        scratch.len_bytes(),
        NORM_BLOCKS * F32,
    )?;
    dev.launch(
        "mse_partial_f32",
        LaunchConfig::linear(NORM_BLOCKS as u32, 256, 0),
        &[ptr(scratch), ptr(pred), ptr(target), Arg::I64(n as i64)],
    )?;
    dev.launch(
        "sum_partials_f32",
        LaunchConfig::linear(1, 32, 0),
        &[ptr(out), ptr(scratch), Arg::I32(NORM_BLOCKS as i32)],
    )
}

/// `dpred += dloss · 2(pred − target)/n`.
pub fn mse_backward<D: KernelDevice>(
    dev: &D,
    dpred: &dyn DeviceBuffer,
    pred: &dyn DeviceBuffer,
    target: &dyn DeviceBuffer,
    n: usize,
    dloss: f32,
) -> Result<()> {
    check_bf16("mse_backward", "dpred", dpred, n)?;
    check_bf16("mse_backward", "pred", pred, n)?;
    let args = [
        ptr(dpred),
        ptr(pred),
        ptr(target),
        Arg::I64(n as i64),
        Arg::F32(2.0 * dloss / n.max(1) as f32),
    ];
    dev.launch("mse_backward_bf16", elementwise_config(n), &args)
}

pub use crate::ops::conv::Conv1dDims;

/// Bytes of the im2col scratch of [`conv1d_forward`] and [`conv1d_backward`] (bf16 columns).
pub fn conv1d_scratch_bytes(d: &Conv1dDims) -> usize {
    d.batch * d.len * d.c_in * d.width * BF16
}

/// Bytes of the f32 column-gradient scratch of [`conv1d_backward`].
pub fn conv1d_dcols_bytes(d: &Conv1dDims) -> usize {
    d.batch * d.len * d.c_in * d.width * F32
}

/// `cols [B·L, Cin·K]` = the 'same'-padded windows of `x [B, L, Cin]` (zero outside the sequence).
pub fn im2col<D: KernelDevice>(
    dev: &D,
    cols: &dyn DeviceBuffer,
    x: &dyn DeviceBuffer,
    d: Conv1dDims,
) -> Result<()> {
    let rows = d.batch * d.len;
    check_bf16("im2col", "x", x, rows * d.c_in)?;
    check_len(
        "im2col",
        "cols (bytes)",
        cols.len_bytes(),
        conv1d_scratch_bytes(&d),
    )?;
    let geo = [
        Arg::I32(d.batch as i32),
        Arg::I32(d.len as i32),
        Arg::I32(d.c_in as i32),
        Arg::I32(d.width as i32),
    ];
    dev.launch(
        "im2col_bf16",
        elementwise_config(rows * d.c_in * d.width),
        &[&[ptr(cols), ptr(x)][..], &geo].concat(),
    )
}

/// conv1d ('same', odd width) as im2col + GEMM + bias; weight `[Cout, Cin, K]` bf16.
pub fn conv1d_forward<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    cols: &dyn DeviceBuffer,
    x: &dyn DeviceBuffer,
    w: &dyn DeviceBuffer,
    bias: Option<&dyn DeviceBuffer>,
    d: Conv1dDims,
) -> Result<()> {
    if d.width % 2 == 0 {
        return Err(crate::Error::invalid(
            "conv1d width",
            format!("{} ('same' padding needs an odd width)", d.width),
        ));
    }
    let rows = d.batch * d.len;
    check_bf16("conv1d", "x", x, rows * d.c_in)?;
    check_bf16("conv1d", "out", out, rows * d.c_out)?;
    check_bf16("conv1d", "weight", w, d.c_out * d.c_in * d.width)?;
    if let Some(bias) = bias {
        check_bf16("conv1d", "bias", bias, d.c_out)?;
    }
    check_len(
        "conv1d",
        "cols (bytes)",
        cols.len_bytes(),
        conv1d_scratch_bytes(&d),
    )?;
    im2col(dev, cols, x, d)?;
    // The bias is written first and the GEMM accumulates onto it: one bf16 rounding of the f32 result.
    if let Some(bias) = bias {
        dev.launch(
            "fill_rows_bf16",
            elementwise_config(rows * d.c_out),
            &[
                ptr(out),
                ptr(bias),
                Arg::I64(rows as i64),
                Arg::I32(d.c_out as i32),
            ],
        )?;
    }
    let mm = MatmulDims {
        batch: 1,
        m: rows,
        n: d.c_out,
        k: d.c_in * d.width,
        trans_a: false,
        trans_b: true,
    };
    dev.gemm(out, false, cols, w, mm, bias.is_some())
}

/// Gradients of [`conv1d_forward`]: `dx += …` (bf16), `dw += …` and `dbias += …` (f32). `cols` must still hold
/// the forward's im2col of x; `dcols` is f32 scratch of [`conv1d_dcols_bytes`].
pub fn conv1d_backward<D: KernelDevice>(
    dev: &D,
    dx_and_dcols: Option<(&dyn DeviceBuffer, &dyn DeviceBuffer)>,
    dw: &dyn DeviceBuffer,
    dbias: Option<&dyn DeviceBuffer>,
    cols: &dyn DeviceBuffer,
    dout: &dyn DeviceBuffer,
    w: &dyn DeviceBuffer,
    d: Conv1dDims,
) -> Result<()> {
    let rows = d.batch * d.len;
    check_bf16("conv1d_backward", "dout", dout, rows * d.c_out)?;
    check_len(
        "conv1d_backward",
        "dw (bytes)",
        dw.len_bytes(),
        d.c_out * d.c_in * d.width * F32,
    )?;
    if let Some(dbias) = dbias {
        check_len(
            "conv1d_backward",
            "dbias (bytes)",
            dbias.len_bytes(),
            d.c_out * F32,
        )?;
    }
    let kk = d.c_in * d.width;
    let geo = [
        Arg::I32(d.batch as i32),
        Arg::I32(d.len as i32),
        Arg::I32(d.c_in as i32),
        Arg::I32(d.width as i32),
    ];
    if let Some((dx, dcols)) = dx_and_dcols {
        check_bf16("conv1d_backward", "dx", dx, rows * d.c_in)?;
        check_len(
            "conv1d_backward",
            "dcols (bytes)",
            dcols.len_bytes(),
            conv1d_dcols_bytes(&d),
        )?;
        // dcols stays f32, so dx is rounded to bf16 once, after col2im's sum.
        dev.gemm(
            dcols,
            true,
            dout,
            w,
            MatmulDims {
                batch: 1,
                m: rows,
                n: kk,
                k: d.c_out,
                trans_a: false,
                trans_b: false,
            },
            false,
        )?;
        dev.launch(
            "col2im_bf16",
            elementwise_config(rows * d.c_in),
            &[&[ptr(dx), ptr(dcols)][..], &geo].concat(),
        )?;
    }
    dev.gemm(
        dw,
        true,
        dout,
        cols,
        MatmulDims {
            batch: 1,
            m: d.c_out,
            n: kk,
            k: rows,
            trans_a: true,
            trans_b: false,
        },
        true,
    )?;
    match dbias {
        Some(dbias) => column_sum(dev, dbias, dout, rows, d.c_out),
        None => Ok(()),
    }
}

/// Batch statistics per channel (biased variance) of `x [rows, channels]`, for training-mode batchnorm.
pub fn batchnorm_stats<D: KernelDevice>(
    dev: &D,
    mean: &dyn DeviceBuffer,
    var: &dyn DeviceBuffer,
    x: &dyn DeviceBuffer,
    rows: usize,
    channels: usize,
) -> Result<()> {
    check_bf16("batchnorm_stats", "x", x, rows * channels)?;
    check_len(
        "batchnorm_stats",
        "mean (bytes)",
        mean.len_bytes(),
        channels * F32,
    )?;
    check_len(
        "batchnorm_stats",
        "var (bytes)",
        var.len_bytes(),
        channels * F32,
    )?;
    dev.launch(
        "batchnorm_stats_f32",
        LaunchConfig::linear(channels.div_ceil(128) as u32, 128, 0),
        &[
            ptr(mean),
            ptr(var),
            ptr(x),
            Arg::I64(rows as i64),
            Arg::I32(channels as i32),
        ],
    )
}

/// `out = (x − mean)/√(var + eps)·γ + β` with batch (train) or running (eval) statistics.
pub fn batchnorm_forward<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    x: &dyn DeviceBuffer,
    mean: &dyn DeviceBuffer,
    var: &dyn DeviceBuffer,
    gamma: &dyn DeviceBuffer,
    beta: &dyn DeviceBuffer,
    rows: usize,
    channels: usize,
    eps: f32,
) -> Result<()> {
    check_bf16("batchnorm_forward", "x", x, rows * channels)?;
    check_bf16("batchnorm_forward", "out", out, rows * channels)?;
    check_bf16("batchnorm_forward", "gamma", gamma, channels)?;
    check_bf16("batchnorm_forward", "beta", beta, channels)?;
    let args = [
        ptr(out),
        ptr(x),
        ptr(mean),
        ptr(var),
        ptr(gamma),
        ptr(beta),
        Arg::I64(rows as i64),
        Arg::I32(channels as i32),
        Arg::F32(eps),
    ];
    dev.launch(
        "batchnorm_forward_bf16",
        elementwise_config(rows * channels),
        &args,
    )
}

/// Gradients of batchnorm: `dx += …` (bf16), `dgamma_dbeta [2, C] += …` (f32); `train` includes the path
/// through the batch statistics.
pub fn batchnorm_backward<D: KernelDevice>(
    dev: &D,
    dx: &dyn DeviceBuffer,
    dgamma_dbeta: &dyn DeviceBuffer,
    dout: &dyn DeviceBuffer,
    x: &dyn DeviceBuffer,
    mean: &dyn DeviceBuffer,
    var: &dyn DeviceBuffer,
    gamma: &dyn DeviceBuffer,
    rows: usize,
    channels: usize,
    train: bool,
    eps: f32,
) -> Result<()> {
    check_bf16("batchnorm_backward", "dx", dx, rows * channels)?;
    check_bf16("batchnorm_backward", "dout", dout, rows * channels)?;
    check_len(
        "batchnorm_backward",
        "dgamma_dbeta (bytes)",
        dgamma_dbeta.len_bytes(),
        2 * channels * F32,
    )?;
    let args = [
        ptr(dx),
        ptr(dgamma_dbeta),
        ptr(dout),
        ptr(x),
        ptr(mean),
        ptr(var),
        ptr(gamma),
        Arg::I64(rows as i64),
        Arg::I32(channels as i32),
        Arg::I32(train as i32),
        Arg::F32(eps),
    ];
    dev.launch(
        "batchnorm_backward_bf16",
        LaunchConfig::linear(channels.div_ceil(128) as u32, 128, 0),
        &args,
    )
}

pub use crate::ops::pool::PoolDims;

/// Enformer's attention pooling: `logits = x·Wᵀ` (GEMM into f32, kept for the backward), then the window
/// softmax. `logits` holds `batch·len·channels` f32.
pub fn attention_pool_forward<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    logits: &dyn DeviceBuffer,
    x: &dyn DeviceBuffer,
    w: &dyn DeviceBuffer,
    d: PoolDims,
) -> Result<()> {
    let rows = d.batch * d.len;
    check_bf16("attention_pool", "x", x, rows * d.channels)?;
    check_len(
        "attention_pool",
        "logits (bytes)",
        logits.len_bytes(),
        rows * d.channels * F32,
    )?;
    check_bf16(
        "attention_pool",
        "out",
        out,
        d.batch * d.out_len() * d.channels,
    )?;
    check_bf16("attention_pool", "weight", w, d.channels * d.channels)?;
    dev.gemm(
        logits,
        true,
        x,
        w,
        MatmulDims {
            batch: 1,
            m: rows,
            n: d.channels,
            k: d.channels,
            trans_a: false,
            trans_b: true,
        },
        false,
    )?;
    let args = [
        ptr(out),
        ptr(logits),
        ptr(x),
        Arg::I32(d.batch as i32),
        Arg::I32(d.len as i32),
        Arg::I32(d.channels as i32),
    ];
    dev.launch(
        "attention_pool_forward_bf16",
        elementwise_config(d.batch * d.out_len() * d.channels),
        &args,
    )
}

/// Gradients of [`attention_pool_forward`]: `dx += …` (bf16), `dw += …` (f32). `dlogits_hi` and `dlogits_lo`
/// are bf16 scratch of the logits' size: the logit gradient as hi + lo terms, two GEMMs each, for f32 accuracy.
pub fn attention_pool_backward<D: KernelDevice>(
    dev: &D,
    dx: &dyn DeviceBuffer,
    dw: &dyn DeviceBuffer,
    dlogits_hi: &dyn DeviceBuffer,
    dlogits_lo: &dyn DeviceBuffer,
    dout: &dyn DeviceBuffer,
    x: &dyn DeviceBuffer,
    w: &dyn DeviceBuffer,
    logits: &dyn DeviceBuffer,
    acc: &dyn DeviceBuffer,
    d: PoolDims,
) -> Result<()> {
    let rows = d.batch * d.len;
    check_bf16("attention_pool_backward", "dx", dx, rows * d.channels)?;
    check_len(
        "attention_pool_backward",
        "acc (bytes)",
        acc.len_bytes(),
        rows * d.channels * F32,
    )?;
    check_bf16(
        "attention_pool_backward",
        "dlogits_hi",
        dlogits_hi,
        rows * d.channels,
    )?;
    check_bf16(
        "attention_pool_backward",
        "dlogits_lo",
        dlogits_lo,
        rows * d.channels,
    )?;
    check_len(
        "attention_pool_backward",
        "dw (bytes)",
        dw.len_bytes(),
        d.channels * d.channels * F32,
    )?;
    let args = [
        ptr(dx),
        ptr(dlogits_hi),
        ptr(dlogits_lo),
        ptr(dout),
        ptr(x),
        ptr(logits),
        Arg::I32(d.batch as i32),
        Arg::I32(d.len as i32),
        Arg::I32(d.channels as i32),
    ];
    dev.launch(
        "attention_pool_backward_bf16",
        elementwise_config(d.batch * d.out_len() * d.channels),
        &args,
    )?;
    // dx += dlogits·W summed in f32 before the single rounding: staged in the f32 `acc` (overwritten).
    for (i, part) in [dlogits_hi, dlogits_lo].into_iter().enumerate() {
        dev.gemm(
            acc,
            true,
            part,
            w,
            MatmulDims {
                batch: 1,
                m: rows,
                n: d.channels,
                k: d.channels,
                trans_a: false,
                trans_b: false,
            },
            i > 0,
        )?;
        dev.gemm(
            dw,
            true,
            part,
            x,
            MatmulDims {
                batch: 1,
                m: d.channels,
                n: d.channels,
                k: rows,
                trans_a: true,
                trans_b: false,
            },
            true,
        )?;
    }
    dev.launch(
        "add_f32_to_bf16",
        elementwise_config(rows * d.channels),
        &[ptr(dx), ptr(acc), Arg::I64((rows * d.channels) as i64)],
    )
}

/// Fused residual add + LayerNorm: `res = x + delta`, `out = LN(res)` (mean/rstd saved), bf16.
pub fn residual_layernorm_forward<D: KernelDevice>(
    dev: &D,
    res: &dyn DeviceBuffer,
    out: &dyn DeviceBuffer,
    mean: &dyn DeviceBuffer,
    rstd: &dyn DeviceBuffer,
    x: &dyn DeviceBuffer,
    delta: &dyn DeviceBuffer,
    gamma: &dyn DeviceBuffer,
    beta: &dyn DeviceBuffer,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<()> {
    for (name, b, n) in [
        ("res", res, rows * dim),
        ("out", out, rows * dim),
        ("x", x, rows * dim),
        ("delta", delta, rows * dim),
        ("gamma", gamma, dim),
        ("beta", beta, dim),
    ] {
        check_bf16("residual_layernorm_forward", name, b, n)?;
    }
    check_len(
        "residual_layernorm_forward",
        "mean (bytes)",
        mean.len_bytes(),
        rows * F32,
    )?;
    check_len(
        "residual_layernorm_forward",
        "rstd (bytes)",
        rstd.len_bytes(),
        rows * F32,
    )?;
    let cfg = LaunchConfig::linear(rows.div_ceil(4) as u32, 128, 0);
    let args = [
        ptr(res),
        ptr(out),
        ptr(mean),
        ptr(rstd),
        ptr(x),
        ptr(delta),
        ptr(gamma),
        ptr(beta),
        Arg::I32(rows as i32),
        Arg::I32(dim as i32),
        Arg::F32(eps),
    ];
    dev.launch("residual_layernorm_forward_bf16", cfg, &args)
}

/// `x[r, :] *= scales[r]` (f32 scales), in place.
pub fn scale_rows<D: KernelDevice>(
    dev: &D,
    x: &dyn DeviceBuffer,
    scales: &dyn DeviceBuffer,
    rows: usize,
    cols: usize,
) -> Result<()> {
    check_bf16("scale_rows", "x", x, rows * cols)?;
    check_len(
        "scale_rows",
        "scales (bytes)",
        scales.len_bytes(),
        rows * F32,
    )?;
    dev.launch(
        "scale_rows_bf16",
        elementwise_config(rows * cols),
        &[
            ptr(x),
            ptr(scales),
            Arg::I64(rows as i64),
            Arg::I32(cols as i32),
        ],
    )
}

/// Enformer's relative-position attention bias `[B, H, n, n]` (f32) from `q_pos [B, n, H, dk]` and
/// `rel_k [2n−1, H, dk]` (bf16).
pub fn relative_logits<D: KernelDevice>(
    dev: &D,
    bias: &dyn DeviceBuffer,
    q_pos: &dyn DeviceBuffer,
    rel_k: &dyn DeviceBuffer,
    batch: usize,
    heads: usize,
    n: usize,
    dk: usize,
) -> Result<()> {
    check_len(
        "relative_logits",
        "bias (bytes)",
        bias.len_bytes(),
        batch * heads * n * n * F32,
    )?;
    check_bf16("relative_logits", "q_pos", q_pos, batch * n * heads * dk)?;
    check_bf16("relative_logits", "rel_k", rel_k, (2 * n - 1) * heads * dk)?;
    let args = [
        ptr(bias),
        ptr(q_pos),
        ptr(rel_k),
        Arg::I32(batch as i32),
        Arg::I32(heads as i32),
        Arg::I32(n as i32),
        Arg::I32(dk as i32),
    ];
    dev.launch(
        "relative_logits_f32",
        elementwise_config(batch * heads * n * n),
        &args,
    )
}

/// `out[r, :] = row` for `rows` rows of `cols` (a bias before a GEMM accumulates onto it; `rows = 1` copies).
pub fn fill_rows<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    row: &dyn DeviceBuffer,
    rows: usize,
    cols: usize,
) -> Result<()> {
    check_bf16("fill_rows", "out", out, rows * cols)?;
    check_bf16("fill_rows", "row", row, cols)?;
    dev.launch(
        "fill_rows_bf16",
        elementwise_config(rows * cols),
        &[
            ptr(out),
            ptr(row),
            Arg::I64(rows as i64),
            Arg::I32(cols as i32),
        ],
    )
}

/// `dst = src` for `n` bf16 values, at element offsets (views into larger buffers).
pub fn copy_at<D: KernelDevice>(
    dev: &D,
    dst: &dyn DeviceBuffer,
    dst_offset: usize,
    src: &dyn DeviceBuffer,
    src_offset: usize,
    n: usize,
) -> Result<()> {
    check_len(
        "copy",
        "dst (bytes)",
        dst.len_bytes().max((dst_offset + n) * BF16),
        dst.len_bytes(),
    )?;
    check_len(
        "copy",
        "src (bytes)",
        src.len_bytes().max((src_offset + n) * BF16),
        src.len_bytes(),
    )?;
    let (d, s) = (
        Arg::Ptr(dst.ptr() + (dst_offset * BF16) as u64),
        Arg::Ptr(src.ptr() + (src_offset * BF16) as u64),
    );
    dev.launch(
        "fill_rows_bf16",
        elementwise_config(n),
        &[d, s, Arg::I64(1), Arg::I32(n as i32)],
    )
}

/// `out[r, c] += bias[c]`; with `rows = 1` and `cols = n`, `out += x` (residuals).
pub fn bias_add<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    bias: &dyn DeviceBuffer,
    rows: usize,
    cols: usize,
) -> Result<()> {
    check_bf16("bias_add", "out", out, rows * cols)?;
    check_len(
        "bias_add",
        "bias (bytes)",
        bias.len_bytes().max(cols * BF16),
        bias.len_bytes(),
    )?;
    dev.launch(
        "bias_add_bf16",
        elementwise_config(rows * cols),
        &[
            ptr(out),
            ptr(bias),
            Arg::I64(rows as i64),
            Arg::I32(cols as i32),
        ],
    )
}

/// After a training step: `running = (1 − momentum)·running + momentum·batch` (unbiased variance), from the
/// batch statistics of [`batchnorm_stats`].
pub fn batchnorm_running_update<D: KernelDevice>(
    dev: &D,
    running_mean: &dyn DeviceBuffer,
    running_var: &dyn DeviceBuffer,
    mean: &dyn DeviceBuffer,
    var: &dyn DeviceBuffer,
    rows: usize,
    channels: usize,
    momentum: f32,
) -> Result<()> {
    for (name, b) in [
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("mean", mean),
        ("var", var),
    ] {
        check_len(
            "batchnorm_running_update",
            &format!("{name} (bytes)"),
            b.len_bytes(),
            channels * F32,
        )?;
    }
    let args = [
        ptr(running_mean),
        ptr(running_var),
        ptr(mean),
        ptr(var),
        Arg::I64(rows as i64),
        Arg::I32(channels as i32),
        Arg::F32(momentum),
    ];
    dev.launch(
        "batchnorm_running_update_f32",
        LaunchConfig::linear(channels.div_ceil(128) as u32, 128, 0),
        &args,
    )
}

/// bf16 → f32 (exact).
pub fn cast_to_f32<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    input: &dyn DeviceBuffer,
    n: usize,
) -> Result<()> {
    check_len("cast_to_f32", "out (bytes)", out.len_bytes(), n * F32)?;
    check_bf16("cast_to_f32", "input", input, n)?;
    dev.launch(
        "cast_bf16_to_f32",
        elementwise_config(n),
        &[ptr(out), ptr(input), Arg::I64(n as i64)],
    )
}

/// `out[j] += Σ_b input[b·n + j]` over `batch` blocks of `n` f32 values, in order (`batch = 1`: `out += input`).
pub fn sum_over_batch<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    input: &dyn DeviceBuffer,
    batch: usize,
    n: usize,
) -> Result<()> {
    check_len("sum_over_batch", "out (bytes)", out.len_bytes(), n * F32)?;
    check_len(
        "sum_over_batch",
        "input (bytes)",
        input.len_bytes(),
        batch * n * F32,
    )?;
    dev.launch(
        "sum_over_batch_f32",
        elementwise_config(n),
        &[
            ptr(out),
            ptr(input),
            Arg::I32(batch as i32),
            Arg::I64(n as i64),
        ],
    )
}

/// `out[c] += Σ_r m[r, c]` for bf16 `m [rows, cols]` into f32 (a bias gradient), in row order.
pub fn column_sum<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    m: &dyn DeviceBuffer,
    rows: usize,
    cols: usize,
) -> Result<()> {
    check_len("column_sum", "out (bytes)", out.len_bytes(), cols * F32)?;
    check_bf16("column_sum", "m", m, rows * cols)?;
    dev.launch(
        "column_sum_bf16_f32",
        LaunchConfig::linear(cols.div_ceil(128) as u32, 128, 0),
        &[
            ptr(out),
            ptr(m),
            Arg::I64(rows as i64),
            Arg::I32(cols as i32),
        ],
    )
}

/// Gradients of [`relative_logits`], added into bf16 `dq_pos [B, n, H, dk]` and `drel_k [2n−1, H, dk]` from
/// the f32 `dbias [B, H, n, n]`.
pub fn relative_logits_backward<D: KernelDevice>(
    dev: &D,
    dq_pos: &dyn DeviceBuffer,
    drel_k: &dyn DeviceBuffer,
    dbias: &dyn DeviceBuffer,
    q_pos: &dyn DeviceBuffer,
    rel_k: &dyn DeviceBuffer,
    batch: usize,
    heads: usize,
    n: usize,
    dk: usize,
) -> Result<()> {
    const OP: &str = "relative_logits_backward";
    if n == 0 {
        return Err(crate::Error::invalid(OP, "empty sequence"));
    }
    check_bf16(OP, "dq_pos", dq_pos, batch * n * heads * dk)?;
    check_bf16(OP, "q_pos", q_pos, batch * n * heads * dk)?;
    check_bf16(OP, "drel_k", drel_k, (2 * n - 1) * heads * dk)?;
    check_bf16(OP, "rel_k", rel_k, (2 * n - 1) * heads * dk)?;
    check_len(
        OP,
        "dbias (bytes)",
        dbias.len_bytes(),
        batch * heads * n * n * F32,
    )?;
    let geo = [
        Arg::I32(batch as i32),
        Arg::I32(heads as i32),
        Arg::I32(n as i32),
        Arg::I32(dk as i32),
    ];
    dev.launch(
        "relative_logits_backward_q_bf16",
        elementwise_config(batch * n * heads * dk),
        &[&[ptr(dq_pos), ptr(dbias), ptr(rel_k)][..], &geo].concat(),
    )?;
    dev.launch(
        "relative_logits_backward_k_bf16",
        elementwise_config((2 * n - 1) * heads * dk),
        &[&[ptr(drel_k), ptr(dbias), ptr(q_pos)][..], &geo].concat(),
    )
}
