//! The formats and the data-free algorithms, on plain f32 slices: power-of-two (PoT) codes,
//! INT codes with zero-points, Step 1's grid search of the PoT scale, GPTQ's error feedback for
//! any of those quantizers, and the dense bit packing of checkpoints.

pub mod gptq;
pub mod int;
pub mod pack;
pub mod pot;
pub mod qtensor;
mod quantizer;
pub mod step1;

pub use gptq::{gptq, gptq_with_inputs, GptqOptions, Hessian};
pub use qtensor::{check_bits, quantize_pot_step1, quantize_pot_step1_weighted, quantize_pot_with_scales, quantize_rtn, Format, GroupLayout, QTensor};
pub use step1::Grid;
