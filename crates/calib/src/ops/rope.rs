//! Rotary position embedding (the non-interleaved form of Llama checkpoints in Hugging Face
//! order, `candle_nn::rotary_emb::rope`'s) with its gradient: each pair `(x_j, x_{j + d/2})` of
//! a head at position `t` is rotated by the angle whose cosine and sine are `cos[t, j]` and
//! `sin[t, j]`. A rotation's gradient is the rotation back, the same op with `−sin`.
//!
//! Attention wants its operands head by head, `[batch, heads, seq, head_dim]`, while the
//! linears make and take them token by token, `[batch, seq, heads, head_dim]`. The op reads one
//! layout and writes either, so the change of layout costs no pass of its own: `rope_to_heads`
//! rotates the linears' queries and keys into attention's layout, and its gradient comes back in
//! the linears' layout.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::map_cpu;

/// `x` `[batch, heads, seq, head_dim]` rotated by the tables `cos`, `sin` `[≥ seq, head_dim / 2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    apply(x, cos, sin, Rope { back: false, tokens_in: false, tokens_out: false })
}

/// `x` `[batch, seq, heads, head_dim]` rotated, as `[batch, heads, seq, head_dim]`.
pub fn rope_to_heads(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    apply(x, cos, sin, Rope { back: false, tokens_in: true, tokens_out: false })
}

/// `∂L/∂x` `[batch, seq, heads, head_dim]` of `rope_to_heads(x, cos, sin)` from `∂L/∂y`
/// `[batch, heads, seq, head_dim]` (`grad`), without recording a graph.
pub fn rope_to_heads_grad(grad: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Rope { back: false, tokens_in: true, tokens_out: false }.grad(grad, cos, sin)
}

fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, op: Rope) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, op)
}

/// `back`: rotate by the opposite angles (the gradient). `tokens_in` / `tokens_out`: the
/// operand / result is `[batch, seq, heads, head_dim]` (else `[batch, heads, seq, head_dim]`).
#[derive(Clone, Copy)]
struct Rope {
    back: bool,
    tokens_in: bool,
    tokens_out: bool,
}

/// The operand's `(seq, heads, head_dim)` where it and the tables fit.
fn check(op: &Rope, lx: &Layout, lc: &Layout, ls: &Layout) -> Result<(usize, usize, usize)> {
    let dims = lx.shape().dims();
    let ok = dims.len() == 4 && dims[3].is_multiple_of(2) && lx.is_contiguous() && lc.is_contiguous() && ls.is_contiguous();
    let (seq, heads, d) = match (ok, op.tokens_in) {
        (false, _) => (0, 0, 0),
        (true, true) => (dims[1], dims[2], dims[3]),
        (true, false) => (dims[2], dims[1], dims[3]),
    };
    let table_ok = |l: &Layout| matches!(l.shape().dims2(), Ok((rows, half)) if rows >= seq && half * 2 == d);
    if !ok || !table_ok(lc) || !table_ok(ls) {
        candle_core::bail!("rope: contiguous [batch, heads, seq, head_dim] (or [batch, seq, heads, head_dim]) and tables [≥ seq, head_dim / 2] (got {:?}, {:?}, {:?})", lx.shape(), lc.shape(), ls.shape());
    }
    Ok((seq, heads, d))
}

impl Rope {
    /// The gradient's op: the rotation back, from the result's layout to the operand's.
    fn transposed(&self) -> Self {
        Self { back: !self.back, tokens_in: self.tokens_out, tokens_out: self.tokens_in }
    }

    fn grad(&self, grad: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        grad.contiguous()?.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &self.transposed())
    }

    /// The result's shape for an operand of `shape` (`[b, a, c, d]`).
    fn out_shape(&self, shape: &Shape) -> Shape {
        let d = shape.dims();
        if self.tokens_in == self.tokens_out { shape.clone() } else { Shape::from((d[0], d[2], d[1], d[3])) }
    }

    /// The operand row that result row `row` (of `batch · seq · heads`) reads.
    fn source_row(&self, row: usize, seq: usize, heads: usize) -> (usize, usize) {
        let (b, rest) = (row / (seq * heads), row % (seq * heads));
        let (t, h) = if self.tokens_out { (rest / heads, rest % heads) } else { (rest % seq, rest / seq) };
        let from = if self.tokens_in { (b * seq + t) * heads + h } else { (b * heads + h) * seq + t };
        (from, t)
    }

    fn cpu<T: WithDType>(&self, x: &[T], cos: &[T], sin: &[T], (seq, heads, d): (usize, usize, usize)) -> Vec<T> {
        let half = d / 2;
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(d).enumerate().for_each(|(row, y)| {
            let (from, t) = self.source_row(row, seq, heads);
            let x = &x[from * d..][..d];
            let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
            for j in 0..half {
                let (c, s) = (c[j].to_f64(), if self.back { -s[j].to_f64() } else { s[j].to_f64() });
                let (a, b) = (x[j].to_f64(), x[j + half].to_f64());
                y[j] = T::from_f64(a * c - b * s);
                y[j + half] = T::from_f64(b * c + a * s);
            }
        });
        y
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = check(self, l1, l2, l3)?;
        let out = map_cpu("rope", (s1, l1), (s2, l2), (s3, l3), |x, c, s| self.cpu(x, c, s, dims), |x, c, s| self.cpu(x, c, s, dims))?;
        Ok((out, self.out_shape(l1.shape())))
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
        let dims = check(self, l1, l2, l3)?;
        let x = crate::gpu::view::<f32>(s1, l1)?;
        let c = crate::gpu::view::<f32>(s2, l2)?;
        let s = crate::gpu::view::<f32>(s3, l3)?;
        let out = cuda::launch(s1.device(), self, l1.shape().elem_count(), dims, &x, &c, &s)?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, s1.device().clone()), self.out_shape(l1.shape())))
    }

    fn bwd(&self, _x: &Tensor, cos: &Tensor, sin: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.grad(grad_res, cos, sin)?), None, None))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};

    /// One thread per pair `(x_j, x_{j + d/2})` of the result, which reads its operand row in
    /// either layout (`Rope::source_row`).
    const SOURCE: &str = r#"
extern "C" __global__ void rope(const float* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                                float* __restrict__ y, unsigned int pairs, unsigned int seq, unsigned int heads, unsigned int half,
                                float sign, unsigned int tokens_in, unsigned int tokens_out) {
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= pairs) return;
    const unsigned int row = i / half, j = i - row * half;
    const unsigned int b = row / (seq * heads), rest = row - b * (seq * heads);
    const unsigned int t = tokens_out ? rest / heads : rest % seq;
    const unsigned int h = tokens_out ? rest % heads : rest / seq;
    const size_t from = tokens_in ? ((size_t)b * seq + t) * heads + h : ((size_t)b * heads + h) * seq + t;
    const float c = cos[t * half + j], s = sign * sin[t * half + j];
    const float a = x[from * 2 * half + j], bb = x[from * 2 * half + j + half];
    const size_t at = (size_t)row * 2 * half + j;
    y[at] = a * c - bb * s;
    y[at + half] = bb * c + a * s;
}
"#;

    #[allow(clippy::too_many_arguments)]
    pub fn launch(dev: &CudaDevice, op: &super::Rope, n: usize, (seq, heads, d): (usize, usize, usize), x: &CudaView<f32>, cos: &CudaView<f32>, sin: &CudaView<f32>) -> candle_core::Result<CudaSlice<f32>> {
        static PTX: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();
        let func = dev.get_or_load_custom_func("rope", "potptq_rope", crate::gpu::ptx(&PTX, SOURCE)?)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { dev.alloc::<f32>(n)? };
        let pairs = u32::try_from(n / 2).map_err(|_| candle_core::Error::Msg(format!("rope: {n} elements do not fit the kernel's 32-bit indices")))?;
        if pairs == 0 {
            return Ok(out);
        }
        let (seq, heads, half, sign) = (seq as u32, heads as u32, (d / 2) as u32, if op.back { -1f32 } else { 1f32 });
        let (tokens_in, tokens_out) = (op.tokens_in as u32, op.tokens_out as u32);
        let mut b = func.builder();
        b.arg(x).arg(cos).arg(sin).arg(&out).arg(&pairs).arg(&seq).arg(&heads).arg(&half).arg(&sign).arg(&tokens_in).arg(&tokens_out);
        let cfg = LaunchConfig { grid_dim: (pairs.div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: `x` and `out` hold n elements, the tables seq · d / 2 (`check`).
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn tables(seq: usize, half: usize, dtype: DType, device: &Device) -> (Tensor, Tensor) {
        let angle: Vec<f64> = (0..seq * half).map(|i| (i / half) as f64 * 10000f64.powf(-((i % half) as f64) / half as f64)).collect();
        let t = |f: fn(f64) -> f64| Tensor::from_vec(angle.iter().map(|&a| f(a)).collect::<Vec<_>>(), (seq, half), device).unwrap().to_dtype(dtype).unwrap();
        (t(f64::cos), t(f64::sin))
    }

    fn input(shape: (usize, usize, usize, usize), dtype: DType, device: &Device) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        Tensor::from_vec((0..n).map(|i| ((i * 7919 % 1009) as f64 - 504.0) * 0.01).collect::<Vec<_>>(), shape, device).unwrap().to_dtype(dtype).unwrap()
    }

    /// Values equal `rope_slow` (f64) and candle's fused rope (f32); the gradient equals
    /// `rope_slow`'s.
    #[test]
    fn equals_candle_rope() {
        let shape = (2, 3, 5, 8);
        let (cos, sin) = tables(7, 4, DType::F64, &Device::Cpu);
        let x = Var::from_tensor(&input(shape, DType::F64, &Device::Cpu)).unwrap();
        let probe = x.as_tensor().sin().unwrap().detach();
        let (c5, s5) = (cos.narrow(0, 0, 5).unwrap(), sin.narrow(0, 0, 5).unwrap());
        let ours = rope(x.as_tensor(), &cos, &sin).unwrap();
        let slow = candle_nn::rotary_emb::rope_slow(x.as_tensor(), &c5, &s5).unwrap();
        let d = (&ours - &slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(d < 1e-12, "values differ by {d}");
        let go = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (&slow * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let d = (go.get(x.as_tensor()).unwrap() - gs.get(x.as_tensor()).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(d < 1e-12, "gradients differ by {d}");
        let (x32, c32, s32) = (x.as_tensor().to_dtype(DType::F32).unwrap(), c5.to_dtype(DType::F32).unwrap(), s5.to_dtype(DType::F32).unwrap());
        let d = (rope(&x32, &c32, &s32).unwrap() - candle_nn::rotary_emb::rope(&x32, &c32, &s32).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "f32 values differ from candle's rope by {d}");
    }

    /// `rope_to_heads` equals `rope` of the transposed operand, in values and gradients (f64),
    /// and its explicit gradient equals autograd's.
    #[test]
    fn to_heads_equals_rope_of_the_transpose() {
        let (cos, sin) = tables(6, 4, DType::F64, &Device::Cpu);
        let x = Var::from_tensor(&input((2, 5, 3, 8), DType::F64, &Device::Cpu)).unwrap();
        let ours = rope_to_heads(x.as_tensor(), &cos, &sin).unwrap();
        let theirs = rope(&x.as_tensor().transpose(1, 2).unwrap(), &cos, &sin).unwrap();
        assert_eq!(ours.dims(), &[2, 3, 5, 8]);
        let max_diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-12);
        let probe = ours.cos().unwrap().detach();
        let go = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gt = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g = go.get(x.as_tensor()).unwrap();
        assert!(max_diff(g, gt.get(x.as_tensor()).unwrap()) < 1e-12);
        assert!(max_diff(&rope_to_heads_grad(&probe, &cos, &sin).unwrap(), g) == 0.0);
        // The gradient is the rotation back, not the rotation.
        assert!(max_diff(&g.transpose(1, 2).unwrap().contiguous().unwrap(), &rope(&probe, &cos, &sin).unwrap()) > 1e-3, "the rotation back differs");
    }

    #[test]
    fn bad_operands_are_errors() {
        let (cos, sin) = tables(4, 4, DType::F32, &Device::Cpu);
        for shape in [(1, 1, 5, 8), (1, 1, 4, 6)] {
            let e = rope(&input(shape, DType::F32, &Device::Cpu), &cos, &sin).unwrap_err().to_string();
            assert!(e.contains("rope: contiguous"), "{shape:?}: {e}");
        }
        let e = rope(&input((1, 1, 4, 8), DType::F16, &Device::Cpu), &cos.to_dtype(DType::F16).unwrap(), &sin.to_dtype(DType::F16).unwrap()).unwrap_err().to_string();
        assert!(e.contains("f32 or f64"), "{e}");
    }

    /// On a GPU (when there is one) the kernel gives the CPU's values and gradients.
    #[cfg(feature = "cuda")]
    #[test]
    fn gpu_equals_cpu() {
        let Some(gpu) = crate::ops::test_gpu() else { return };
        let run = |d: &Device| {
            let (cos, sin) = tables(40, 32, DType::F32, d);
            let x = Var::from_tensor(&input((2, 3, 33, 64), DType::F32, d)).unwrap();
            let y = rope(x.as_tensor(), &cos, &sin).unwrap();
            let g = (&y * x.as_tensor().cos().unwrap().detach()).unwrap().sum_all().unwrap().backward().unwrap();
            let mut g = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // The same operand read as [batch, seq, heads, head_dim].
            let t = rope_to_heads(x.as_tensor(), &cos, &sin).unwrap();
            let gt = rope_to_heads_grad(&t.sin().unwrap(), &cos, &sin).unwrap();
            y.extend(t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            g.extend(gt.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            (y, g)
        };
        let ((yc, gc), (yg, gg)) = (run(&Device::Cpu), run(&gpu));
        for (a, b) in yc.iter().zip(&yg).chain(gc.iter().zip(&gg)) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
        }
    }
}
