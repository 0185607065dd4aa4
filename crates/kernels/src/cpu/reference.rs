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

/// The Q8 path's definition (`q8`): each token's activations quantized per block, each block's
/// products an exact integer sum `Σ w·q` (PoT `w = ±2^E`, INT `w = q − z`) times `d · s`, all in
/// f64.
pub fn matmul_packed_q8(m: &PackedMatrix, x: &[f32], tokens: usize) -> Reference {
    use crate::cpu::q8::{blocks, integer_weight, Order, Q8Activations};
    let (rows, cols) = (m.rows(), m.cols());
    let gpr = m.layout().groups_per_row();
    let mut y = vec![0f64; tokens * rows];
    let mut magnitude = vec![0f64; tokens * rows];
    for t in 0..tokens {
        let a = Q8Activations::new(&x[t * cols..(t + 1) * cols], m.layout(), Order::Natural, false);
        for r in 0..rows {
            for (b, (c, len, group)) in blocks(m.layout()).enumerate() {
                let scale = a.d[b] as f64 * m.scales()[r * gpr + group] as f64;
                for col in c..c + len {
                    let p = (integer_weight(m, r, col) as i64 * a.q[col] as i64) as f64 * scale;
                    y[t * rows + r] += p;
                    magnitude[t * rows + r] += p.abs();
                }
            }
        }
    }
    Reference { y, magnitude }
}
