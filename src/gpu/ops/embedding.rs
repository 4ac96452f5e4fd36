//! Embedding and MSE launchers (`kernels/embedding.cu`).

use super::*;

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
    launch(
        dev,
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
    launch(
        dev,
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
    launch(
        dev,
        "mse_partial_f32",
        LaunchConfig::linear(NORM_BLOCKS as u32, 256, 0),
        &[ptr(scratch), ptr(pred), ptr(target), Arg::I64(n as i64)],
    )?;
    sum_partials(dev, out, scratch)
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
    launch(dev, "mse_backward_bf16", elementwise_config(n), &args)
}
