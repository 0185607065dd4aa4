//! Step 2's quantize-dequantize of a whole linear in one pass: `W̃ = ŝ · P·2^E` with
//! `E = clamp(round(log2(|W| / ŝ)), 0, q_max)` and `P = sign(W)`, for weights `[rows, cols]`
//! and group scales `[rows, groups]` (groups of `G` columns, the last one possibly shorter).
//!
//! Written as tensor operations this is a dozen elementwise passes over every weight per
//! training step (division, log, scaling, round, clamp, exp, round, sign, products), the
//! largest cost of a GPU step after the matrix products; as one op it reads `W` and `ŝ` once.
//! The backward keeps the method's straight-through estimator: `P·2^E` is held constant, so
//! `∂L/∂ŝ_g = Σ_{j ∈ g} ∂L/∂W̃_j · P_j 2^{E_j} = (Σ_j ∂L/∂W̃_j · W̃_j) / ŝ_g` (exact: `W̃_j / ŝ_g`
//! is a power of two), and `W` gets no gradient here (trained weights add theirs outside).

use std::f64::consts::LN_2;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// `W̃` from weights `[rows, cols]` and scales `[rows, groups]` of `group` columns (both f32);
/// see the module docs. The gradient reaches the scales only.
pub fn pot_fake_quant(weights: &Tensor, scales: &Tensor, group: usize, qmax: u32) -> Result<Tensor> {
    weights.apply_op2(scales, FakeQuant { group, qmax })
}

struct FakeQuant {
    group: usize,
    qmax: u32,
}

/// The level `±2^E` of weight `w` under scale `s`, with the arithmetic of the tensor-op form
/// (`ln(|w| / s) · (1 / ln 2)` in f32, rounded half away from zero).
fn level(w: f32, s: f32, qmax: f32) -> f32 {
    let e = ((w.abs() / s).ln() * (1.0 / LN_2) as f32).round().clamp(0.0, qmax);
    let magnitude = (1u32 << e as u32) as f32;
    if w >= 0.0 { magnitude } else { -magnitude }
}

/// `(rows, cols, groups)` of contiguous operands that fit together.
fn check(l1: &Layout, l2: &Layout, group: usize) -> Result<(usize, usize, usize)> {
    let (rows, cols) = l1.shape().dims2()?;
    let groups = cols.div_ceil(group.max(1));
    if group == 0 || l2.shape().dims2()? != (rows, groups) || !l1.is_contiguous() || !l2.is_contiguous() {
        candle_core::bail!("pot_fake_quant: contiguous weights [rows, cols] and scales [rows, cols / {group}] (got {:?} and {:?})", l1.shape(), l2.shape());
    }
    Ok((rows, cols, groups))
}

/// `Σ` over each group of columns of `t` `[rows, cols]`: `[rows, groups]`.
fn group_sums(t: &Tensor, group: usize) -> Result<Tensor> {
    let (rows, cols) = t.dims2()?;
    let whole = cols / group;
    let mut parts = Vec::new();
    if whole > 0 {
        parts.push(t.narrow(1, 0, whole * group)?.reshape((rows, whole, group))?.sum(D::Minus1)?);
    }
    if cols % group > 0 {
        parts.push(t.narrow(1, whole * group, cols % group)?.sum_keepdim(D::Minus1)?);
    }
    Tensor::cat(&parts, 1)
}

impl CustomOp2 for FakeQuant {
    fn name(&self) -> &'static str {
        "pot-fake-quant"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, cols, groups) = check(l1, l2, self.group)?;
        let (CpuStorage::F32(w), CpuStorage::F32(s)) = (s1, s2) else {
            candle_core::bail!("pot_fake_quant: f32 weights and scales");
        };
        let w = &w[l1.start_offset()..l1.start_offset() + rows * cols];
        let s = &s[l2.start_offset()..l2.start_offset() + rows * groups];
        let qmax = self.qmax as f32;
        let mut out = vec![0f32; rows * cols];
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        out.par_chunks_mut(cols).zip(w.par_chunks(cols)).zip(s.par_chunks(groups)).for_each(|((o, row), sr)| {
            for ((og, wg), &sg) in o.chunks_mut(self.group).zip(row.chunks(self.group)).zip(sr) {
                for (o, &v) in og.iter_mut().zip(wg) {
                    *o = sg * level(v, sg, qmax);
                }
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;

        let (rows, cols, groups) = check(l1, l2, self.group)?;
        let n = rows * cols;
        let dev = s1.device();
        let w = s1.as_cuda_slice::<f32>()?.slice(l1.start_offset()..);
        let s = s2.as_cuda_slice::<f32>()?.slice(l2.start_offset()..);
        let func = dev.get_or_load_custom_func("pot_fake_quant", "potptq_fake_quant", cuda::ptx()?)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<f32>(n)? };
        let (n64, cols32, groups32, group32, qmax, inv_ln2) = (n as u64, cols as u32, groups as u32, self.group as u32, self.qmax as f32, (1.0 / LN_2) as f32);
        let mut b = func.builder();
        b.arg(&w).arg(&s).arg(&out).arg(&n64).arg(&cols32).arg(&groups32).arg(&group32).arg(&qmax).arg(&inv_ln2);
        // Grid-stride: any grid covers every weight; this one fills an H200-sized GPU.
        let cfg = LaunchConfig { grid_dim: (n.div_ceil(256).clamp(1, 132 * 16) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: `w` and `out` hold rows·cols weights and `s` rows·groups scales, checked above.
        unsafe { b.launch(cfg) }.w()?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()), l1.shape().clone()))
    }

    fn bwd(&self, _weights: &Tensor, scales: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_scales = group_sums(&(grad_res * res)?, self.group)?.div(scales)?;
        Ok((None, Some(grad_scales)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::OnceLock;

    /// The kernel of `FakeQuant`, one thread per weight (grid-stride); `level` in CUDA.
    const SOURCE: &str = r#"
extern "C" __global__ void pot_fake_quant(const float* __restrict__ w, const float* __restrict__ s, float* __restrict__ out,
                                          unsigned long long n, unsigned int cols, unsigned int groups, unsigned int group,
                                          float qmax, float inv_ln2) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned long long row = i / cols;
        const float v = w[i], sg = s[row * groups + (unsigned int)(i - row * cols) / group];
        const float e = fminf(fmaxf(roundf(logf(fabsf(v) / sg) * inv_ln2), 0.f), qmax);
        const float magnitude = (float)(1u << (unsigned int)e);
        out[i] = sg * (v >= 0.f ? magnitude : -magnitude);
    }
}
"#;

    pub fn ptx() -> candle_core::Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        PTX.get_or_init(|| {
            candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SOURCE).map(|p| p.to_src()).map_err(|e| format!("NVRTC: {e:?}"))
        })
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn weights(rows: usize, cols: usize) -> Vec<f32> {
        let mut w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1e-4).collect();
        w[5] = 0.0;
        w
    }

    /// `W̃` and its scale gradient as tensor operations, groups spread by index.
    fn plain(w: &Tensor, s: &Tensor, group: usize, qmax: u32) -> Tensor {
        let cols = w.dim(1).unwrap();
        let idx = Tensor::from_vec((0..cols).map(|c| (c / group) as u32).collect::<Vec<_>>(), cols, w.device()).unwrap();
        let spread = s.index_select(&idx, 1).unwrap();
        let sd = spread.detach();
        let e = ((w.abs().unwrap().div(&sd).unwrap().log().unwrap() / LN_2).unwrap().round().unwrap()).clamp(0.0, qmax as f64).unwrap();
        let sign = ((w.ge(0f64).unwrap().to_dtype(candle_core::DType::F32).unwrap() * 2.0).unwrap() - 1.0).unwrap();
        let levels = (e * LN_2).unwrap().exp().unwrap().round().unwrap().mul(&sign).unwrap();
        levels.mul(&spread).unwrap()
    }

    /// The op equals the tensor-op form, values exactly and scale gradients, with a ragged
    /// last group and with groups that tile the rows.
    #[test]
    fn equals_the_tensor_op_form() {
        for (rows, cols, group) in [(3usize, 112usize, 32usize), (2, 128, 64)] {
            let groups = cols.div_ceil(group);
            let w = Tensor::from_vec(weights(rows, cols), (rows, cols), &Device::Cpu).unwrap();
            let s = Var::from_tensor(&Tensor::from_vec((0..rows * groups).map(|i| 3e-4 + 2e-4 * i as f32).collect::<Vec<_>>(), (rows, groups), &Device::Cpu).unwrap()).unwrap();
            let probe = Tensor::from_vec((0..rows * cols).map(|i| (i % 5) as f32 - 2.0).collect::<Vec<_>>(), (rows, cols), &Device::Cpu).unwrap();
            for qmax in [1u32, 3, 7] {
                let fused = pot_fake_quant(&w, s.as_tensor(), group, qmax).unwrap();
                let plain = plain(&w, s.as_tensor(), group, qmax);
                let (a, b): (Vec<f32>, Vec<f32>) = (fused.flatten_all().unwrap().to_vec1().unwrap(), plain.flatten_all().unwrap().to_vec1().unwrap());
                assert_eq!(a, b, "[{rows}, {cols}] g{group} qmax {qmax}");
                let ga = (&fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let gb = (&plain * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let ga: Vec<f32> = ga.get(s.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let gb: Vec<f32> = gb.get(s.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                assert!(gb.iter().any(|g| g.abs() > 1e-3));
                for (x, y) in ga.iter().zip(&gb) {
                    assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "[{rows}, {cols}] g{group} qmax {qmax}: {x} vs {y}");
                }
            }
        }
    }

    /// On a GPU (when there is one) the kernel gives the CPU's levels, scale gradients within
    /// rounding (its `logf` may differ from the CPU's by an ulp: a weight exactly on a rounding
    /// boundary may land one level apart, which the count bound allows).
    #[cfg(feature = "cuda")]
    #[test]
    fn gpu_equals_cpu() {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: the GPU kernel is not tested");
            return;
        };
        let (rows, cols, group) = (64usize, 1000usize, 128usize);
        let (n, groups) = (rows * cols, cols.div_ceil(group));
        let w: Vec<f32> = (0..n).map(|i| (((i * 2654435761usize) % 100003) as f32 / 100003.0 - 0.5) * 0.1).collect();
        let s: Vec<f32> = (0..rows * groups).map(|i| 1e-3 + 1e-5 * (i % 97) as f32).collect();
        for qmax in [1u32, 3, 7] {
            let run = |d: &Device| {
                let wt = Tensor::from_vec(w.clone(), (rows, cols), d).unwrap();
                let sv = Var::from_tensor(&Tensor::from_vec(s.clone(), (rows, groups), d).unwrap()).unwrap();
                let out = pot_fake_quant(&wt, sv.as_tensor(), group, qmax).unwrap();
                let probe = wt.sin().unwrap();
                let g = (&out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let g: Vec<f32> = g.get(sv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                (out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), g)
            };
            let (oc, gc) = run(&Device::Cpu);
            let (og, gg) = run(&gpu);
            let differ = oc.iter().zip(&og).filter(|(a, b)| a != b).count();
            assert!(differ <= n / 10000, "qmax {qmax}: {differ} of {n} weights differ");
            for (a, b) in gc.iter().zip(&gg) {
                assert!((a - b).abs() <= 1e-3 * a.abs().max(1e-2), "qmax {qmax}: gradient {a} vs {b}");
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let w = Tensor::zeros((2, 12), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = |s: Tensor, group: usize| pot_fake_quant(&w, &s, group, 3).unwrap_err().to_string();
        let e = err(Tensor::ones((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(), 4);
        assert!(e.contains("scales [rows, cols / 4]"), "12 columns are 3 groups of 4: {e}");
        let e = err(Tensor::ones((2, 3), candle_core::DType::F64, &Device::Cpu).unwrap(), 4);
        assert!(e.contains("f32 weights and scales"), "{e}");
        let e = err(Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap(), 0);
        assert!(e.contains("pot_fake_quant"), "{e}");
        assert!(pot_fake_quant(&w, &Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap(), 4, 3).is_ok());
        let empty = Tensor::zeros((0, 12), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(pot_fake_quant(&empty, &Tensor::ones((0, 3), candle_core::DType::F32, &Device::Cpu).unwrap(), 4, 3).unwrap().dims(), &[0, 12]);
    }
}
