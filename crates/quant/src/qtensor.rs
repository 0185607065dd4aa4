//! The codes and scales of one linear layer, and the data-free ways to make them.

use std::ops::Range;

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::quantizer::{GroupParams, GroupQuantizer};
use crate::step1::Grid;
use crate::{int, pack, pot};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Format {
    /// Power of two: 1 sign + (bits−1) exponent bits, one scale per group.
    Pot,
    /// Uniform INT, asymmetric min-max with an integer zero-point per group.
    IntAsym,
    /// Uniform INT, symmetric.
    IntSym,
}

impl Format {
    pub fn is_int(self) -> bool {
        self != Format::Pot
    }
}

pub fn check_bits(format: Format, bits: u8) -> Result<()> {
    let (lo, hi) = if format == Format::Pot { (2, 4) } else { (2, 8) };
    if bits < lo || bits > hi {
        bail!("{bits} bits is out of range for {format:?} (supported: {lo} to {hi})");
    }
    Ok(())
}

/// A row-major `[rows, cols]` matrix cut into groups of `group_size` consecutive columns of a
/// row; a row's last group is shorter when `group_size` does not divide `cols`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLayout {
    pub rows: usize,
    pub cols: usize,
    pub group_size: usize,
}

impl GroupLayout {
    pub fn new(rows: usize, cols: usize, group_size: usize) -> Result<Self> {
        ensure!(rows > 0 && cols > 0, "empty matrix [{rows}, {cols}]");
        if group_size == 0 || !group_size.is_multiple_of(8) {
            bail!("group size {group_size} must be a positive multiple of 8");
        }
        Ok(Self { rows, cols, group_size })
    }

    pub fn groups_per_row(&self) -> usize {
        self.cols.div_ceil(self.group_size)
    }

    pub fn group_cols(&self, g: usize) -> Range<usize> {
        g * self.group_size..((g + 1) * self.group_size).min(self.cols)
    }
}

/// The smallest normal f16, 2^-14.
const F16_MIN_NORMAL: f32 = 1.0 / 16384.0;
/// The largest finite f16.
const F16_MAX: f32 = 65504.0;

/// Rounds a scale to f16, clamped so that it is normal and `scale · max_level` stays finite
/// (the precondition of the f16 bit-add decode). Returns the scale and whether it was clamped.
#[inline]
pub fn to_f16_scale(scale: f32, max_level: f32) -> (f32, bool) {
    // Exact for the power-of-two top levels of PoT (and 1 for INT), so `hi` is an f16 itself.
    let hi = F16_MAX / max_level;
    let clamped = scale.clamp(F16_MIN_NORMAL, hi);
    (round_to_normal_f16(clamped), clamped != scale)
}

/// Rounds a PoT scale to f16 under the bit-add precondition for `bits`.
#[inline]
pub fn pot_f16_scale(scale: f32, bits: u8) -> (f32, bool) {
    to_f16_scale(scale, (1u32 << pot::qmax(bits)) as f32)
}

/// `f16::from_f32(x).to_f32()` for `x` in the normal f16 range, by integer rounding of the f32
/// mantissa to f16's 10 bits (nearest, ties to even). Step 1 rounds 200 candidates per group;
/// this is several times faster than the library's conversion and vectorizes.
#[inline]
pub(crate) fn round_to_normal_f16(x: f32) -> f32 {
    debug_assert!((F16_MIN_NORMAL..=F16_MAX).contains(&x));
    let bits = x.to_bits();
    let odd = (bits >> 13) & 1;
    f32::from_bits((bits + 0x0FFF + odd) & !0x1FFF)
}

#[derive(Debug, Clone, PartialEq)]
pub struct QTensor {
    pub format: Format,
    pub bits: u8,
    pub layout: GroupLayout,
    /// One code per weight, row-major.
    pub codes: Vec<u8>,
    /// `[rows, groups_per_row]`, each exactly an f16.
    pub scales: Vec<f32>,
    /// INT zero-points `[rows, groups_per_row]`; empty for PoT.
    pub zeros: Vec<u8>,
    /// Groups whose scale was clamped to the f16 range.
    pub clamped_scales: usize,
}

impl QTensor {
    /// Codes plus the per-group parameters (row-major `[rows, groups_per_row]`).
    pub(crate) fn assemble(format: Format, bits: u8, layout: GroupLayout, codes: Vec<u8>, params: Vec<GroupParams>) -> Self {
        let zeros = if format.is_int() { params.iter().map(|p| p.zero).collect() } else { Vec::new() };
        Self {
            format,
            bits,
            layout,
            codes,
            scales: params.iter().map(|p| p.scale).collect(),
            zeros,
            clamped_scales: params.iter().filter(|p| p.clamped).count(),
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let l = self.layout;
        let gpr = l.groups_per_row();
        let mut out = vec![0f32; l.rows * l.cols];
        out.par_chunks_mut(l.cols).enumerate().for_each(|(r, row)| {
            for g in 0..gpr {
                let s = self.scales[r * gpr + g];
                for c in l.group_cols(g) {
                    let code = self.codes[r * l.cols + c];
                    row[c] = match self.format {
                        Format::Pot => pot::decode(code, s, self.bits),
                        _ => int::decode(code, s, self.zeros[r * gpr + g]),
                    };
                }
            }
        });
        out
    }

    /// Codes, 16-bit scales and (INT) `bits`-bit zero-points per weight, real group counts.
    pub fn bits_per_weight(&self) -> f64 {
        let l = self.layout;
        let groups = (l.rows * l.groups_per_row()) as f64;
        let zero_bits = if self.format.is_int() { self.bits as f64 } else { 0.0 };
        let weights = (l.rows * l.cols) as f64;
        (weights * self.bits as f64 + groups * (16.0 + zero_bits)) / weights
    }

    pub fn packed_codes(&self) -> Vec<u32> {
        pack::pack(&self.codes, self.layout.rows, self.layout.cols, self.bits)
    }

    pub fn from_packed(
        format: Format,
        bits: u8,
        layout: GroupLayout,
        packed: &[u32],
        scales: Vec<f32>,
        zeros: Vec<u8>,
    ) -> Result<Self> {
        check_bits(format, bits)?;
        let codes = pack::unpack(packed, layout.rows, layout.cols, bits)?;
        Self::from_codes(format, bits, layout, codes, scales, zeros)
    }

    /// Checks stored parameters (one code per weight, in range) and assembles them.
    pub fn from_codes(format: Format, bits: u8, layout: GroupLayout, codes: Vec<u8>, scales: Vec<f32>, zeros: Vec<u8>) -> Result<Self> {
        check_bits(format, bits)?;
        let groups = layout.rows * layout.groups_per_row();
        ensure!(codes.len() == layout.rows * layout.cols, "{} codes for a [{}, {}] matrix", codes.len(), layout.rows, layout.cols);
        ensure!(codes.iter().all(|&c| (c as u32) < 1 << bits), "codes must fit in {bits} bits");
        ensure!(scales.len() == groups, "{} scales for {groups} groups", scales.len());
        ensure!(scales.iter().all(|s| s.is_finite() && *s > 0.0), "scales must be positive and finite");
        if format.is_int() {
            ensure!(zeros.len() == groups, "{} zero-points for {groups} groups", zeros.len());
            ensure!(zeros.iter().all(|&z| (z as u32) < 1 << bits), "zero-points must fit in {bits} bits");
        } else {
            ensure!(zeros.is_empty(), "PoT has no zero-points");
        }
        Ok(Self { format, bits, layout, codes, scales, zeros, clamped_scales: 0 })
    }
}

/// Errors unless `w` fills `layout` with finite values; the message names the tensor.
pub(crate) fn check_input(name: &str, w: &[f32], layout: GroupLayout) -> Result<()> {
    ensure!(
        w.len() == layout.rows * layout.cols,
        "tensor `{name}`: {} values for a [{}, {}] matrix",
        w.len(),
        layout.rows,
        layout.cols
    );
    if let Some(i) = w.iter().position(|x| !x.is_finite()) {
        let (r, c) = (i / layout.cols, i % layout.cols);
        bail!("tensor `{name}` contains a non-finite value ({}) at row {r}, column {c}", w[i]);
    }
    Ok(())
}

/// Quantizes every group of `w` independently, rows in parallel; `quantizer` makes the
/// per-thread quantizer (with its own search buffers).
fn quantize_groups<'g>(
    w: &[f32],
    layout: GroupLayout,
    format: Format,
    bits: u8,
    quantizer: impl Fn() -> GroupQuantizer<'g> + Sync + Send,
) -> QTensor {
    let gpr = layout.groups_per_row();
    let mut codes = vec![0u8; w.len()];
    let mut params = vec![None; layout.rows * gpr];
    codes
        .par_chunks_mut(layout.cols)
        .zip(params.par_chunks_mut(gpr))
        .zip(w.par_chunks(layout.cols))
        .map_init(&quantizer, |q, ((codes, params), row)| {
            for (g, slot) in params.iter_mut().enumerate() {
                let cols = layout.group_cols(g);
                let p = q.params(&row[cols.clone()]);
                for c in cols {
                    codes[c] = q.encode(p, row[c]);
                }
                *slot = Some(p);
            }
        })
        .for_each(drop);
    QTensor::assemble(format, bits, layout, codes, params.into_iter().map(|p| p.expect("every group visited")).collect())
}

/// Round to nearest: PoT with `s0` scales (the paper's "neither step"), INT with min-max.
pub fn quantize_rtn(name: &str, w: &[f32], layout: GroupLayout, format: Format, bits: u8) -> Result<QTensor> {
    check_bits(format, bits)?;
    check_input(name, w, layout)?;
    Ok(quantize_groups(w, layout, format, bits, || GroupQuantizer::rtn(format, bits)))
}

/// PoT with Step 1's grid-searched scale per group.
pub fn quantize_pot_step1(name: &str, w: &[f32], layout: GroupLayout, bits: u8, grid: &Grid) -> Result<QTensor> {
    check_bits(Format::Pot, bits)?;
    check_input(name, w, layout)?;
    grid.check()?;
    Ok(quantize_groups(w, layout, Format::Pot, bits, || GroupQuantizer::searched(Format::Pot, bits, grid)))
}

/// PoT codes of `w` under given per-group scales (`[rows, groups_per_row]`, e.g. refined by
/// Step 2): each scale is rounded to f16 under the bit-add precondition, then every weight is
/// encoded against the stored scale, so codes and scales agree exactly.
pub fn quantize_pot_with_scales(name: &str, w: &[f32], layout: GroupLayout, bits: u8, scales: &[f32]) -> Result<QTensor> {
    check_bits(Format::Pot, bits)?;
    check_input(name, w, layout)?;
    let gpr = layout.groups_per_row();
    ensure!(scales.len() == layout.rows * gpr, "tensor `{name}`: {} scales for {} groups", scales.len(), layout.rows * gpr);
    if let Some(i) = scales.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
        bail!("tensor `{name}`: scale {i} is {} (scales must be positive and finite)", scales[i]);
    }
    let params: Vec<GroupParams> = scales
        .iter()
        .map(|&s| {
            let (scale, clamped) = pot_f16_scale(s, bits);
            GroupParams { scale, zero: 0, clamped }
        })
        .collect();
    let mut codes = vec![0u8; w.len()];
    codes.par_chunks_mut(layout.cols).zip(w.par_chunks(layout.cols)).enumerate().for_each(|(r, (codes, row))| {
        for g in 0..gpr {
            let s = params[r * gpr + g].scale;
            for c in layout.group_cols(g) {
                codes[c] = pot::encode(row[c], s, bits);
            }
        }
    });
    Ok(QTensor::assemble(Format::Pot, bits, layout, codes, params))
}

/// PoT with Step 1's grid search against the error weighted per column, `Σ c_j (w_j − Q(w_j))²`
/// (e.g. `c_j = E[x_j²]` of the layer's input, the diagonal of GPTQ's Hessian): groups spend
/// their levels where the input is large.
pub fn quantize_pot_step1_weighted(name: &str, w: &[f32], layout: GroupLayout, bits: u8, grid: &Grid, column_weights: &[f32]) -> Result<QTensor> {
    check_bits(Format::Pot, bits)?;
    check_input(name, w, layout)?;
    grid.check()?;
    ensure!(column_weights.len() == layout.cols, "tensor `{name}`: {} column weights for {} columns", column_weights.len(), layout.cols);
    ensure!(column_weights.iter().all(|c| c.is_finite() && *c >= 0.0), "tensor `{name}`: column weights must be finite and ≥ 0");
    let gpr = layout.groups_per_row();
    let mut scales = vec![0f32; layout.rows * gpr];
    scales.par_chunks_mut(gpr).zip(w.par_chunks(layout.cols)).for_each_init(
        || crate::step1::ScaleSearch::new(bits, grid),
        |search, (scales, row)| {
            for (g, s) in scales.iter_mut().enumerate() {
                let cols = layout.group_cols(g);
                *s = search.search_weighted(&row[cols.clone()], &column_weights[cols]);
            }
        },
    );
    quantize_pot_with_scales(name, w, layout, bits, &scales)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * 0.05).collect()
    }

    #[test]
    fn pot_with_step1_scales_reproduces_step1() {
        let layout = GroupLayout::new(5, 200, 64).unwrap();
        let w = random(layout.rows * layout.cols, 7);
        let grid = Grid::default();
        let s1 = quantize_pot_step1("w", &w, layout, 3, &grid).unwrap();
        let again = quantize_pot_with_scales("w", &w, layout, 3, &s1.scales).unwrap();
        assert_eq!(again.codes, s1.codes);
        assert_eq!(again.scales, s1.scales);
        let mut bad = s1.scales.clone();
        bad[3] = -1.0;
        assert!(quantize_pot_with_scales("w", &w, layout, 3, &bad).is_err());
    }

    #[test]
    fn weighted_step1_with_uniform_weights_is_step1() {
        let layout = GroupLayout::new(4, 150, 64).unwrap();
        let w = random(layout.rows * layout.cols, 9);
        let grid = Grid::default();
        let plain = quantize_pot_step1("w", &w, layout, 3, &grid).unwrap();
        let weighted = quantize_pot_step1_weighted("w", &w, layout, 3, &grid, &vec![2.5; 150]).unwrap();
        assert_eq!(plain.scales, weighted.scales);
        assert_eq!(plain.codes, weighted.codes);
        // Heavy columns pull the scale toward fitting them.
        let mut c = vec![1e-3f32; 150];
        c[5] = 1e3;
        let heavy = quantize_pot_step1_weighted("w", &w, layout, 3, &grid, &c).unwrap();
        let err = |q: &QTensor| (0..layout.rows).map(|r| (w[r * 150 + 5] - q.dequantize()[r * 150 + 5]).abs()).sum::<f32>();
        assert!(err(&heavy) <= err(&plain));
        assert!(quantize_pot_step1_weighted("w", &w, layout, 3, &grid, &[1.0; 3]).is_err());
    }

    fn all_formats() -> Vec<(Format, u8)> {
        let mut cases: Vec<(Format, u8)> = (2..=4).map(|b| (Format::Pot, b)).collect();
        cases.extend((2..=8).flat_map(|b| [(Format::IntAsym, b), (Format::IntSym, b)]));
        cases
    }

    /// The dequantized value of every weight, computed from the stored parameters alone.
    fn decode_by_hand(q: &QTensor) -> Vec<f32> {
        let l = q.layout;
        let gpr = l.groups_per_row();
        (0..l.rows * l.cols)
            .map(|i| {
                let g = (i / l.cols) * gpr + (i % l.cols) / l.group_size;
                match q.format {
                    Format::Pot => pot::decode(q.codes[i], q.scales[g], q.bits),
                    _ => int::decode(q.codes[i], q.scales[g], q.zeros[g]),
                }
            })
            .collect()
    }

    /// quantize → pack → unpack → dequantize, on ragged and aligned shapes, every group size
    /// and per-row groups, RTN for every format and Step 1 for PoT.
    #[test]
    fn round_trips_through_packing() {
        let grid = Grid::default();
        for &(rows, cols) in &[(3usize, 576usize), (2, 72), (4, 100), (2, 256), (1, 1536), (5, 40)] {
            let per_row = cols.div_ceil(8) * 8;
            for g in [32usize, 64, 128, 256, per_row] {
                let layout = GroupLayout::new(rows, cols, g).unwrap();
                let w = random(rows * cols, (rows * cols + g) as u64);
                for (format, bits) in all_formats() {
                    let mut tensors = vec![quantize_rtn("w", &w, layout, format, bits).unwrap()];
                    if format == Format::Pot {
                        tensors.push(quantize_pot_step1("w", &w, layout, bits, &grid).unwrap());
                    }
                    for q in tensors {
                        let what = format!("{rows}x{cols} g{g} {format:?} {bits}");
                        assert_eq!(q.codes.len(), rows * cols);
                        assert_eq!(q.scales.len(), rows * layout.groups_per_row(), "{what}");
                        assert!(q.codes.iter().all(|&c| (c as u32) < 1 << bits), "{what}");
                        let packed = q.packed_codes();
                        assert_eq!(packed.len(), rows * pack::words_per_row(cols, bits), "{what}");
                        if cols % 32 == 0 {
                            assert_eq!(packed.len() * 32, rows * cols * bits as usize, "{what}: exactly {bits} bits per weight");
                        }
                        let back = QTensor::from_packed(format, bits, layout, &packed, q.scales.clone(), q.zeros.clone()).unwrap();
                        assert_eq!(back.codes, q.codes, "{what}");
                        let deq = back.dequantize();
                        assert_eq!(deq, q.dequantize(), "{what}");
                        assert_eq!(deq, decode_by_hand(&q), "{what}");
                        // Every scale is an f16, and re-encoding with the stored scales gives
                        // the stored codes: what was evaluated is what is stored.
                        assert!(q.scales.iter().all(|s| f16::from_f32(*s).to_f32() == *s && *s > 0.0), "{what}");
                        let again: Vec<u8> = (0..rows * cols)
                            .map(|i| {
                                let gi = (i / cols) * layout.groups_per_row() + (i % cols) / g;
                                match format {
                                    Format::Pot => pot::encode(w[i], q.scales[gi], bits),
                                    _ => int::encode(w[i], q.scales[gi], q.zeros[gi], bits),
                                }
                            })
                            .collect();
                        assert_eq!(again, q.codes, "{what}");
                        // INT reproduces every weight to within half a step.
                        if format == Format::IntAsym {
                            for i in 0..rows * cols {
                                let gi = (i / cols) * layout.groups_per_row() + (i % cols) / g;
                                assert!((deq[i] - w[i]).abs() <= 0.5001 * q.scales[gi] + 1e-7, "{what} at {i}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn step1_beats_rtn_on_the_whole_tensor() {
        let layout = GroupLayout::new(16, 576, 128).unwrap();
        let w = random(16 * 576, 5);
        for bits in 2..=4 {
            let sse = |q: &QTensor| q.dequantize().iter().zip(&w).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
            let rtn = quantize_rtn("w", &w, layout, Format::Pot, bits).unwrap();
            let s1 = quantize_pot_step1("w", &w, layout, bits, &Grid::default()).unwrap();
            assert!(sse(&s1) < 0.9 * sse(&rtn), "{bits}: {} vs {}", sse(&s1), sse(&rtn));
        }
    }

    #[test]
    fn f16_constants() {
        assert_eq!(F16_MIN_NORMAL, f16::MIN_POSITIVE.to_f32());
        assert_eq!(F16_MAX, f16::MAX.to_f32());
    }

    #[test]
    fn f16_rounding_by_bits_equals_the_library() {
        let (lo, hi) = (f16::MIN_POSITIVE.to_f32(), f16::MAX.to_f32());
        // Around every normal f16: itself, its neighbours, and both sides of both ties.
        for h in 0x0400u16..0x7C00 {
            let center = f16::from_bits(h).to_f32().to_bits() as i64;
            for off in [-0x1001i64, -0x1000, -0x0FFF, -1, 0, 1, 0x0FFF, 0x1000, 0x1001] {
                let x = f32::from_bits((center + off) as u32).clamp(lo, hi);
                assert_eq!(round_to_normal_f16(x), f16::from_f32(x).to_f32(), "{x:e}");
            }
        }
    }

    #[test]
    fn ragged_last_group() {
        let layout = GroupLayout::new(1, 576, 128).unwrap();
        assert_eq!(layout.groups_per_row(), 5);
        assert_eq!(layout.group_cols(4), 512..576);
        assert_eq!(GroupLayout::new(1, 72, 32).unwrap().group_cols(2), 64..72);
        // A row whose short last group holds large weights gets its own scale.
        let mut w = vec![0.01f32; 576];
        w[512..].iter_mut().for_each(|x| *x = 1.0);
        let q = quantize_rtn("w", &w, layout, Format::Pot, 3).unwrap();
        assert!(q.scales[4] > 10.0 * q.scales[0]);
        let bpw = q.bits_per_weight();
        assert!((bpw - (3.0 + 5.0 * 16.0 / 576.0)).abs() < 1e-12, "{bpw}");
        let q = quantize_rtn("w", &w, layout, Format::IntAsym, 3).unwrap();
        assert!((q.bits_per_weight() - (3.0 + 5.0 * 19.0 / 576.0)).abs() < 1e-12, "INT counts its zero-points");
        let q = quantize_rtn("w", &w, GroupLayout::new(1, 576, 576).unwrap(), Format::Pot, 2).unwrap();
        assert!((q.bits_per_weight() - (2.0 + 16.0 / 576.0)).abs() < 1e-12, "per-row");
    }

    #[test]
    fn bad_input() {
        for g in [0, 12, 100] {
            let e = GroupLayout::new(2, 64, g).unwrap_err().to_string();
            assert!(e.contains("positive multiple of 8"), "{e}");
        }
        assert!(GroupLayout::new(0, 64, 32).is_err());
        assert!(GroupLayout::new(2, 0, 32).is_err());
        let layout = GroupLayout::new(2, 64, 32).unwrap();
        let w = random(128, 1);
        for (format, bits, allowed) in [(Format::Pot, 5, "2 to 4"), (Format::Pot, 1, "2 to 4"), (Format::IntAsym, 1, "2 to 8"), (Format::IntSym, 9, "2 to 8")] {
            let e = quantize_rtn("w", &w, layout, format, bits).unwrap_err().to_string();
            assert!(e.contains("out of range") && e.contains(allowed), "{e}");
        }
        assert!(quantize_pot_step1("w", &w, layout, 0, &Grid::default()).is_err());
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            let mut w = random(128, 1);
            w[77] = bad;
            let e = quantize_pot_step1("blk.3.q", &w, layout, 3, &Grid::default()).unwrap_err().to_string();
            assert!(e.contains("tensor `blk.3.q` contains a non-finite value") && e.contains("row 1, column 13"), "{e}");
            let e = quantize_rtn("blk.4.k", &w, layout, Format::IntAsym, 4).unwrap_err().to_string();
            assert!(e.contains("tensor `blk.4.k`"), "{e}");
        }
        let e = quantize_rtn("w", &random(100, 1), layout, Format::Pot, 3).unwrap_err().to_string();
        assert!(e.contains("100 values for a [2, 64] matrix"), "{e}");
        assert!(quantize_pot_step1("w", &random(129, 1), layout, 3, &Grid::default()).is_err());
        let e = quantize_pot_step1("w", &w, layout, 3, &Grid { lo: -1.0, hi: 1.0, points: 3 }).unwrap_err().to_string();
        assert!(e.contains("grid"), "{e}");
        // from_packed: wrong lengths of codes, scales, zero-points.
        let q = quantize_rtn("w", &w, layout, Format::IntAsym, 3).unwrap();
        let p = q.packed_codes();
        assert!(QTensor::from_packed(Format::IntAsym, 3, layout, &p[1..], q.scales.clone(), q.zeros.clone()).is_err());
        assert!(QTensor::from_packed(Format::IntAsym, 3, layout, &p, q.scales[1..].to_vec(), q.zeros.clone()).is_err());
        assert!(QTensor::from_packed(Format::IntAsym, 3, layout, &p, q.scales.clone(), Vec::new()).is_err());
        assert!(QTensor::from_packed(Format::IntAsym, 3, layout, &p, q.scales.clone(), vec![8; 4]).is_err());
        assert!(QTensor::from_packed(Format::Pot, 3, layout, &p, q.scales.clone(), q.zeros.clone()).is_err());
        assert!(QTensor::from_packed(Format::Pot, 3, layout, &p, vec![f32::NAN; 4], Vec::new()).is_err());
        assert!(QTensor::from_packed(Format::Pot, 5, layout, &p, q.scales.clone(), Vec::new()).is_err());
    }

    #[test]
    fn scales_respect_the_f16_bit_add_precondition() {
        let layout = GroupLayout::new(1, 96, 32).unwrap();
        let mut w = vec![1e-9f32; 96];
        w[32..64].iter_mut().for_each(|x| *x = 70000.0);
        w[64..].iter_mut().for_each(|x| *x = 0.0);
        for bits in 2..=4 {
            let top = (1u32 << pot::qmax(bits)) as f32;
            for q in [quantize_rtn("w", &w, layout, Format::Pot, bits).unwrap(), quantize_pot_step1("w", &w, layout, bits, &Grid::default()).unwrap()] {
                assert_eq!(q.clamped_scales, 3, "tiny, huge and all-zero groups");
                for &s in &q.scales {
                    assert!(s >= f16::MIN_POSITIVE.to_f32(), "normal f16");
                    let top_level = f16::from_f32(s * top);
                    assert!(top_level.is_finite() && top_level.to_f32() == s * top, "s·2^qmax is a finite f16");
                    // The bit-add: exponent field of s plus qmax stays below the all-ones field.
                    assert!(((f16::from_f32(s).to_bits() >> 10) & 0x1F) as u32 + pot::qmax(bits) < 31);
                }
                assert!(q.dequantize().iter().all(|v| v.is_finite()));
            }
        }
        let q = quantize_rtn("w", &w, layout, Format::IntAsym, 4).unwrap();
        assert!(q.scales.iter().all(|&s| s >= f16::MIN_POSITIVE.to_f32() && s <= f16::MAX.to_f32()));
        assert_eq!(q.clamped_scales, 1, "1e-9/15 is below the f16 range; 70000/15 and the all-zero group's 2/15 fit");
    }
}
