//! Models: tokenizers, configurations, weight loading, and the encoders (ESM-2 and NT-v2 share one
//! transformer; Enformer has its own trunk).

// Forward/backward helpers pass parameters, saved activations, gradients and geometry explicitly.
#![allow(clippy::too_many_arguments)]

pub mod config;
pub mod enformer;
pub mod isoformer;
pub mod recompute;
pub mod tokenizers;
pub mod transformer;
pub mod weights;
