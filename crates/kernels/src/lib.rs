//! Products of quantized weight matrices with f32 activations, without expanding the weights
//! to a whole f32 matrix: PoT and INT codes as checkpoints pack them (`PackedMatrix`), and f16
//! or f32 matrices for the layers kept unquantized (the output projection).
//!
//! `cpu` holds the kernels (a plain reference, a portable path, AVX2 chosen at run time);
//! `cuda` holds the GPU layout and, with feature `cuda`, the fused GPU kernels.

pub mod cpu;
pub mod cuda;
mod matrix;

pub use cpu::{matmul, matmul_f16, matmul_f32, matmul_with, set_default_activations, Activations, Isa, Kernel, PotDecode};
pub use matrix::PackedMatrix;
