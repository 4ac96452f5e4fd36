//! Training: the AdamW optimiser over a backend's planned parameter state, with gradient clipping.

pub mod adamw;

pub use adamw::{clip_coefficient, global_norm, AdamW, ParamGroup, StepReport};
pub mod bench_encoder;
pub mod bench_step;
pub mod cache;
pub mod checkpoint;
pub mod metrics;
pub mod params;
pub mod plan;
pub mod plots;
pub mod schedule;
pub mod step;
pub mod trainer;
