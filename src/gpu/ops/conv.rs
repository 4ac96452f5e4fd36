//! Enformer's convolutional launchers (`kernels/conv.cu`): conv1d as im2col + GEMM, batchnorm, attention pooling, column sums.

use super::*;

pub use crate::ops::pool::PoolDims;

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
    launch(
        dev,
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
    if d.width.is_multiple_of(2) {
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
        launch(
            dev,
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
        launch(
            dev,
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
    launch(
        dev,
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
    launch(
        dev,
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
    launch(
        dev,
        "batchnorm_backward_bf16",
        LaunchConfig::linear(channels.div_ceil(128) as u32, 128, 0),
        &args,
    )
}

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
    launch(
        dev,
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
    launch(
        dev,
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
    launch(
        dev,
        "add_f32_to_bf16",
        elementwise_config(rows * d.channels),
        &[ptr(dx), ptr(acc), Arg::I64((rows * d.channels) as i64)],
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
    launch(
        dev,
        "batchnorm_running_update_f32",
        LaunchConfig::linear(channels.div_ceil(128) as u32, 128, 0),
        &args,
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
    launch(
        dev,
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
