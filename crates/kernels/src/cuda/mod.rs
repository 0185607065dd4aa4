//! Fused dequant-GEMV/GEMM on NVIDIA GPUs (sm_80 and newer; built for the H100/H200).
//!
//! `layout` (always compiled, tested on the CPU) re-tiles packed codes for the kernels and
//! holds their CPU reference; `gpu` (feature `cuda`) compiles `qgemm.cu` with NVRTC at run
//! time and launches it.

pub mod layout;
#[cfg(feature = "cuda")]
pub mod gpu;

pub use layout::{reference_matmul, GpuLayout};
