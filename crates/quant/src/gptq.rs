//! GPTQ (Frantar et al.): quantize a layer column by column, feeding each column's error back
//! into the columns not yet quantized, weighted by the inverse Hessian of the layer's input.
//! Generic over the quantizer: INT min-max (the baseline) or PoT with Step-1 scales.
//!
//! As in the reference implementation: dead inputs (`H_ii = 0`) get `H_ii = 1` and zero
//! weights; the diagonal is dampened by `damp ·` its mean; the error of column `i` is scaled by
//! the upper Cholesky factor `U` of `H⁻¹` (`Uᵀ U = H⁻¹`); updates are lazy, one matrix product
//! per block of columns for the rest of the row. A group's parameters are fixed when its first
//! column is reached, from the error-updated weights — or, with act-order, up front from the
//! original weights ("static groups"), since act-order visits a group's columns out of order.
//!
//! `gptq` is the fast form (blocked, rows in parallel, faer for the factorizations and the
//! trailing products); `gptq_reference` is the plain column-by-column loop it must equal.

use std::ops::Range;

use anyhow::{anyhow, ensure, Result};
use faer::linalg::matmul::{matmul, triangular};
use faer::prelude::*;
use faer::linalg::triangular_inverse::invert_lower_triangular;
use faer::{Accum, Side};
use rayon::prelude::*;

use crate::qtensor::{check_bits, check_input, Format, GroupLayout, QTensor};
use crate::quantizer::{GroupParams, GroupQuantizer};
use crate::step1::Grid;

/// `H = 2/N · Σ x xᵀ` over the N input rows (tokens) seen so far.
#[derive(Debug, Clone)]
pub struct Hessian {
    pub cols: usize,
    pub samples: usize,
    /// `Σ x xᵀ`, lower triangle only (row-major, `i ≥ j`), summed in f64 across calls.
    sum: Vec<f64>,
}

impl Hessian {
    pub fn new(cols: usize) -> Self {
        Self { cols, samples: 0, sum: vec![0.0; cols * cols] }
    }

    /// Adds `x`, `[tokens, cols]` row-major.
    pub fn add(&mut self, x: &[f32], tokens: usize) {
        let n = self.cols;
        assert_eq!(x.len(), tokens * n, "Hessian::add: {} values for [{tokens}, {n}]", x.len());
        if tokens == 0 {
            return;
        }
        // xᵀx in f32 by faer (only the lower triangle: it is symmetric), then into the f64 sum.
        let x = MatRef::from_row_major_slice(x, tokens, n);
        let mut xtx = Mat::<f32>::zeros(n, n);
        triangular::matmul(
            xtx.as_mut(),
            triangular::BlockStructure::TriangularLower,
            Accum::Replace,
            x.transpose(),
            triangular::BlockStructure::Rectangular,
            x,
            triangular::BlockStructure::Rectangular,
            1.0f32,
            Par::rayon(0),
        );
        self.sum.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            for (j, s) in row[..=i].iter_mut().enumerate() {
                *s += xtx[(i, j)] as f64;
            }
        });
        self.samples += tokens;
    }

    /// Adds a Gram matrix `xᵀx` (`[cols, cols]`, row-major, symmetric) of `tokens` input rows,
    /// computed elsewhere (e.g. on a GPU).
    pub fn add_gram(&mut self, gram: &[f32], tokens: usize) {
        let n = self.cols;
        assert_eq!(gram.len(), n * n, "Hessian::add_gram: {} values for [{n}, {n}]", gram.len());
        self.sum.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            for (j, s) in row[..=i].iter_mut().enumerate() {
                *s += gram[i * n + j] as f64;
            }
        });
        self.samples += tokens;
    }

    /// The full symmetric `H`, row-major.
    pub fn matrix(&self) -> Vec<f64> {
        let n = self.cols;
        let k = if self.samples > 0 { 2.0 / self.samples as f64 } else { 0.0 };
        let mut h = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..=i {
                let v = self.sum[i * n + j] * k;
                h[i * n + j] = v;
                h[j * n + i] = v;
            }
        }
        h
    }

    pub fn diag(&self) -> Vec<f32> {
        let k = if self.samples > 0 { 2.0 / self.samples as f64 } else { 0.0 };
        (0..self.cols).map(|i| (self.sum[i * self.cols + i] * k) as f32).collect()
    }
}

#[derive(Debug, Clone)]
pub struct GptqOptions {
    /// Added to the diagonal, as a fraction of its mean.
    pub damp: f32,
    /// Columns per lazy batch.
    pub block: usize,
    /// Quantize columns in order of decreasing Hessian diagonal (with static groups).
    pub act_order: bool,
    /// PoT: each group's scale search weights its columns by the Hessian diagonal (`E[x²]`).
    pub weighted_scales: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        Self { damp: 0.01, block: 128, act_order: false, weighted_scales: false }
    }
}

impl GptqOptions {
    pub fn check(&self) -> Result<()> {
        ensure!(self.damp.is_finite() && self.damp >= 0.0, "GPTQ damp must be a finite value ≥ 0 (got {})", self.damp);
        ensure!(self.block > 0, "GPTQ block must be at least one column");
        Ok(())
    }
}

/// GPTQ with lazy batches; rows are independent within a batch and run in parallel.
#[allow(clippy::too_many_arguments)]
pub fn gptq(
    name: &str,
    w: &[f32],
    layout: GroupLayout,
    hessian: &Hessian,
    format: Format,
    bits: u8,
    grid: &Grid,
    opts: &GptqOptions,
) -> Result<QTensor> {
    Ok(gptq_with_inputs(name, w, layout, hessian, format, bits, grid, opts)?.0)
}

/// `gptq`, also returning the weights each column was rounded from (the original weights plus
/// the error feedback they received), row-major in the original column order: rounding them
/// with the returned scales gives the returned codes.
#[allow(clippy::too_many_arguments)]
pub fn gptq_with_inputs(
    name: &str,
    w: &[f32],
    layout: GroupLayout,
    hessian: &Hessian,
    format: Format,
    bits: u8,
    grid: &Grid,
    opts: &GptqOptions,
) -> Result<(QTensor, Vec<f32>)> {
    let mut p = Problem::new(name, w, layout, hessian, format, bits, grid, opts)?;
    let (rows, cols, gpr) = (layout.rows, layout.cols, layout.groups_per_row());
    let blocks = column_blocks(cols, layout.group_size, opts.block, opts.act_order);
    let widest = blocks.iter().map(|b| b.len()).max().unwrap_or(0);
    // err[r, i − block start]: column i's error over U_ii, for the trailing product.
    let mut err = vec![0f32; rows * widest];
    let mut codes = vec![0u8; rows * cols];
    for block in blocks {
        let Problem { w, u, params, order, column_weights, .. } = &mut p;
        let (u, order, column_weights) = (&u[..], &order[..], column_weights.as_deref());
        w.par_chunks_mut(cols)
            .zip(codes.par_chunks_mut(cols))
            .zip(err.par_chunks_mut(widest))
            .zip(params.par_chunks_mut(gpr))
            .with_min_len(4)
            .map_init(
                || GroupQuantizer::searched(format, bits, grid),
                |q, (((w_row, code_row), err_row), params_row)| {
                    for i in block.clone() {
                        let e = quantize_column(q, layout, order, u, i, w_row, code_row, params_row, column_weights);
                        err_row[i - block.start] = e;
                        // Feedback inside the block, now; the rest of the row waits for the product.
                        let u_row = &u[i * cols..(i + 1) * cols];
                        for (wj, uj) in w_row[i + 1..block.end].iter_mut().zip(&u_row[i + 1..block.end]) {
                            *wj -= e * uj;
                        }
                    }
                },
            )
            .for_each(drop);
        // W[:, end..] −= Err · U[block, end..]: one product for every later column.
        if block.end < cols {
            let rest = cols - block.end;
            let target = row_major_mut(&mut w[block.end..], rows, rest, cols);
            let errors = MatRef::from_row_major_slice_with_stride(&err[..], rows, block.len(), widest);
            let factor = MatRef::from_row_major_slice_with_stride(&u[block.start * cols + block.end..], block.len(), rest, cols);
            matmul(target, Accum::Add, errors, factor, -1.0f32, Par::rayon(0));
        }
    }
    let inputs = p.unpermuted_weights();
    Ok((p.finish(codes), inputs))
}

/// A row-major view with a row stride. Not faer's `from_row_major_slice_with_stride_mut`:
/// in faer 0.24.4 it builds a column-major view (strides swapped), so a product written
/// through it lands outside the slice. The transposed column-major view is the right one.
fn row_major_mut(slice: &mut [f32], rows: usize, cols: usize, row_stride: usize) -> MatMut<'_, f32> {
    MatMut::from_column_major_slice_with_stride_mut(slice, cols, rows, row_stride).transpose_mut()
}

/// The plain algorithm: one column at a time, its feedback applied at once to every later
/// column. `gptq` computes the same, reordered for speed.
#[allow(clippy::too_many_arguments)]
pub fn gptq_reference(
    name: &str,
    w: &[f32],
    layout: GroupLayout,
    hessian: &Hessian,
    format: Format,
    bits: u8,
    grid: &Grid,
    opts: &GptqOptions,
) -> Result<QTensor> {
    let mut p = Problem::new(name, w, layout, hessian, format, bits, grid, opts)?;
    let (cols, gpr) = (layout.cols, layout.groups_per_row());
    let mut q = GroupQuantizer::searched(format, bits, grid);
    let mut codes = vec![0u8; layout.rows * cols];
    for r in 0..layout.rows {
        let w_row = &mut p.w[r * cols..(r + 1) * cols];
        let params_row = &mut p.params[r * gpr..(r + 1) * gpr];
        for i in 0..cols {
            let cw = p.column_weights.as_deref();
            let e = quantize_column(&mut q, layout, &p.order, &p.u, i, w_row, &mut codes[r * cols..(r + 1) * cols], params_row, cw);
            for (wj, uj) in w_row[i + 1..].iter_mut().zip(&p.u[i * cols + i + 1..(i + 1) * cols]) {
                *wj -= e * uj;
            }
        }
    }
    Ok(p.finish(codes))
}

/// Quantizes processing position `i` of one row (fixing its group's parameters first if `i`
/// opens the group) and returns the error scaled by `1 / U_ii`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn quantize_column(
    q: &mut GroupQuantizer,
    layout: GroupLayout,
    order: &[usize],
    u: &[f32],
    i: usize,
    w_row: &mut [f32],
    code_row: &mut [u8],
    params_row: &mut [Option<GroupParams>],
    column_weights: Option<&[f32]>,
) -> f32 {
    let g = order[i] / layout.group_size;
    let p = match params_row[g] {
        Some(p) => p,
        None => {
            // Without act-order the order is the identity: the group's columns are here, ahead.
            let cols = layout.group_cols(g);
            let p = q.params_weighted(&w_row[cols.clone()], column_weights.map(|c| &c[cols]));
            params_row[g] = Some(p);
            p
        }
    };
    let x = w_row[i];
    let code = q.encode(p, x);
    code_row[i] = code;
    (x - q.decode(p, code)) / u[i * layout.cols + i]
}

/// Column blocks for the lazy updates. A group's parameters come from weights that have had
/// the feedback of every earlier column; a block that ended inside a group would leave the
/// group's later columns without part of it. So blocks hold whole groups (as many as fit in
/// `block` columns), and a group wider than `block` opens a block of its own and is cut into
/// `block`-wide pieces after it. With act-order (static groups) any cut is fine.
fn column_blocks(cols: usize, group: usize, block: usize, act_order: bool) -> Vec<Range<usize>> {
    let (span, piece) = if act_order {
        (block, block)
    } else if group <= block {
        let whole = block / group * group;
        (whole, whole)
    } else {
        (group, block)
    };
    (0..cols)
        .step_by(span)
        .flat_map(|s| {
            let end = (s + span).min(cols);
            (s..end).step_by(piece).map(move |b| b..(b + piece).min(end))
        })
        .collect()
}

/// What both loops start from: weights in processing order, `U` in that order, group
/// parameters (static ones already set).
struct Problem<'g> {
    layout: GroupLayout,
    format: Format,
    bits: u8,
    /// Processing position → original column.
    order: Vec<usize>,
    /// Row-major `[rows, cols]`, columns in processing order; updated in place.
    w: Vec<f32>,
    /// Upper factor of the dampened `H⁻¹`, processing order, row-major.
    u: Vec<f32>,
    /// `[rows, groups_per_row]`, by original group index.
    params: Vec<Option<GroupParams>>,
    /// The Hessian diagonal by original column, when scale searches are weighted by it.
    column_weights: Option<Vec<f32>>,
    _grid: std::marker::PhantomData<&'g Grid>,
}

impl<'g> Problem<'g> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: &str,
        w: &[f32],
        layout: GroupLayout,
        hessian: &Hessian,
        format: Format,
        bits: u8,
        grid: &'g Grid,
        opts: &GptqOptions,
    ) -> Result<Self> {
        check_bits(format, bits)?;
        check_input(name, w, layout)?;
        grid.check()?;
        opts.check()?;
        let (rows, cols) = (layout.rows, layout.cols);
        ensure!(hessian.cols == cols, "tensor `{name}`: Hessian of {} columns for {cols} input features", hessian.cols);
        ensure!(hessian.samples > 0, "tensor `{name}`: the Hessian has no samples");
        let mut h = hessian.matrix();
        ensure!(h.iter().all(|v| v.is_finite()), "tensor `{name}`: the Hessian has non-finite entries (NaN/Inf activations?)");
        let mut w = w.to_vec();

        // Dead inputs: the weight never matters; make H invertible there and the weight 0.
        for c in 0..cols {
            if h[c * cols + c] == 0.0 {
                h[c * cols + c] = 1.0;
                (0..rows).for_each(|r| w[r * cols + c] = 0.0);
            }
        }
        let gpr = layout.groups_per_row();
        let mut params = vec![None; rows * gpr];
        let column_weights = (opts.weighted_scales && format == Format::Pot).then(|| hessian.diag());
        let order: Vec<usize> = if opts.act_order {
            // Static groups, from the original (dead-zeroed) weights.
            params.par_chunks_mut(gpr).zip(w.par_chunks(cols)).for_each_init(
                || GroupQuantizer::searched(format, bits, grid),
                |q, (slots, row)| {
                    for (g, slot) in slots.iter_mut().enumerate() {
                        let cols = layout.group_cols(g);
                        *slot = Some(q.params_weighted(&row[cols.clone()], column_weights.as_deref().map(|c| &c[cols])));
                    }
                },
            );
            let mut order: Vec<usize> = (0..cols).collect();
            order.sort_by(|&a, &b| h[b * cols + b].total_cmp(&h[a * cols + a]));
            order
        } else {
            (0..cols).collect()
        };
        let (w, h) = if opts.act_order { permute(w, h, rows, &order) } else { (w, h) };
        let u = inverse_hessian_factor(name, h, cols, opts.damp as f64)?;
        Ok(Self { layout, format, bits, order, w, u, params, column_weights, _grid: std::marker::PhantomData })
    }

    /// The weights as updated in place, in the original column order.
    fn unpermuted_weights(&self) -> Vec<f32> {
        let cols = self.layout.cols;
        let mut original = vec![0f32; self.w.len()];
        original.par_chunks_mut(cols).zip(self.w.par_chunks(cols)).for_each(|(out, row)| {
            for (i, &c) in self.order.iter().enumerate() {
                out[c] = row[i];
            }
        });
        original
    }

    /// Codes back in the original column order, with the group parameters.
    fn finish(self, codes: Vec<u8>) -> QTensor {
        let cols = self.layout.cols;
        let mut original = vec![0u8; codes.len()];
        original.par_chunks_mut(cols).zip(codes.par_chunks(cols)).for_each(|(out, row)| {
            for (i, &c) in self.order.iter().enumerate() {
                out[c] = row[i];
            }
        });
        let params = self.params.into_iter().map(|p| p.expect("every group was quantized")).collect();
        QTensor::assemble(self.format, self.bits, self.layout, original, params)
    }
}

/// `W` and `H` with columns (and H's rows) in processing order; the originals are dropped.
fn permute(w: Vec<f32>, h: Vec<f64>, rows: usize, order: &[usize]) -> (Vec<f32>, Vec<f64>) {
    let n = order.len();
    let mut wp = vec![0f32; rows * n];
    wp.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
        for (i, &c) in order.iter().enumerate() {
            row[i] = w[r * n + c];
        }
    });
    let mut hp = vec![0f64; n * n];
    hp.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for (j, &c) in order.iter().enumerate() {
            row[j] = h[order[i] * n + c];
        }
    });
    (wp, hp)
}

/// The upper-triangular `U` with `Uᵀ U = (H + λI)⁻¹`, `λ = damp · mean(diag H)`, as f32
/// row-major: the matrix GPTQ gets from Cholesky of H, its inverse, and Cholesky of that.
/// Here with one factorization and one triangular inverse, half the work: with `J` the
/// reversal, factor `J H J = L Lᵀ`; then `H = V Vᵀ` with `V = J L J` upper, so
/// `H⁻¹ = (V⁻¹)ᵀ V⁻¹` and, the Cholesky factor being unique, `U = V⁻¹ = J L⁻¹ J`.
/// In f64: H of a layer input is often ill-conditioned, and f64 costs about a second at 4096
/// columns. The test checks it against GPTQ's three steps.
fn inverse_hessian_factor(name: &str, mut h: Vec<f64>, n: usize, damp: f64) -> Result<Vec<f32>> {
    let lambda = damp * (0..n).map(|i| h[i * n + i]).sum::<f64>() / n as f64;
    (0..n).for_each(|i| h[i * n + i] += lambda);
    let llt = MatRef::from_row_major_slice(&h, n, n).reverse_rows_and_cols().llt(Side::Lower).map_err(|_| {
        anyhow!("tensor `{name}`: the dampened Hessian is not positive definite (raise the GPTQ damp, now {damp})")
    })?;
    drop(h); // n² f64: at 11008 columns a gigabyte; free it before the inverse needs as much
    let mut l_inv = Mat::<f64>::zeros(n, n);
    invert_lower_triangular(l_inv.as_mut(), llt.L(), Par::rayon(0));
    let mut u = vec![0f32; n * n];
    u.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for j in i..n {
            row[j] = l_inv[(n - 1 - i, n - 1 - j)] as f32;
        }
    });
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qtensor::quantize_rtn;
    use faer::linalg::solvers::DenseSolveCore;
    use rand::{Rng, SeedableRng};

    /// Inputs with strongly correlated columns (few latent factors) and uneven scales, as LLM
    /// activations have.
    fn correlated_inputs(tokens: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let factors = 8;
        let mix: Vec<f32> = (0..factors * cols).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        let gain: Vec<f32> = (0..cols).map(|c| if c % 17 == 3 { 8.0 } else { 1.0 }).collect();
        let mut x = vec![0f32; tokens * cols];
        for t in 0..tokens {
            let z: Vec<f32> = (0..factors).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
            for c in 0..cols {
                let noise = 0.05 * (rng.random::<f32>() - 0.5);
                x[t * cols + c] = gain[c] * ((0..factors).map(|f| z[f] * mix[f * cols + c]).sum::<f32>() + noise);
            }
        }
        x
    }

    #[test]
    fn gram_matrix_adds_like_activations() {
        let (tokens, cols) = (37, 24);
        let x = correlated_inputs(tokens, cols, 3);
        let mut direct = Hessian::new(cols);
        direct.add(&x, tokens);
        let mut gram = vec![0f32; cols * cols];
        for t in 0..tokens {
            for i in 0..cols {
                for j in 0..cols {
                    gram[i * cols + j] += x[t * cols + i] * x[t * cols + j];
                }
            }
        }
        let mut via_gram = Hessian::new(cols);
        via_gram.add_gram(&gram, tokens);
        for (a, b) in direct.matrix().iter().zip(via_gram.matrix()) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{a} vs {b}");
        }
    }

    fn random_weights(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| (rng.random::<f32>() - 0.5) * 0.1).collect()
    }

    /// `‖(W − Ŵ) Xᵀ‖_F`.
    fn output_error(w: &[f32], wq: &[f32], x: &[f32], rows: usize, cols: usize) -> f64 {
        let tokens = x.len() / cols;
        let mut total = 0.0;
        for t in 0..tokens {
            for r in 0..rows {
                let d: f64 = (0..cols).map(|c| ((w[r * cols + c] - wq[r * cols + c]) * x[t * cols + c]) as f64).sum();
                total += d * d;
            }
        }
        total.sqrt()
    }

    fn hessian_of(x: &[f32], cols: usize) -> Hessian {
        let tokens = x.len() / cols;
        let mut h = Hessian::new(cols);
        h.add(&x[..tokens / 2 * cols], tokens / 2);
        h.add(&x[tokens / 2 * cols..], tokens - tokens / 2);
        h
    }

    #[test]
    fn reduces_output_error_against_rtn_for_int_and_pot() {
        let (rows, cols, tokens) = (24, 160, 512);
        let w = random_weights(rows * cols, 1);
        let x = correlated_inputs(tokens, cols, 2);
        let h = hessian_of(&x, cols);
        let layout = GroupLayout::new(rows, cols, 64).unwrap(); // ragged: 64 + 64 + 32
        let grid = Grid::default();
        for (format, bits) in [(Format::IntAsym, 3), (Format::IntSym, 4), (Format::Pot, 3), (Format::IntAsym, 2), (Format::Pot, 2), (Format::Pot, 4)] {
            // RTN; for PoT also Step 1 (scales searched, no feedback), and the better of the two.
            let mut er = output_error(&w, &quantize_rtn("w", &w, layout, format, bits).unwrap().dequantize(), &x, rows, cols);
            if format == Format::Pot {
                let step1 = crate::qtensor::quantize_pot_step1("w", &w, layout, bits, &grid).unwrap();
                er = er.min(output_error(&w, &step1.dequantize(), &x, rows, cols));
            }
            for act_order in [false, true] {
                let opts = GptqOptions { act_order, block: 48, ..Default::default() };
                let g = gptq("w", &w, layout, &h, format, bits, &grid, &opts).unwrap();
                let eg = output_error(&w, &g.dequantize(), &x, rows, cols);
                assert!(eg < 0.5 * er, "{format:?} {bits} act_order={act_order}: GPTQ {eg} vs baseline {er}");
            }
        }
    }

    /// Rounding the returned inputs with the returned scales gives GPTQ's codes, in any order.
    #[test]
    fn returned_inputs_round_to_the_codes() {
        let (rows, cols, tokens) = (12, 160, 300);
        let w = random_weights(rows * cols, 5);
        let x = correlated_inputs(tokens, cols, 6);
        let h = hessian_of(&x, cols);
        let layout = GroupLayout::new(rows, cols, 64).unwrap();
        for act_order in [false, true] {
            let opts = GptqOptions { act_order, block: 64, ..Default::default() };
            let (q, inputs) = gptq_with_inputs("w", &w, layout, &h, Format::Pot, 3, &Grid::default(), &opts).unwrap();
            assert_ne!(inputs, w, "the feedback moved the weights");
            let again = crate::qtensor::quantize_pot_with_scales("w", &inputs, layout, 3, &q.scales).unwrap();
            assert_eq!(again.codes, q.codes, "act_order={act_order}");
        }
    }

    #[test]
    fn blocked_equals_the_plain_loop() {
        let (rows, cols, tokens) = (16, 200, 400);
        let w = random_weights(rows * cols, 3);
        let x = correlated_inputs(tokens, cols, 4);
        let h = hessian_of(&x, cols);
        let grid = Grid::default();
        for (format, bits, g) in [(Format::Pot, 3, 64), (Format::IntAsym, 4, 32), (Format::Pot, 2, 200), (Format::IntSym, 3, 96)] {
            let layout = GroupLayout::new(rows, cols, g).unwrap();
            for (act_order, weighted_scales) in [(false, false), (true, false), (false, true), (true, true)] {
                let opts = |block| GptqOptions { act_order, block, weighted_scales, ..Default::default() };
                let reference = gptq_reference("w", &w, layout, &h, format, bits, &grid, &opts(1)).unwrap();
                // One block: the same operations in the same order, so the same bits.
                let one = gptq("w", &w, layout, &h, format, bits, &grid, &opts(1024)).unwrap();
                assert!(one.codes == reference.codes, "{format:?} {bits} g{g} act_order={act_order}");
                assert_eq!(one.scales, reference.scales);
                if weighted_scales && format == Format::Pot {
                    let unweighted = gptq_reference("w", &w, layout, &h, format, bits, &grid, &GptqOptions { weighted_scales: false, ..opts(1) }).unwrap();
                    assert_ne!(unweighted.scales, reference.scales, "the Hessian diagonal moves some scales");
                }
                // Lazy blocks sum the feedback in another order: rare near-tie codes may flip.
                for block in [16, 48, 128] {
                    let fast = gptq("w", &w, layout, &h, format, bits, &grid, &opts(block)).unwrap();
                    let same = fast.codes.iter().zip(&reference.codes).filter(|(a, b)| a == b).count();
                    assert!(same as f64 >= 0.99 * reference.codes.len() as f64, "{format:?} {bits} g{g} block {block}: {same} equal codes");
                    let (ef, er) = (output_error(&w, &fast.dequantize(), &x, rows, cols), output_error(&w, &reference.dequantize(), &x, rows, cols));
                    assert!((ef - er).abs() <= 0.02 * er, "{format:?} {bits} g{g} block {block}: {ef} vs {er}");
                }
            }
        }
    }

    /// The trailing product writes exactly the later columns, through the strided view.
    #[test]
    fn row_major_view_stays_inside_its_slice() {
        let (rows, cols, start, end) = (5, 12, 2, 5);
        let mut w: Vec<f32> = (0..rows * cols + 4).map(|i| i as f32).collect();
        let err: Vec<f32> = (0..rows * 3).map(|i| (i % 4) as f32).collect();
        let u: Vec<f32> = (0..cols * cols).map(|i| (i % 5) as f32).collect();
        let mut want = w.clone();
        for r in 0..rows {
            for j in end..cols {
                want[r * cols + j] -= (0..3).map(|k| err[r * 3 + k] * u[(start + k) * cols + j]).sum::<f32>();
            }
        }
        let (body, _guard) = w.split_at_mut(rows * cols);
        let target = row_major_mut(&mut body[end..], rows, cols - end, cols);
        let errors = MatRef::from_row_major_slice_with_stride(&err[..], rows, 3, 3);
        let factor = MatRef::from_row_major_slice_with_stride(&u[start * cols + end..], 3, cols - end, cols);
        matmul(target, Accum::Add, errors, factor, -1.0f32, Par::Seq);
        assert_eq!(w, want);
    }

    #[test]
    fn blocks_hold_whole_groups() {
        assert_eq!(column_blocks(576, 128, 128, false), vec![0..128, 128..256, 256..384, 384..512, 512..576]);
        assert_eq!(column_blocks(200, 32, 128, false), vec![0..128, 128..200]);
        assert_eq!(column_blocks(200, 96, 128, false), vec![0..96, 96..192, 192..200]);
        assert_eq!(column_blocks(300, 256, 128, false), vec![0..128, 128..256, 256..300]);
        assert_eq!(column_blocks(300, 200, 128, false), vec![0..128, 128..200, 200..300]);
        assert_eq!(column_blocks(300, 200, 128, true), vec![0..128, 128..256, 256..300]);
    }

    #[test]
    fn hessian_and_factor_against_plain_math() {
        let (tokens, n) = (50, 24);
        let x = correlated_inputs(tokens, n, 5);
        let mut h = Hessian::new(n);
        h.add(&x[..20 * n], 20);
        h.add(&x[20 * n..], tokens - 20);
        h.add(&[], 0);
        assert_eq!(h.samples, tokens);
        let m = h.matrix();
        for i in 0..n {
            for j in 0..n {
                let plain: f64 = (0..tokens).map(|t| x[t * n + i] as f64 * x[t * n + j] as f64).sum::<f64>() * 2.0 / tokens as f64;
                assert!((m[i * n + j] - plain).abs() <= 1e-5 * plain.abs().max(1.0), "H[{i},{j}] {} vs {plain}", m[i * n + j]);
            }
            assert_eq!(h.diag()[i], m[i * n + i] as f32);
        }
        // Uᵀ U = (H + λI)⁻¹: check (H + λI) · Uᵀ U = I, and U upper with a positive diagonal.
        let damp = 0.01;
        let u = inverse_hessian_factor("h", m.clone(), n, damp).unwrap();
        let lambda = damp * (0..n).map(|i| m[i * n + i]).sum::<f64>() / n as f64;
        // GPTQ's own three steps: Cholesky, inverse, Cholesky of the inverse (upper).
        let mut dampened = m.clone();
        (0..n).for_each(|i| dampened[i * n + i] += lambda);
        let inverse = MatRef::from_row_major_slice(&dampened, n, n).llt(Side::Lower).unwrap().inverse();
        let l2 = inverse.llt(Side::Lower).unwrap();
        for i in 0..n {
            for j in i..n {
                let want = l2.L()[(j, i)];
                assert!((u[i * n + j] as f64 - want).abs() <= 1e-5 * want.abs().max(1e-3 * l2.L()[(i, i)]), "U[{i},{j}] {} vs {want}", u[i * n + j]);
            }
        }
        let inv: Vec<f64> = (0..n * n)
            .map(|ij| (0..n).map(|k| u[k * n + ij / n] as f64 * u[k * n + ij % n] as f64).sum())
            .collect();
        for i in 0..n {
            assert!(u[i * n + i] > 0.0);
            for j in 0..i {
                assert_eq!(u[i * n + j], 0.0);
            }
            for j in 0..n {
                let v: f64 = (0..n).map(|k| (m[i * n + k] + if i == k { lambda } else { 0.0 }) * inv[k * n + j]).sum();
                assert!((v - (i == j) as u8 as f64).abs() < 1e-4, "({i},{j}) = {v}");
            }
        }
    }

    #[test]
    fn dead_inputs_and_bad_input() {
        let (rows, cols) = (4, 32);
        let w = random_weights(rows * cols, 6);
        let mut x = correlated_inputs(64, cols, 7);
        for t in 0..64 {
            x[t * cols + 5] = 0.0; // column 5 never active
        }
        let h = hessian_of(&x, cols);
        let layout = GroupLayout::new(rows, cols, 32).unwrap();
        let grid = Grid::default();
        for format in [Format::IntAsym, Format::Pot] {
            for act_order in [false, true] {
                let opts = GptqOptions { act_order, ..Default::default() };
                let q = gptq("w", &w, layout, &h, format, 4, &grid, &opts).unwrap();
                let deq = q.dequantize();
                assert!(deq.iter().all(|v| v.is_finite()));
                if format == Format::IntAsym {
                    assert!((0..rows).all(|r| deq[r * cols + 5] == 0.0), "dead column quantized as 0");
                }
            }
        }
        let opts = GptqOptions::default();
        let mut bad = w.clone();
        bad[3] = f32::NAN;
        let e = gptq("blk.0.up", &bad, layout, &h, Format::Pot, 3, &grid, &opts).unwrap_err().to_string();
        assert!(e.contains("tensor `blk.0.up` contains a non-finite value"), "{e}");
        let e = gptq("w", &w, layout, &Hessian::new(cols), Format::Pot, 3, &grid, &opts).unwrap_err().to_string();
        assert!(e.contains("no samples"), "{e}");
        let e = gptq("w", &w, layout, &Hessian::new(16), Format::Pot, 3, &grid, &opts).unwrap_err().to_string();
        assert!(e.contains("Hessian of 16 columns"), "{e}");
        let e = gptq("w", &w[1..], layout, &h, Format::Pot, 3, &grid, &opts).unwrap_err().to_string();
        assert!(e.contains("values for a [4, 32] matrix"), "{e}");
        assert!(gptq("w", &w, layout, &h, Format::Pot, 5, &grid, &opts).unwrap_err().to_string().contains("2 to 4"));
        assert!(gptq("w", &w, layout, &h, Format::IntAsym, 9, &grid, &opts).is_err());
        assert!(gptq("w", &w, layout, &h, Format::Pot, 3, &grid, &GptqOptions { block: 0, ..opts.clone() }).is_err());
        assert!(gptq("w", &w, layout, &h, Format::Pot, 3, &grid, &GptqOptions { damp: f32::NAN, ..opts.clone() }).is_err());
        let mut nan_x = x.clone();
        nan_x[9] = f32::NAN;
        let e = gptq("w", &w, layout, &hessian_of(&nan_x, cols), Format::Pot, 3, &grid, &opts).unwrap_err().to_string();
        assert!(e.contains("non-finite"), "{e}");
        // Without dampening, a rank-deficient Hessian is refused with a clear message.
        let e = gptq("w", &w, layout, &hessian_of(&x[..4 * cols], cols), Format::Pot, 3, &grid, &GptqOptions { damp: 0.0, ..opts })
            .unwrap_err()
            .to_string();
        assert!(e.contains("not positive definite"), "{e}");
    }
}
