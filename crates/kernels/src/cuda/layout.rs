//! The GPU layout of PoT and INT codes for the fused kernels of `qgemm.cu`, built on the CPU
//! at load time (and tested here, without a GPU).
//!
//! **Tiles.** A matrix `[rows, cols]` is cut into tiles of 16 rows × 64 columns (four
//! `mma.m16n8k16` steps). In a tile, lane `l` of a warp owns the 32 weights that its A
//! fragments hold: for pair `p = 4·step + reg` (`reg` = fragment register 0..4), row
//! `l/4 + 8·(reg & 1)` and the two columns `16·(l%4) + 4·step + 2·(reg >> 1) + {0, 1}`. The
//! `mma`'s k positions are a permutation of the tile's columns, chosen so that lane `l`'s
//! activations for the whole tile are the 16 consecutive columns from `16·(l%4)`: two
//! 16-byte loads. Those 32 weights are `bits` u32 words, stored lane by lane (4-bit: one
//! 16-byte load per lane; 2-bit: 8 bytes; 3-bit: 8 bytes, then one word from the tile's
//! last 128 bytes), so a warp loads a tile with wide coalesced reads and nothing is unpacked
//! in memory.
//!
//! **Words.** Every pair is decoded into both 16-bit halves of one 32-bit register at once:
//! `rotl(word, r) & mask` puts each code bit where the f16 decode needs it, in both lanes.
//! PoT: exponent bit `i` at 10 + i (the f16 exponent field), the sign at 15, so that
//! `0x4000·0x10001 | fields` is the pair of levels `±2^(1+E)`: the bit-add of METHOD.md on
//! the bit pattern of 2.0, whose low exponent bits are zero, so that the add is an OR and
//! one `lop3` both masks and decodes. The group scale (`s/2`, f32) multiplies the group's
//! partial sums after the `mma`. INT: code bit `i` at `i`, so `fields | 0x6400` is the f16
//! `1024 + q`, and `h − (1024 + z)` the exact `q − z` (the usual magic-number conversion),
//! scaled after the `mma` the same way. A "plane" is a set of code bits stored together:
//! 2-bit codes use one plane (both bits, 8 pairs a word); 3-bit codes a 2-bit plane (2 words)
//! and a 1-bit plane (16 pairs in one word); 4-bit codes two 2-bit planes. Pair `p` is
//! rotated by `2·(p % 8)` in a plane of 8 pairs a word and by `2·(p % 8) + p / 8` in one of
//! 16, so the planes of a pair share its rotation (up to one shift per tile for the 1-bit
//! plane): the kernel selects the bits of both planes with one `lop3` and rotates once. The
//! template positions of each plane were chosen so that these rotations tile the 32 bits
//! exactly (2-bit planes need their two positions of opposite parity), so the layout holds
//! exactly `bits` bits a weight.
//!
//! **Scales.** One u32 per group, `[group][row]` (a warp reads 16 consecutive rows). PoT: the
//! f32 bits of `s/2`; INT: `f16(s) | f16(1024 + z) << 16`.

use anyhow::{bail, ensure, Result};
use half::f16;
use potptq_quant::{pot, Format};
use rayon::prelude::*;

pub const TILE_ROWS: usize = 16;
pub const TILE_COLS: usize = 64;
/// Pairs of weights a lane holds per tile.
pub const PAIRS: usize = 16;

/// Code bits stored together in a run of words.
struct Plane {
    first_word: usize,
    code_bits: &'static [u32],
    pairs_per_word: usize,
}

fn planes(bits: u8) -> &'static [Plane] {
    const B2: [Plane; 1] = [Plane { first_word: 0, code_bits: &[0, 1], pairs_per_word: 8 }];
    const B3: [Plane; 2] = [Plane { first_word: 0, code_bits: &[0, 1], pairs_per_word: 8 }, Plane { first_word: 2, code_bits: &[2], pairs_per_word: 16 }];
    const B4: [Plane; 2] = [Plane { first_word: 0, code_bits: &[0, 1], pairs_per_word: 8 }, Plane { first_word: 2, code_bits: &[2, 3], pairs_per_word: 8 }];
    match bits {
        2 => &B2,
        3 => &B3,
        4 => &B4,
        _ => unreachable!("checked by the callers"),
    }
}

/// Where code bit `b` lands in a 16-bit lane once decoded.
fn template(pot: bool, bits: u8, b: u32) -> u32 {
    if !pot {
        b
    } else if b == bits as u32 - 1 {
        15
    } else {
        10 + b
    }
}

/// The word (of a lane's `bits`) and the left rotation that decode pair `p` of `plane`.
fn slot(plane: &Plane, p: usize) -> (usize, u32) {
    let k = plane.pairs_per_word;
    (plane.first_word + p / k, (2 * (p % 8) + (p % k) / 8) as u32)
}

/// Where word `i` of `lane` sits in a tile's `bits · 32` words: lane by lane, in runs of 4
/// (4-bit) or 2 words (2- and 3-bit; the third word of 3-bit codes after the 64 others).
pub fn word_offset(bits: u8, lane: usize, i: usize) -> usize {
    match (bits, i) {
        (4, _) => 4 * lane + i,
        (3, 2) => 64 + lane,
        _ => 2 * lane + i,
    }
}

fn plane_mask(pot: bool, bits: u8, plane: &Plane) -> u32 {
    plane.code_bits.iter().map(|&b| (1u32 << template(pot, bits, b)) * 0x10001).sum()
}

/// The masks `qgemm.cu` hard-codes, per plane: `(bits, pot) → [mask of plane 0, plane 1]`.
pub fn masks(pot: bool, bits: u8) -> Vec<u32> {
    planes(bits).iter().map(|pl| plane_mask(pot, bits, pl)).collect()
}

/// Tile-relative `(row, first column)` of pair `p` of `lane` (the A fragment of
/// `mma.m16n8k16`).
pub fn pair_position(lane: usize, p: usize) -> (usize, usize) {
    let (g, t, step, reg) = (lane / 4, lane % 4, p / 4, p % 4);
    (g + 8 * (reg & 1), 16 * t + 4 * step + 2 * (reg >> 1))
}

fn check_shape(rows: usize, cols: usize, group: usize, bits: u8) -> Result<()> {
    ensure!((2..=4).contains(&bits), "GPU kernels take 2, 3 or 4 bits (got {bits})");
    ensure!(rows.is_multiple_of(TILE_ROWS), "GPU kernels need rows in multiples of {TILE_ROWS} (got {rows})");
    // A K tile never straddles two groups: the kernels find a tile's group as `tile / (group /
    // 64)`, which also holds for a short last group (e.g. 576 columns in groups of 128).
    ensure!(cols.is_multiple_of(TILE_COLS), "GPU kernels need columns in multiples of {TILE_COLS} (got {cols})");
    ensure!(group.is_multiple_of(TILE_COLS), "GPU kernels need groups of a multiple of {TILE_COLS} columns (got {group})");
    Ok(())
}

/// Lays out `rows × cols` codes (`code(r, c)`) in tiles; see the module docs.
pub fn repack_codes(code: impl Fn(usize, usize) -> u8 + Sync, rows: usize, cols: usize, bits: u8, pot: bool) -> Result<Vec<u32>> {
    check_shape(rows, cols, TILE_COLS, bits)?;
    let ktiles = cols / TILE_COLS;
    let b = bits as usize;
    let mut out = vec![0u32; rows * cols * b / 32];
    out.par_chunks_mut(b * 32).enumerate().for_each(|(tile, words)| {
        let (rt, kt) = (tile / ktiles, tile % ktiles);
        for lane in 0..32 {
            for p in 0..PAIRS {
                let (r, c) = pair_position(lane, p);
                for half in 0..2 {
                    let q = code(rt * TILE_ROWS + r, kt * TILE_COLS + c + half) as u32;
                    debug_assert!(q < 1 << bits);
                    for plane in planes(bits) {
                        let (w, rot) = slot(plane, p);
                        for &cb in plane.code_bits {
                            if (q >> cb) & 1 == 1 {
                                let pos = (template(pot, bits, cb) + 16 * half as u32 + 32 - rot) % 32;
                                words[word_offset(bits, lane, w)] |= 1 << pos;
                            }
                        }
                    }
                }
            }
        }
    });
    Ok(out)
}

/// The fields of pair `p` from a lane's `bits` words: what the kernel computes before the add
/// (PoT) or the `| 0x6400` (INT).
pub fn pair_fields(words: &[u32], p: usize, bits: u8, pot: bool) -> u32 {
    planes(bits)
        .iter()
        .map(|pl| {
            let (w, rot) = slot(pl, p);
            words[w].rotate_left(rot) & plane_mask(pot, bits, pl)
        })
        .fold(0, |a, f| a | f)
}

/// `pair_fields` as `qgemm.cu` computes it: the bits of both planes of the pair selected into
/// one word with one mask (`lop3`), then one move into place (`to_fields`); the 1-bit plane
/// of 3-bit codes is rotated by one first for pairs 8..16 (once a tile in the kernel).
pub fn kernel_fields(words: &[u32], p: usize, bits: u8, pot: bool) -> u32 {
    let m = masks(pot, bits);
    let (_, r) = slot(&planes(bits)[0], p);
    if bits == 2 {
        return to_fields(words[p / 8], r, m[0]);
    }
    let lo = words[p / 8];
    let hi = if bits == 4 { words[2 + p / 8] } else { words[2].rotate_left((p / 8) as u32) };
    let keep_lo = m[0].rotate_right(r);
    to_fields((lo & keep_lo) | (hi & !keep_lo), r, m[0] | m[1])
}

/// How the kernel brings the bits of `mask` rotated right by `r` back to `mask`: a left shift
/// when none of them would wrap around (the kernel's shift is a multiply, on the FMA pipe, off
/// the ALU that its `lop3`s load), else a rotation.
pub fn field_move(mask: u32, r: u32) -> FieldMove {
    let at = mask.rotate_right(r);
    if r == 0 {
        FieldMove::None
    } else if (at << r) >> r == at {
        FieldMove::Shift
    } else {
        FieldMove::Rotate
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldMove {
    None,
    Shift,
    Rotate,
}

fn to_fields(word: u32, r: u32, mask: u32) -> u32 {
    let moved = match field_move(mask, r) {
        FieldMove::None => word,
        FieldMove::Shift => word << r,
        FieldMove::Rotate => word.rotate_left(r),
    };
    moved & mask
}

/// The two codes of pair `p`, read back from the fields (the inverse of `repack_codes`).
pub fn pair_codes(words: &[u32], p: usize, bits: u8, pot: bool) -> [u8; 2] {
    let f = pair_fields(words, p, bits, pot);
    let mut out = [0u8; 2];
    for (half, o) in out.iter_mut().enumerate() {
        for b in 0..bits as u32 {
            *o |= (((f >> (template(pot, bits, b) + 16 * half as u32)) & 1) << b) as u8;
        }
    }
    out
}

/// PoT level bits: `2.0`'s f16 bit pattern, whose exponent field (16) has its low four bits
/// clear, so that OR-ing a code's exponent (≤ 7) and sign into it is the bit-add.
pub const POT_BASE: u32 = 0x4000_4000;

/// The PoT decode the kernel does, on the CPU: `POT_BASE | fields`, two f16 lanes holding
/// `±2^(1+E)`; the kernel multiplies their products by `s/2`.
pub fn pot_decode_pair(words: &[u32], p: usize, bits: u8) -> [f16; 2] {
    let h = POT_BASE | pair_fields(words, p, bits, true);
    [f16::from_bits(h as u16), f16::from_bits((h >> 16) as u16)]
}

/// A quantized matrix in the GPU layout, on the host.
#[derive(Debug, Clone)]
pub struct GpuLayout {
    pub format: Format,
    pub bits: u8,
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    pub words: Vec<u32>,
    /// `[group][row]`; PoT: f32 bits of `s/2`; INT: `f16(s) | f16(1024 + z) << 16`.
    pub meta: Vec<u32>,
}

impl GpuLayout {
    pub fn is_pot(&self) -> bool {
        self.format == Format::Pot
    }

    /// Bytes a product reads per pass over the weights (codes and group parameters).
    pub fn weight_bytes(&self) -> usize {
        self.words.len() * 4 + self.meta.len() * 4
    }

    /// `words` already in the tile layout (e.g. random words, which are random codes: the
    /// layout is a bijection on bits); `scales` and `zeros` row-major `[rows, groups]`.
    pub fn from_parts(format: Format, bits: u8, rows: usize, cols: usize, group: usize, words: Vec<u32>, scales: &[f16], zeros: &[u8]) -> Result<Self> {
        check_shape(rows, cols, group, bits)?;
        ensure!(words.len() == rows * cols * bits as usize / 32, "{} words for [{rows}, {cols}] at {bits} bits", words.len());
        let groups = cols.div_ceil(group);
        ensure!(scales.len() == rows * groups, "{} scales for {} groups", scales.len(), rows * groups);
        let pot = format == Format::Pot;
        let mut meta = vec![0u32; rows * groups];
        for r in 0..rows {
            for g in 0..groups {
                let s = scales[r * groups + g];
                ensure!(s.is_finite(), "scale {s} of row {r}, group {g} is not finite");
                meta[g * rows + r] = if pot {
                    (s.to_f32() * 0.5).to_bits()
                } else {
                    let z = zeros[r * groups + g];
                    ensure!((z as u32) < 1 << bits, "zero-point {z} does not fit in {bits} bits");
                    s.to_bits() as u32 | (f16::from_f32(1024.0 + z as f32).to_bits() as u32) << 16
                };
            }
        }
        Ok(Self { format, bits, rows, cols, group, words, meta })
    }

    /// From a `PackedMatrix` (checkpoint layout): codes re-tiled, scales narrowed to f16
    /// (exactly: checkpoints store f16 scales).
    pub fn from_packed(m: &crate::PackedMatrix) -> Result<Self> {
        let (rows, cols, bits) = (m.rows(), m.cols(), m.bits());
        let pot = m.format() == Format::Pot;
        ensure!(pot || m.format() == Format::IntAsym || m.format() == Format::IntSym, "unsupported format");
        let words = repack_codes(|r, c| m.code(r, c), rows, cols, bits, pot)?;
        let scales: Vec<f16> = m.scales().iter().map(|&s| f16::from_f32(s)).collect();
        if let Some((s, h)) = m.scales().iter().zip(&scales).find(|(s, h)| h.to_f32() != **s) {
            bail!("scale {s:e} is not an f16 ({h})");
        }
        Self::from_parts(m.format(), bits, rows, cols, m.layout().group_size, words, &scales, m.zeros())
    }

    /// The code of weight `(r, c)`, read back from the tile layout.
    pub fn code(&self, r: usize, c: usize) -> u8 {
        let b = self.bits as usize;
        let ktiles = self.cols / TILE_COLS;
        let tile = (r / TILE_ROWS) * ktiles + c / TILE_COLS;
        let (tr, tc) = (r % TILE_ROWS, c % TILE_COLS);
        // Invert pair_position.
        let (g, hi_row) = (tr % 8, tr / 8);
        let (t, step, hi_col, half) = (tc / 16, (tc % 16) / 4, (tc % 4) / 2, tc % 2);
        let lane = 4 * g + t;
        let p = 4 * step + hi_row + 2 * hi_col;
        let words: Vec<u32> = (0..b).map(|i| self.words[tile * b * 32 + word_offset(self.bits, lane, i)]).collect();
        pair_codes(&words, p, self.bits, self.is_pot())[half]
    }

    /// Weight `(r, c)` as the kernel computes it, exactly: PoT its levels `±2^(1+E)` times
    /// `s/2`, the quantizer's `±s·2^E`; INT `(q − z)·s`.
    pub fn weight(&self, r: usize, c: usize) -> f64 {
        let meta = self.meta[(c / self.group) * self.rows + r];
        let q = self.code(r, c);
        if self.is_pot() {
            pot::decode(q, 2.0 * f32::from_bits(meta), self.bits) as f64
        } else {
            let s = f16::from_bits(meta as u16).to_f64();
            let z = f16::from_bits((meta >> 16) as u16).to_f64() - 1024.0;
            (q as f64 - z) * s
        }
    }
}

/// `y[t][r] = Σ_c w(r, c)·x[t][c]` in f64, with the weights as the kernel decodes them and
/// `x` as f16 `[tokens, cols]`: the CPU reference the GPU kernels are tested against.
pub fn reference_matmul(m: &GpuLayout, x: &[f16], tokens: usize) -> Vec<f64> {
    assert_eq!(x.len(), tokens * m.cols);
    let w: Vec<f64> = (0..m.rows * m.cols).map(|i| m.weight(i / m.cols, i % m.cols)).collect();
    let mut y = vec![0f64; tokens * m.rows];
    for t in 0..tokens {
        for r in 0..m.rows {
            y[t * m.rows + r] = (0..m.cols).map(|c| w[r * m.cols + c] * x[t * m.cols + c].to_f64()).sum();
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PackedMatrix;
    use potptq_quant::GroupLayout;

    fn codes(rows: usize, cols: usize, bits: u8, seed: u64) -> Vec<u8> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..rows * cols)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 20) as u8 & ((1u16 << bits) - 1) as u8
            })
            .collect()
    }

    #[test]
    fn planes_tile_the_words_exactly() {
        for pot in [true, false] {
            for bits in 2..=4u8 {
                let mut used = vec![0u32; bits as usize];
                for plane in planes(bits) {
                    for p in 0..PAIRS {
                        let (w, rot) = slot(plane, p);
                        let at = plane_mask(pot, bits, plane).rotate_right(rot);
                        assert_eq!(used[w] & at, 0, "pot {pot} bits {bits}: pair {p} overlaps in word {w}");
                        used[w] |= at;
                    }
                }
                assert!(used.iter().all(|&u| u == u32::MAX), "pot {pot} bits {bits}: {used:x?}");
            }
        }
        assert_eq!(masks(true, 2), vec![0x8400_8400]);
        assert_eq!(masks(true, 3), vec![0x0C00_0C00, 0x8000_8000]);
        assert_eq!(masks(true, 4), vec![0x0C00_0C00, 0x9000_9000]);
        assert_eq!(masks(false, 2), vec![0x0003_0003]);
        assert_eq!(masks(false, 3), vec![0x0003_0003, 0x0004_0004]);
        assert_eq!(masks(false, 4), vec![0x0003_0003, 0x000C_000C]);
    }

    #[test]
    fn fragment_positions_cover_a_tile_once() {
        let mut seen = vec![0u8; TILE_ROWS * TILE_COLS];
        for lane in 0..32 {
            for p in 0..PAIRS {
                let (r, c) = pair_position(lane, p);
                seen[r * TILE_COLS + c] += 1;
                seen[r * TILE_COLS + c + 1] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
    }

    #[test]
    fn repacked_codes_read_back() {
        for pot in [true, false] {
            for bits in 2..=4u8 {
                let (rows, cols) = (32, 192);
                let c = codes(rows, cols, bits, bits as u64 + pot as u64 * 10);
                let words = repack_codes(|r, k| c[r * cols + k], rows, cols, bits, pot).unwrap();
                assert_eq!(words.len() * 32, rows * cols * bits as usize, "exactly {bits} bits a weight");
                let format = if pot { Format::Pot } else { Format::IntAsym };
                let scales = vec![f16::from_f32(0.01); rows * 3];
                let m = GpuLayout::from_parts(format, bits, rows, cols, 64, words, &scales, &vec![1; rows * 3]).unwrap();
                for r in 0..rows {
                    for k in 0..cols {
                        assert_eq!(m.code(r, k), c[r * cols + k], "pot {pot} bits {bits} ({r}, {k})");
                    }
                }
            }
        }
    }

    #[test]
    fn words_sit_lane_by_lane_once_each() {
        for bits in 2..=4u8 {
            let mut seen = vec![0u8; bits as usize * 32];
            for lane in 0..32 {
                for i in 0..bits as usize {
                    seen[word_offset(bits, lane, i)] += 1;
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{bits} bits");
        }
        // A lane's 16-byte (4-bit) or 8-byte (2-, 3-bit) run is aligned for one vector load.
        assert_eq!(word_offset(4, 3, 0), 12);
        assert_eq!(word_offset(3, 5, 0), 10);
        assert_eq!(word_offset(3, 5, 2), 69);
    }

    #[test]
    fn planes_of_a_pair_share_its_rotation() {
        // What lets the kernel select both planes' bits with one lop3 before one rotation; the
        // 1-bit plane of 3-bit codes is one bit further for pairs 8..16 (one shift a tile).
        for bits in [3u8, 4] {
            let pl = planes(bits);
            for p in 0..PAIRS {
                let (_, r0) = slot(&pl[0], p);
                let (_, r1) = slot(&pl[1], p);
                assert_eq!(r1, r0 + if bits == 3 { (p / 8) as u32 } else { 0 }, "{bits} bits, pair {p}");
            }
        }
    }

    #[test]
    fn the_kernels_one_rotation_decode_equals_the_planes() {
        for pot in [true, false] {
            for bits in 2..=4u8 {
                for seed in 1..50u64 {
                    let c = codes(1, 64 * bits as usize, 1, seed);
                    let words: Vec<u32> = c.chunks(32).map(|b| b.iter().enumerate().map(|(i, &v)| (v as u32) << i).sum()).collect();
                    for p in 0..PAIRS {
                        assert_eq!(kernel_fields(&words, p, bits, pot), pair_fields(&words, p, bits, pot), "pot {pot} bits {bits} pair {p}");
                    }
                }
            }
        }
    }

    #[test]
    fn most_pairs_move_into_place_by_a_shift() {
        // Of a lane's 16 pairs per tile, those whose fields a left shift moves (pairs 0 and 8
        // need no move, the others a rotation). PoT's fields sit high in the f16 (exponent from
        // bit 10, sign at 15), so rotations up to 10 are shifts; INT's sit at bit 0, where the
        // shift would be a right shift, which as a multiply (IMAD.HI) measured slower on the
        // H200 than the rotation: INT keeps the rotation.
        for (pot, bits, shifts) in [(true, 2, 10), (true, 3, 10), (true, 4, 10), (false, 2, 0), (false, 3, 0), (false, 4, 0)] {
            let m = masks(pot, bits).iter().fold(0, |a, m| a | m);
            let n = (0..PAIRS).filter(|&p| field_move(m, slot(&planes(bits)[0], p).1) == FieldMove::Shift).count();
            assert_eq!(n, shifts, "pot {pot} bits {bits}");
        }
    }

    #[test]
    fn kernel_decode_equals_the_quantizer() {
        // 320 columns in groups of 128: a short last group of 64, as SmolLM2's 576 has.
        let layout = GroupLayout::new(48, 320, 128).unwrap();
        let w: Vec<f32> = (0..48 * 320).map(|i| (((i * 7919) % 1013) as f32 - 506.0) * 1e-4).collect();
        for (format, bits) in [(Format::Pot, 2), (Format::Pot, 3), (Format::Pot, 4), (Format::IntAsym, 2), (Format::IntAsym, 3), (Format::IntAsym, 4)] {
            let q = potptq_quant::quantize_rtn("w", &w, layout, format, bits).unwrap();
            let packed = PackedMatrix::from_qtensor(&q).unwrap();
            let g = GpuLayout::from_packed(&packed).unwrap();
            let deq = q.dequantize();
            for r in 0..48 {
                for c in 0..320 {
                    assert_eq!(g.code(r, c), q.codes[r * 320 + c]);
                    assert_eq!(g.weight(r, c), deq[r * 320 + c] as f64, "{format:?} {bits} ({r}, {c}): exact");
                }
            }
            if format == Format::Pot {
                // The two-lane decode of a lane's words, times s/2, is the weight.
                let b = bits as usize;
                for lane in [0, 5, 31] {
                    let words: Vec<u32> = (0..b).map(|i| g.words[word_offset(bits, lane, i)]).collect();
                    for p in 0..PAIRS {
                        let (r, c) = pair_position(lane, p);
                        let half_scale = f32::from_bits(g.meta[r]) as f64;
                        let levels = pot_decode_pair(&words, p, bits);
                        assert_eq!([levels[0].to_f64() * half_scale, levels[1].to_f64() * half_scale], [g.weight(r, c), g.weight(r, c + 1)]);
                    }
                }
            }
        }
    }

    #[test]
    fn any_finite_scale_is_taken_and_bad_shapes_are_errors() {
        // The scale multiplies in f32 after the mma: subnormal or large f16 scales decode too.
        for s in [f16::from_bits(1), f16::from_f32(1024.0)] {
            let m = GpuLayout::from_parts(Format::Pot, 4, 16, 64, 64, vec![u32::MAX; 128], &[s; 16], &[]).unwrap();
            assert_eq!(m.weight(0, 0), -(2f64.powi(8)) * s.to_f64() / 2.0);
        }
        let e = GpuLayout::from_parts(Format::Pot, 4, 16, 64, 64, vec![0; 128], &[f16::INFINITY; 16], &[]).unwrap_err();
        assert!(e.to_string().contains("not finite"), "{e}");
        assert!(GpuLayout::from_parts(Format::Pot, 4, 15, 64, 64, vec![0; 120], &[f16::ONE; 15], &[]).is_err());
        assert!(GpuLayout::from_parts(Format::Pot, 4, 16, 96, 96, vec![0; 192], &[f16::ONE; 16], &[]).is_err());
    }

    #[test]
    fn reference_matmul_is_the_plain_sum() {
        let c = codes(16, 128, 3, 7);
        let words = repack_codes(|r, k| c[r * 128 + k], 16, 128, 3, true).unwrap();
        let m = GpuLayout::from_parts(Format::Pot, 3, 16, 128, 128, words, &[f16::from_f32(0.5); 16], &[]).unwrap();
        let x: Vec<f16> = (0..2 * 128).map(|i| f16::from_f32((i % 5) as f32 - 2.0)).collect();
        let y = reference_matmul(&m, &x, 2);
        let want: f64 = (0..128).map(|k| potptq_quant::pot::decode(c[128 + k], 0.5, 3) as f64 * x[128 + k].to_f64()).sum();
        assert_eq!(y[16 + 1], want);
    }
}
