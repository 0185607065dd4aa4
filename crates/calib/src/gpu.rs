//! What the training ops' CUDA code shares: run-time compilation of their kernels, once per
//! process and source, and views of their operands.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::CudaView;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, Layout};

/// The PTX of `source`, compiled by NVRTC on first use and kept in `cell` (a compile error
/// is kept too, and returned on every use).
pub fn ptx(cell: &'static OnceLock<Result<String, String>>, source: &str) -> candle_core::Result<&'static str> {
    cell.get_or_init(|| candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(source).map(|p| p.to_src()).map_err(|e| format!("NVRTC: {e:?}")))
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// An operand's elements of type `T`, from where its layout starts.
pub fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> candle_core::Result<CudaView<'a, T>> {
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}
