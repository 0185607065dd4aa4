//! Run-time compilation of the training ops' CUDA kernels, once per process and source.

use std::sync::OnceLock;

/// The PTX of `source`, compiled by NVRTC on first use and kept in `cell` (a compile error
/// is kept too, and returned on every use).
pub fn ptx(cell: &'static OnceLock<Result<String, String>>, source: &str) -> candle_core::Result<&'static str> {
    cell.get_or_init(|| candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(source).map(|p| p.to_src()).map_err(|e| format!("NVRTC: {e:?}")))
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
}
