//! LayerNorm launchers (`kernels/layernorm.cu`): forward, backward with deterministic column reductions, and the fused residual add + LayerNorm.

use super::*;

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
    launch(dev, "layernorm_forward_bf16", cfg, &args)
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
    launch(dev, "layernorm_backward_bf16", cfg, &args)?;
    let cols = 2 * dim;
    let cfg = LaunchConfig::linear(cols.div_ceil(256) as u32, 256, 0);
    launch(
        dev,
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
    launch(dev, "residual_layernorm_forward_bf16", cfg, &args)
}
