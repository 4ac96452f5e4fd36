//! Launch code for the GPU kernels, written once for every [`KernelDevice`] (the CUDA device and the
//! emulator): grid and block sizes, argument lists, and the size checks that turn a bad call into an error.
//! One file per kernel file of `kernels/`.
//!
//! Kernels receive raw device addresses, so the launch itself is `unsafe` ([`KernelDevice::launch`]); the
//! launchers here check every size before they call it, and are the only callers.

// Kernel-style signatures: outputs, saved statistics, inputs, dims.
#![allow(clippy::too_many_arguments)]

mod attention;
mod conv;
mod elementwise;
mod embedding;
mod layernorm;
mod optim;
mod softmax;

pub use attention::*;
pub use conv::*;
pub use elementwise::*;
pub use embedding::*;
pub use layernorm::*;
pub use optim::*;
pub use softmax::*;

use super::{Arg, DeviceBuffer, KernelDevice, LaunchConfig, MatmulDims};
use crate::error::check_len;
use crate::Result;

const BF16: usize = 2;
const F32: usize = 4;

fn ptr<B: DeviceBuffer + ?Sized>(b: &B) -> Arg {
    Arg::Ptr(b.ptr())
}

/// Launches `kernel` after the caller has checked every buffer's size against the arguments.
fn launch<D: KernelDevice>(dev: &D, kernel: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
    // SAFETY: every launcher in this module checks the byte size of each buffer it passes against the
    // geometry in the arguments before calling this, and buffers are live views or allocations.
    unsafe { dev.launch(kernel, cfg, args) }
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

fn check_bf16(op: &'static str, name: &str, b: &dyn DeviceBuffer, n: usize) -> Result<()> {
    check_len(op, &format!("{name} (bytes)"), b.len_bytes(), n * BF16)
}

fn rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig::linear(rows.div_ceil(4).max(1) as u32, 128, 0)
}

/// `out[0] = Σ scratch[b]` over the [`NORM_BLOCKS`] per-block partial sums, in block order.
fn sum_partials<D: KernelDevice>(
    dev: &D,
    out: &dyn DeviceBuffer,
    scratch: &dyn DeviceBuffer,
) -> Result<()> {
    check_len("sum_partials", "out (bytes)", out.len_bytes(), F32)?;
    launch(
        dev,
        "sum_partials_f32",
        LaunchConfig::linear(1, 32, 0),
        &[ptr(out), ptr(scratch), Arg::I32(NORM_BLOCKS as i32)],
    )
}
