//! Every kernel against the plain reference, on shapes chosen to hit the edges: rows that are
//! not a multiple of anything, rows whose width is not a multiple of 8 (scalar tail), groups
//! longer than the row, ragged last groups, and batches on both sides of the GEMV/GEMM switch.
//! Relative error: `|y − y_ref| / Σ_c |W·x|` per output, at most 1e-5.

use half::f16;
use potptq_kernels::cpu::reference;
use potptq_kernels::{matmul_f16, matmul_f32, matmul_with, Activations, Isa, Kernel, PackedMatrix, PotDecode};
use potptq_quant::{quantize_rtn, Format, GroupLayout};
use rand::{Rng, SeedableRng};

const TOLERANCE: f64 = 1e-5;
const BATCHES: [usize; 4] = [1, 3, 5, 32];

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale).collect()
}

fn isas() -> Vec<Isa> {
    [Isa::Portable, Isa::Avx2, Isa::Avx512].into_iter().filter(|i| i.available()).collect()
}

/// `(rows, cols, group)`: ragged last groups (576 = 4.5 × 128, 100 = 3 × 32 + 4), a group
/// wider than the row, widths that are not a multiple of 8 or of 32.
const SHAPES: [(usize, usize, usize); 13] = [
    (3, 160, 32),
    (10, 264, 96),
    (6, 4000, 256),
    (5, 200, 64),
    (7, 576, 128),
    (13, 100, 32),
    (3, 72, 256),
    (9, 200, 64),
    (1, 1536, 128),
    (17, 331, 40),
    (5, 256, 256),
    (11, 96, 48),
    (67, 144, 136),
];

fn check(m: &PackedMatrix, what: &str) {
    for &tokens in &BATCHES {
        let x = random(tokens * m.cols(), (tokens * 131 + m.rows()) as u64, 1.0);
        let want = reference::matmul_packed(m, &x, tokens);
        for isa in isas() {
            for decode in [PotDecode::Lut, PotDecode::BitAdd] {
                let mut y = vec![f32::NAN; tokens * m.rows()];
                matmul_with(Kernel { isa, pot_decode: Some(decode), activations: Activations::F32 }, m, &x, tokens, &mut y).unwrap();
                let err = want.max_relative_error(&y);
                assert!(err <= TOLERANCE, "{what} batch {tokens} {isa:?} {decode:?}: relative error {err:e}");
            }
        }
        // Q8 activations: their own reference (the same rounding of x, integer products).
        let want = reference::matmul_packed_q8(m, &x, tokens);
        for isa in isas() {
            let mut y = vec![f32::NAN; tokens * m.rows()];
            matmul_with(Kernel { isa, pot_decode: None, activations: Activations::Q8 }, m, &x, tokens, &mut y).unwrap();
            let err = want.max_relative_error(&y);
            assert!(err <= TOLERANCE, "{what} batch {tokens} {isa:?} Q8: relative error {err:e}");
        }
    }
}

#[test]
fn packed_kernels_equal_the_reference() {
    for (i, &(rows, cols, group)) in SHAPES.iter().enumerate() {
        let layout = GroupLayout::new(rows, cols, group).unwrap();
        let w = random(rows * cols, i as u64, 0.05);
        for (format, bits) in [(Format::Pot, 2), (Format::Pot, 3), (Format::Pot, 4), (Format::IntAsym, 2), (Format::IntAsym, 3), (Format::IntAsym, 4), (Format::IntSym, 4), (Format::IntAsym, 8)] {
            let q = quantize_rtn("w", &w, layout, format, bits).unwrap();
            let m = PackedMatrix::from_qtensor(&q).unwrap();
            check(&m, &format!("{format:?} {bits} bits [{rows}, {cols}] g{group}"));
        }
    }
}

/// Extreme codes: every weight at the top level, every sign, scales far from 1 (groups of one
/// 32-block and a half, and of two: the VNNI kernels' pairs).
#[test]
fn packed_kernels_at_extreme_codes_and_scales() {
    for (cols, group) in [(80, 32), (192, 64)] {
        extreme_codes_and_scales(GroupLayout::new(5, cols, group).unwrap());
    }
}

fn extreme_codes_and_scales(layout: GroupLayout) {
    let cols = layout.cols;
    for bits in 2..=4u8 {
        for (i, fill) in [0u8, (1 << bits) - 1, 1 << (bits - 1), (1 << (bits - 1)) - 1].into_iter().enumerate() {
            let codes = vec![fill; 5 * cols];
            let words = potptq_quant::pack::pack(&codes, 5, cols, bits);
            let scales: Vec<f32> = (0..15).map(|g| f16::from_f32(6e-5 * 7f32.powi(g % 6)).to_f32()).collect();
            let m = PackedMatrix::new(Format::Pot, bits, layout, words.clone(), scales.clone(), vec![]).unwrap();
            check(&m, &format!("PoT {bits} bits all codes {fill}"));
            let zeros = vec![(i as u8) % (1 << bits); 15];
            let m = PackedMatrix::new(Format::IntAsym, bits, layout, words, scales, zeros).unwrap();
            check(&m, &format!("INT {bits} bits all codes {fill}"));
        }
    }
}

#[test]
fn dense_kernels_equal_the_reference() {
    for &(rows, cols, _) in &SHAPES {
        let w = random(rows * cols, 3, 0.1);
        let h: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
        let bits: Vec<u16> = h.iter().map(|v| v.to_bits()).collect();
        for &tokens in &BATCHES {
            let x = random(tokens * cols, 4, 1.0);
            let want32 = reference::matmul_f32(&w, rows, cols, &x, tokens);
            let want16 = reference::matmul_f16(&h, rows, cols, &x, tokens);
            for isa in isas() {
                let mut y = vec![f32::NAN; tokens * rows];
                matmul_f32(isa, &w, rows, cols, &x, tokens, &mut y).unwrap();
                assert!(want32.max_relative_error(&y) <= TOLERANCE, "f32 [{rows}, {cols}] batch {tokens} {isa:?}");
                matmul_f16(isa, &bits, rows, cols, &x, tokens, &mut y).unwrap();
                assert!(want16.max_relative_error(&y) <= TOLERANCE, "f16 [{rows}, {cols}] batch {tokens} {isa:?}");
            }
        }
    }
}

#[test]
fn wrong_lengths_are_errors() {
    let layout = GroupLayout::new(4, 64, 32).unwrap();
    let q = quantize_rtn("w", &random(256, 1, 0.1), layout, Format::Pot, 3).unwrap();
    let m = PackedMatrix::from_qtensor(&q).unwrap();
    let mut y = vec![0f32; 8];
    let e = potptq_kernels::matmul(&m, &[0.0; 127], 2, &mut y).unwrap_err().to_string();
    assert!(e.contains("expected 2 tokens × 64"), "{e}");
    let e = potptq_kernels::matmul(&m, &[0.0; 128], 2, &mut y[..7]).unwrap_err().to_string();
    assert!(e.contains("output"), "{e}");
    assert!(matmul_f32(Isa::Portable, &[0.0; 10], 4, 64, &[0.0; 64], 1, &mut y[..4]).is_err());
}
