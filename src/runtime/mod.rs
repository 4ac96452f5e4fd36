//! The tensor runtime: element types, shapes, tensors, and the planned memory that holds them.

pub mod dtype;
pub mod finite;
pub mod input;
pub mod memory;
pub mod output;
pub mod safetensors_file;
pub mod shape;

pub use dtype::{DType, Element};
pub use memory::{
    place, place_segments, ActivationArena, ActivationPlan, Arena, ArenaPlan, Layout, Lifetime,
    TensorSpec,
};
pub use shape::Shape;
