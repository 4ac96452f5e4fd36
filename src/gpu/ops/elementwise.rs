//! Pointwise launchers (`kernels/elementwise.cu`): activations, SwiGLU, adds, casts, row scaling and copies.

use super::*;

/// The pointwise activations the kernels implement (`kind` argument of `act_*_bf16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    GeluErf = 0,
    GeluSigmoid = 1,
    Relu = 2,
    Softplus = 3,
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
    launch(
        dev,
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
    launch(
        dev,
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
    launch(
        dev,
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
    launch(
        dev,
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
    launch(
        dev,
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
    launch(
        dev,
        "cast_f32_to_bf16",
        elementwise_config(n),
        &[ptr(out), ptr(input), Arg::I64(n as i64)],
    )
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
    launch(
        dev,
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
    launch(
        dev,
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
    launch(
        dev,
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
    launch(
        dev,
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

/// bf16 → f32 (exact).
pub fn cast_to_f32<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    input: &dyn DeviceBuffer,
    n: usize,
) -> Result<()> {
    check_len("cast_to_f32", "out (bytes)", out.len_bytes(), n * F32)?;
    check_bf16("cast_to_f32", "input", input, n)?;
    launch(
        dev,
        "cast_bf16_to_f32",
        elementwise_config(n),
        &[ptr(out), ptr(input), Arg::I64(n as i64)],
    )
}
