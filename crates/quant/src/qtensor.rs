//! The codes and scales of one linear layer, and the data-free ways to make them.

use std::ops::Range;

use anyhow::{bail, ensure, Result};
use half::f16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::step1::{self, Grid};
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
        if group_size == 0 || group_size % 8 != 0 {
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

/// Rounds a scale to f16, clamped so that it is normal and `scale · 2^max_shift` stays finite
/// (the precondition of the f16 bit-add decode). Returns the scale and whether it was clamped.
pub fn to_f16_scale(scale: f32, max_level: f32) -> (f32, bool) {
    let lo = f16::MIN_POSITIVE.to_f32();
    // Exact for the power-of-two top levels of PoT (and 1 for INT), so `hi` is an f16 itself.
    let hi = f16::MAX.to_f32() / max_level;
    let clamped = scale.clamp(lo, hi);
    (f16::from_f32(clamped).to_f32(), clamped != scale)
}

/// Rounds a PoT scale to f16 under the bit-add precondition for `bits`.
pub fn pot_f16_scale(scale: f32, bits: u8) -> (f32, bool) {
    to_f16_scale(scale, (1u32 << pot::qmax(bits)) as f32)
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
        let groups = layout.rows * layout.groups_per_row();
        ensure!(scales.len() == groups, "{} scales for {groups} groups", scales.len());
        ensure!(scales.iter().all(|s| s.is_finite() && *s > 0.0), "scales must be positive and finite");
        if format.is_int() {
            ensure!(zeros.len() == groups, "{} zero-points for {groups} groups", zeros.len());
        } else {
            ensure!(zeros.is_empty(), "PoT has no zero-points");
        }
        let codes = pack::unpack(packed, layout.rows, layout.cols, bits)?;
        Ok(Self { format, bits, layout, codes, scales, zeros, clamped_scales: 0 })
    }
}

fn check_input(name: &str, w: &[f32], layout: GroupLayout) -> Result<()> {
    ensure!(
        w.len() == layout.rows * layout.cols,
        "tensor `{name}`: {} values for a [{}, {}] matrix",
        w.len(),
        layout.rows,
        layout.cols
    );
    if let Some(i) = w.iter().position(|x| !x.is_finite()) {
        bail!("tensor `{name}` contains a non-finite value ({}) at flat index {i}", w[i]);
    }
    Ok(())
}

/// Quantizes every group of `w` with the scale (and zero-point) `params` picks for it.
fn quantize_groups(
    w: &[f32],
    layout: GroupLayout,
    format: Format,
    bits: u8,
    params: impl Fn(&[f32]) -> (f32, u8, bool) + Sync,
) -> QTensor {
    let gpr = layout.groups_per_row();
    let rows: Vec<(Vec<u8>, Vec<f32>, Vec<u8>, usize)> = w
        .par_chunks(layout.cols)
        .map(|row| {
            let mut codes = vec![0u8; layout.cols];
            let (mut scales, mut zeros, mut clamped) = (Vec::with_capacity(gpr), Vec::with_capacity(gpr), 0);
            for g in 0..gpr {
                let cols = layout.group_cols(g);
                let (s, z, was_clamped) = params(&row[cols.clone()]);
                clamped += was_clamped as usize;
                for c in cols {
                    codes[c] = match format {
                        Format::Pot => pot::encode(row[c], s, bits),
                        _ => int::encode(row[c], s, z, bits),
                    };
                }
                scales.push(s);
                zeros.push(z);
            }
            (codes, scales, zeros, clamped)
        })
        .collect();
    let mut q = QTensor {
        format,
        bits,
        layout,
        codes: Vec::with_capacity(w.len()),
        scales: Vec::with_capacity(layout.rows * gpr),
        zeros: Vec::new(),
        clamped_scales: 0,
    };
    for (c, s, z, n) in rows {
        q.codes.extend(c);
        q.scales.extend(s);
        if format.is_int() {
            q.zeros.extend(z);
        }
        q.clamped_scales += n;
    }
    q
}

/// Round to nearest: PoT with `s0` scales (the paper's "neither step"), INT with min-max.
pub fn quantize_rtn(name: &str, w: &[f32], layout: GroupLayout, format: Format, bits: u8) -> Result<QTensor> {
    check_bits(format, bits)?;
    check_input(name, w, layout)?;
    Ok(quantize_groups(w, layout, format, bits, |g| match format {
        Format::Pot => {
            let (s, clamped) = pot_f16_scale(step1::s0(g, bits), bits);
            (s, 0, clamped)
        }
        Format::IntAsym => {
            let (s, z) = int::params_asym(g, bits);
            (s, z, false)
        }
        Format::IntSym => {
            let (s, z) = int::params_sym(g, bits);
            (s, z, false)
        }
    }))
}

/// PoT with Step 1's grid-searched scale per group.
pub fn quantize_pot_step1(name: &str, w: &[f32], layout: GroupLayout, bits: u8, grid: &Grid) -> Result<QTensor> {
    check_bits(Format::Pot, bits)?;
    check_input(name, w, layout)?;
    grid.check()?;
    Ok(quantize_groups(w, layout, Format::Pot, bits, |g| {
        let s = step1::search_scale(g, bits, grid);
        let (s, clamped) = pot_f16_scale(s, bits);
        (s, 0, clamped)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
    }

    #[test]
    fn round_trips_through_packing() {
        for &(rows, cols) in &[(3usize, 576usize), (2, 72), (4, 100), (1, 1536)] {
            for &g in &[32usize, 64, 128, 256, cols.div_ceil(8) * 8] {
                let layout = GroupLayout::new(rows, cols, g).unwrap();
                let w = random(rows * cols, (rows * cols + g) as u64);
                let mut cases: Vec<(Format, u8)> = (2..=4).map(|b| (Format::Pot, b)).collect();
                cases.extend((2..=8).flat_map(|b| [(Format::IntAsym, b), (Format::IntSym, b)]));
                for (format, bits) in cases {
                    let q = quantize_rtn("w", &w, layout, format, bits).unwrap();
                    let back = QTensor::from_packed(format, bits, layout, &q.packed_codes(), q.scales.clone(), q.zeros.clone())
                        .unwrap();
                    assert_eq!(back.codes, q.codes, "{rows}x{cols} g{g} {format:?} {bits}");
                    assert_eq!(back.dequantize(), q.dequantize());
                    // Every scale is an f16.
                    assert!(q.scales.iter().all(|s| half::f16::from_f32(*s).to_f32() == *s));
                }
            }
        }
    }

    #[test]
    fn ragged_last_group() {
        let layout = GroupLayout::new(1, 576, 128).unwrap();
        assert_eq!(layout.groups_per_row(), 5);
        assert_eq!(layout.group_cols(4), 512..576);
        // A row whose short last group holds large weights gets its own scale.
        let mut w = vec![0.01f32; 576];
        w[512..].iter_mut().for_each(|x| *x = 1.0);
        let q = quantize_rtn("w", &w, layout, Format::Pot, 3).unwrap();
        assert!(q.scales[4] > 10.0 * q.scales[0]);
        let bpw = q.bits_per_weight();
        assert!((bpw - (3.0 + 5.0 * 16.0 / 576.0)).abs() < 1e-12, "{bpw}");
    }

    #[test]
    fn bad_input() {
        assert!(GroupLayout::new(2, 64, 0).unwrap_err().to_string().contains("positive multiple of 8"));
        assert!(GroupLayout::new(2, 64, 12).unwrap_err().to_string().contains("positive multiple of 8"));
        let layout = GroupLayout::new(2, 64, 32).unwrap();
        let e = quantize_rtn("w", &random(128, 1), layout, Format::Pot, 5).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        let e = quantize_rtn("w", &random(128, 1), layout, Format::IntAsym, 1).unwrap_err();
        assert!(e.to_string().contains("supported: 2 to 8"), "{e}");
        let mut w = random(128, 1);
        w[77] = f32::INFINITY;
        let e = quantize_pot_step1("blk.3.q", &w, layout, 3, &Grid::default()).unwrap_err();
        assert!(e.to_string().contains("tensor `blk.3.q` contains a non-finite value"), "{e}");
        let e = quantize_rtn("w", &random(100, 1), layout, Format::Pot, 3).unwrap_err();
        assert!(e.to_string().contains("100 values for a [2, 64] matrix"), "{e}");
    }

    #[test]
    fn scales_respect_the_f16_bit_add_precondition() {
        let layout = GroupLayout::new(1, 64, 32).unwrap();
        let mut w = vec![1e-9f32; 64];
        w[32..].iter_mut().for_each(|x| *x = 70000.0);
        let q = quantize_rtn("w", &w, layout, Format::Pot, 4).unwrap();
        assert_eq!(q.clamped_scales, 2);
        for &s in &q.scales {
            assert!(s >= half::f16::MIN_POSITIVE.to_f32());
            assert!((s * 128.0).is_finite() && s * 128.0 <= half::f16::MAX.to_f32());
        }
    }
}
