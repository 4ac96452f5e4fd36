//! Models: tokenizers, configurations, weight loading, and the encoders (ESM-2 and NT-v2 share one
//! transformer; Enformer has its own trunk).

pub mod config;
pub mod tokenizers;
pub mod transformer;
pub mod weights;
