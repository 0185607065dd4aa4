//! Axes 1 and 2 of a 4-D tensor swapped, as a contiguous copy: attention's values and outputs
//! between the linears' `[batch, seq, heads, head_dim]` and attention's
//! `[batch, heads, seq, head_dim]`. Rows of the last axis move whole, so the copy reads and
//! writes runs of `head_dim` values; candle's general strided copy moved these tensors at a
//! sixth of the GPU's copy bandwidth. The swap is its own inverse, and so its own gradient.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// `x` `[b, p, q, d]` as a contiguous `[b, q, p, d]`.
pub fn swap_axes_1_2(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Swap)
}

struct Swap;

/// `(b, p, q, d)` of a contiguous 4-D operand.
fn dims(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    match l.shape().dims() {
        &[b, p, q, d] if l.is_contiguous() => Ok((b, p, q, d)),
        _ => candle_core::bail!("swap_axes_1_2: a contiguous 4-D operand (got {:?})", l.shape()),
    }
}

fn cpu<T: WithDType>(x: &[T], (_, p, q, d): (usize, usize, usize, usize)) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    if d > 0 {
        // Result row (b, i, j) of [b, q, p] is operand row (b, j, i) of [b, p, q].
        y.par_chunks_mut(d).enumerate().for_each(|(row, y)| {
            let (b, i, j) = (row / (q * p), row / p % q, row % p);
            y.copy_from_slice(&x[((b * p + j) * q + i) * d..][..d]);
        });
    }
    y
}

impl CustomOp1 for Swap {
    fn name(&self) -> &'static str {
        "swap-axes-1-2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, p, q, d) = dims(l)?;
        let n = l.shape().elem_count();
        let at = l.start_offset();
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(cpu(&v[at..at + n], (b, p, q, d))),
            CpuStorage::F64(v) => CpuStorage::F64(cpu(&v[at..at + n], (b, p, q, d))),
            _ => candle_core::bail!("swap_axes_1_2: f32 or f64"),
        };
        Ok((out, Shape::from((b, q, p, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (b, p, q, d) = dims(l)?;
        let x = crate::gpu::view::<f32>(s, l)?;
        let out = cuda::launch(s.device(), l.shape().elem_count(), (p, q, d), &x)?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, s.device().clone()), Shape::from((b, q, p, d))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&Swap)?))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};

    /// One thread per result element; consecutive threads walk a row of `d` values.
    const SOURCE: &str = r#"
extern "C" __global__ void swap_axes_1_2(const float* __restrict__ x, float* __restrict__ y, unsigned int n, unsigned int p, unsigned int q, unsigned int d) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const unsigned int k = i % d, row = i / d;
    const unsigned int b = row / (q * p), a = row / p % q, c = row % p;
    y[i] = x[((size_t)(b * p + c) * q + a) * d + k];
}
"#;

    pub fn launch(dev: &CudaDevice, n: usize, (p, q, d): (usize, usize, usize), x: &CudaView<f32>) -> candle_core::Result<CudaSlice<f32>> {
        static PTX: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();
        let func = dev.get_or_load_custom_func("swap_axes_1_2", "potptq_swap", crate::gpu::ptx(&PTX, SOURCE)?)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<f32>(n)? };
        let fit = |v: usize| u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("swap_axes_1_2: {n} elements do not fit the kernel's 32-bit indices")));
        let (n32, p, q, d) = (fit(n)?, fit(p)?, fit(q)?, fit(d)?);
        if n32 == 0 {
            return Ok(out);
        }
        let mut b = func.builder();
        b.arg(x).arg(&out).arg(&n32).arg(&p).arg(&q).arg(&d);
        let cfg = LaunchConfig { grid_dim: (n32.div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: `x` and `out` hold n elements (`dims`).
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn input(shape: (usize, usize, usize, usize), device: &Device) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        Tensor::from_vec((0..n).map(|i| ((i * 7919 % 1009) as f32 - 504.0) * 0.01).collect::<Vec<_>>(), shape, device).unwrap()
    }

    /// Values and gradients equal candle's transpose made contiguous (f32 and f64).
    #[test]
    fn equals_the_transpose() {
        for dtype in [DType::F32, DType::F64] {
            let x = Var::from_tensor(&input((2, 5, 3, 4), &Device::Cpu).to_dtype(dtype).unwrap()).unwrap();
            let ours = swap_axes_1_2(x.as_tensor()).unwrap();
            let theirs = x.as_tensor().transpose(1, 2).unwrap().contiguous().unwrap();
            assert_eq!(ours.dims(), &[2, 3, 5, 4]);
            let flat = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert_eq!(flat(&ours), flat(&theirs));
            let probe = ours.sin().unwrap().detach();
            let go = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gt = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            assert_eq!(flat(go.get(x.as_tensor()).unwrap()), flat(gt.get(x.as_tensor()).unwrap()));
        }
        assert!(swap_axes_1_2(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap()).unwrap_err().to_string().contains("4-D"));
    }

    /// On a GPU (when there is one) the kernel gives the CPU's result.
    #[cfg(feature = "cuda")]
    #[test]
    fn gpu_equals_cpu() {
        let Some(gpu) = crate::ops::test_gpu() else { return };
        let run = |d: &Device| swap_axes_1_2(&input((2, 7, 33, 64), d)).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(run(&Device::Cpu), run(&gpu));
    }
}
