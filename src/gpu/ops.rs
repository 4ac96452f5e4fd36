//! Launch code for the GPU kernels, written once for every [`KernelDevice`] (the CUDA device and the
//! emulator): grid and block sizes, argument lists, and the size checks that turn a bad call into an error.

// Kernel-style signatures: outputs, saved statistics, inputs, dims.
#![allow(clippy::too_many_arguments)]

use super::{Arg, DeviceBuffer, KernelDevice, LaunchConfig};
use crate::error::check_len;
use crate::Result;

const BF16: usize = 2;
const F32: usize = 4;

fn ptr<B: DeviceBuffer>(b: &B) -> Arg {
    Arg::Ptr(b.ptr())
}

/// LayerNorm forward, bf16 (one warp per row, 4 rows per block).
pub fn layernorm_forward<D: KernelDevice>(
    dev: &D,
    out: &D::Buffer,
    mean: &D::Buffer,
    rstd: &D::Buffer,
    x: &D::Buffer,
    gamma: &D::Buffer,
    beta: &D::Buffer,
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
    dx: &D::Buffer,
    dgamma_dbeta: &D::Buffer,
    scratch: &D::Buffer,
    dout: &D::Buffer,
    x: &D::Buffer,
    gamma: &D::Buffer,
    mean: &D::Buffer,
    rstd: &D::Buffer,
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
