//! The kernels crate's products as candle operations, so the forward pass stays one piece of
//! tensor code: the input is read in place, the output is a new tensor, nothing is expanded.

use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use half::f16;
use potptq_kernels::{Isa, PackedMatrix};

fn candle_err(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{e:#}"))
}

/// The contiguous f32 values of an input, and its dims.
fn f32_input<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(x) = storage else {
        return Err(candle_core::Error::Msg(format!("{op}: the input must be f32, found {:?}", storage.dtype())));
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&x[start..end]),
        None => Err(candle_core::Error::Msg(format!("{op}: the input must be contiguous"))),
    }
}

/// `[.., cols]` → `(tokens, output dims [.., rows])`.
pub(crate) fn output_shape(layout: &Layout, cols: usize, rows: usize, op: &str) -> candle_core::Result<(usize, Shape)> {
    let dims = layout.dims();
    if dims.last() != Some(&cols) {
        return Err(candle_core::Error::Msg(format!("{op}: input {dims:?} does not end in {cols} features")));
    }
    let mut out = dims.to_vec();
    *out.last_mut().expect("non-empty dims") = rows;
    Ok((dims.iter().product::<usize>() / cols, Shape::from(out)))
}

struct PackedMatMul<'a>(&'a PackedMatrix);

impl CustomOp1 for PackedMatMul<'_> {
    fn name(&self) -> &'static str {
        "potptq-packed-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let m = self.0;
        let x = f32_input(storage, layout, self.name())?;
        let (tokens, shape) = output_shape(layout, m.cols(), m.rows(), self.name())?;
        let mut y = vec![0f32; tokens * m.rows()];
        potptq_kernels::matmul(m, x, tokens, &mut y).map_err(candle_err)?;
        Ok((CpuStorage::F32(y), shape))
    }
}

/// `x Wᵀ` for a packed `W`; `x` of shape `[.., in]`.
pub fn packed_matmul(x: &Tensor, m: &PackedMatrix) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1_no_bwd(&PackedMatMul(m))?)
}

struct F16MatMul;

impl CustomOp2 for F16MatMul {
    fn name(&self) -> &'static str {
        "potptq-f16-matmul"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ws: &CpuStorage, wl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_input(xs, xl, self.name())?;
        let (CpuStorage::F16(w), Some((start, end)), &[rows, cols]) = (ws, wl.contiguous_offsets(), wl.dims()) else {
            return Err(candle_core::Error::Msg(format!("{}: the weight must be a contiguous f16 matrix", self.name())));
        };
        let (tokens, shape) = output_shape(xl, cols, rows, self.name())?;
        let bits: &[u16] = bytemuck::cast_slice::<f16, u16>(&w[start..end]);
        let mut y = vec![0f32; tokens * rows];
        potptq_kernels::matmul_f16(Isa::best(), bits, rows, cols, x, tokens, &mut y).map_err(candle_err)?;
        Ok((CpuStorage::F32(y), shape))
    }
}

/// `x Wᵀ` for an f16 `W` of `[out, in]`.
pub fn f16_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    anyhow::ensure!(w.dtype() == DType::F16, "f16_matmul: the weight is {:?}", w.dtype());
    Ok(x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &F16MatMul)?)
}
