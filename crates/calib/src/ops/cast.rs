//! f32 ↔ bf16 conversion with its gradient (the conversion back), for the bf16 products of the
//! block graph. candle's own conversion from bf16 to f32 ran at a sixth of the GPU's copy
//! bandwidth, and converting the gradients of every linear's weights and activations made it
//! a quarter of a bf16 training step.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

/// `x` (f32 or bf16) in `dtype` (f32 or bf16), rounding to nearest even; the gradient is
/// converted back.
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        return Ok(x.clone());
    }
    x.contiguous()?.apply_op1(Cast)
}

/// Between f32 and bf16, whichever way the operand is.
struct Cast;

fn check(l: &Layout) -> Result<()> {
    if !l.is_contiguous() {
        candle_core::bail!("cast: a contiguous operand (got {:?})", l.shape());
    }
    Ok(())
}

/// Elements per CPU task.
const CHUNK: usize = 1 << 14;

impl CustomOp1 for Cast {
    fn name(&self) -> &'static str {
        "cast-f32-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        check(l)?;
        let range = l.start_offset()..l.start_offset() + l.shape().elem_count();
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::BF16(v[range].par_chunks(CHUNK).flat_map_iter(|c| c.iter().map(|&x| bf16::from_f32(x))).collect()),
            CpuStorage::BF16(v) => CpuStorage::F32(v[range].par_chunks(CHUNK).flat_map_iter(|c| c.iter().map(|&x| x.to_f32())).collect()),
            _ => candle_core::bail!("cast: f32 or bf16 operands"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        check(l)?;
        let (dev, n) = (s.device(), l.shape().elem_count());
        let out = match s.dtype() {
            DType::F32 => candle_core::CudaStorage::wrap_cuda_slice(cuda::launch::<f32, bf16>("f32_to_bf16", dev, n, l.start_offset(), &crate::gpu::view::<f32>(s, l)?)?, dev.clone()),
            DType::BF16 => candle_core::CudaStorage::wrap_cuda_slice(cuda::launch::<bf16, f32>("bf16_to_f32", dev, n, l.start_offset(), &crate::gpu::view::<bf16>(s, l)?)?, dev.clone()),
            _ => candle_core::bail!("cast: f32 or bf16 operands"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&Cast)?))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};

    /// Four elements a thread; bf16 as its bits (NVRTC has no bf16 header): f32 → bf16 rounds
    /// to nearest even and keeps NaNs quiet.
    const SOURCE: &str = r#"
__device__ unsigned short to_bf16(float f) {
    const unsigned int b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((b >> 16) | 0x40u);
    return (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// `vec`: x is 16-byte aligned and n a multiple of 4.
extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, unsigned short* __restrict__ y, unsigned int n, unsigned int vec) {
    const unsigned int i = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (vec && i + 4 <= n) {
        const float4 v = *reinterpret_cast<const float4*>(x + i);
        *reinterpret_cast<uint2*>(y + i) = make_uint2(to_bf16(v.x) | ((unsigned int)to_bf16(v.y) << 16), to_bf16(v.z) | ((unsigned int)to_bf16(v.w) << 16));
    } else {
        for (unsigned int j = i; j < min(i + 4, n); ++j) y[j] = to_bf16(x[j]);
    }
}

extern "C" __global__ void bf16_to_f32(const unsigned short* __restrict__ x, float* __restrict__ y, unsigned int n, unsigned int vec) {
    const unsigned int i = 4 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (vec && i + 4 <= n) {
        const uint2 v = *reinterpret_cast<const uint2*>(x + i);
        *reinterpret_cast<float4*>(y + i) = make_float4(__uint_as_float(v.x << 16), __uint_as_float(v.x & 0xffff0000u), __uint_as_float(v.y << 16), __uint_as_float(v.y & 0xffff0000u));
    } else {
        for (unsigned int j = i; j < min(i + 4, n); ++j) y[j] = __uint_as_float((unsigned int)x[j] << 16);
    }
}
"#;

    /// `offset`: where `x` starts in its allocation, in elements.
    pub fn launch<A: DeviceRepr, B: DeviceRepr + ValidAsZeroBits>(name: &str, dev: &CudaDevice, n: usize, offset: usize, x: &CudaView<A>) -> candle_core::Result<CudaSlice<B>> {
        static PTX: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();
        let func = dev.get_or_load_custom_func(name, "potptq_cast", crate::gpu::ptx(&PTX, SOURCE)?)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<B>(n)? };
        let n32 = u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("cast: {n} elements do not fit the kernel's 32-bit indices")))?;
        if n32 == 0 {
            return Ok(out);
        }
        // candle's allocations are 256-byte aligned: a view is 16-byte aligned when its offset
        // is a multiple of 4 elements.
        let vec = u32::from(n.is_multiple_of(4) && offset.is_multiple_of(4));
        let mut b = func.builder();
        b.arg(x).arg(&out).arg(&n32).arg(&vec);
        let cfg = LaunchConfig { grid_dim: (n32.div_ceil(4 * 256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: `x` and `out` hold n elements; vector accesses only where aligned (`vec`).
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(n: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1009) as f32 - 504.0) * 0.0137).collect();
        v[1] = f32::NAN;
        v[2] = f32::INFINITY;
        v[3] = 1.0 + f32::EPSILON * 64.0; // exactly halfway between two bf16: rounds to even
        v
    }

    #[test]
    fn rounds_like_half_and_converts_the_gradient_back() {
        let v = values(37);
        let x = Var::from_tensor(&Tensor::from_vec(v.clone(), 37, &Device::Cpu).unwrap()).unwrap();
        let y = cast(x.as_tensor(), DType::BF16).unwrap();
        let got: Vec<bf16> = y.to_vec1().unwrap();
        for (g, &f) in got.iter().zip(&v) {
            assert!(g.to_bits() == bf16::from_f32(f).to_bits() || (g.is_nan() && f.is_nan()), "{f}: {g}");
        }
        let g = cast(&y, DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(x.as_tensor()).unwrap().dtype(), DType::F32);
        assert!(cast(&x.as_tensor().to_dtype(DType::F16).unwrap(), DType::F32).unwrap_err().to_string().contains("f32 or bf16"));
    }

    /// On a GPU (when there is one) both directions give the CPU's bits, odd lengths too.
    #[cfg(feature = "cuda")]
    #[test]
    fn gpu_equals_cpu() {
        let Some(gpu) = crate::ops::test_gpu() else { return };
        for n in [4096, 1001] {
            let x = Tensor::from_vec(values(n), n, &Device::Cpu).unwrap();
            let cpu: Vec<bf16> = cast(&x, DType::BF16).unwrap().to_vec1().unwrap();
            let on_gpu = cast(&x.to_device(&gpu).unwrap(), DType::BF16).unwrap();
            let g: Vec<bf16> = on_gpu.to_vec1().unwrap();
            assert!(cpu.iter().zip(&g).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())), "f32 → bf16, {n}");
            let back: Vec<f32> = cast(&on_gpu, DType::F32).unwrap().to_vec1().unwrap();
            let cpu_back: Vec<f32> = cast(&cast(&x, DType::BF16).unwrap(), DType::F32).unwrap().to_vec1().unwrap();
            assert!(cpu_back.iter().zip(&back).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())), "bf16 → f32, {n}");
        }
    }
}
