//! Step 1: per-group grid search of the PoT scale.
//!
//! Candidates are `s = b · s0`, `b` on a grid (default 0.01 … 2.00, 200 points), each rounded to
//! f16 as it will be stored; the one with the least squared error wins, and `s0` itself is
//! always a contender, so the result is never worse than `s0`.
//!
//! The brute force (`search_scale_reference`) quantizes the group once per candidate. The fast
//! search (`search_scale`) does not. For a scale `s`,
//!
//! ```text
//! err(s) = Σ c·w² − 2s·A(s) + s²·B(s),   A(s) = Σ c·|w|·2^E(s),   B(s) = Σ c·4^E(s)
//! ```
//!
//! (`c` = 1, or the per-column weights of the weighted variant). Each weight's exponent `E(s)`
//! is a step function of `s`: it is at least `k+1` exactly when `s` is at or below a breakpoint
//! near `|w| / (√2·2^k)`, `k = 0 … q_max−1`. Writing `2^E = 1 + Σ_{k<E} 2^k` and
//! `4^E = 1 + Σ_{k<E} 3·4^k`, A and B are totals of per-(weight, level) terms, each of which
//! applies to every candidate at or below its breakpoint: add the term at the last such
//! candidate, and one suffix sum over the grid gives A and B for all candidates at once.
//! Work: O(group · q_max + points) instead of O(group · points).

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

    /// `b_i = lo + i·(hi − lo)/(points − 1)`; a one-point grid is `lo`.
    pub fn multiplier(&self, i: usize) -> f32 {
        if self.points == 1 {
            return self.lo;
        }
        self.lo + i as f32 * (self.hi - self.lo) / (self.points - 1) as f32
    }

    /// Spacing of the multipliers (1 for a grid of one value, where there is none).
    fn step(&self) -> f32 {
        if self.points == 1 || self.hi == self.lo {
            1.0
        } else {
            (self.hi - self.lo) / (self.points - 1) as f32
        }
    }
}

/// The scale whose top level `s0 · 2^q_max` is the largest weight magnitude.
pub fn s0(w: &[f32], bits: u8) -> f32 {
    let max = w.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    max / (1u32 << pot::qmax(bits)) as f32
}

/// `s0` as it would be stored: rounded to f16 under the bit-add precondition.
fn stored_s0(w: &[f32], bits: u8) -> f32 {
    pot_f16_scale(s0(w, bits), bits).0
}

/// The grid's candidates for a group with scale `s0`, as stored (f16). Non-decreasing, since
/// rounding and clamping are monotone.
fn fill_candidates(out: &mut Vec<f32>, s0: f32, bits: u8, grid: &Grid) {
    let multipliers: Vec<f32> = (0..grid.points).map(|i| grid.multiplier(i)).collect();
    fill_candidates_from(out, s0, bits, &multipliers);
}

fn fill_candidates_from(out: &mut Vec<f32>, s0: f32, bits: u8, multipliers: &[f32]) {
    out.clear();
    out.extend(multipliers.iter().map(|&b| pot_f16_scale(b * s0, bits).0));
}

fn error(w: &[f32], weights: Option<&[f32]>, scale: f32, bits: u8) -> f64 {
    match weights {
        None => pot::group_sq_error(w, scale, bits),
        Some(c) => pot::group_weighted_sq_error(w, c, scale, bits),
    }
}

/// Of `best` and the stored `s0`, the one with the smaller exact error (`best` on a tie).
fn never_worse_than_s0(w: &[f32], weights: Option<&[f32]>, best: f32, bits: u8) -> f32 {
    let base = stored_s0(w, bits);
    if best == base {
        return best;
    }
    // Both errors in one pass over the group.
    let (mut e_best, mut e_base) = (0f64, 0f64);
    for (j, &x) in w.iter().enumerate() {
        let c = weights.map_or(1.0, |c| c[j] as f64);
        let (x64, q_best, q_base) = (x as f64, pot::decode(pot::encode(x, best, bits), best, bits), pot::decode(pot::encode(x, base, bits), base, bits));
        e_best += c * (x64 - q_best as f64).powi(2);
        e_base += c * (x64 - q_base as f64).powi(2);
    }
    if e_best <= e_base {
        best
    } else {
        base
    }
}

// ---------------------------------------------------------------------------------------------
// Reference: quantize the group at every candidate.

pub fn search_scale_reference(w: &[f32], bits: u8, grid: &Grid) -> f32 {
    brute_force(w, None, bits, grid)
}

pub fn search_scale_weighted_reference(w: &[f32], weights: &[f32], bits: u8, grid: &Grid) -> f32 {
    assert_eq!(w.len(), weights.len(), "one weight per value");
    brute_force(w, Some(weights), bits, grid)
}

fn brute_force(w: &[f32], weights: Option<&[f32]>, bits: u8, grid: &Grid) -> f32 {
    if let Err(e) = grid.check() {
        panic!("{e}");
    }
    let mut candidates = Vec::new();
    fill_candidates(&mut candidates, s0(w, bits), bits, grid);
    let mut best = (f64::INFINITY, candidates[0]);
    for &s in &candidates {
        let e = error(w, weights, s, bits);
        if e < best.0 {
            best = (e, s);
        }
    }
    never_worse_than_s0(w, weights, best.1, bits)
}

// ---------------------------------------------------------------------------------------------
// Fast: one sweep over the grid.

/// The returned scale is an f16 and its squared error is never above that of `s0` (as f16).
pub fn search_scale(w: &[f32], bits: u8, grid: &Grid) -> f32 {
    ScaleSearch::new(bits, grid).search(w)
}

/// Minimizes `Σ weights_j · (w_j − Q(w_j))²` (e.g. weights = E[x_j²] of the layer's input);
/// `weights` must be non-negative. Same guarantees as `search_scale`.
pub fn search_scale_weighted(w: &[f32], weights: &[f32], bits: u8, grid: &Grid) -> f32 {
    ScaleSearch::new(bits, grid).search_weighted(w, weights)
}

/// The exponent rule of `pot::encode` as a real-number threshold: `E ≥ k+1` at scale `s`
/// exactly when `fl(|w| / s) ≥ T_k`, `T_k` the f32 with mantissa `SQRT2_MANTISSA` and
/// exponent `k`. With round-to-nearest-even division that is `|w| / s ≥ M_k`, `M_k` the
/// midpoint between `T_k` and the f32 below it (`T_k`'s mantissa is even, so the midpoint
/// itself rounds up to `T_k`), i.e. `|w| ≥ M_0 · 2^k · s`. `M_0` has 25 significant bits and
/// an f16 scale 11, so `M_0 · s` is exact in f64 and the test below is exact — the sweep's
/// exponents are the ones `encode` produces, to the last ulp.
fn round_up_midpoint() -> f64 {
    let t = f32::from_bits((127 << 23) | pot::SQRT2_MANTISSA) as f64;
    let below = f32::from_bits(((127 << 23) | pot::SQRT2_MANTISSA) - 1) as f64;
    (t + below) / 2.0
}

/// Step 1's search with reusable buffers: make one per thread and call it for every group.
pub struct ScaleSearch<'g> {
    grid: &'g Grid,
    bits: u8,
    midpoint: f64,
    /// The grid's `b_i`.
    multipliers: Vec<f32>,
    /// This group's candidates (f16), ascending.
    candidates: Vec<f32>,
    /// `M_0 · candidate`: weight magnitudes at or above `2^k ·` this have `E ≥ k+1`.
    thresholds: Vec<f64>,
    /// Per candidate, the A and B terms whose breakpoint is this candidate (suffix-summed).
    delta_a: Vec<f64>,
    delta_b: Vec<f64>,
}

impl<'g> ScaleSearch<'g> {
    /// Panics on an invalid grid (the `quantize_*` functions check it and return an error).
    pub fn new(bits: u8, grid: &'g Grid) -> Self {
        if let Err(e) = grid.check() {
            panic!("{e}");
        }
        Self {
            grid,
            bits,
            midpoint: round_up_midpoint(),
            multipliers: (0..grid.points).map(|i| grid.multiplier(i)).collect(),
            candidates: Vec::with_capacity(grid.points),
            thresholds: Vec::with_capacity(grid.points),
            delta_a: Vec::with_capacity(grid.points),
            delta_b: Vec::with_capacity(grid.points),
        }
    }

    pub fn search(&mut self, w: &[f32]) -> f32 {
        self.sweep(w, None)
    }

    pub fn search_weighted(&mut self, w: &[f32], weights: &[f32]) -> f32 {
        assert_eq!(w.len(), weights.len(), "one weight per value");
        self.sweep(w, Some(weights))
    }

    fn sweep(&mut self, w: &[f32], weights: Option<&[f32]>) -> f32 {
        let bits = self.bits;
        let base = s0(w, bits);
        if base == 0.0 {
            // All zero: every scale gives the same levels; take the smallest stored one.
            return pot_f16_scale(0.0, bits).0;
        }
        fill_candidates_from(&mut self.candidates, base, bits, &self.multipliers);
        let n = self.candidates.len();
        let m0 = self.midpoint;
        self.thresholds.clear();
        self.thresholds.extend(self.candidates.iter().map(|&s| m0 * s as f64));
        self.thresholds.push(f64::INFINITY); // sentinel: the upward scan below stops at n
        self.delta_a.clear();
        self.delta_a.resize(n, 0.0);
        self.delta_b.clear();
        self.delta_b.resize(n, 0.0);
        let thresholds = &self.thresholds[..];
        let (delta_a, delta_b) = (&mut self.delta_a[..], &mut self.delta_b[..]);

        // Grid position of a threshold, before f16 rounding: M_0·s0·(lo + m·step) = t at
        // m = t·to_index − offset. A first guess; the exact comparisons below correct it.
        let step = self.grid.step() as f64;
        let to_index = 1.0 / (m0 * base as f64 * step);
        let offset = self.grid.lo as f64 / step;
        let lowest = thresholds[0];
        let levels = pot::qmax(bits);

        let (mut sum_cw2, mut sum_cw, mut sum_c) = (0f64, 0f64, 0f64);
        for (j, &x) in w.iter().enumerate() {
            let c = weights.map_or(1.0, |c| c[j] as f64);
            let a = x.abs() as f64;
            sum_cw2 += c * a * a;
            sum_cw += c * a;
            sum_c += c;
            // Level k: magnitude a·2^-k against the thresholds (exact scaling by 2^-k).
            let mut a_k = a;
            let (mut term_a, mut term_b) = (c * a, 3.0 * c);
            for _ in 0..levels {
                if a_k < lowest {
                    break; // no candidate reaches this level, nor any higher one
                }
                // Count of candidates m with thresholds[m] ≤ a_k: they all have E ≥ k+1.
                // (`as` truncates toward 0 where floor would go down, but both clamp to 1 there.)
                let guess = (a_k * to_index - offset) as isize + 1;
                let mut count = guess.clamp(1, n as isize) as usize;
                while thresholds[count] <= a_k {
                    count += 1;
                }
                while thresholds[count - 1] > a_k {
                    count -= 1; // stops at 1: thresholds[0] ≤ a_k
                }
                delta_a[count - 1] += term_a;
                delta_b[count - 1] += term_b;
                a_k *= 0.5;
                term_a *= 2.0;
                term_b *= 4.0;
            }
        }

        // Sweep from the largest candidate down, accumulating the terms that apply.
        let (mut acc_a, mut acc_b) = (0f64, 0f64);
        let mut best = (f64::INFINITY, self.candidates[n - 1]);
        for m in (0..n).rev() {
            acc_a += delta_a[m];
            acc_b += delta_b[m];
            let s = self.candidates[m] as f64;
            let err = sum_cw2 - 2.0 * s * (sum_cw + acc_a) + s * s * (sum_c + acc_b);
            if err < best.0 {
                best = (err, self.candidates[m]);
            }
        }
        never_worse_than_s0(w, weights, best.1, bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn gaussian(rng: &mut impl Rng) -> f32 {
        let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }

    /// Student-t with `nu` degrees of freedom: a Gaussian over the root of a χ²/ν.
    fn student_t(rng: &mut impl Rng, nu: usize) -> f32 {
        let chi2: f32 = (0..nu).map(|_| gaussian(rng).powi(2)).sum();
        gaussian(rng) / (chi2 / nu as f32).sqrt()
    }

    /// Gaussian, Student-t (ν = 3), Cauchy (ratio of Gaussians) and sparse-outlier groups of
    /// full, half and odd sizes.
    fn groups(seed: u64) -> Vec<Vec<f32>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut out = Vec::new();
        for len in [128usize, 64, 37] {
            out.push((0..len).map(|_| 0.02 * gaussian(&mut rng)).collect());
            out.push((0..len).map(|_| 0.02 * student_t(&mut rng, 3)).collect());
            out.push((0..len).map(|_| 0.02 * gaussian(&mut rng) / gaussian(&mut rng).abs().max(1e-3)).collect());
            out.push((0..len).map(|i| if i == 3 { 0.8 } else { 0.01 * gaussian(&mut rng) }).collect());
        }
        out
    }

    fn stored_s0_error(w: &[f32], bits: u8) -> f64 {
        pot::group_sq_error(w, stored_s0(w, bits), bits)
    }

    #[test]
    fn never_worse_than_s0_and_equal_to_brute_force() {
        let grid = Grid::default();
        let mut strictly_better = 0;
        for seed in 0..25 {
            for w in groups(seed) {
                for bits in 2..=4 {
                    let fast = search_scale(&w, bits, &grid);
                    let slow = search_scale_reference(&w, bits, &grid);
                    assert_eq!(half::f16::from_f32(fast).to_f32(), fast, "an f16");
                    let (ef, es, e0) = (pot::group_sq_error(&w, fast, bits), pot::group_sq_error(&w, slow, bits), stored_s0_error(&w, bits));
                    assert!(ef <= e0, "seed {seed} bits {bits}: {ef} > s0's {e0}");
                    assert!((ef - es).abs() <= 1e-6 * es, "seed {seed} bits {bits}: fast {ef} vs brute force {es}");
                    strictly_better += (ef < 0.99 * e0) as usize;
                }
            }
        }
        assert!(strictly_better > 500, "the search should usually beat s0 ({strictly_better} of 900)");
    }

    #[test]
    fn weighted_search_matches_brute_force() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let grid = Grid::default();
        for seed in 0..5 {
            for w in groups(seed) {
                // Heavy-tailed column weights, as E[x²] of activations with outlier channels.
                let c: Vec<f32> = w.iter().map(|_| gaussian(&mut rng).powi(4) + 0.01).collect();
                for bits in 2..=4 {
                    let fast = search_scale_weighted(&w, &c, bits, &grid);
                    let slow = search_scale_weighted_reference(&w, &c, bits, &grid);
                    let ef = pot::group_weighted_sq_error(&w, &c, fast, bits);
                    let es = pot::group_weighted_sq_error(&w, &c, slow, bits);
                    let e0 = pot::group_weighted_sq_error(&w, &c, stored_s0(&w, bits), bits);
                    assert!(ef <= e0, "bits {bits}: {ef} > s0's {e0}");
                    assert!((ef - es).abs() <= 1e-6 * es, "bits {bits}: {ef} vs {es}");
                }
            }
        }
        // Unit weights are the unweighted search.
        let w = &groups(3)[1];
        assert_eq!(search_scale_weighted(w, &vec![1.0; w.len()], 3, &grid), search_scale(w, 3, &grid));
    }

    /// Weights sitting exactly on breakpoints of the candidates, where `E` changes.
    #[test]
    fn exact_on_breakpoints() {
        let grid = Grid::default();
        for bits in 2..=4 {
            let top = (1u32 << pot::qmax(bits)) as f32;
            let mut candidates = Vec::new();
            fill_candidates(&mut candidates, 1.0 / top, bits, &grid);
            let mut w = vec![1.0f32, -1.0];
            for (i, &s) in candidates.iter().enumerate().step_by(7) {
                let k = (i % pot::qmax(bits) as usize) as i32;
                let at = f32::from_bits((127 << 23) | pot::SQRT2_MANTISSA) * 2f32.powi(k) * s;
                w.extend([at, f32::from_bits(at.to_bits() - 1), -f32::from_bits(at.to_bits() + 1)]);
            }
            let fast = search_scale(&w, bits, &grid);
            let slow = search_scale_reference(&w, bits, &grid);
            let (ef, es) = (pot::group_sq_error(&w, fast, bits), pot::group_sq_error(&w, slow, bits));
            assert!((ef - es).abs() <= 1e-9 * es, "bits {bits}: {ef} vs {es}");
        }
    }

    #[test]
    fn custom_grids_and_extreme_groups() {
        let w: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.01).collect();
        for grid in [Grid { lo: 0.5, hi: 1.5, points: 11 }, Grid { lo: 1.0, hi: 1.0, points: 1 }, Grid { lo: 0.3, hi: 4.0, points: 57 }] {
            for bits in 2..=4 {
                let s = search_scale(&w, bits, &grid);
                let r = search_scale_reference(&w, bits, &grid);
                assert!(pot::group_sq_error(&w, s, bits) <= stored_s0_error(&w, bits));
                assert_eq!(pot::group_sq_error(&w, s, bits), pot::group_sq_error(&w, r, bits), "{grid:?} {bits}");
            }
        }
        let grid = Grid::default();
        // All zero: the smallest normal f16, no NaN.
        let s = search_scale(&[0.0; 16], 3, &grid);
        assert_eq!(s, half::f16::MIN_POSITIVE.to_f32());
        // Tiny and huge groups: candidates clamp to the f16 range and repeat; still exact.
        for w in [vec![1e-7f32, -3e-7, 2e-8], vec![6e4f32, -1e3, 7.0], vec![1e-30f32, 5e30]] {
            for bits in 2..=4 {
                let (s, r) = (search_scale(&w, bits, &grid), search_scale_reference(&w, bits, &grid));
                assert_eq!(pot::group_sq_error(&w, s, bits), pot::group_sq_error(&w, r, bits), "{w:?} {bits}");
                assert!(s.is_finite() && s >= half::f16::MIN_POSITIVE.to_f32());
            }
        }
        assert!(Grid { lo: 0.0, hi: 1.0, points: 5 }.check().is_err());
        assert!(Grid { lo: 1.0, hi: 2.0, points: 0 }.check().is_err());
        assert!(Grid::default().check().is_ok());
    }

    #[test]
    fn default_grid() {
        let g = Grid::default();
        assert_eq!(g.multiplier(0), 0.01);
        assert_eq!(g.multiplier(199), 2.0);
        assert!((g.multiplier(99) - 1.0).abs() < 1e-6);
    }
}
