//! The MLP's gate, `silu(g) ⊙ u`, with its gradient: `∂L/∂g = ∂L/∂y ⊙ u ⊙ σ(g)(1 + g(1 − σ(g)))`
//! and `∂L/∂u = ∂L/∂y ⊙ silu(g)`, both from one pass over `∂L/∂y`, `g` and `u` (composed from
//! candle's ops, the backward took nine passes over these `[tokens, intermediate]` tensors).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::map_cpu;

/// `silu(gate) ⊙ up`, elementwise, for tensors of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// `(∂L/∂gate, ∂L/∂up)` of `swiglu(gate, up)` from `∂L/∂y` (`grad`), without recording a
/// graph.
pub fn swiglu_grad(grad: &Tensor, gate: &Tensor, up: &Tensor) -> Result<(Tensor, Tensor)> {
    let both = grad.contiguous()?.apply_op3_no_bwd(&gate.contiguous()?, &up.contiguous()?, &SwiGluGrad)?;
    Ok((both.get(0)?, both.get(1)?))
}

struct SwiGlu;

/// `[∂L/∂g, ∂L/∂u]` stacked along a new first axis, from `∂L/∂y`, `g` and `u` (an op
/// without a gradient).
struct SwiGluGrad;

fn check(a: &Layout, b: &Layout) -> Result<()> {
    if a.shape() != b.shape() || !a.is_contiguous() || !b.is_contiguous() {
        candle_core::bail!("swiglu: contiguous operands of one shape (got {:?} and {:?})", a.shape(), b.shape());
    }
    Ok(())
}

/// Elements per CPU task.
const CHUNK: usize = 4096;

fn sigmoid(g: f64) -> f64 {
    1.0 / (1.0 + (-g).exp())
}

fn cpu<T: WithDType>(g: &[T], u: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); g.len()];
    y.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK))).for_each(|(y, (g, u))| {
        for ((y, g), u) in y.iter_mut().zip(g).zip(u) {
            let g = g.to_f64();
            *y = T::from_f64(g * sigmoid(g) * u.to_f64());
        }
    });
    y
}

fn cpu_grad<T: WithDType>(dy: &[T], g: &[T], u: &[T]) -> Vec<T> {
    let n = g.len();
    let mut out = vec![T::zero(); 2 * n];
    let (dg, du) = out.split_at_mut(n);
    dg.par_chunks_mut(CHUNK).zip(du.par_chunks_mut(CHUNK)).zip(dy.par_chunks(CHUNK).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))).for_each(|((dg, du), (dy, (g, u)))| {
        for i in 0..g.len() {
            let (d, g, u) = (dy[i].to_f64(), g[i].to_f64(), u[i].to_f64());
            let s = sigmoid(g);
            dg[i] = T::from_f64(d * u * s * (1.0 + g * (1.0 - s)));
            du[i] = T::from_f64(d * g * s);
        }
    });
    out
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        check(l1, l2)?;
        Ok((map_cpu("swiglu", (s1, l1), (s2, l2), (s2, l2), |g, u, _| cpu(g, u), |g, u, _| cpu(g, u))?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        check(l1, l2)?;
        let g = crate::gpu::view::<f32>(s1, l1)?;
        let u = crate::gpu::view::<f32>(s2, l2)?;
        let out = cuda::launch("swiglu", s1.device(), l1.shape().elem_count(), &g, &g, &u)?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, s1.device().clone()), l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = swiglu_grad(grad_res, g, u)?;
        Ok((Some(dg), Some(du)))
    }
}

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        check(l1, l2)?;
        check(l2, l3)?;
        let out = map_cpu("swiglu", (s1, l1), (s2, l2), (s3, l3), cpu_grad, cpu_grad)?;
        Ok((out, stacked(l1)))
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
        check(l1, l2)?;
        check(l2, l3)?;
        let dy = crate::gpu::view::<f32>(s1, l1)?;
        let g = crate::gpu::view::<f32>(s2, l2)?;
        let u = crate::gpu::view::<f32>(s3, l3)?;
        let out = cuda::launch("swiglu_grad", s1.device(), l1.shape().elem_count(), &dy, &g, &u)?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, s1.device().clone()), stacked(l1)))
    }
}

/// `[2, ..shape]`.
fn stacked(l: &Layout) -> Shape {
    Shape::from([&[2], l.shape().dims()].concat())
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};

    /// One thread per element.
    const SOURCE: &str = r#"
// `dy` is unused here: both kernels take the same arguments.
extern "C" __global__ void swiglu(const float* __restrict__ dy, const float* __restrict__ g, const float* __restrict__ u,
                                  float* __restrict__ y, unsigned int n) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float gi = g[i];
    y[i] = gi / (1.f + expf(-gi)) * u[i];
}

// Writes ∂L/∂g to out[0, n) and ∂L/∂u to out[n, 2n).
extern "C" __global__ void swiglu_grad(const float* __restrict__ dy, const float* __restrict__ g, const float* __restrict__ u,
                                       float* __restrict__ out, unsigned int n) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float d = dy[i], gi = g[i], s = 1.f / (1.f + expf(-gi));
    out[i] = d * u[i] * s * (1.f + gi * (1.f - s));
    out[(size_t)n + i] = d * gi * s;
}
"#;

    /// `name` over `n` elements (the gradient writes `2n`).
    pub fn launch(name: &str, dev: &CudaDevice, n: usize, dy: &CudaView<f32>, g: &CudaView<f32>, u: &CudaView<f32>) -> candle_core::Result<CudaSlice<f32>> {
        static PTX: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();
        let func = dev.get_or_load_custom_func(name, "potptq_swiglu", crate::gpu::ptx(&PTX, SOURCE)?)?;
        let len = if name == "swiglu_grad" { 2 * n } else { n };
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<f32>(len)? };
        let n32 = u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("swiglu: {n} elements do not fit the kernel's 32-bit indices")))?;
        if n32 == 0 {
            return Ok(out);
        }
        let mut b = func.builder();
        b.arg(dy).arg(g).arg(u).arg(&out).arg(&n32);
        let cfg = LaunchConfig { grid_dim: (n32.div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the operands hold n elements and `out` len (`check`).
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn input(n: usize, seed: usize, device: &Device) -> Tensor {
        Tensor::from_vec((0..n).map(|i| (((i + seed) * 7919 % 1009) as f64 - 504.0) * 0.01).collect::<Vec<_>>(), (2, n / 2), device).unwrap()
    }

    #[test]
    fn equals_the_composed_form() {
        let (g, u) = (Var::from_tensor(&input(40, 0, &Device::Cpu)).unwrap(), Var::from_tensor(&input(40, 3, &Device::Cpu)).unwrap());
        let probe = g.as_tensor().cos().unwrap().detach();
        let ours = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
        let plain = (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap();
        let d = (&ours - &plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(d < 1e-12, "values differ by {d}");
        let go = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (&plain * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&g, &u] {
            let d = (go.get(v.as_tensor()).unwrap() - gp.get(v.as_tensor()).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(d < 1e-12, "gradients differ by {d}");
        }
    }

    #[test]
    fn bad_operands_are_errors() {
        let g = input(40, 0, &Device::Cpu).to_dtype(DType::F32).unwrap();
        let e = swiglu(&g, &g.narrow(1, 0, 10).unwrap()).unwrap_err().to_string();
        assert!(e.contains("swiglu: contiguous operands of one shape"), "{e}");
        let h = g.to_dtype(DType::F16).unwrap();
        assert!(swiglu(&h, &h).unwrap_err().to_string().contains("f32 or f64"));
    }

    /// On a GPU (when there is one) the kernels give the CPU's values and gradients.
    #[cfg(feature = "cuda")]
    #[test]
    fn gpu_equals_cpu() {
        let Some(gpu) = crate::ops::test_gpu() else { return };
        let run = |d: &Device| {
            let g = Var::from_tensor(&input(3000, 0, d).to_dtype(DType::F32).unwrap()).unwrap();
            let u = Var::from_tensor(&input(3000, 5, d).to_dtype(DType::F32).unwrap()).unwrap();
            let y = swiglu(g.as_tensor(), u.as_tensor()).unwrap();
            let gr = (&y * g.as_tensor().sin().unwrap().detach()).unwrap().sum_all().unwrap().backward().unwrap();
            let mut v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for t in [&g, &u] {
                v.extend(gr.get(t.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
            v
        };
        for (a, b) in run(&Device::Cpu).iter().zip(&run(&gpu)) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
        }
    }
}
