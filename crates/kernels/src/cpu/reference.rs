//! The plain definition every fast kernel is tested against: `y[t, r] = Σ_c W[r, c]·x[t, c]`,
//! each weight decoded on its own by the quantizer's `decode`, sums in f64.

use half::f16;

use crate::PackedMatrix;

/// Products in f64, and `Σ_c |W[r, c]·x[t, c]|`: the scale a relative error is measured on
/// (a sum that cancels to near zero has no meaningful relative error of its own).
pub struct Reference {
    pub y: Vec<f64>,
    pub magnitude: Vec<f64>,
}

fn reference(rows: usize, cols: usize, weight: impl Fn(usize, usize) -> f32, x: &[f32], tokens: usize) -> Reference {
    let mut y = vec![0f64; tokens * rows];
    let mut magnitude = vec![0f64; tokens * rows];
    for t in 0..tokens {
        for r in 0..rows {
            for c in 0..cols {
                let p = weight(r, c) as f64 * x[t * cols + c] as f64;
                y[t * rows + r] += p;
                magnitude[t * rows + r] += p.abs();
            }
        }
    }
    Reference { y, magnitude }
}

pub fn matmul_packed(m: &PackedMatrix, x: &[f32], tokens: usize) -> Reference {
    reference(m.rows(), m.cols(), |r, c| m.weight(r, c), x, tokens)
}

pub fn matmul_f32(w: &[f32], rows: usize, cols: usize, x: &[f32], tokens: usize) -> Reference {
    reference(rows, cols, |r, c| w[r * cols + c], x, tokens)
}

pub fn matmul_f16(w: &[f16], rows: usize, cols: usize, x: &[f32], tokens: usize) -> Reference {
    reference(rows, cols, |r, c| w[r * cols + c].to_f32(), x, tokens)
}

impl Reference {
    /// The largest `|y − y_ref| / Σ|W·x|` over all outputs.
    pub fn max_relative_error(&self, y: &[f32]) -> f64 {
        assert_eq!(y.len(), self.y.len());
        y.iter()
            .zip(&self.y)
            .zip(&self.magnitude)
            .map(|((&a, &b), &m)| if m == 0.0 { (a as f64 - b).abs() } else { (a as f64 - b).abs() / m })
            .fold(0.0, f64::max)
    }
}
