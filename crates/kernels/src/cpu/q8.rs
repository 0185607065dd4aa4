//! Activations quantized to 8-bit integers (llama.cpp's Q8_0): the input vector is cut into
//! blocks of 32 and each block becomes `d · q` with `d = max|x| / 127` and `q` in `[−127, 127]`
//! (round to nearest, ties to even). A packed weight is `s · w` with `w` a small integer (PoT:
//! `±2^E`; INT: `q − z`), so a block's products are one exact integer sum `Σ w·q` times
//! `d · s`: that is what `_mm256_maddubs_epi16` computes, 32 weights at a time.
//!
//! Blocks never straddle a weight group: they run in 32s from each group's start, the last
//! block of a group (or of a ragged row) being shorter. When the group size is a multiple of 32
//! the blocks are simply columns `32b..32b + 32` of the row.
//!
//! This changes the numbers (the activations are rounded to about 2.5 significant digits per
//! block), so it is an explicit choice (`Activations::Q8`); its exact definition is
//! `reference::matmul_packed_q8`.

use crate::PackedMatrix;
use potptq_quant::GroupLayout;

/// Values per activation block.
pub const BLOCK: usize = 32;

/// One token's activations in Q8 blocks, laid out for one matrix's group size.
#[derive(Debug, Clone)]
pub struct Q8Activations {
    /// The quantized values: whole 32-blocks (when the group size is a multiple of 32) in the
    /// order the SIMD decode of the matrix's width produces codes (`order`), others in column
    /// order.
    pub q: Vec<i8>,
    /// The scale `d` of each block.
    pub d: Vec<f32>,
    /// `Σ q` of each block.
    pub sums: Vec<i32>,
    /// `Σ_b d_b · Σ q` over the whole 32-blocks of each group (short blocks are left out: the
    /// SIMD kernels do those in integers). The zero-point term of INT, and the offset that
    /// makes PoT levels unsigned.
    pub group_sums: Vec<f32>,
}

/// Where code `k` (0..32) of a chunk of 32 lands in a SIMD register, for each order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Column order.
    Natural,
    /// 4-bit codes: low nibbles (even columns) first, then high nibbles (odd columns).
    Nibbles,
    /// 2-bit codes: column `4j + l` at position `8l + j`.
    Crumbs,
}

impl Order {
    #[inline]
    pub fn position(self, k: usize) -> usize {
        match self {
            Order::Natural => k,
            Order::Nibbles => (k & 1) * 16 + k / 2,
            Order::Crumbs => (k & 3) * 8 + k / 4,
        }
    }
}

/// The blocks of a row: `(first column, length, group)` in order.
pub fn blocks(layout: GroupLayout) -> impl Iterator<Item = (usize, usize, usize)> {
    let (cols, g) = (layout.cols, layout.group_size);
    (0..layout.groups_per_row()).flat_map(move |group| {
        let (start, end) = (group * g, ((group + 1) * g).min(cols));
        (start..end).step_by(BLOCK).map(move |c| (c, BLOCK.min(end - c), group))
    })
}

/// `round_ties_even(x / d)` as the kernels compute it: `x · (1/d)`.
#[inline]
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    d
}

impl Q8Activations {
    /// Quantizes one token `x` (`layout.cols` values); whole 32-blocks are stored in `order`.
    /// `simd`: whole blocks through AVX2 (the same numbers, faster).
    pub fn new(x: &[f32], layout: GroupLayout, order: Order, simd: bool) -> Self {
        assert_eq!(x.len(), layout.cols);
        let n_blocks = blocks(layout).count();
        let mut q = vec![0i8; x.len()];
        let mut d = Vec::with_capacity(n_blocks);
        let mut sums = Vec::with_capacity(n_blocks);
        let mut group_sums = vec![0f32; layout.groups_per_row()];
        let mut natural = [0i8; BLOCK];
        for (c, len, group) in blocks(layout) {
            #[cfg(target_arch = "x86_64")]
            let scale = if simd && len == BLOCK {
                // SAFETY: the caller checked AVX2; the block has 32 values.
                unsafe { super::avx2::q8_quantize_block(x[c..c + BLOCK].as_ptr(), &mut natural) }
            } else {
                quantize_block(&x[c..c + len], &mut natural[..len])
            };
            #[cfg(not(target_arch = "x86_64"))]
            let scale = {
                let _ = simd;
                quantize_block(&x[c..c + len], &mut natural[..len])
            };
            let out = &mut q[c..c + len];
            if len == BLOCK {
                for (k, &v) in natural.iter().enumerate() {
                    out[order.position(k)] = v;
                }
            } else {
                out.copy_from_slice(&natural[..len]);
            }
            let sum: i32 = natural[..len].iter().map(|&v| v as i32).sum();
            d.push(scale);
            sums.push(sum);
            if len == BLOCK {
                group_sums[group] += scale * sum as f32;
            }
        }
        Self { q, d, sums, group_sums }
    }

    /// The activations the integer products see, back as f32 in column order (`d · q`): a
    /// product of many tokens multiplies these with the decoded weights (same numbers, the
    /// dense arithmetic).
    pub fn dequantize_into(x: &[f32], layout: GroupLayout, out: &mut [f32]) {
        let mut q = [0i8; BLOCK];
        for (c, len, _) in blocks(layout) {
            let d = quantize_block(&x[c..c + len], &mut q[..len]);
            for (o, &v) in out[c..c + len].iter_mut().zip(&q[..len]) {
                *o = d * v as f32;
            }
        }
    }
}

/// The integer weight `w` of `(r, c)` (the weight is `s · w`): PoT `±2^E`, INT `q − z`.
pub fn integer_weight(m: &PackedMatrix, r: usize, c: usize) -> i32 {
    let code = m.code(r, c) as i32;
    let bits = m.bits() as i32;
    if m.format().is_int() {
        code - m.zeros()[r * m.layout().groups_per_row() + c / m.layout().group_size] as i32
    } else {
        let e = code & ((1 << (bits - 1)) - 1);
        if code >> (bits - 1) & 1 == 1 {
            -(1 << e)
        } else {
            1 << e
        }
    }
}

/// Row `r` against one token's activations in column order: the plain integer sum per block.
pub fn dot_scalar(m: &PackedMatrix, r: usize, a: &Q8Activations) -> f32 {
    let gpr = m.layout().groups_per_row();
    let mut total = 0f32;
    for (b, (c, len, group)) in blocks(m.layout()).enumerate() {
        let dot: i32 = (c..c + len).map(|col| integer_weight(m, r, col) * a.q[col] as i32).sum();
        total += a.d[b] * m.scales()[r * gpr + group] * dot as f32;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_stay_inside_groups() {
        let layout = GroupLayout::new(1, 100, 40).unwrap();
        let b: Vec<_> = blocks(layout).collect();
        assert_eq!(b, vec![(0, 32, 0), (32, 8, 0), (40, 32, 1), (72, 8, 1), (80, 20, 2)]);
    }

    #[test]
    fn simd_quantization_is_the_scalar_one() {
        #[cfg(target_arch = "x86_64")]
        if super::super::avx2::available() {
            let layout = GroupLayout::new(1, 4096, 128).unwrap();
            let mut x: Vec<f32> = (0..4096).map(|i| ((i * 7919 % 1013) as f32 - 506.5) * 0.013).collect();
            x[..32].iter_mut().for_each(|v| *v = 0.0);
            x[40] = 127.0 * 0.5; // ties
            for order in [Order::Natural, Order::Nibbles, Order::Crumbs] {
                let a = Q8Activations::new(&x, layout, order, false);
                let b = Q8Activations::new(&x, layout, order, true);
                assert_eq!((a.q, a.d, a.sums, a.group_sums), (b.q, b.d, b.sums, b.group_sums));
            }
        }
    }

    #[test]
    fn orders_are_permutations() {
        for order in [Order::Natural, Order::Nibbles, Order::Crumbs] {
            let mut seen: Vec<usize> = (0..32).map(|k| order.position(k)).collect();
            seen.sort();
            assert_eq!(seen, (0..32).collect::<Vec<_>>());
        }
    }

    #[test]
    fn quantization_rounds_to_the_block_scale() {
        let layout = GroupLayout::new(1, 40, 40).unwrap();
        let x: Vec<f32> = (0..40).map(|i| (i as f32 - 17.0) * 0.1).collect();
        let a = Q8Activations::new(&x, layout, Order::Natural, false);
        assert_eq!(a.d.len(), 2);
        assert_eq!(a.q[0], -127); // −1.7 is the largest magnitude of the first block
        let mut back = vec![0f32; 40];
        Q8Activations::dequantize_into(&x, layout, &mut back);
        for (i, (&v, &b)) in x.iter().zip(&back).enumerate() {
            let d = a.d[if i < 32 { 0 } else { 1 }];
            assert!((v - b).abs() <= d / 2.0 * 1.0001, "{i}: {v} {b}");
            assert_eq!(b, d * a.q[i] as f32);
        }
        assert_eq!(a.sums[1], a.q[32..].iter().map(|&v| v as i32).sum::<i32>());
    }
}
