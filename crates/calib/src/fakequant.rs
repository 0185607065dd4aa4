//! Step 2's quantize-dequantize of a whole linear in one pass: `W̃ = ŝ · P·2^E` with
//! `E = clamp(round(log2(|W| / ŝ)), 0, q_max)` and `P = sign(W)`, for weights `[rows, cols]`
//! and group scales `[rows, groups]` (groups of `G` columns, the last one possibly shorter).
//!
//! Written as tensor operations this is a dozen elementwise passes over every weight per
//! training step (division, log, scaling, round, clamp, exp, round, sign, products), the
//! largest cost of a GPU step after the matrix products; as one op it reads `W` and `ŝ` once.
//! The backward keeps the method's straight-through estimator: `P·2^E` is held constant, so
//! `∂L/∂ŝ_g = Σ_{j ∈ g} ∂L/∂W̃_j · P_j 2^{E_j} = (Σ_j ∂L/∂W̃_j · W̃_j) / ŝ_g` (exact: `W̃_j / ŝ_g`
//! is a power of two), one more pass, and `W` gets no gradient here (trained weights add
//! theirs outside).
//!
//! The op reads `Wᵀ` and writes `W̃ᵀ`, `[cols, rows]`: the block's linears compute `x · W̃ᵀ`,
//! whose weight gradient a matrix product then delivers in this same layout. With `W̃` itself,
//! candle would add the transposed gradient into a `[rows, cols]` buffer with strided reads, a
//! pass that cost three times a plain one; and trained weights, kept as `Wᵀ`, take their
//! straight-through gradient, `∂L/∂Wᵀ = ∂L/∂W̃ᵀ`, as it comes: the op passes it on when `Wᵀ`
//! carries a gradient.
//!
//! `W̃ᵀ` comes in f32, or in bf16 for bf16 products (the backward then reads the bf16
//! gradient), so that no f32 copy is made and converted.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::bf16;
use potptq_quant::pot::pot_exponent;
use rayon::prelude::*;

/// `W̃ᵀ` `[cols, rows]` in `out` (f32 or bf16) from the transposed weights `Wᵀ`
/// `[cols, rows]` and scales `[rows, groups]` of `group` columns of `W` (both f32); see the
/// module docs. The gradient reaches the scales, and `Wᵀ` straight through if it carries one.
pub fn pot_fake_quant_t(weights_t: &Tensor, scales: &Tensor, group: usize, qmax: u32, out: DType) -> Result<Tensor> {
    if !matches!(out, DType::F32 | DType::BF16) {
        candle_core::bail!("pot_fake_quant: W̃ in f32 or bf16, not {out:?}");
    }
    weights_t.apply_op2(scales, FakeQuant { group, qmax, bf16: out == DType::BF16, weight_grad: weights_t.track_op() })
}

/// `∂L/∂ŝ` `[rows, groups]` from `∂L/∂W̃ᵀ` (`grad`) and the op's output `W̃ᵀ` (f32 or bf16, the
/// same dtype) for scales `ŝ`, without recording a graph: the scales' side of the op's
/// backward.
pub fn pot_fake_quant_t_scale_grad(grad: &Tensor, fake_t: &Tensor, scales: &Tensor, group: usize, qmax: u32) -> Result<Tensor> {
    let bf16 = match (fake_t.dtype(), grad.dtype()) {
        (DType::F32, DType::F32) => false,
        (DType::BF16, DType::BF16) => true,
        (w, g) => candle_core::bail!("pot_fake_quant: W̃ᵀ and its gradient in f32 or bf16, one dtype (got {w:?} and {g:?})"),
    };
    let op = FakeQuant { group, qmax, bf16, weight_grad: false };
    grad.contiguous()?.apply_op3_no_bwd(&fake_t.contiguous()?, &scales.contiguous()?, &FakeQuantGrad(op))
}

#[derive(Clone, Copy)]
struct FakeQuant {
    group: usize,
    qmax: u32,
    /// `W̃ᵀ` in bf16.
    bf16: bool,
    /// Pass the gradient on to `Wᵀ`.
    weight_grad: bool,
}

/// `∂L/∂ŝ` from `∂L/∂W̃ᵀ`, `W̃ᵀ` and `ŝ` (an op without a gradient).
struct FakeQuantGrad(FakeQuant);

/// The level `±2^E` of weight `w` under scale `s`: `E` by the packer's rule
/// (`pot::pot_exponent` on the f32 ratio `|w| / s`), so that the codes Step 2 trains through
/// are the codes the checkpoint stores, ties included.
#[inline(always)]
fn level(w: f32, s: f32, qmax: u32) -> f32 {
    let magnitude = f32::from_bits((127 + pot_exponent(w.abs() / s, qmax)) << 23);
    if w >= 0.0 { magnitude } else { -magnitude }
}

/// `(rows, cols, groups)` of contiguous transposed weights `[cols, rows]` and scales
/// `[rows, groups]` that fit together.
fn check(lw: &Layout, ls: &Layout, group: usize) -> Result<(usize, usize, usize)> {
    let (cols, rows) = lw.shape().dims2()?;
    let groups = cols.div_ceil(group.max(1));
    if group == 0 || ls.shape().dims2()? != (rows, groups) || !lw.is_contiguous() || !ls.is_contiguous() {
        candle_core::bail!("pot_fake_quant: contiguous transposed weights [cols, rows] and scales [rows, cols / {group}] (got {:?} and {:?})", lw.shape(), ls.shape());
    }
    Ok((rows, cols, groups))
}

/// The contents of a contiguous f32 or bf16 operand, as f32.
fn widen<'a>(s: &'a CpuStorage, l: &Layout) -> Result<std::borrow::Cow<'a, [f32]>> {
    Ok(match s {
        CpuStorage::BF16(v) => v[l.start_offset()..l.start_offset() + l.shape().elem_count()].iter().map(|x| x.to_f32()).collect::<Vec<_>>().into(),
        _ => f32s(s, l)?.into(),
    })
}

fn f32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("pot_fake_quant: f32 weights and scales");
    };
    Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()])
}

impl CustomOp2 for FakeQuant {
    fn name(&self) -> &'static str {
        "pot-fake-quant"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, cols, groups) = check(l1, l2, self.group)?;
        let (wt, s) = (f32s(s1, l1)?, f32s(s2, l2)?);
        let qmax = self.qmax;
        let mut out = vec![0f32; rows * cols];
        if rows > 0 {
            // A task per group: its columns are `group` whole rows of `W̃ᵀ`, and its scales,
            // gathered once, line up with every one of them.
            out.par_chunks_mut(rows * self.group).zip(wt.par_chunks(rows * self.group)).enumerate().for_each(|(g, (o, w))| {
                let sg: Vec<f32> = (0..rows).map(|r| s[r * groups + g]).collect();
                for (o, w) in o.chunks_mut(rows).zip(w.chunks(rows)) {
                    o.iter_mut().zip(w).zip(&sg).for_each(|((o, &v), &s)| *o = s * level(v, s, qmax));
                }
            });
        }
        let out = if self.bf16 { CpuStorage::BF16(out.into_iter().map(bf16::from_f32).collect()) } else { CpuStorage::F32(out) };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (rows, cols, groups) = check(l1, l2, self.group)?;
        let w = crate::gpu::view::<f32>(s1, l1)?;
        let s = crate::gpu::view::<f32>(s2, l2)?;
        let out = cuda::fake_quant_t(s1.device(), self, (rows, cols, groups), &w, &s)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, _weights: &Tensor, scales: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let grad_weights = if self.weight_grad { Some(crate::ops::cast::cast(&grad, DType::F32)?) } else { None };
        Ok((grad_weights, Some(pot_fake_quant_t_scale_grad(&grad, res, scales, self.group, self.qmax)?)))
    }
}

impl CustomOp3 for FakeQuantGrad {
    fn name(&self) -> &'static str {
        "pot-fake-quant-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, cols, groups) = check(l1, l3, self.0.group)?;
        check(l2, l3, self.0.group)?;
        // The gradient and `W̃ᵀ` come in the op's output dtype.
        let (g, wt, s) = (widen(s1, l1)?, widen(s2, l2)?, f32s(s3, l3)?);
        // One task per group: its columns are whole rows of `W̃ᵀ`, read in order.
        let sums: Vec<Vec<f32>> = (0..groups)
            .into_par_iter()
            .map(|gi| {
                let mut acc = vec![0f32; rows];
                for c in gi * self.0.group..cols.min((gi + 1) * self.0.group) {
                    for ((a, &g), &w) in acc.iter_mut().zip(&g[c * rows..][..rows]).zip(&wt[c * rows..][..rows]) {
                        *a += g * w;
                    }
                }
                acc
            })
            .collect();
        let out = (0..rows * groups).map(|i| sums[i % groups][i / groups] / s[i]).collect();
        Ok((CpuStorage::F32(out), l3.shape().clone()))
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
        let (rows, cols, groups) = check(l1, l3, self.0.group)?;
        check(l2, l3, self.0.group)?;
        let s = crate::gpu::view::<f32>(s3, l3)?;
        let out = if self.0.bf16 {
            let (g, wt) = (crate::gpu::view::<bf16>(s1, l1)?, crate::gpu::view::<bf16>(s2, l2)?);
            cuda::scale_grad(s1.device(), "scale_grad_bf16", &self.0, (rows, cols, groups), &g, &wt, &s)?
        } else {
            let (g, wt) = (crate::gpu::view::<f32>(s1, l1)?, crate::gpu::view::<f32>(s2, l2)?);
            cuda::scale_grad(s1.device(), "scale_grad", &self.0, (rows, cols, groups), &g, &wt, &s)?
        };
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, s1.device().clone()), l3.shape().clone()))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};

    use super::FakeQuant;

    /// One thread per (row, group) of `W`, 128 rows a block: the thread keeps the group's scale
    /// and walks the group's rows of `Wᵀ` and `W̃ᵀ` (consecutive threads, consecutive
    /// addresses): `pot_fake_quant_t` writes `W̃ᵀ`, `scale_grad` sums `∂L/∂W̃ᵀ ⊙ W̃ᵀ`. bf16 is
    /// handled as its bits (NVRTC has no bf16 header); `W̃` rounds to nearest even.
    const SOURCE: &str = r#"
__device__ float load(const float* p, size_t i) { return p[i]; }
__device__ float load(const unsigned short* p, size_t i) { return __uint_as_float((unsigned int)p[i] << 16); }
__device__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ void store(unsigned short* p, size_t i, float v) {
    const unsigned int b = __float_as_uint(v);
    p[i] = (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

template <typename T>
__device__ void fake_quant(const float* __restrict__ wt, const float* __restrict__ s, T* __restrict__ out, unsigned int rows,
                           unsigned int cols, unsigned int groups, unsigned int group, int qmax, unsigned int sqrt2_mantissa) {
    const unsigned int r = blockIdx.x * blockDim.x + threadIdx.x, gi = blockIdx.y;
    if (r >= rows) return;
    const float sg = s[(size_t)r * groups + gi];
    const unsigned int end = min(cols, (gi + 1) * group);
    // Unrolled so that each thread has several loads in flight: at 4096 rows the grid fills
    // half the GPU's thread slots.
#pragma unroll 8
    for (unsigned int c = gi * group; c < end; ++c) {
        const float v = wt[(size_t)c * rows + r];
        // pot::pot_exponent: the ratio's exponent field, plus one from √2's mantissa on.
        const unsigned int ratio = __float_as_uint(fabsf(v) / sg) & 0x7fffffffu;
        const int e = min(max((int)(ratio >> 23) - 127 + (int)((ratio & 0x7fffffu) >= sqrt2_mantissa), 0), qmax);
        const float magnitude = __uint_as_float((unsigned int)(127 + e) << 23);
        store(out, (size_t)c * rows + r, sg * (v >= 0.f ? magnitude : -magnitude));
    }
}

template <typename T>
__device__ void scale_grad_of(const T* __restrict__ g, const T* __restrict__ wt, const float* __restrict__ s, float* __restrict__ out,
                              unsigned int rows, unsigned int cols, unsigned int groups, unsigned int group) {
    const unsigned int r = blockIdx.x * blockDim.x + threadIdx.x, gi = blockIdx.y;
    if (r >= rows) return;
    const unsigned int end = min(cols, (gi + 1) * group);
    float acc = 0.f;
#pragma unroll 8
    for (unsigned int c = gi * group; c < end; ++c) acc += load(g, (size_t)c * rows + r) * load(wt, (size_t)c * rows + r);
    out[(size_t)r * groups + gi] = acc / s[(size_t)r * groups + gi];
}

#define FAKE_QUANT(NAME, T) \
extern "C" __global__ void NAME(const float* __restrict__ wt, const float* __restrict__ s, T* __restrict__ out, unsigned int rows, \
                                unsigned int cols, unsigned int groups, unsigned int group, int qmax, unsigned int sqrt2_mantissa) { \
    fake_quant(wt, s, out, rows, cols, groups, group, qmax, sqrt2_mantissa); \
}
FAKE_QUANT(pot_fake_quant_t, float)
FAKE_QUANT(pot_fake_quant_t_bf16, unsigned short)

#define SCALE_GRAD(NAME, T) \
extern "C" __global__ void NAME(const T* __restrict__ g, const T* __restrict__ wt, const float* __restrict__ s, float* __restrict__ out, \
                                unsigned int rows, unsigned int cols, unsigned int groups, unsigned int group) { \
    scale_grad_of(g, wt, s, out, rows, cols, groups, group); \
}
SCALE_GRAD(scale_grad, float)
SCALE_GRAD(scale_grad_bf16, unsigned short)
"#;

    static PTX: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();

    const MODULE: &str = "potptq_fake_quant";

    fn u32s(dims: (usize, usize, usize), group: usize) -> candle_core::Result<[u32; 4]> {
        let fit = |v: usize| u32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("pot_fake_quant: {dims:?} does not fit the kernel's 32-bit indices")));
        Ok([fit(dims.0)?, fit(dims.1)?, fit(dims.2)?, fit(group)?])
    }

    pub fn fake_quant_t(dev: &CudaDevice, op: &FakeQuant, dims: (usize, usize, usize), w: &CudaView<f32>, s: &CudaView<f32>) -> candle_core::Result<candle_core::CudaStorage> {
        fn run<T: DeviceRepr + ValidAsZeroBits>(dev: &CudaDevice, name: &str, op: &FakeQuant, dims: (usize, usize, usize), w: &CudaView<f32>, s: &CudaView<f32>) -> candle_core::Result<CudaSlice<T>> {
            let (rows, cols, _) = dims;
            let [r, c, g, gs] = u32s(dims, op.group)?;
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc::<T>(rows * cols)? };
            if rows * cols == 0 {
                return Ok(out);
            }
            let (qmax, sqrt2_mantissa) = (op.qmax.min(i32::MAX as u32) as i32, potptq_quant::pot::SQRT2_MANTISSA);
            let f = dev.get_or_load_custom_func(name, MODULE, crate::gpu::ptx(&PTX, SOURCE)?)?;
            let mut b = f.builder();
            b.arg(w).arg(s).arg(&out).arg(&r).arg(&c).arg(&g).arg(&gs).arg(&qmax).arg(&sqrt2_mantissa);
            let cfg = LaunchConfig { grid_dim: (r.div_ceil(128), g, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: `w` and `out` hold rows · cols weights and `s` rows · groups scales (`check`).
            unsafe { b.launch(cfg) }.w()?;
            Ok(out)
        }
        Ok(if op.bf16 {
            candle_core::CudaStorage::wrap_cuda_slice(run::<half::bf16>(dev, "pot_fake_quant_t_bf16", op, dims, w, s)?, dev.clone())
        } else {
            candle_core::CudaStorage::wrap_cuda_slice(run::<f32>(dev, "pot_fake_quant_t", op, dims, w, s)?, dev.clone())
        })
    }

    /// `name`: `scale_grad` (f32 `g`, `wt`) or `scale_grad_bf16`.
    pub fn scale_grad<T: DeviceRepr>(dev: &CudaDevice, name: &str, op: &FakeQuant, dims: (usize, usize, usize), g: &CudaView<T>, wt: &CudaView<T>, s: &CudaView<f32>) -> candle_core::Result<CudaSlice<f32>> {
        let (rows, _, groups) = dims;
        let [r, c, gr, gs] = u32s(dims, op.group)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<f32>(rows * groups)? };
        if rows * groups == 0 {
            return Ok(out);
        }
        let f = dev.get_or_load_custom_func(name, MODULE, crate::gpu::ptx(&PTX, SOURCE)?)?;
        let mut b = f.builder();
        b.arg(g).arg(wt).arg(s).arg(&out).arg(&r).arg(&c).arg(&gr).arg(&gs);
        let cfg = LaunchConfig { grid_dim: (r.div_ceil(128), gr, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: `g` and `wt` hold cols · rows values and `s` rows · groups scales (`check`).
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::LN_2;

    use candle_core::{Device, Var};

    fn weights(rows: usize, cols: usize) -> Vec<f32> {
        let mut w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 1e-4).collect();
        w[5] = 0.0;
        w
    }

    /// `W̃` as tensor operations, groups spread by index, transposed like the op's output.
    fn plain(w: &Tensor, s: &Tensor, group: usize, qmax: u32) -> Tensor {
        let cols = w.dim(1).unwrap();
        let idx = Tensor::from_vec((0..cols).map(|c| (c / group) as u32).collect::<Vec<_>>(), cols, w.device()).unwrap();
        let spread = s.index_select(&idx, 1).unwrap();
        let sd = spread.detach();
        let e = ((w.abs().unwrap().div(&sd).unwrap().log().unwrap() / LN_2).unwrap().round().unwrap()).clamp(0.0, qmax as f64).unwrap();
        let sign = ((w.ge(0f64).unwrap().to_dtype(candle_core::DType::F32).unwrap() * 2.0).unwrap() - 1.0).unwrap();
        let levels = (e * LN_2).unwrap().exp().unwrap().round().unwrap().mul(&sign).unwrap();
        levels.mul(&spread).unwrap().t().unwrap()
    }

    /// The op's levels are the packer's codes, decoded: every weight, ratios one to three f32
    /// steps either side of each rounding tie `√2·2^k` included, trains with the exponent the
    /// checkpoint stores.
    #[test]
    fn levels_are_the_packed_codes() {
        let tie = |k: i32| f32::from_bits((127 << 23) | potptq_quant::pot::SQRT2_MANTISSA) * 2f32.powi(k);
        for bits in 2..=4u8 {
            let qmax = potptq_quant::pot::qmax(bits);
            let (rows, cols, group) = (5usize, 96usize, 32usize);
            let groups = cols / group;
            let s: Vec<f32> = (0..rows * groups).map(|i| 3e-3 * (1.0 + 0.37 * i as f32)).collect();
            let mut w = weights(rows, cols);
            // Ratios just around the ties, for every exponent, and w / s exactly those.
            let mut at = 0;
            for k in -1..=qmax as i32 {
                for d in -3i32..=3 {
                    let (r, c) = (at % rows, at / rows);
                    let ratio = f32::from_bits((tie(k).to_bits() as i32 + d) as u32);
                    w[r * cols + c] = if d % 2 == 0 { ratio } else { -ratio } * s[r * groups + c / group];
                    at += 1;
                }
            }
            let wt = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).unwrap().t().unwrap().contiguous().unwrap();
            let st = Tensor::from_vec(s.clone(), (rows, groups), &Device::Cpu).unwrap();
            let fused: Vec<f32> = pot_fake_quant_t(&wt, &st, group, qmax, DType::F32).unwrap().t().unwrap().flatten_all().unwrap().to_vec1().unwrap();
            for (i, (&v, &got)) in w.iter().zip(&fused).enumerate() {
                let scale = s[(i / cols) * groups + (i % cols) / group];
                let want = potptq_quant::pot::decode(potptq_quant::pot::encode(v, scale, bits), scale, bits);
                assert_eq!(got.to_bits(), want.to_bits(), "{bits} bits: w {v:e}, s {scale:e}, ratio {:e}", v.abs() / scale);
            }
        }
    }

    /// The op equals the tensor-op form, values exactly and scale gradients, with a ragged
    /// last group and with groups that tile the rows.
    #[test]
    fn equals_the_tensor_op_form() {
        for (rows, cols, group) in [(3usize, 112usize, 32usize), (2, 128, 64)] {
            let groups = cols.div_ceil(group);
            let w = Tensor::from_vec(weights(rows, cols), (rows, cols), &Device::Cpu).unwrap();
            let s = Var::from_tensor(&Tensor::from_vec((0..rows * groups).map(|i| 3e-4 + 2e-4 * i as f32).collect::<Vec<_>>(), (rows, groups), &Device::Cpu).unwrap()).unwrap();
            let probe = Tensor::from_vec((0..rows * cols).map(|i| (i % 5) as f32 - 2.0).collect::<Vec<_>>(), (cols, rows), &Device::Cpu).unwrap();
            for qmax in [1u32, 3, 7] {
                let fused = pot_fake_quant_t(&w.t().unwrap().contiguous().unwrap(), s.as_tensor(), group, qmax, candle_core::DType::F32).unwrap();
                let plain = plain(&w, s.as_tensor(), group, qmax);
                let (a, b): (Vec<f32>, Vec<f32>) = (fused.flatten_all().unwrap().to_vec1().unwrap(), plain.contiguous().unwrap().flatten_all().unwrap().to_vec1().unwrap());
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

    /// On a GPU (when there is one) the kernel gives the CPU's levels exactly (both divide in
    /// IEEE f32 and read the exponent off the bits), scale gradients within rounding.
    #[cfg(feature = "cuda")]
    #[test]
    fn gpu_equals_cpu() {
        let Some(gpu) = crate::ops::test_gpu() else { return };
        let (rows, cols, group) = (64usize, 1000usize, 128usize);
        let (n, groups) = (rows * cols, cols.div_ceil(group));
        let w: Vec<f32> = (0..n).map(|i| (((i * 2654435761usize) % 100003) as f32 / 100003.0 - 0.5) * 0.1).collect();
        let s: Vec<f32> = (0..rows * groups).map(|i| 1e-3 + 1e-5 * (i % 97) as f32).collect();
        for qmax in [1u32, 3, 7] {
            let run = |d: &Device| {
                let wt = Tensor::from_vec(w.clone(), (rows, cols), d).unwrap();
                let sv = Var::from_tensor(&Tensor::from_vec(s.clone(), (rows, groups), d).unwrap()).unwrap();
                let wt = wt.t().unwrap().contiguous().unwrap();
                let out = pot_fake_quant_t(&wt, sv.as_tensor(), group, qmax, candle_core::DType::F32).unwrap();
                // bf16 output: the f32 output rounded, on the GPU as on the CPU.
                let b: Vec<half::bf16> = pot_fake_quant_t(&wt, sv.as_tensor(), group, qmax, candle_core::DType::BF16).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                let f: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
                assert!(f.iter().zip(&b).all(|(f, b)| half::bf16::from_f32(*f) == *b));
                let probe = wt.sin().unwrap();
                let g = (&out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let g: Vec<f32> = g.get(sv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                (out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), g)
            };
            let (oc, gc) = run(&Device::Cpu);
            let (og, gg) = run(&gpu);
            let differ = oc.iter().zip(&og).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "qmax {qmax}: {differ} of {n} weights differ");
            for (a, b) in gc.iter().zip(&gg) {
                assert!((a - b).abs() <= 1e-3 * a.abs().max(1e-2), "qmax {qmax}: gradient {a} vs {b}");
            }
        }
    }

    /// bf16 output is the f32 output rounded to nearest even, its scale gradient the f32 one's
    /// within bf16 rounding; trained weights get the output's gradient, in f32.
    #[test]
    fn bf16_output_and_weight_gradient() {
        let (rows, cols, group) = (3usize, 96usize, 32usize);
        let wt = Var::from_tensor(&Tensor::from_vec(weights(rows, cols), (cols, rows), &Device::Cpu).unwrap()).unwrap();
        let s = Var::from_tensor(&Tensor::from_vec((0..rows * 3).map(|i| 3e-4 + 2e-4 * i as f32).collect::<Vec<_>>(), (rows, 3), &Device::Cpu).unwrap()).unwrap();
        let probe = Tensor::from_vec((0..rows * cols).map(|i| (i % 5) as f32 - 2.0).collect::<Vec<_>>(), (cols, rows), &Device::Cpu).unwrap();
        let run = |dtype: candle_core::DType| {
            let out = pot_fake_quant_t(wt.as_tensor(), s.as_tensor(), group, 7, dtype).unwrap();
            let g = (out.to_dtype(candle_core::DType::F32).unwrap() * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let gw: Vec<f32> = g.get(wt.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let gs: Vec<f32> = g.get(s.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            (out, gs, gw)
        };
        let (f, gs_f, gw_f) = run(candle_core::DType::F32);
        let (b, gs_b, gw_b) = run(candle_core::DType::BF16);
        assert_eq!(b.dtype(), candle_core::DType::BF16);
        let (f, b): (Vec<f32>, Vec<half::bf16>) = (f.flatten_all().unwrap().to_vec1().unwrap(), b.flatten_all().unwrap().to_vec1().unwrap());
        assert!(f.iter().zip(&b).all(|(f, b)| half::bf16::from_f32(*f) == *b));
        assert_eq!(gw_f, probe.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(gw_b, gw_f);
        for (x, y) in gs_f.iter().zip(&gs_b) {
            assert!((x - y).abs() <= 1e-2 * x.abs().max(1.0), "{x} vs {y}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        // `Wᵀ` of 2 rows × 12 columns.
        let wt = Tensor::zeros((12, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = |s: Tensor, group: usize| pot_fake_quant_t(&wt, &s, group, 3, candle_core::DType::F32).unwrap_err().to_string();
        let e = err(Tensor::ones((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(), 4);
        assert!(e.contains("scales [rows, cols / 4]"), "12 columns are 3 groups of 4: {e}");
        let e = err(Tensor::ones((2, 3), candle_core::DType::F64, &Device::Cpu).unwrap(), 4);
        assert!(e.contains("f32 weights and scales"), "{e}");
        let e = err(Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap(), 0);
        assert!(e.contains("pot_fake_quant"), "{e}");
        let e = pot_fake_quant_t(&wt, &Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap(), 4, 3, candle_core::DType::F16).unwrap_err().to_string();
        assert!(e.contains("W̃ in f32 or bf16, not F16"), "{e}");
        let e = pot_fake_quant_t(&wt.t().unwrap(), &Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap(), 4, 3, candle_core::DType::F32).unwrap_err().to_string();
        assert!(e.contains("contiguous transposed weights"), "a strided view: {e}");
        assert_eq!(pot_fake_quant_t(&wt, &Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap(), 4, 3, candle_core::DType::F32).unwrap().dims(), &[12, 2]);
        let empty = Tensor::zeros((12, 0), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(pot_fake_quant_t(&empty, &Tensor::ones((0, 3), candle_core::DType::F32, &Device::Cpu).unwrap(), 4, 3, candle_core::DType::F32).unwrap().dims(), &[12, 0]);
        // The scale gradient wants `W̃ᵀ` and its gradient in one dtype, f32 or bf16.
        let scales = Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        for (w_dtype, g_dtype) in [(candle_core::DType::F32, candle_core::DType::BF16), (candle_core::DType::F64, candle_core::DType::F64)] {
            let e = pot_fake_quant_t_scale_grad(&wt.to_dtype(g_dtype).unwrap(), &wt.to_dtype(w_dtype).unwrap(), &scales, 4, 3).unwrap_err().to_string();
            assert!(e.contains("W̃ᵀ and its gradient in f32 or bf16, one dtype"), "{w_dtype:?} / {g_dtype:?}: {e}");
        }
        assert_eq!(pot_fake_quant_t_scale_grad(&wt, &wt, &scales, 4, 3).unwrap().dims(), &[2, 3]);
    }
}
