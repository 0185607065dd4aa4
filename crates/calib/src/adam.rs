//! Adam (β₁ 0.9, β₂ 0.999, ε 1e-8) for Step 2's parameters: the moment estimates of one
//! tensor, and its update either as tensor operations (any dtype: the small `Γ`, the f64
//! gradient checks) or in place in two fused passes (f32: the trained weights, as large as
//! the block, where the dozen tensor operations of an update cost more than the backward
//! pass's products).

use anyhow::Result;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;

pub struct Adam {
    /// `[2, ..shape]`: the first and second moment estimates `m`, `v`.
    moments: Tensor,
    t: i32,
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;

impl Adam {
    pub fn new(shape: (usize, usize), dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self { moments: Tensor::zeros((2, shape.0, shape.1), dtype, device)?, t: 0 })
    }

    /// The step to subtract for gradient `g`, as tensor operations.
    pub fn update(&mut self, g: &Tensor, lr: f64) -> Result<Tensor> {
        self.t += 1;
        let m = ((self.moments.get(0)? * BETA1)? + (g * (1.0 - BETA1))?)?;
        let v = ((self.moments.get(1)? * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
        let m_hat = (&m / (1.0 - BETA1.powi(self.t)))?;
        let v_hat = (&v / (1.0 - BETA2.powi(self.t)))?;
        self.moments = Tensor::stack(&[m, v], 0)?;
        Ok(((m_hat / (v_hat.sqrt()? + EPS)?)? * lr)?)
    }

    /// `param ← max(param − step, floor)` for gradient `g`, `param` and the moments updated in
    /// place (f32, contiguous); other dtypes go through `update`.
    pub fn apply_in_place(&mut self, param: &Var, g: &Tensor, lr: f64, floor: Option<f64>) -> Result<()> {
        if param.dtype() != DType::F32 || !param.is_contiguous() || !self.moments.is_contiguous() {
            let next = (param.as_tensor() - self.update(g, lr)?)?;
            param.set(&match floor {
                Some(f) => next.maximum(f)?,
                None => next,
            })?;
            return Ok(());
        }
        self.t += 1;
        self.moments.inplace_op2(&g.contiguous()?, &Moments)?;
        let floor = floor.map_or(f32::MIN, |f| f as f32);
        let step = Step { lr: lr / (1.0 - BETA1.powi(self.t)), v_scale: 1.0 / (1.0 - BETA2.powi(self.t)), floor };
        param.inplace_op2(&self.moments, &step)?;
        Ok(())
    }
}

/// `[m, v] ← [β₁m + (1 − β₁)g, β₂v + (1 − β₂)g²]`.
struct Moments;

/// `p ← max(p − lr · m / (sqrt(v · v_scale) + ε), floor)`, with `lr` and `v_scale` holding the
/// bias corrections.
struct Step {
    lr: f64,
    v_scale: f64,
    floor: f32,
}

fn f32s_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    let n = l.shape().elem_count();
    match s {
        CpuStorage::F32(v) if l.is_contiguous() => Ok(&mut v[l.start_offset()..l.start_offset() + n]),
        _ => candle_core::bail!("adam: a contiguous f32 parameter"),
    }
}

fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let n = l.shape().elem_count();
    match s {
        CpuStorage::F32(v) if l.is_contiguous() => Ok(&v[l.start_offset()..l.start_offset() + n]),
        _ => candle_core::bail!("adam: contiguous f32 operands"),
    }
}

/// Elements per CPU task.
const CHUNK: usize = 1 << 14;

/// The length `n` of `other` (a gradient or the parameter) when `moments` holds `2n` and both
/// are contiguous.
fn moments_fit(moments: &Layout, other: &Layout, what: &str) -> candle_core::Result<usize> {
    let n = other.shape().elem_count();
    if moments.shape().elem_count() != 2 * n || !moments.is_contiguous() || !other.is_contiguous() {
        candle_core::bail!("adam: moments {:?} for a {what} {:?}", moments.shape(), other.shape());
    }
    Ok(n)
}

impl InplaceOp2 for Moments {
    fn name(&self) -> &'static str {
        "adam-moments"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let n = moments_fit(l1, l2, "gradient")?;
        let (mv, g) = (f32s_mut(s1, l1)?, f32s(s2, l2)?);
        let (m, v) = mv.split_at_mut(n);
        m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)).zip(g.par_chunks(CHUNK)).for_each(|((m, v), g)| {
            for ((m, v), &g) in m.iter_mut().zip(v).zip(g) {
                *m = BETA1 as f32 * *m + (1.0 - BETA1) as f32 * g;
                *v = BETA2 as f32 * *v + (1.0 - BETA2) as f32 * g * g;
            }
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &mut candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> candle_core::Result<()> {
        let n = moments_fit(l1, l2, "gradient")?;
        cuda::in_place("adam_moments", n, (s1, l1), (s2, l2), &[BETA1 as f32, BETA2 as f32])
    }
}

impl InplaceOp2 for Step {
    fn name(&self) -> &'static str {
        "adam-step"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let n = moments_fit(l2, l1, "parameter")?;
        let (p, mv) = (f32s_mut(s1, l1)?, f32s(s2, l2)?);
        let (m, v) = mv.split_at(n);
        let (lr, v_scale, eps, floor) = (self.lr as f32, self.v_scale as f32, EPS as f32, self.floor);
        p.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK)).zip(v.par_chunks(CHUNK)).for_each(|((p, m), v)| {
            for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                *p = (*p - lr * m / ((v * v_scale).sqrt() + eps)).max(floor);
            }
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &mut candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> candle_core::Result<()> {
        let n = moments_fit(l2, l1, "parameter")?;
        cuda::in_place("adam_step", n, (s1, l1), (s2, l2), &[self.lr as f32, self.v_scale as f32, EPS as f32, self.floor])
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Layout};

    /// One thread per element; `mv` holds `m` then `v`.
    const SOURCE: &str = r#"
extern "C" __global__ void adam_moments(float* __restrict__ mv, const float* __restrict__ g, unsigned int n, float beta1, float beta2) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float gi = g[i];
    mv[i] = beta1 * mv[i] + (1.f - beta1) * gi;
    mv[(size_t)n + i] = beta2 * mv[(size_t)n + i] + (1.f - beta2) * gi * gi;
}

extern "C" __global__ void adam_step(float* __restrict__ p, const float* __restrict__ mv, unsigned int n, float lr, float v_scale, float eps, float floor) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    p[i] = fmaxf(p[i] - lr * mv[i] / (sqrtf(mv[(size_t)n + i] * v_scale) + eps), floor);
}
"#;

    /// Kernel `name` over `n` elements: the contiguous `dst` updated in place from `src`, with the
    /// kernel's constants `k` (the callers checked the lengths).
    pub fn in_place(name: &str, n: usize, (dst, ld): (&mut CudaStorage, &Layout), (src, ls): (&CudaStorage, &Layout), k: &[f32]) -> candle_core::Result<()> {
        static PTX: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();
        let dev = src.device().clone();
        let func = dev.get_or_load_custom_func(name, "potptq_adam", crate::gpu::ptx(&PTX, SOURCE)?)?;
        let src = crate::gpu::view::<f32>(src, ls)?;
        let mut dst = dst.as_cuda_slice_mut::<f32>()?.slice_mut(ld.start_offset()..);
        let n32 = u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("adam: {n} elements do not fit the kernel's 32-bit indices")))?;
        if n32 == 0 {
            return Ok(());
        }
        let mut b = func.builder();
        b.arg(&mut dst).arg(&src).arg(&n32);
        for k in k {
            b.arg(k);
        }
        let cfg = LaunchConfig { grid_dim: (n32.div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: `dst` and `src` hold the elements the kernel touches (checked by the callers).
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(n: usize, seed: usize, device: &Device) -> Tensor {
        Tensor::from_vec((0..n).map(|i| (((i + seed) * 7919 % 1009) as f32 - 504.0) * 1e-3).collect::<Vec<_>>(), (n / 8, 8), device).unwrap()
    }

    /// Three in-place steps equal three tensor-op steps, with a floor and without.
    fn in_place_equals_tensor_ops(device: &Device) {
        for floor in [None, Some(-0.3)] {
            in_place_equals_tensor_ops_with(device, floor);
        }
    }

    fn in_place_equals_tensor_ops_with(device: &Device, floor: Option<f64>) {
        let n = 4000;
        let p0 = tensor(n, 0, device);
        let (mut a, mut b) = (Adam::new((n / 8, 8), DType::F32, device).unwrap(), Adam::new((n / 8, 8), DType::F32, device).unwrap());
        let mut plain = p0.clone();
        let fused = Var::from_tensor(&p0.copy().unwrap()).unwrap();
        for k in 0..3 {
            let g = tensor(n, 17 * (k + 1), device);
            plain = (&plain - a.update(&g, 0.1).unwrap()).unwrap();
            if let Some(f) = floor {
                plain = plain.maximum(f).unwrap();
            }
            b.apply_in_place(&fused, &g, 0.1, floor).unwrap();
        }
        let (x, y): (Vec<f32>, Vec<f32>) = (plain.flatten_all().unwrap().to_vec1().unwrap(), fused.flatten_all().unwrap().to_vec1().unwrap());
        assert!(x.iter().zip(&p0.flatten_all().unwrap().to_vec1::<f32>().unwrap()).any(|(a, b)| (a - b).abs() > 1e-3));
        if let Some(f) = floor {
            assert!(y.iter().any(|&v| v == f as f32), "the floor holds some parameters");
        }
        for (x, y) in x.iter().zip(&y) {
            // Steps of 0.1 in f32 (fused multiply-adds on a GPU) round differently by ~1e-7 each.
            assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{x} vs {y}");
        }
    }

    #[test]
    fn in_place_equals_tensor_ops_on_cpu() {
        in_place_equals_tensor_ops(&Device::Cpu);
    }

    /// f64 parameters take the tensor-op update.
    #[test]
    fn f64_takes_the_tensor_ops() {
        let p = Var::from_tensor(&tensor(16, 0, &Device::Cpu).to_dtype(DType::F64).unwrap()).unwrap();
        let before: Vec<f64> = p.flatten_all().unwrap().to_vec1().unwrap();
        let mut a = Adam::new((2, 8), DType::F64, &Device::Cpu).unwrap();
        a.apply_in_place(&p, &p.ones_like().unwrap(), 0.5, None).unwrap();
        let after: Vec<f64> = p.flatten_all().unwrap().to_vec1().unwrap();
        // The first step moves every parameter by lr against the gradient's sign.
        for (b, a) in before.iter().zip(&after) {
            assert!((b - a - 0.5).abs() < 1e-6, "{b} → {a}");
        }
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn in_place_equals_tensor_ops_on_gpu() {
        if let Some(gpu) = crate::ops::test_gpu() {
            in_place_equals_tensor_ops(&gpu);
        }
    }
}
