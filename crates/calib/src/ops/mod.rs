//! The block graph's fused operations, each with its gradient: candle's own fused softmax,
//! rope and rms-norm have none, the MLP's gate has no fused form, and composing them from
//! elementwise tensor ops costs a pass over the activations per op, forward and backward.
//! Each op has a plain CPU version (f32 and f64, which the gradient checks use; `cast` f32
//! and bf16) and an NVRTC kernel, tested against it.

pub mod cast;
pub mod rms_norm;
pub mod rope;
pub mod softmax;
pub mod swap;
pub mod swiglu;

use candle_core::{CpuStorage, Layout, Result};

/// The elements of a contiguous operand.
fn slice<'a, T>(v: &'a [T], l: &Layout) -> &'a [T] {
    &v[l.start_offset()..l.start_offset() + l.shape().elem_count()]
}

/// `f(a, b, c)` on the f32 or f64 contents of up to three CPU operands of one dtype (unused
/// ones repeat an operand), as a storage of that dtype.
fn map_cpu(
    op: &str,
    (a, la): (&CpuStorage, &Layout),
    (b, lb): (&CpuStorage, &Layout),
    (c, lc): (&CpuStorage, &Layout),
    f32s: impl Fn(&[f32], &[f32], &[f32]) -> Vec<f32>,
    f64s: impl Fn(&[f64], &[f64], &[f64]) -> Vec<f64>,
) -> Result<CpuStorage> {
    Ok(match (a, b, c) {
        (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => CpuStorage::F32(f32s(slice(a, la), slice(b, lb), slice(c, lc))),
        (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(c)) => CpuStorage::F64(f64s(slice(a, la), slice(b, lb), slice(c, lc))),
        _ => candle_core::bail!("{op}: f32 or f64 operands of one dtype"),
    })
}

/// The GPU the kernels' tests compare against the CPU, if this machine has one (said when not).
#[cfg(all(test, feature = "cuda"))]
pub(crate) fn test_gpu() -> Option<candle_core::Device> {
    let gpu = candle_core::Device::new_cuda(0).ok();
    if gpu.is_none() {
        eprintln!("no CUDA device: the GPU kernels are not tested");
    }
    gpu
}
