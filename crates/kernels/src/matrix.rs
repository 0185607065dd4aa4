//! A quantized weight matrix held as the checkpoint stores it: dense-packed codes (rows in
//! chunks of 32 codes, each chunk `bits` little-endian u32 words), one scale per group and, for
//! INT, one zero-point per group. Nothing is unpacked at load time: the SIMD kernels read 8
//! codes at a time straight from this layout (see `cpu::avx2`).

use anyhow::{ensure, Result};
use potptq_quant::pack::words_per_row;
use potptq_quant::{check_bits, int, pot, Format, GroupLayout, QTensor};

#[derive(Debug, Clone, PartialEq)]
pub struct PackedMatrix {
    format: Format,
    bits: u8,
    layout: GroupLayout,
    /// `rows × words_per_row` words, then one zero word: the kernels load 32 bits at the byte
    /// where 8 codes start, which for 2 and 3 bits reaches past a row's last chunk.
    words: Vec<u32>,
    /// `[rows, groups_per_row]`.
    scales: Vec<f32>,
    /// INT zero-points `[rows, groups_per_row]`; empty for PoT.
    zeros: Vec<u8>,
    /// INT `−s·z` per group, so that `w = s·q + offset` (exact: `s` is an f16, `q, z < 256`).
    offsets: Vec<f32>,
}

impl PackedMatrix {
    /// Checks the stored parameters against `layout` and keeps them as they are.
    pub fn new(format: Format, bits: u8, layout: GroupLayout, mut words: Vec<u32>, scales: Vec<f32>, zeros: Vec<u8>) -> Result<Self> {
        check_bits(format, bits)?;
        let expected = layout.rows * words_per_row(layout.cols, bits);
        ensure!(
            words.len() == expected,
            "packed codes: {} words, expected {expected} for [{}, {}] at {bits} bits",
            words.len(),
            layout.rows,
            layout.cols
        );
        let groups = layout.rows * layout.groups_per_row();
        ensure!(scales.len() == groups, "{} scales for {groups} groups", scales.len());
        ensure!(scales.iter().all(|s| s.is_finite() && *s > 0.0), "scales must be positive and finite");
        let offsets = if format.is_int() {
            ensure!(zeros.len() == groups, "{} zero-points for {groups} groups", zeros.len());
            ensure!(zeros.iter().all(|&z| (z as u32) < 1 << bits), "zero-points must fit in {bits} bits");
            scales.iter().zip(&zeros).map(|(&s, &z)| -s * z as f32).collect()
        } else {
            ensure!(zeros.is_empty(), "PoT has no zero-points");
            if let Some(s) = scales.iter().find(|s| !pot_scale_decodes_exactly(**s, bits)) {
                anyhow::bail!("PoT scale {s:e} is not a normal f32 whose top level stays finite ({bits} bits)");
            }
            Vec::new()
        };
        words.push(0);
        Ok(Self { format, bits, layout, words, scales, zeros, offsets })
    }

    pub fn from_qtensor(q: &QTensor) -> Result<Self> {
        Self::new(q.format, q.bits, q.layout, q.packed_codes(), q.scales.clone(), q.zeros.clone())
    }

    /// The matrices one above the other (`[Σ rows, cols]`): linears that read the same input,
    /// multiplied in one product (a block's q, k, v or gate, up).
    pub fn stack_rows(parts: &[&PackedMatrix]) -> Result<Self> {
        let first = parts.first().ok_or_else(|| anyhow::anyhow!("no matrices to stack"))?;
        let (format, bits, cols, group) = (first.format, first.bits, first.cols(), first.layout.group_size);
        ensure!(
            parts.iter().all(|m| (m.format, m.bits, m.cols(), m.layout.group_size) == (format, bits, cols, group)),
            "stacked matrices differ in format, bits, columns or group size"
        );
        let rows = parts.iter().map(|m| m.rows()).sum();
        let words = parts.iter().flat_map(|m| m.packed_words()).copied().collect();
        let scales = parts.iter().flat_map(|m| &m.scales).copied().collect();
        let zeros = parts.iter().flat_map(|m| &m.zeros).copied().collect();
        Self::new(format, bits, GroupLayout::new(rows, cols, group)?, words, scales, zeros)
    }

    /// The codes unpacked again (one byte per weight), e.g. to compare with what was saved.
    pub fn to_qtensor(&self) -> Result<QTensor> {
        QTensor::from_packed(self.format, self.bits, self.layout, self.packed_words(), self.scales.clone(), self.zeros.clone())
    }

    pub fn format(&self) -> Format {
        self.format
    }
    pub fn bits(&self) -> u8 {
        self.bits
    }
    pub fn layout(&self) -> GroupLayout {
        self.layout
    }
    pub fn rows(&self) -> usize {
        self.layout.rows
    }
    pub fn cols(&self) -> usize {
        self.layout.cols
    }
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
    pub fn zeros(&self) -> &[u8] {
        &self.zeros
    }
    pub(crate) fn offsets(&self) -> &[f32] {
        &self.offsets
    }

    /// The packed codes as stored in a checkpoint (without the padding word).
    pub fn packed_words(&self) -> &[u32] {
        &self.words[..self.words.len() - 1]
    }

    pub fn words_per_row(&self) -> usize {
        words_per_row(self.layout.cols, self.bits)
    }

    /// Row `r`'s packed bytes, followed by at least 4 readable bytes.
    pub(crate) fn row_ptr(&self, r: usize) -> *const u8 {
        debug_assert!(r < self.layout.rows);
        self.words[r * self.words_per_row()..].as_ptr() as *const u8
    }

    /// Bytes held in memory: codes, scales, zero-points and INT offsets.
    pub fn memory_bytes(&self) -> usize {
        self.words.len() * 4 + self.scales.len() * 4 + self.zeros.len() + self.offsets.len() * 4
    }

    /// Bytes a product reads per pass over the weights: codes, scales (and INT offsets).
    pub fn weight_bytes(&self) -> usize {
        self.packed_words().len() * 4 + self.scales.len() * 4 + self.offsets.len() * 4
    }

    /// The code of weight `(r, c)`, read from the packed bits.
    pub fn code(&self, r: usize, c: usize) -> u8 {
        let b = self.bits as usize;
        let bit = (c / 32) * 32 * b + (c % 32) * b;
        let row = &self.words[r * self.words_per_row()..];
        let (word, off) = (bit / 32, bit % 32);
        let pair = row[word] as u64 | (row[word + 1] as u64) << 32;
        ((pair >> off) & ((1 << b) - 1)) as u8
    }

    /// Weight `(r, c)` as the quantizer defines it (`potptq_quant::{pot, int}::decode`).
    pub fn weight(&self, r: usize, c: usize) -> f32 {
        let g = r * self.layout.groups_per_row() + c / self.layout.group_size;
        let code = self.code(r, c);
        match self.format {
            Format::Pot => pot::decode(code, self.scales[g], self.bits),
            Format::IntAsym | Format::IntSym => int::decode(code, self.scales[g], self.zeros[g]),
        }
    }

    /// The f32 matrix, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.layout.rows * self.layout.cols];
        crate::cpu::decode_rows(self, 0, &mut out);
        out
    }
}

/// The CPU bit-add `bits(s) + (E << 23)` is exact when `s` is a normal f32 and `s · 2^q_max`
/// is finite. f16 scales (as checkpoints store them) always are.
fn pot_scale_decodes_exactly(s: f32, bits: u8) -> bool {
    s.is_normal() && (s * (1u32 << pot::qmax(bits)) as f32).is_finite()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_weights_match_the_quantizer() {
        let layout = GroupLayout::new(3, 100, 32).unwrap();
        let w: Vec<f32> = (0..300).map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3).collect();
        for (format, bits) in [(Format::Pot, 2), (Format::Pot, 3), (Format::Pot, 4), (Format::IntAsym, 3), (Format::IntSym, 4)] {
            let q = potptq_quant::quantize_rtn("w", &w, layout, format, bits).unwrap();
            let m = PackedMatrix::from_qtensor(&q).unwrap();
            let deq = q.dequantize();
            for r in 0..3 {
                for c in 0..100 {
                    assert_eq!(m.code(r, c), q.codes[r * 100 + c]);
                    assert_eq!(m.weight(r, c), deq[r * 100 + c]);
                }
            }
            assert_eq!(m.dequantize(), deq, "{format:?} {bits}");
            assert_eq!(m.to_qtensor().unwrap().codes, q.codes);
        }
    }

    #[test]
    fn stacked_rows_are_the_parts_in_order() {
        let w: Vec<f32> = (0..500).map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3).collect();
        for (format, bits) in [(Format::Pot, 3), (Format::IntAsym, 2)] {
            let part = |rows: usize, at: usize| {
                let q = potptq_quant::quantize_rtn("w", &w[at..at + rows * 48], GroupLayout::new(rows, 48, 24).unwrap(), format, bits).unwrap();
                PackedMatrix::from_qtensor(&q).unwrap()
            };
            let (a, b, c) = (part(3, 0), part(1, 144), part(5, 192));
            let s = PackedMatrix::stack_rows(&[&a, &b, &c]).unwrap();
            assert_eq!((s.rows(), s.cols()), (9, 48));
            let want: Vec<f32> = [a.dequantize(), b.dequantize(), c.dequantize()].concat();
            assert_eq!(s.dequantize(), want, "{format:?} {bits}");
        }
        let q = |bits| PackedMatrix::from_qtensor(&potptq_quant::quantize_rtn("w", &w[..96], GroupLayout::new(2, 48, 24).unwrap(), Format::Pot, bits).unwrap()).unwrap();
        let e = PackedMatrix::stack_rows(&[&q(3), &q(4)]).unwrap_err();
        assert!(e.to_string().contains("differ"), "{e}");
        assert!(PackedMatrix::stack_rows(&[]).is_err());
    }

    #[test]
    fn bad_parameters_are_errors() {
        let layout = GroupLayout::new(2, 64, 32).unwrap();
        let words = vec![0u32; 2 * 2 * 3];
        assert!(PackedMatrix::new(Format::Pot, 3, layout, words.clone(), vec![1.0; 4], vec![]).is_ok());
        let e = PackedMatrix::new(Format::Pot, 3, layout, words[1..].to_vec(), vec![1.0; 4], vec![]).unwrap_err();
        assert!(e.to_string().contains("expected 12"), "{e}");
        assert!(PackedMatrix::new(Format::Pot, 3, layout, words.clone(), vec![1.0; 3], vec![]).is_err());
        assert!(PackedMatrix::new(Format::Pot, 3, layout, words.clone(), vec![f32::NAN; 4], vec![]).is_err());
        assert!(PackedMatrix::new(Format::Pot, 3, layout, words.clone(), vec![1e-40; 4], vec![]).is_err(), "subnormal scale");
        assert!(PackedMatrix::new(Format::Pot, 5, layout, words.clone(), vec![1.0; 4], vec![]).is_err());
        assert!(PackedMatrix::new(Format::IntAsym, 3, layout, words.clone(), vec![1.0; 4], vec![]).is_err());
        assert!(PackedMatrix::new(Format::IntAsym, 3, layout, words, vec![1.0; 4], vec![8; 4]).is_err());
    }
}
