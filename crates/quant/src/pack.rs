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

/// Packs `rows × cols` codes of `bits` bits each (1..=8); panics on a length mismatch or a code
/// that does not fit, which would be a bug in the caller.
pub fn pack(codes: &[u8], rows: usize, cols: usize, bits: u8) -> Vec<u32> {
    assert!((1..=8).contains(&bits), "pack: {bits} bits per code");
    assert_eq!(codes.len(), rows * cols, "pack: {} codes for [{rows}, {cols}]", codes.len());
    assert!(codes.iter().all(|&c| (c as u32) < 1 << bits), "pack: a code does not fit in {bits} bits");
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
    ensure!((1..=8).contains(&bits), "packed codes: {bits} bits per code is not supported (1 to 8)");
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

    /// The layout spelled out: each row's chunks as a list of bits, lowest first, then cut
    /// into 32-bit words.
    fn pack_reference(codes: &[u8], rows: usize, cols: usize, bits: u8) -> Vec<u32> {
        let mut out = Vec::new();
        for r in 0..rows {
            let mut stream: Vec<bool> = Vec::new();
            for c in 0..cols.div_ceil(32) * 32 {
                let code = if c < cols { codes[r * cols + c] } else { 0 };
                stream.extend((0..bits).map(|k| (code >> k) & 1 == 1));
            }
            out.extend(stream.chunks(32).map(|w| w.iter().enumerate().map(|(k, &b)| (b as u32) << k).sum::<u32>()));
        }
        out
    }

    #[test]
    fn equals_the_bit_stream_reference() {
        for bits in 1..=8u8 {
            for &(rows, cols) in &[(1, 32), (2, 576), (3, 72), (2, 100), (4, 7)] {
                let codes: Vec<u8> = (0..rows * cols).map(|i| ((i * 2654435761usize) >> 7) as u8 & ((1u16 << bits) - 1) as u8).collect();
                assert_eq!(pack(&codes, rows, cols, bits), pack_reference(&codes, rows, cols, bits), "{bits} bits, [{rows}, {cols}]");
            }
        }
    }

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
        assert!(unpack(&[0; 5], 2, 32, 3).unwrap_err().to_string().contains("expected 6"));
        assert!(unpack(&[0; 2], 1, 32, 0).is_err());
        assert!(unpack(&[0; 9], 1, 32, 9).is_err());
    }

    #[test]
    fn layout_of_a_3_bit_chunk() {
        let mut codes = vec![0u8; 32];
        codes[10] = 0b111; // bits 30..33: straddles words 0 and 1
        let p = pack(&codes, 1, 32, 3);
        assert_eq!(p, vec![0b11 << 30, 0b1, 0]);
    }
}
