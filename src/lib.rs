//! isoformer-engine: a tensor runtime with a multi-threaded CPU backend (the reference) and custom CUDA
//! kernels, built to run and train IsoFormer and its three encoders (Enformer, Nucleotide Transformer v2,
//! ESM-2).
//!
//! Layout: [`runtime`] (dtypes, tensors, planned memory), [`device`], [`ops`] (CPU forward and backward
//! of every op), [`training`] (optimiser), [`bench`](mod@bench) (measurements shared by the CLI and criterion).

pub mod backend;
pub mod bench;
pub mod cli;
pub mod data;
pub mod device;
pub mod embed;
pub mod error;
pub mod gpu;
pub mod models;
pub mod ops;
pub mod runtime;
#[doc(hidden)]
pub mod testing;
pub mod training;

pub use device::{Device, DeviceRequest};
pub use error::{Context, Error, Result};
pub use runtime::{DType, Shape};

/// Compiles and runs the README's Rust examples as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
