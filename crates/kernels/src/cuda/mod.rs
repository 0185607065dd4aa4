//! Fused dequant-GEMV/GEMM on NVIDIA GPUs (sm_80 and newer; built for the H100/H200).
//!
//! `layout` (always compiled, tested on the CPU) re-tiles packed codes for the kernels and
//! holds their CPU reference; `config` (also tested on the CPU) says which instantiation
//! serves a product; `gpu` (feature `cuda`) compiles `qgemm.cu` with NVRTC at run time and
//! launches it; `decode` (feature `cuda`) the kernels around the linears when a model decodes
//! on the GPU.

pub mod config;
#[cfg(feature = "cuda")]
pub mod decode;
pub mod layout;
#[cfg(feature = "cuda")]
pub mod gpu;

pub use layout::{reference_matmul, GpuLayout};

/// The kernels, compiled at run time by NVRTC: `common.cuh` (what `decode.cu` shares) in
/// front of `qgemm.cu`.
pub const SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("qgemm.cu"));
