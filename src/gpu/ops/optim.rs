//! Optimiser launchers (`kernels/adamw.cu`): the global gradient norm and the fused AdamW step.

use super::*;

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
    launch(
        dev,
        "sum_squares_partial_f32",
        LaunchConfig::linear(NORM_BLOCKS as u32, 256, 0),
        &[ptr(scratch), ptr(x), Arg::I64(n as i64)],
    )?;
    sum_partials(dev, out, scratch)
}

pub use crate::ops::optim::AdamWStep;

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
    launch(dev, "adamw_bf16", elementwise_config(n), &args)
}
