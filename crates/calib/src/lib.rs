//! Quantizing a whole model: calibration data, the methods, and the block-by-block pipeline.

pub mod blockwise;
pub mod graph;
pub mod methods;
pub mod segments;
pub mod step2;

pub use blockwise::{quantize_model, QuantizeOptions, QuantizedModel};
pub use methods::Method;
