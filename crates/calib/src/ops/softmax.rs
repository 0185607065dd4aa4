//! Attention's causal softmax as one differentiable op: `P = softmax(scale · S)` over the keys,
//! with every key after the query's position at probability 0.
//!
//! Composed from tensor ops (scale, add a −∞ mask, max, subtract, exp, sum, divide) this is
//! about ten passes over the `[heads, queries, keys]` scores forward and twenty backward: at
//! 2048 tokens and 32 heads, each pass moves 0.5 GB, and together they took half of a Step 2
//! step of a 7B block on a GPU. Fused, the forward reads each row's visible scores once and
//! writes the row; the backward, `∂L/∂S = scale · P ⊙ (∂L/∂P − Σ_keys ∂L/∂P ⊙ P)`, reads the
//! visible parts of `P` and `∂L/∂P` once.
//!
//! Rows follow `grouped_attention`'s layout: the query heads of one KV group are stacked along
//! the query axis, so row `r` of a `[.., group · queries, keys]` tensor is query `r % queries`,
//! at position `keys − queries + r % queries`.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::map_cpu;

/// `softmax(scale · scores)` over the last axis, causally masked (see the module docs);
/// `scores` `[.., group · queries, keys]` with `queries ≤ keys`, `scale > 0`.
pub fn causal_softmax(scores: &Tensor, queries: usize, scale: f64) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax { queries, scale })
}

/// `∂L/∂scores` of `causal_softmax(scores, queries, scale)` from its output `probs` and
/// `∂L/∂probs` (`grad`), without recording a graph.
pub fn causal_softmax_grad(grad: &Tensor, probs: &Tensor, queries: usize, scale: f64) -> Result<Tensor> {
    grad.contiguous()?.apply_op2_no_bwd(&probs.contiguous()?, &CausalSoftmaxGrad(CausalSoftmax { queries, scale }))
}

#[derive(Clone, Copy)]
struct CausalSoftmax {
    queries: usize,
    scale: f64,
}

/// The gradient of `CausalSoftmax` from its output `P` and `∂L/∂P` (an op without a gradient).
struct CausalSoftmaxGrad(CausalSoftmax);

/// `(rows, keys)` of a contiguous `[.., rows, keys]` operand that the mask fits.
fn rows_keys(op: &CausalSoftmax, l: &Layout) -> Result<(usize, usize)> {
    let dims = l.shape().dims();
    let keys = *dims.last().unwrap_or(&0);
    let ok = dims.len() >= 2 && l.is_contiguous() && op.queries > 0 && op.queries <= keys && dims[dims.len() - 2].is_multiple_of(op.queries);
    if !(ok && op.scale > 0.0 && op.scale.is_finite()) {
        candle_core::bail!("causal_softmax: contiguous [.., group · {} queries, keys ≥ queries] scores and a positive scale (got {:?}, scale {})", op.queries, l.shape(), op.scale);
    }
    Ok((l.shape().elem_count() / keys, keys))
}

impl CausalSoftmax {
    /// How many keys row `row` sees.
    fn visible(&self, row: usize, keys: usize) -> usize {
        keys - self.queries + row % self.queries + 1
    }

    fn cpu<T: WithDType>(&self, s: &[T], keys: usize) -> Vec<T> {
        let mut p = vec![T::zero(); s.len()];
        p.par_chunks_mut(keys).zip(s.par_chunks(keys)).enumerate().for_each(|(row, (p, s))| {
            let n = self.visible(row, keys);
            let max = s[..n].iter().map(|v| v.to_f64()).fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s[..n].iter().map(|v| (self.scale * (v.to_f64() - max)).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (p, e) in p.iter_mut().zip(&e) {
                *p = T::from_f64(e / sum);
            }
        });
        p
    }

    fn cpu_grad<T: WithDType>(&self, g: &[T], p: &[T], keys: usize) -> Vec<T> {
        let mut dx = vec![T::zero(); g.len()];
        dx.par_chunks_mut(keys).zip(g.par_chunks(keys).zip(p.par_chunks(keys))).enumerate().for_each(|(row, (dx, (g, p)))| {
            let n = self.visible(row, keys);
            let dot: f64 = g[..n].iter().zip(&p[..n]).map(|(g, p)| g.to_f64() * p.to_f64()).sum();
            for ((dx, g), p) in dx[..n].iter_mut().zip(&g[..n]).zip(&p[..n]) {
                *dx = T::from_f64(self.scale * p.to_f64() * (g.to_f64() - dot));
            }
        });
        dx
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, keys) = rows_keys(self, l)?;
        let out = map_cpu("causal_softmax", (s, l), (s, l), (s, l), |s, _, _| self.cpu(s, keys), |s, _, _| self.cpu(s, keys))?;
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (rows, keys) = rows_keys(self, l)?;
        let src = crate::gpu::view::<f32>(s, l)?;
        let out = cuda::launch("causal_softmax", s.device(), self, rows, keys, &src, None)?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, s.device().clone()), l.shape().clone()))
    }

    fn bwd(&self, _scores: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(causal_softmax_grad(grad_res, res, self.queries, self.scale)?))
    }
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "causal-softmax-grad"
    }

    fn cpu_fwd(&self, g: &CpuStorage, lg: &Layout, p: &CpuStorage, lp: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, keys) = rows_keys(&self.0, lg)?;
        rows_keys(&self.0, lp)?;
        let out = map_cpu("causal_softmax", (g, lg), (p, lp), (p, lp), |g, p, _| self.0.cpu_grad(g, p, keys), |g, p, _| self.0.cpu_grad(g, p, keys))?;
        Ok((out, lg.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, g: &candle_core::CudaStorage, lg: &Layout, p: &candle_core::CudaStorage, lp: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (rows, keys) = rows_keys(&self.0, lg)?;
        rows_keys(&self.0, lp)?;
        let gs = crate::gpu::view::<f32>(g, lg)?;
        let ps = crate::gpu::view::<f32>(p, lp)?;
        let out = cuda::launch("causal_softmax_grad", g.device(), &self.0, rows, keys, &gs, Some(&ps))?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, g.device().clone()), lg.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};

    use super::CausalSoftmax;

    /// One block of 256 threads per row; block-wide max and sums through warp shuffles. Only a
    /// row's visible keys are read; the rest of the row is written as 0.
    const SOURCE: &str = r#"
__device__ float block_reduce(float v, bool is_max) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) {
        const float u = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, u) : v + u;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : (is_max ? __int_as_float(0xff800000) : 0.f);
    for (int o = 16; o > 0; o >>= 1) {
        const float u = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, u) : v + u;
    }
    return v;
}

extern "C" __global__ void causal_softmax(const float* __restrict__ s, const float* __restrict__ unused, float* __restrict__ p,
                                          unsigned int queries, unsigned int keys, float scale) {
    const unsigned long long row = blockIdx.x;
    const unsigned int visible = keys - queries + (unsigned int)(row % queries) + 1;
    const float* x = s + row * keys;
    float* y = p + row * keys;
    float m = __int_as_float(0xff800000);  // −∞
    for (unsigned int c = threadIdx.x; c < visible; c += blockDim.x) m = fmaxf(m, x[c]);
    m = block_reduce(m, true);
    float sum = 0.f;
    for (unsigned int c = threadIdx.x; c < visible; c += blockDim.x) sum += expf(scale * (x[c] - m));
    const float inv = 1.f / block_reduce(sum, false);
    for (unsigned int c = threadIdx.x; c < keys; c += blockDim.x) y[c] = c < visible ? expf(scale * (x[c] - m)) * inv : 0.f;
}

extern "C" __global__ void causal_softmax_grad(const float* __restrict__ g, const float* __restrict__ p, float* __restrict__ dx,
                                               unsigned int queries, unsigned int keys, float scale) {
    const unsigned long long row = blockIdx.x;
    const unsigned int visible = keys - queries + (unsigned int)(row % queries) + 1;
    const float* gr = g + row * keys;
    const float* pr = p + row * keys;
    float* out = dx + row * keys;
    float dot = 0.f;
    for (unsigned int c = threadIdx.x; c < visible; c += blockDim.x) dot += gr[c] * pr[c];
    dot = block_reduce(dot, false);
    for (unsigned int c = threadIdx.x; c < keys; c += blockDim.x) out[c] = c < visible ? scale * pr[c] * (gr[c] - dot) : 0.f;
}
"#;

    /// Runs `name` over `rows` rows of `keys`: the softmax of `a`, or its gradient from
    /// `a = ∂L/∂P` and `b = P`.
    pub fn launch(name: &str, dev: &CudaDevice, op: &CausalSoftmax, rows: usize, keys: usize, a: &CudaView<f32>, b: Option<&CudaView<f32>>) -> candle_core::Result<CudaSlice<f32>> {
        static PTX: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();
        let func = dev.get_or_load_custom_func(name, "potptq_causal_softmax", crate::gpu::ptx(&PTX, SOURCE)?)?;
        // SAFETY: every element of every row is written by the kernel.
        let out = unsafe { dev.alloc::<f32>(rows * keys)? };
        if rows == 0 {
            return Ok(out);
        }
        let (queries, keys32, scale) = (op.queries as u32, keys as u32, op.scale as f32);
        let mut builder = func.builder();
        builder.arg(a);
        match b {
            Some(b) => builder.arg(b),
            None => builder.arg(a),
        };
        builder.arg(&out).arg(&queries).arg(&keys32).arg(&scale);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the operands hold rows · keys elements (checked by `rows_keys`).
        unsafe { builder.launch(cfg) }.w()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var, D};
    use potptq_model::attention::causal_mask;

    /// The composed form `softmax(scale · S + mask)` that the op replaces.
    fn composed(s: &Tensor, queries: usize, scale: f64) -> Tensor {
        let (rows, keys) = (s.dim(D::Minus2).unwrap(), s.dim(D::Minus1).unwrap());
        let mask = causal_mask(rows / queries, queries, keys, s.dtype(), s.device()).unwrap();
        candle_nn::ops::softmax(&(s * scale).unwrap().broadcast_add(&mask).unwrap(), D::Minus1).unwrap()
    }

    fn scores(shape: (usize, usize, usize, usize), dtype: DType, device: &Device) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f64> = (0..n).map(|i| ((i * 7919 % 1009) as f64 - 504.0) * 0.013).collect();
        Tensor::from_vec(v, shape, device).unwrap().to_dtype(dtype).unwrap()
    }

    /// Values and gradients equal the composed form in f64, with grouped heads and more keys
    /// than queries (a KV cache's layout).
    #[test]
    fn equals_the_composed_form() {
        for (shape, queries) in [((2, 3, 7, 7), 7), ((1, 2, 10, 9), 5), ((1, 1, 4, 11), 4)] {
            let s = Var::from_tensor(&scores(shape, DType::F64, &Device::Cpu)).unwrap();
            let probe = s.as_tensor().cos().unwrap().detach();
            let fused = causal_softmax(s.as_tensor(), queries, 0.37).unwrap();
            let plain = composed(s.as_tensor(), queries, 0.37);
            let d = (&fused - &plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(d < 1e-12, "{shape:?}: values differ by {d}");
            let gf = (&fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gp = (&plain * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let (gf, gp) = (gf.get(s.as_tensor()).unwrap(), gp.get(s.as_tensor()).unwrap());
            let d = (gf - gp).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(d < 1e-12, "{shape:?}: gradients differ by {d}");
            assert!(gp.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap() > 1e-3);
        }
        let s = scores((1, 2, 6, 6), DType::F32, &Device::Cpu);
        let d = (causal_softmax(&s, 6, 0.5).unwrap() - composed(&s, 6, 0.5)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "f32 values differ by {d}");
    }

    #[test]
    fn bad_operands_are_errors() {
        let s = scores((1, 1, 6, 4), DType::F32, &Device::Cpu);
        for (queries, scale) in [(5, 1.0), (0, 1.0), (3, 0.0), (3, f64::NAN)] {
            let e = causal_softmax(&s, queries, scale).unwrap_err().to_string();
            assert!(e.contains("causal_softmax"), "{queries} queries, scale {scale}: {e}");
        }
        let e = causal_softmax(&s.to_dtype(DType::F16).unwrap(), 3, 1.0).unwrap_err().to_string();
        assert!(e.contains("f32 or f64"), "{e}");
    }

    /// On a GPU (when there is one) the kernels give the CPU's values and gradients.
    #[cfg(feature = "cuda")]
    #[test]
    fn gpu_equals_cpu() {
        let Some(gpu) = crate::ops::test_gpu() else { return };
        for (shape, queries) in [((2, 3, 300, 300), 300), ((1, 2, 64, 600), 32)] {
            let run = |d: &Device| {
                let s = Var::from_tensor(&scores(shape, DType::F32, d)).unwrap();
                let p = causal_softmax(s.as_tensor(), queries, 0.125).unwrap();
                let g = (&p * s.as_tensor().sin().unwrap().detach()).unwrap().sum_all().unwrap().backward().unwrap();
                let g = g.get(s.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                (p.flatten_all().unwrap().to_vec1::<f32>().unwrap(), g)
            };
            let ((pc, gc), (pg, gg)) = (run(&Device::Cpu), run(&gpu));
            for (a, b) in pc.iter().zip(&pg).chain(gc.iter().zip(&gg)) {
                assert!((a - b).abs() <= 1e-5 * a.abs().max(1e-2), "{shape:?}: {a} vs {b}");
            }
        }
    }
}
