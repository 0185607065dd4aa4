//! Quantizing a whole model: calibration data, the methods, and the block-by-block pipeline.

mod adam;
pub mod blockwise;
pub mod fakequant;
pub mod graph;
pub mod methods;
#[cfg(feature = "cuda")]
mod gpu;
pub mod ops;
pub mod rotate;
pub mod segments;
pub mod state;
pub mod step2;

pub use blockwise::{quantize_model, BlockSummary, QuantizeOptions, QuantizedModel};
pub use state::RunState;
pub use step2::{Decay, Schedule, Step2Input, Step2Options};
pub use methods::{Method, Variant};
