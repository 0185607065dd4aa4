//! Dense bit packing: exactly `bits` bits per weight when a row's length is a multiple of 32.
//!
//! Each row is cut into chunks of 32 codes (the last one zero-padded). A chunk is `bits`
//! little-endian u32 words; code `j` of the chunk occupies bits `[j·bits, (j+1)·bits)` of the
//! chunk's bit stream, lowest bits first. 32 codes of any width fill whole words, so a kernel
//! decodes a chunk from `bits` aligned loads.

use anyhow::{ensure, Result};

pub fn words_per_row(cols: usize, bits: u8) -> usize {
    cols.div_ceil(32) * bits as usize
}

pub fn pack(codes: &[u8], rows: usize, cols: usize, bits: u8) -> Vec<u32> {
    assert_eq!(codes.len(), rows * cols);
    let b = bits as usize;
    let wpr = words_per_row(cols, bits);
    let mut out = vec![0u32; rows * wpr];
    for (r, row) in codes.chunks(cols).enumerate() {
        let words = &mut out[r * wpr..(r + 1) * wpr];
        for (c, &code) in row.iter().enumerate() {
            let bit = (c / 32) * 32 * b + (c % 32) * b;
            let (word, off) = (bit / 32, bit % 32);
            words[word] |= (code as u32) << off;
            if off + b > 32 {
                words[word + 1] |= (code as u32) >> (32 - off);
            }
        }
    }
    out
}

pub fn unpack(packed: &[u32], rows: usize, cols: usize, bits: u8) -> Result<Vec<u8>> {
    let b = bits as usize;
    let wpr = words_per_row(cols, bits);
    ensure!(packed.len() == rows * wpr, "packed codes: {} words, expected {} for [{rows}, {cols}] at {bits} bits", packed.len(), rows * wpr);
    let mask = (1u64 << b) - 1;
    let mut out = Vec::with_capacity(rows * cols);
    for words in packed.chunks(wpr) {
        for c in 0..cols {
            let bit = (c / 32) * 32 * b + (c % 32) * b;
            let (word, off) = (bit / 32, bit % 32);
            let lo = words[word] as u64;
            let hi = if off + b > 32 { (words[word + 1] as u64) << 32 } else { 0 };
            out.push((((lo | hi) >> off) & mask) as u8);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_size_and_round_trip() {
        for bits in 2..=8u8 {
            for &(rows, cols) in &[(1, 32), (3, 96), (2, 100), (5, 1)] {
                let codes: Vec<u8> = (0..rows * cols).map(|i| ((i * 7 + 3) % (1 << bits)) as u8).collect();
                let p = pack(&codes, rows, cols, bits);
                assert_eq!(p.len(), rows * cols.div_ceil(32) * bits as usize);
                if cols % 32 == 0 {
                    assert_eq!(p.len() * 32, rows * cols * bits as usize, "exactly {bits} bits per weight");
                }
                assert_eq!(unpack(&p, rows, cols, bits).unwrap(), codes);
            }
        }
        assert!(unpack(&[0; 5], 2, 32, 3).is_err());
    }

    #[test]
    fn layout_of_a_3_bit_chunk() {
        let mut codes = vec![0u8; 32];
        codes[10] = 0b111; // bits 30..33: straddles words 0 and 1
        let p = pack(&codes, 1, 32, 3);
        assert_eq!(p, vec![0b11 << 30, 0b1, 0]);
    }
}
