//! Packed linears on an NVIDIA GPU: the kernels crate's fused dequant-GEMV/GEMM
//! (`potptq_kernels::cuda`) as a candle operation, launched on the device's own stream so it
//! is ordered with candle's work around it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use half::f16;
use potptq_kernels::cuda::gpu::{GpuMatrix, Io, Kernels};
use potptq_kernels::cuda::GpuLayout;
use potptq_kernels::PackedMatrix;

use crate::kernel_ops::output_shape;

/// The fused kernels of one device, once per process (each code format compiled on first use).
pub(crate) fn kernels(dev: &CudaDevice) -> Result<Arc<Kernels>> {
    static CACHE: OnceLock<Mutex<HashMap<DeviceId, Arc<Kernels>>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().map_err(|_| anyhow::anyhow!("kernel cache poisoned"))?;
    if let Some(k) = cache.get(&dev.id()) {
        return Ok(k.clone());
    }
    let k = Arc::new(Kernels::new(dev.cuda_stream())?);
    cache.insert(dev.id(), k.clone());
    Ok(k)
}

/// A packed matrix in the fused kernels' layout, in GPU memory.
pub struct GpuPacked {
    kernels: Arc<Kernels>,
    matrix: GpuMatrix,
}

impl std::fmt::Debug for GpuPacked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.matrix;
        write!(f, "GpuPacked({} {}-bit [{}, {}], g{})", if m.pot { "PoT" } else { "INT" }, m.bits, m.rows, m.cols, m.group)
    }
}

impl GpuPacked {
    /// Re-tiles `m` for the kernels and copies it to `device`; an error when the kernels
    /// cannot take its shape (rows in multiples of 16, groups of a multiple of 64 columns).
    pub fn upload(m: &PackedMatrix, device: &Device) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            bail!("GPU kernels need a CUDA device, not {device:?}");
        };
        let layout = GpuLayout::from_packed(m)?;
        let kernels = kernels(dev)?;
        let matrix = kernels.upload(&layout)?;
        // Its format's kernels are compiled now rather than in the first product.
        kernels.prepare(matrix.pot, matrix.bits)?;
        Ok(Self { kernels, matrix })
    }
}

struct GpuPackedMatMul<'a>(&'a GpuPacked);

impl CustomOp1 for GpuPackedMatMul<'_> {
    fn name(&self) -> &'static str {
        "potptq-gpu-packed-matmul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(candle_core::Error::Msg(format!("{}: these packed weights are on the GPU, the input on the CPU", self.name())))
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let m = &self.0.matrix;
        let (tokens, shape) = output_shape(layout, m.cols, m.rows, self.name())?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(candle_core::Error::Msg(format!("{}: the input must be contiguous", self.name())));
        };
        match storage.dtype() {
            DType::F32 => self.product::<f32>(storage, start..end, tokens, shape, Io::F32),
            DType::F16 => self.product::<f16>(storage, start..end, tokens, shape, Io::F16),
            other => Err(candle_core::Error::Msg(format!("{}: activations in {other:?}, not f32 or f16", self.name()))),
        }
    }
}

impl GpuPackedMatMul<'_> {
    /// The product for activations (elements `x` of `storage`) and outputs of type `T`.
    fn product<T: CudaDType + DeviceRepr>(&self, storage: &CudaStorage, x: Range<usize>, tokens: usize, shape: Shape, io: Io) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = storage.device();
        let x = storage.as_cuda_slice::<T>()?.slice(x);
        // SAFETY: the kernel writes every one of the tokens·rows outputs.
        let y = unsafe { dev.alloc::<T>(tokens * self.0.matrix.rows)? };
        if tokens > 0 {
            let stream = dev.cuda_stream();
            let (xp, _x_guard) = x.device_ptr(&stream);
            let (yp, _y_guard) = y.device_ptr(&stream);
            // SAFETY: x holds tokens·cols and y tokens·rows elements of io's type, on the
            // kernels' stream (the device's own).
            unsafe { self.0.kernels.matmul_raw(&self.0.matrix, xp, yp, tokens, io) }.map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        }
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), shape))
    }
}

/// `W` as an f16 `[rows, cols]` tensor on the input's device (the input is only a handle to
/// the device).
struct GpuPackedDequant<'a>(&'a GpuPacked);

impl CustomOp1 for GpuPackedDequant<'_> {
    fn name(&self) -> &'static str {
        "potptq-gpu-packed-dequant"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(candle_core::Error::Msg(format!("{}: these packed weights are on the GPU, the input on the CPU", self.name())))
    }

    fn cuda_fwd(&self, storage: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let m = &self.0.matrix;
        let dev = storage.device();
        // SAFETY: the kernel writes every one of the rows·cols weights.
        let w = unsafe { dev.alloc::<f16>(m.rows * m.cols)? };
        {
            let stream = dev.cuda_stream();
            let (wp, _w_guard) = w.device_ptr(&stream);
            // SAFETY: w holds rows·cols f16, on the kernels' stream (the device's own).
            unsafe { self.0.kernels.dequantize_raw(m, wp) }.map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        }
        Ok((CudaStorage::wrap_cuda_slice(w, dev.clone()), Shape::from((m.rows, m.cols))))
    }
}

/// Tokens from which a product dequantizes the weights to f16 and multiplies with cuBLAS:
/// beyond one launch of the fused kernels (64 tokens). On the H200 (`bench cuda`, 4096×4096)
/// 64 tokens take 17.9 µs fused against 10.3 µs of dequantization plus 11.5 µs of cuBLAS;
/// 128 would take two fused launches against one more cuBLAS product.
pub const DENSE_FROM_TOKENS: usize = potptq_kernels::cuda::gpu::MAX_TOKENS + 1;

/// `x Wᵀ` for a packed `W` on the GPU; `x` of shape `[.., in]` in any float type, multiplied
/// in f16 (the kernels' activations) with f32 sums, and returned in `x`'s type. Up to 64
/// tokens through the fused kernels, which read and write f32 themselves (no conversions
/// around them for an f32 model); more (prefill, evaluation) through `W` dequantized to f16
/// for this product and cuBLAS.
pub fn gpu_packed_matmul(x: &Tensor, m: &GpuPacked) -> Result<Tensor> {
    let op = GpuPackedMatMul(m);
    let (tokens, out_shape) = output_shape(x.layout(), m.matrix.cols, m.matrix.rows, op.name())?;
    if x.dtype() == DType::F32 && tokens < DENSE_FROM_TOKENS {
        return Ok(x.contiguous()?.apply_op1_no_bwd(&op)?);
    }
    let x16 = x.to_dtype(DType::F16)?.contiguous()?;
    let y = if tokens >= DENSE_FROM_TOKENS {
        let w = x16.apply_op1_no_bwd(&GpuPackedDequant(m))?;
        x16.reshape((tokens, m.matrix.cols))?.matmul(&w.t()?)?.reshape(out_shape)?
    } else {
        x16.apply_op1_no_bwd(&op)?
    };
    Ok(y.to_dtype(x.dtype())?)
}
