//! `y = x / sqrt(mean(x²) + eps) · w` over the last axis, with the gradient for `x`:
//! `∂L/∂x = r · (∂L/∂y ⊙ w) − x · r³ · mean(∂L/∂y ⊙ w ⊙ x)`, `r = 1 / sqrt(mean(x²) + eps)`.
//! The norm weights `w` are constants of the block graph (Step 2 trains scales and linear
//! weights, not norms): they get no gradient.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::map_cpu;

/// `x` `[.., n]` normalized by its root mean square over the last axis and scaled by `weight`
/// `[n]`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNorm { eps })
}

/// `∂L/∂x` of `rms_norm(x, weight, eps)` from `∂L/∂y` (`grad`), without recording a graph.
pub fn rms_norm_grad(grad: &Tensor, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    grad.contiguous()?.apply_op3_no_bwd(&x.contiguous()?, &weight.contiguous()?, &RmsNormGrad(RmsNorm { eps }))
}

#[derive(Clone, Copy)]
struct RmsNorm {
    eps: f64,
}

/// `∂L/∂x` from `∂L/∂y`, `x` and `w` (an op without a gradient).
struct RmsNormGrad(RmsNorm);

/// The row length `n` of contiguous `x` `[.., n]` and `w` `[n]` (and `∂L/∂y` like `x`).
fn check(lx: &Layout, lw: &Layout, eps: f64) -> Result<usize> {
    let n = lx.shape().dims().last().copied().unwrap_or(0);
    if n == 0 || lw.shape().dims() != [n] || !lx.is_contiguous() || !lw.is_contiguous() || !(eps >= 0.0 && eps.is_finite()) {
        candle_core::bail!("rms_norm: contiguous x [.., n] and weight [n], eps ≥ 0 (got {:?}, {:?}, eps {eps})", lx.shape(), lw.shape());
    }
    Ok(n)
}

impl RmsNorm {
    /// `1 / sqrt(mean(x²) + eps)` of one row.
    fn r<T: WithDType>(&self, x: &[T]) -> f64 {
        let mean = x.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>() / x.len() as f64;
        1.0 / (mean + self.eps).sqrt()
    }

    fn cpu<T: WithDType>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let n = w.len();
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(y, x)| {
            let r = self.r(x);
            for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                *y = T::from_f64(x.to_f64() * r * w.to_f64());
            }
        });
        y
    }

    fn cpu_grad<T: WithDType>(&self, g: &[T], x: &[T], w: &[T]) -> Vec<T> {
        let n = w.len();
        let mut dx = vec![T::zero(); x.len()];
        dx.par_chunks_mut(n).zip(x.par_chunks(n).zip(g.par_chunks(n))).for_each(|(dx, (x, g))| {
            let r = self.r(x);
            let mean = g.iter().zip(w).zip(x).map(|((g, w), x)| g.to_f64() * w.to_f64() * x.to_f64()).sum::<f64>() / n as f64;
            for (((dx, g), w), x) in dx.iter_mut().zip(g).zip(w).zip(x) {
                *dx = T::from_f64(r * g.to_f64() * w.to_f64() - x.to_f64() * r * r * r * mean);
            }
        });
        dx
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        check(l1, l2, self.eps)?;
        let out = map_cpu("rms_norm", (s1, l1), (s2, l2), (s2, l2), |x, w, _| self.cpu(x, w), |x, w, _| self.cpu(x, w))?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let n = check(l1, l2, self.eps)?;
        let x = crate::gpu::view::<f32>(s1, l1)?;
        let w = crate::gpu::view::<f32>(s2, l2)?;
        let out = cuda::launch("rms_norm", s1.device(), self.eps, l1.shape().elem_count(), n, &x, &x, &w)?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, s1.device().clone()), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(rms_norm_grad(grad_res, x, w, self.eps)?), None))
    }
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        check(l1, l3, self.0.eps)?;
        check(l2, l3, self.0.eps)?;
        let out = map_cpu("rms_norm", (s1, l1), (s2, l2), (s3, l3), |g, x, w| self.0.cpu_grad(g, x, w), |g, x, w| self.0.cpu_grad(g, x, w))?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let n = check(l1, l3, self.0.eps)?;
        check(l2, l3, self.0.eps)?;
        let g = crate::gpu::view::<f32>(s1, l1)?;
        let x = crate::gpu::view::<f32>(s2, l2)?;
        let w = crate::gpu::view::<f32>(s3, l3)?;
        let out = cuda::launch("rms_norm_grad", s1.device(), self.0.eps, l1.shape().elem_count(), n, &g, &x, &w)?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, s1.device().clone()), l1.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};

    /// One block of 256 threads per row; block-wide sums through warp shuffles.
    const SOURCE: &str = r#"
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < blockDim.x / 32 ? partial[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ float inv_rms(const float* x, unsigned int n, float eps) {
    float sq = 0.f;
    for (unsigned int c = threadIdx.x; c < n; c += blockDim.x) sq += x[c] * x[c];
    return rsqrtf(block_sum(sq) / n + eps);
}

// `g` is unused here: both kernels take the same arguments.
extern "C" __global__ void rms_norm(const float* __restrict__ g, const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ y, unsigned int n, float eps) {
    const float* xr = x + (size_t)blockIdx.x * n;
    float* yr = y + (size_t)blockIdx.x * n;
    const float r = inv_rms(xr, n, eps);
    for (unsigned int c = threadIdx.x; c < n; c += blockDim.x) yr[c] = xr[c] * r * w[c];
}

extern "C" __global__ void rms_norm_grad(const float* __restrict__ g, const float* __restrict__ x, const float* __restrict__ w,
                                         float* __restrict__ dx, unsigned int n, float eps) {
    const size_t at = (size_t)blockIdx.x * n;
    const float *gr = g + at, *xr = x + at;
    float* out = dx + at;
    const float r = inv_rms(xr, n, eps);
    float dot = 0.f;
    for (unsigned int c = threadIdx.x; c < n; c += blockDim.x) dot += gr[c] * w[c] * xr[c];
    const float k = r * r * r * block_sum(dot) / n;
    for (unsigned int c = threadIdx.x; c < n; c += blockDim.x) out[c] = r * gr[c] * w[c] - xr[c] * k;
}
"#;

    /// `name` over the rows of `x` (`g` is `∂L/∂y` for the gradient, unused otherwise).
    #[allow(clippy::too_many_arguments)]
    pub fn launch(name: &str, dev: &CudaDevice, eps: f64, len: usize, n: usize, g: &CudaView<f32>, x: &CudaView<f32>, w: &CudaView<f32>) -> candle_core::Result<CudaSlice<f32>> {
        static PTX: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();
        let func = dev.get_or_load_custom_func(name, "potptq_rms_norm", crate::gpu::ptx(&PTX, SOURCE)?)?;
        // SAFETY: every element of every row is written by the kernel.
        let out = unsafe { dev.alloc::<f32>(len)? };
        let rows = u32::try_from(len / n).map_err(|_| candle_core::Error::Msg("rms_norm: too many rows".into()))?;
        if rows == 0 {
            return Ok(out);
        }
        let (n32, eps) = (n as u32, eps as f32);
        let mut b = func.builder();
        b.arg(g).arg(x).arg(w).arg(&out).arg(&n32).arg(&eps);
        let cfg = LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: `g`, `x` and `out` hold rows · n elements, `w` n (`check`).
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var, D};

    /// The composed form the graph used: `x / sqrt(mean(x²) + eps) · w`.
    fn composed(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let rms = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps).unwrap().sqrt().unwrap();
        x.broadcast_div(&rms).unwrap().broadcast_mul(w).unwrap()
    }

    fn input(rows: usize, n: usize, dtype: DType, device: &Device) -> (Tensor, Tensor) {
        let x = Tensor::from_vec((0..rows * n).map(|i| ((i * 7919 % 1009) as f64 - 504.0) * 0.01).collect::<Vec<_>>(), (2, rows / 2, n), device).unwrap();
        let w = Tensor::from_vec((0..n).map(|i| 0.5 + 0.01 * i as f64).collect::<Vec<_>>(), n, device).unwrap();
        (x.to_dtype(dtype).unwrap(), w.to_dtype(dtype).unwrap())
    }

    #[test]
    fn equals_the_composed_form() {
        let (x, w) = input(6, 20, DType::F64, &Device::Cpu);
        let x = Var::from_tensor(&x).unwrap();
        let probe = x.as_tensor().cos().unwrap().detach();
        let ours = rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
        let plain = composed(x.as_tensor(), &w, 1e-5);
        let d = (&ours - &plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(d < 1e-12, "values differ by {d}");
        let go = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (&plain * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let d = (go.get(x.as_tensor()).unwrap() - gp.get(x.as_tensor()).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(d < 1e-12, "gradients differ by {d}");
    }

    #[test]
    fn bad_operands_are_errors() {
        let (x, w) = input(4, 8, DType::F32, &Device::Cpu);
        let e = rms_norm(&x, &w.narrow(0, 0, 7).unwrap(), 1e-5).unwrap_err().to_string();
        assert!(e.contains("rms_norm: contiguous"), "{e}");
        let e = rms_norm(&x, &w, f64::NAN).unwrap_err().to_string();
        assert!(e.contains("eps"), "{e}");
        let e = rms_norm(&x.to_dtype(DType::F16).unwrap(), &w.to_dtype(DType::F16).unwrap(), 1e-5).unwrap_err().to_string();
        assert!(e.contains("f32 or f64"), "{e}");
    }

    /// On a GPU (when there is one) the kernels give the CPU's values and gradients.
    #[cfg(feature = "cuda")]
    #[test]
    fn gpu_equals_cpu() {
        let Some(gpu) = crate::ops::test_gpu() else { return };
        let run = |d: &Device| {
            let (x, w) = input(10, 1000, DType::F32, d);
            let x = Var::from_tensor(&x).unwrap();
            let y = rms_norm(x.as_tensor(), &w, 1e-5).unwrap();
            let g = (&y * x.as_tensor().sin().unwrap().detach()).unwrap().sum_all().unwrap().backward().unwrap();
            let g = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), g)
        };
        let ((yc, gc), (yg, gg)) = (run(&Device::Cpu), run(&gpu));
        for (a, b) in yc.iter().zip(&yg).chain(gc.iter().zip(&gg)) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
        }
    }
}
