//! Row softmax and rotary launchers (`kernels/softmax.cu`).

use super::*;

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
    launch(
        dev,
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
    launch(
        dev,
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
    launch(
        dev,
        "rotary_bf16",
        elementwise_config(vectors * d / 2),
        &args,
    )
}
