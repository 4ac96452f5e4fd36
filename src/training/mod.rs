//! Training: the AdamW optimiser over the planned parameter arena, and gradient clipping.

pub mod adamw;

pub use adamw::{clip_grad_norm, global_norm, AdamW, ParamGroup};
