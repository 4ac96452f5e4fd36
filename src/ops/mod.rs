//! CPU reference ops, forward and backward. Buffers are contiguous row-major f32 slices with explicit
//! dimensions (llm.c style), so the same signatures map one-to-one onto device kernels.
//!
//! Conventions, common to every op:
//! - a forward writes its output (it never reads the old contents unless it says "accumulate");
//! - a backward **adds** into its gradient buffers, so gradients of shared inputs and of several uses sum up
//!   without extra copies; zero the gradient arena once per step;
//! - sizes are checked and reported as [`crate::Error::Shape`], never by panicking.
//!
//! Work is split with rayon over rows, heads or channels; f32 GEMMs go through the `gemm` crate, except
//! a linear layer's product of few rows, which reads its weight in place (`few_rows`); bf16 GEMMs are
//! our own (`gemm_bf16`).

// Kernel-style signatures (outputs, saved statistics, inputs, dims) are long by nature.
#![allow(clippy::too_many_arguments)]

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod embedding;
pub(crate) mod few_rows;
pub mod gemm_bf16;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod output;
pub mod pool;
pub mod relative;
pub mod rotary;
pub(crate) mod simd;
pub mod softmax;

/// Rows per rayon task for row-wise ops: enough work per task to amortise scheduling.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16 * 1024 / row_len.max(1)).max(1)
}
