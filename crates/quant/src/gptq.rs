//! GPTQ: quantize a layer column by column, feeding each column's error back into the columns
//! not yet quantized, weighted by the inverse Hessian of the layer's input (Frantar et al.).
//! Generic over the quantizer: INT min-max (the baseline) or PoT with Step-1 scales.
//!
//! As in the reference implementation: 1% dampening of the mean diagonal, dead inputs zeroed,
//! the upper Cholesky factor of H⁻¹, lazy batches of `block` columns with one matrix product
//! per batch for the rest of the row, and each group's scale fixed when its first column is
//! reached (from the error-updated weights), or up front from the original weights with
//! act-order ("static groups").

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use crate::qtensor::{check_bits, pot_f16_scale, Format, GroupLayout, QTensor};
use crate::step1::{self, Grid};
use crate::{int, pot};

/// `H = 2/N · Σ xᵀx` over the N input rows seen so far.
#[derive(Debug, Clone)]
pub struct Hessian {
    pub cols: usize,
    pub samples: usize,
    sum: Vec<f64>,
}

impl Hessian {
    pub fn new(cols: usize) -> Self {
        Self { cols, samples: 0, sum: vec![0.0; cols * cols] }
    }

    /// Adds `x`, `[tokens, cols]` row-major.
    pub fn add(&mut self, x: &[f32], tokens: usize) {
        let n = self.cols;
        assert_eq!(x.len(), tokens * n);
        // xᵀx in f32 by a fast matmul, accumulated in f64 across calls.
        let mut xtx = vec![0f32; n * n];
        // SAFETY: xtx is n×n, x is tokens×n; strides below stay inside both.
        unsafe {
            gemm::gemm(
                n, n, tokens,
                xtx.as_mut_ptr(), 1, n as isize, false,
                x.as_ptr(), n as isize, 1, // lhs = xᵀ: element (i, p) at x[p*n + i]
                x.as_ptr(), 1, n as isize, // rhs = x:  element (p, j) at x[p*n + j]
                0.0, 1.0, false, false, false,
                gemm::Parallelism::Rayon(0),
            );
        }
        self.sum.iter_mut().zip(&xtx).for_each(|(s, v)| *s += *v as f64);
        self.samples += tokens;
    }

    pub fn matrix(&self) -> Vec<f64> {
        let k = if self.samples > 0 { 2.0 / self.samples as f64 } else { 0.0 };
        self.sum.iter().map(|v| v * k).collect()
    }

    pub fn diag(&self) -> Vec<f32> {
        let h = self.matrix();
        (0..self.cols).map(|i| h[i * self.cols + i] as f32).collect()
    }
}

#[derive(Debug, Clone)]
pub struct GptqOptions {
    /// Fraction of the mean diagonal added to the diagonal.
    pub damp: f32,
    /// Columns per lazy batch.
    pub block: usize,
    /// Quantize columns in order of decreasing Hessian diagonal.
    pub act_order: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        Self { damp: 0.01, block: 128, act_order: false }
    }
}

/// Lower Cholesky factor of the SPD matrix `a` (n×n), in place.
fn cholesky(a: &mut [f64], n: usize) -> Result<()> {
    for j in 0..n {
        let (done, rest) = a.split_at_mut(j * n);
        let row_j = &mut rest[..n];
        let d = row_j[j] - row_j[..j].iter().map(|v| v * v).sum::<f64>();
        if !(d > 0.0) {
            bail!("Hessian is not positive definite (increase --damp)");
        }
        row_j[j] = d.sqrt();
        let _ = done;
        let ljj = a[j * n + j];
        let (head, tail) = a.split_at_mut((j + 1) * n);
        let row_j = &head[j * n..j * n + j];
        tail.par_chunks_mut(n).for_each(|row_i| {
            let s: f64 = row_i[..j].iter().zip(row_j).map(|(x, y)| x * y).sum();
            row_i[j] = (row_i[j] - s) / ljj;
        });
    }
    // Clear the upper triangle.
    for i in 0..n {
        a[i * n + i + 1..(i + 1) * n].iter_mut().for_each(|v| *v = 0.0);
    }
    Ok(())
}

/// `(L Lᵀ)⁻¹` from the lower factor `l`.
fn inverse_from_cholesky(l: &[f64], n: usize) -> Vec<f64> {
    // Columns of L⁻¹ by forward substitution, one column per task.
    let cols: Vec<Vec<f64>> = (0..n)
        .into_par_iter()
        .map(|c| {
            let mut x = vec![0f64; n];
            x[c] = 1.0 / l[c * n + c];
            for i in c + 1..n {
                let s: f64 = (c..i).map(|k| l[i * n + k] * x[k]).sum();
                x[i] = -s / l[i * n + i];
            }
            x
        })
        .collect();
    // inv = L⁻ᵀ L⁻¹: inv[i][j] = Σ_k Linv[k][i] Linv[k][j] = dot(col_i, col_j).
    let mut inv = vec![0f64; n * n];
    inv.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for j in 0..n {
            let from = i.max(j);
            row[j] = (from..n).map(|k| cols[i][k] * cols[j][k]).sum();
        }
    });
    inv
}

/// Upper factor `U` of `a = Uᵀ U` (row-major), i.e. the transpose of the lower factor.
fn upper_cholesky(a: &[f64], n: usize) -> Result<Vec<f64>> {
    let mut l = a.to_vec();
    cholesky(&mut l, n)?;
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = l[j * n + i];
        }
    }
    Ok(u)
}

/// A group's quantization parameters and its quantize function.
#[derive(Clone, Copy)]
struct GroupParams {
    scale: f32,
    zero: u8,
}

fn group_params(format: Format, bits: u8, grid: &Grid, w: &[f32]) -> (GroupParams, bool) {
    match format {
        Format::Pot => {
            let (scale, clamped) = pot_f16_scale(step1::search_scale(w, bits, grid), bits);
            (GroupParams { scale, zero: 0 }, clamped)
        }
        Format::IntAsym => {
            let (scale, zero) = int::params_asym(w, bits);
            (GroupParams { scale, zero }, false)
        }
        Format::IntSym => {
            let (scale, zero) = int::params_sym(w, bits);
            (GroupParams { scale, zero }, false)
        }
    }
}

fn encode(format: Format, bits: u8, p: GroupParams, w: f32) -> (u8, f32) {
    match format {
        Format::Pot => {
            let c = pot::encode(w, p.scale, bits);
            (c, pot::decode(c, p.scale, bits))
        }
        _ => {
            let c = int::encode(w, p.scale, p.zero, bits);
            (c, int::decode(c, p.scale, p.zero))
        }
    }
}

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
    check_bits(format, bits)?;
    let (rows, cols) = (layout.rows, layout.cols);
    ensure!(w.len() == rows * cols, "tensor `{name}`: {} values for [{rows}, {cols}]", w.len());
    ensure!(hessian.cols == cols, "tensor `{name}`: Hessian of {} columns for {cols}", hessian.cols);
    ensure!(hessian.samples > 0, "tensor `{name}`: the Hessian has no samples");
    if let Some(i) = w.iter().position(|x| !x.is_finite()) {
        bail!("tensor `{name}` contains a non-finite value ({}) at flat index {i}", w[i]);
    }
    let gpr = layout.groups_per_row();
    let mut h = hessian.matrix();
    // Work on columns: wt[c][r] = W[r][c], so a column's update is a contiguous slice.
    let mut wt = vec![0f32; cols * rows];
    for r in 0..rows {
        for c in 0..cols {
            wt[c * rows + r] = w[r * cols + c];
        }
    }
    // Dead inputs: the weight does not matter; make H invertible and the weight zero.
    for c in 0..cols {
        if h[c * cols + c] == 0.0 {
            h[c * cols + c] = 1.0;
            wt[c * rows..(c + 1) * rows].iter_mut().for_each(|v| *v = 0.0);
        }
    }
    // With act-order, group parameters come from the original weights, up front.
    let mut params: Vec<Option<GroupParams>> = vec![None; rows * gpr];
    let mut clamped = 0;
    let order: Vec<usize> = if opts.act_order {
        for r in 0..rows {
            for g in 0..gpr {
                let group: Vec<f32> = layout.group_cols(g).map(|c| wt[c * rows + r]).collect();
                let (p, cl) = group_params(format, bits, grid, &group);
                clamped += cl as usize;
                params[r * gpr + g] = Some(p);
            }
        }
        let mut idx: Vec<usize> = (0..cols).collect();
        idx.sort_by(|&a, &b| h[b * cols + b].total_cmp(&h[a * cols + a]));
        idx
    } else {
        (0..cols).collect()
    };
    // Permute H to the processing order.
    let mut hp = vec![0f64; cols * cols];
    for (i, &oi) in order.iter().enumerate() {
        for (j, &oj) in order.iter().enumerate() {
            hp[i * cols + j] = h[oi * cols + oj];
        }
    }
    let mean_diag = (0..cols).map(|i| hp[i * cols + i]).sum::<f64>() / cols as f64;
    let damp = opts.damp as f64 * mean_diag;
    (0..cols).for_each(|i| hp[i * cols + i] += damp);
    let mut l = hp;
    cholesky(&mut l, cols)?;
    let hinv = upper_cholesky(&inverse_from_cholesky(&l, cols), cols)?;

    let mut codes = vec![0u8; rows * cols];
    let block = opts.block.max(1);
    let mut start = 0;
    while start < cols {
        let end = (start + block).min(cols);
        // err[i - start][r]: the scaled error of processed column i, for the trailing update.
        let mut err = vec![0f32; (end - start) * rows];
        for i in start..end {
            let c = order[i];
            // Without act-order, a group's parameters are set when its first column arrives.
            if !opts.act_order && c % layout.group_size == 0 {
                let g = c / layout.group_size;
                for r in 0..rows {
                    let group: Vec<f32> = layout.group_cols(g).map(|cc| wt[cc * rows + r]).collect();
                    let (p, cl) = group_params(format, bits, grid, &group);
                    clamped += cl as usize;
                    params[r * gpr + g] = Some(p);
                }
            }
            let d = hinv[i * cols + i];
            let g = c / layout.group_size;
            let col: Vec<f32> = wt[c * rows..(c + 1) * rows].to_vec();
            let e = &mut err[(i - start) * rows..(i - start + 1) * rows];
            for r in 0..rows {
                let p = params[r * gpr + g].expect("group parameters set before use");
                let (code, q) = encode(format, bits, p, col[r]);
                codes[r * cols + c] = code;
                e[r] = ((col[r] - q) as f64 / d) as f32;
            }
            // Feed the error into the rest of this batch.
            for j in i + 1..end {
                let hij = hinv[i * cols + j] as f32;
                let cj = order[j];
                let target = &mut wt[cj * rows..(cj + 1) * rows];
                target.iter_mut().zip(e.iter()).for_each(|(t, ev)| *t -= ev * hij);
            }
        }
        // One product for every later column: W[:, j] -= Σ_i err_i · Hinv[i, j].
        if end < cols {
            let later: Vec<usize> = order[end..].to_vec();
            let hrows: Vec<&[f64]> = (start..end).map(|i| &hinv[i * cols..(i + 1) * cols]).collect();
            // Columns are disjoint slices of `wt`; update them in parallel.
            let mut slots: Vec<(usize, &mut [f32])> = wt.chunks_mut(rows).enumerate().collect();
            let mut targets: Vec<(usize, &mut [f32])> = Vec::with_capacity(later.len());
            let mut position = vec![usize::MAX; cols];
            for (j, &c) in later.iter().enumerate() {
                position[c] = j + end;
            }
            for (c, slice) in slots.drain(..) {
                if position[c] != usize::MAX {
                    targets.push((position[c], slice));
                }
            }
            targets.par_iter_mut().for_each(|(j, target)| {
                for (k, hrow) in hrows.iter().enumerate() {
                    let hij = hrow[*j] as f32;
                    if hij != 0.0 {
                        let e = &err[k * rows..(k + 1) * rows];
                        target.iter_mut().zip(e).for_each(|(t, ev)| *t -= ev * hij);
                    }
                }
            });
        }
        start = end;
    }
    let scales = params.iter().map(|p| p.expect("every group quantized").scale).collect();
    let zeros = if format.is_int() { params.iter().map(|p| p.unwrap().zero).collect() } else { Vec::new() };
    Ok(QTensor { format, bits, layout, codes, scales, zeros, clamped_scales: clamped })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qtensor::quantize_rtn;
    use rand::{Rng, SeedableRng};

    /// Inputs with strongly correlated columns (few latent factors), as LLM activations are.
    fn correlated_inputs(tokens: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let factors = 8;
        let mix: Vec<f32> = (0..factors * cols).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        let mut x = vec![0f32; tokens * cols];
        for t in 0..tokens {
            let z: Vec<f32> = (0..factors).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
            for c in 0..cols {
                let noise = 0.05 * (rng.random::<f32>() - 0.5);
                x[t * cols + c] = (0..factors).map(|f| z[f] * mix[f * cols + c]).sum::<f32>() + noise;
            }
        }
        x
    }

    fn output_error(w: &[f32], wq: &[f32], x: &[f32], rows: usize, cols: usize) -> f64 {
        let tokens = x.len() / cols;
        let mut total = 0.0;
        for t in 0..tokens {
            for r in 0..rows {
                let d: f32 = (0..cols).map(|c| (w[r * cols + c] - wq[r * cols + c]) * x[t * cols + c]).sum();
                total += (d as f64).powi(2);
            }
        }
        total.sqrt()
    }

    #[test]
    fn reduces_output_error_against_rtn_for_int_and_pot() {
        let (rows, cols, tokens) = (24, 160, 512);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let w: Vec<f32> = (0..rows * cols).map(|_| (rng.random::<f32>() - 0.5) * 0.1).collect();
        let x = correlated_inputs(tokens, cols, 2);
        let mut h = Hessian::new(cols);
        h.add(&x[..tokens / 2 * cols], tokens / 2);
        h.add(&x[tokens / 2 * cols..], tokens - tokens / 2);
        let layout = GroupLayout::new(rows, cols, 64).unwrap(); // ragged: 64 + 64 + 32
        for (format, bits) in [(Format::IntAsym, 3), (Format::Pot, 3), (Format::IntAsym, 2), (Format::Pot, 2)] {
            for act_order in [false, true] {
                let opts = GptqOptions { act_order, block: 48, ..Default::default() };
                let g = gptq("w", &w, layout, &h, format, bits, &Grid::default(), &opts).unwrap();
                let r = quantize_rtn("w", &w, layout, format, bits).unwrap();
                let (eg, er) = (output_error(&w, &g.dequantize(), &x, rows, cols), output_error(&w, &r.dequantize(), &x, rows, cols));
                assert!(eg < 0.8 * er, "{format:?} {bits} act_order={act_order}: GPTQ {eg} vs RTN {er}");
            }
        }
    }

    #[test]
    fn hessian_and_factorizations() {
        let x = [1.0f32, 2.0, 0.0, 1.0, 3.0, 1.0];
        let mut h = Hessian::new(2);
        h.add(&x, 3);
        let m = h.matrix();
        // 2/3 · [[10, 5], [5, 6]]
        let want = [20.0 / 3.0, 10.0 / 3.0, 10.0 / 3.0, 4.0];
        m.iter().zip(want).for_each(|(a, b)| assert!((a - b).abs() < 1e-9, "{m:?}"));
        let mut l = m.clone();
        cholesky(&mut l, 2).unwrap();
        let inv = inverse_from_cholesky(&l, 2);
        // m · inv = I
        for i in 0..2 {
            for j in 0..2 {
                let v: f64 = (0..2).map(|k| m[i * 2 + k] * inv[k * 2 + j]).sum();
                assert!((v - (i == j) as u8 as f64).abs() < 1e-9);
            }
        }
        let u = upper_cholesky(&inv, 2).unwrap();
        assert_eq!(u[2], 0.0);
        let utu: Vec<f64> = (0..4).map(|ij| (0..2).map(|k| u[k * 2 + ij / 2] * u[k * 2 + ij % 2]).sum()).collect();
        utu.iter().zip(&inv).for_each(|(a, b)| assert!((a - b).abs() < 1e-9));
    }

    #[test]
    fn dead_inputs_and_bad_input() {
        let (rows, cols) = (4, 32);
        let w = vec![0.1f32; rows * cols];
        let mut x = vec![1.0f32; 8 * cols];
        for t in 0..8 {
            x[t * cols + 5] = 0.0; // column 5 never active
            x[t * cols + (t % 7)] += t as f32;
        }
        let mut h = Hessian::new(cols);
        h.add(&x, 8);
        let layout = GroupLayout::new(rows, cols, 32).unwrap();
        let q = gptq("w", &w, layout, &h, Format::IntAsym, 4, &Grid::default(), &GptqOptions::default()).unwrap();
        assert!(q.dequantize().iter().all(|v| v.is_finite()));
        let mut bad = w.clone();
        bad[3] = f32::NAN;
        let e = gptq("blk.0.up", &bad, layout, &h, Format::Pot, 3, &Grid::default(), &GptqOptions::default()).unwrap_err();
        assert!(e.to_string().contains("tensor `blk.0.up` contains a non-finite value"), "{e}");
        let e = gptq("w", &w, layout, &Hessian::new(cols), Format::Pot, 3, &Grid::default(), &GptqOptions::default()).unwrap_err();
        assert!(e.to_string().contains("no samples"), "{e}");
    }
}
