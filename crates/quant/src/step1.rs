//! Step 1: per-group grid search of the PoT scale.
//!
//! Candidates are `s = b · s0`, `b` on a grid (default 0.01 … 2.00, 200 points), each rounded to
//! f16 as it will be stored; the one with the least squared error wins, and `s0` itself is
//! always a contender, so the result is never worse than `s0`.
//!
//! The fast search avoids quantizing the group once per candidate. For a scale `s`,
//!     err(s) = Σ c·w² − 2s·Σ c·|w|·2^E + s²·Σ c·4^E,
//! and each weight's exponent `E(s)` steps up by one as `s` falls below `|w| / (√2·2^k)`,
//! `k = 0 … q_max−1`. With `2^E = 1 + Σ_{k<E} 2^k` and `4^E = 1 + Σ_{k<E} 3·4^k`, both sums
//! are totals of per-(weight, level) terms that apply to every candidate at or below a
//! breakpoint: one suffix sum over the grid gives them for all candidates at once.

use anyhow::{ensure, Result};

use crate::pot;
use crate::qtensor::pot_f16_scale;

#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    pub lo: f32,
    pub hi: f32,
    pub points: usize,
}

impl Default for Grid {
    fn default() -> Self {
        Self { lo: 0.01, hi: 2.0, points: 200 }
    }
}

impl Grid {
    pub fn check(&self) -> Result<()> {
        ensure!(
            self.lo > 0.0 && self.hi >= self.lo && self.lo.is_finite() && self.hi.is_finite(),
            "scale grid needs 0 < lo ≤ hi (got {} … {})",
            self.lo,
            self.hi
        );
        ensure!(self.points >= 1, "scale grid needs at least one point");
        Ok(())
    }

    fn multiplier(&self, i: usize) -> f32 {
        if self.points == 1 {
            return self.lo;
        }
        // Exact at both ends and, for the default grid, at b = 1.
        self.lo + (self.hi - self.lo) * i as f32 / (self.points - 1) as f32
    }
}

/// The scale whose top level `s0 · 2^q_max` is the largest weight magnitude.
pub fn s0(w: &[f32], bits: u8) -> f32 {
    let max = w.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    max / (1u32 << pot::qmax(bits)) as f32
}

fn weighted_error(w: &[f32], c: Option<&[f32]>, scale: f32, bits: u8) -> f64 {
    match c {
        None => pot::group_sq_error(w, scale, bits),
        Some(c) => w
            .iter()
            .zip(c)
            .map(|(&x, &ci)| {
                let d = (x - pot::decode(pot::encode(x, scale, bits), scale, bits)) as f64;
                ci as f64 * d * d
            })
            .sum(),
    }
}

/// The f16 candidates of the grid for a group with scale `s0`, ascending.
fn candidates(s0: f32, bits: u8, grid: &Grid) -> Vec<f32> {
    (0..grid.points).map(|i| pot_f16_scale(grid.multiplier(i) * s0, bits).0).collect()
}

/// Of the winner of the sweep and `s0`, the one with the smaller exact error.
fn never_worse_than_s0(w: &[f32], c: Option<&[f32]>, best: f32, bits: u8) -> f32 {
    let base = pot_f16_scale(s0(w, bits), bits).0;
    if weighted_error(w, c, best, bits) <= weighted_error(w, c, base, bits) {
        best
    } else {
        base
    }
}

/// Brute force: quantize the group at every candidate.
pub fn search_scale_reference(w: &[f32], bits: u8, grid: &Grid) -> f32 {
    search_reference(w, None, bits, grid)
}

fn search_reference(w: &[f32], c: Option<&[f32]>, bits: u8, grid: &Grid) -> f32 {
    let mut best = (f64::INFINITY, 0.0);
    for s in candidates(s0(w, bits), bits, grid) {
        let e = weighted_error(w, c, s, bits);
        if e < best.0 {
            best = (e, s);
        }
    }
    never_worse_than_s0(w, c, best.1, bits)
}

pub fn search_scale(w: &[f32], bits: u8, grid: &Grid) -> f32 {
    sweep(w, None, bits, grid)
}

/// Minimizes `Σ weights_j · (w_j − Q(w_j))²` (e.g. weights = E[x_j²] of the layer's input).
pub fn search_scale_weighted(w: &[f32], weights: &[f32], bits: u8, grid: &Grid) -> f32 {
    assert_eq!(w.len(), weights.len());
    sweep(w, Some(weights), bits, grid)
}

/// Mantissa threshold of `pot::pot_exponent` as a real number: ratios at or above
/// `ROUND_UP · 2^k` get exponent `k + 1`.
const ROUND_UP: f64 = 1.4142136573791504; // f32 with mantissa bits 0x3504F4

fn sweep(w: &[f32], c: Option<&[f32]>, bits: u8, grid: &Grid) -> f32 {
    let base = s0(w, bits);
    if base == 0.0 {
        return pot_f16_scale(0.0, bits).0;
    }
    let cand = candidates(base, bits, grid);
    let n = cand.len();
    let qmax = pot::qmax(bits);
    // Per candidate (suffix-summed below): Δ of Σ c|w|2^E and of Σ c·4^E.
    let mut d_a = vec![0f64; n];
    let mut d_b = vec![0f64; n];
    let (mut sum_cw2, mut sum_cw, mut sum_c) = (0f64, 0f64, 0f64);
    let step = if grid.points > 1 { (grid.hi - grid.lo) as f64 / (grid.points - 1) as f64 } else { 1.0 };
    for (j, &x) in w.iter().enumerate() {
        let cj = c.map_or(1.0, |c| c[j] as f64);
        let a = x.abs() as f64;
        sum_cw2 += cj * a * a;
        sum_cw += cj * a;
        sum_c += cj;
        for k in 0..qmax {
            // E ≥ k+1 at every candidate s ≤ t.
            let t = a / (ROUND_UP * (1u64 << k) as f64);
            if t < cand[0] as f64 {
                break; // higher levels have smaller breakpoints still
            }
            // Last candidate ≤ t: start from the unrounded grid position, then correct for f16.
            let guess = if grid.points > 1 { ((t / base as f64 - grid.lo as f64) / step).floor() } else { 0.0 };
            let mut m = guess.clamp(0.0, (n - 1) as f64) as usize;
            while m + 1 < n && cand[m + 1] as f64 <= t {
                m += 1;
            }
            while m > 0 && cand[m] as f64 > t {
                m -= 1;
            }
            d_a[m] += cj * a * (1u64 << k) as f64;
            d_b[m] += cj * 3.0 * (1u64 << (2 * k)) as f64;
        }
    }
    let (mut acc_a, mut acc_b) = (0f64, 0f64);
    let mut best = (f64::INFINITY, cand[0]);
    for m in (0..n).rev() {
        acc_a += d_a[m];
        acc_b += d_b[m];
        let s = cand[m] as f64;
        let err = sum_cw2 - 2.0 * s * (sum_cw + acc_a) + s * s * (sum_c + acc_b);
        if err < best.0 {
            best = (err, cand[m]);
        }
    }
    never_worse_than_s0(w, c, best.1, bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn gaussian(rng: &mut impl Rng) -> f32 {
        let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }

    /// Gaussian, heavy-tailed (Cauchy-like ratio of Gaussians) and sparse-outlier groups.
    fn groups(seed: u64) -> Vec<Vec<f32>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut out = Vec::new();
        for len in [128usize, 64, 37] {
            out.push((0..len).map(|_| 0.02 * gaussian(&mut rng)).collect());
            out.push((0..len).map(|_| 0.02 * gaussian(&mut rng) / gaussian(&mut rng).abs().max(0.05)).collect());
            out.push((0..len).map(|i| if i == 3 { 0.8 } else { 0.01 * gaussian(&mut rng) }).collect());
        }
        out
    }

    #[test]
    fn never_worse_than_s0_and_equal_to_brute_force() {
        for seed in 0..20 {
            for w in groups(seed) {
                for bits in 2..=4 {
                    let grid = Grid::default();
                    let fast = search_scale(&w, bits, &grid);
                    let slow = search_scale_reference(&w, bits, &grid);
                    let (ef, es) = (pot::group_sq_error(&w, fast, bits), pot::group_sq_error(&w, slow, bits));
                    let e0 = pot::group_sq_error(&w, pot_f16_scale(s0(&w, bits), bits).0, bits);
                    assert!(ef <= e0, "seed {seed} bits {bits}: {ef} > s0's {e0}");
                    assert!(ef <= es * (1.0 + 1e-6) + 1e-18, "seed {seed} bits {bits}: fast {ef} vs brute force {es}");
                }
            }
        }
    }

    #[test]
    fn weighted_search_matches_brute_force() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for w in groups(5) {
            let c: Vec<f32> = w.iter().map(|_| rng.random::<f32>() * 10.0).collect();
            for bits in 2..=4 {
                let grid = Grid::default();
                let fast = search_scale_weighted(&w, &c, bits, &grid);
                let slow = search_reference(&w, Some(&c), bits, &grid);
                let ef = weighted_error(&w, Some(&c), fast, bits);
                let es = weighted_error(&w, Some(&c), slow, bits);
                assert!(ef <= es * (1.0 + 1e-6) + 1e-18, "bits {bits}: {ef} vs {es}");
            }
        }
    }

    #[test]
    fn custom_grids_and_zero_groups() {
        let w: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.01).collect();
        for grid in [Grid { lo: 0.5, hi: 1.5, points: 11 }, Grid { lo: 1.0, hi: 1.0, points: 1 }] {
            let s = search_scale(&w, 3, &grid);
            assert!(pot::group_sq_error(&w, s, 3) <= pot::group_sq_error(&w, pot_f16_scale(s0(&w, 3), 3).0, 3));
        }
        let s = search_scale(&[0.0; 16], 3, &Grid::default());
        assert!(s > 0.0 && s.is_finite());
        assert!(Grid { lo: 0.0, hi: 1.0, points: 5 }.check().is_err());
    }
}
