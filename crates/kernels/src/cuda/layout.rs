//! The GPU layout of PoT and INT codes for the fused kernels of `qgemm.cu`, built on the CPU
//! at load time (and tested here, without a GPU).
//!
//! **Tiles.** A matrix `[rows, cols]` is cut into tiles of 16 rows × 64 columns (four
//! `mma.m16n8k16` steps). In a tile, lane `l` of a warp owns the 32 weights that its A
//! fragments hold: for pair `p = 4·step + reg` (`reg` = fragment register 0..4), row
//! `l/4 + 8·(reg & 1)` and the two columns `16·step + 2·(l%4) + 8·(reg >> 1) + {0, 1}`.
//! Those 32 weights are `bits` u32 words; word `i` of lane `l` of tile `(rt, kt)` sits at
//! `((rt·ktiles + kt)·bits + i)·32 + l`, so a warp loads a tile with `bits` coalesced
//! 128-byte reads and nothing is unpacked in memory.
//!
//! **Words.** Every pair is decoded into both 16-bit halves of one 32-bit register at once:
//! `rotl(word, r) & mask` puts each code bit where the f16 decode needs it, in both lanes.
//! PoT: exponent bit `i` at 10 + i (the f16 exponent field), the sign at 15, so the weight
//! pair is `bits(s)·0x10001 + fields` — the bit-add of METHOD.md, two lanes in one integer
//! add; no lane carries into the next because `s > 0` has a clear sign bit and its exponent
//! field plus `q_max` stays below 31 (checked here). INT: code bit `i` at `i`, so
//! `fields | 0x6400` is the f16 `1024 + q`, and `(h − (1024 + z))·s` the weight (the usual
//! magic-number conversion). A "plane" is a set of code bits stored together: 2-bit codes
//! use one plane (both bits, 8 pairs a word); 3-bit codes a 2-bit plane (2 words) and a
//! 1-bit plane (16 pairs in one word); 4-bit codes two 2-bit planes. Pair `j` of a word of
//! a plane with `k` pairs per word is rotated by `j·16/k`; the template positions of each
//! plane were chosen so that these rotations tile the 32 bits exactly (2-bit planes need
//! their two positions of opposite parity), so the layout holds exactly `bits` bits a weight.
//!
//! **Scales.** One f16 per group, `[group][row]` (a warp reads 16 consecutive rows). INT:
//! one u32 per group, `f16(s) | f16(1024 + z) << 16`.

use anyhow::{bail, ensure, Result};
use half::f16;
use potptq_quant::{pot, Format};

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
    (plane.first_word + p / k, ((p % k) * (16 / k)) as u32)
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
    (g + 8 * (reg & 1), 16 * step + 2 * t + 8 * (reg >> 1))
}

fn check_shape(rows: usize, cols: usize, group: usize, bits: u8) -> Result<()> {
    ensure!((2..=4).contains(&bits), "GPU kernels take 2, 3 or 4 bits (got {bits})");
    ensure!(rows % TILE_ROWS == 0, "GPU kernels need rows in multiples of {TILE_ROWS} (got {rows})");
    // A K tile never straddles two groups: the kernels find a tile's group as `tile / (group /
    // 64)`, which also holds for a short last group (e.g. 576 columns in groups of 128).
    ensure!(cols % TILE_COLS == 0, "GPU kernels need columns in multiples of {TILE_COLS} (got {cols})");
    ensure!(group % TILE_COLS == 0, "GPU kernels need groups of a multiple of {TILE_COLS} columns (got {group})");
    Ok(())
}

/// Lays out `rows × cols` codes (`code(r, c)`) in tiles; see the module docs.
pub fn repack_codes(code: impl Fn(usize, usize) -> u8 + Sync, rows: usize, cols: usize, bits: u8, pot: bool) -> Result<Vec<u32>> {
    check_shape(rows, cols, TILE_COLS, bits)?;
    let ktiles = cols / TILE_COLS;
    let b = bits as usize;
    let mut out = vec![0u32; rows * cols * b / 32];
    for (tile, words) in out.chunks_mut(b * 32).enumerate() {
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
                                words[w * 32 + lane] |= 1 << pos;
                            }
                        }
                    }
                }
            }
        }
    }
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

/// The PoT decode the kernel does, on the CPU: `bits(s)·0x10001 + fields`, two f16 lanes.
pub fn pot_decode_pair(words: &[u32], p: usize, bits: u8, scale: f16) -> [f16; 2] {
    let h = (scale.to_bits() as u32 * 0x10001).wrapping_add(pair_fields(words, p, bits, true));
    [f16::from_bits(h as u16), f16::from_bits((h >> 16) as u16)]
}

/// True when the f16 bit-add decodes every level of `scale` to a finite normal f16.
pub fn pot_scale_ok(scale: f16, bits: u8) -> bool {
    let exp = (scale.to_bits() >> 10) & 0x1F;
    scale.to_bits() & 0x8000 == 0 && exp >= 1 && exp + (pot::qmax(bits) as u16) < 31
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
    /// PoT: f16 scales `[group][row]`; INT: `f16(s) | f16(1024 + z) << 16` per `[group][row]`.
    pub meta: Vec<u32>,
}

impl GpuLayout {
    pub fn is_pot(&self) -> bool {
        self.format == Format::Pot
    }

    /// Bytes a product reads per pass over the weights (codes and group parameters).
    pub fn weight_bytes(&self) -> usize {
        let per_group = if self.is_pot() { 2 } else { 4 };
        self.words.len() * 4 + self.rows * self.cols.div_ceil(self.group) * per_group
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
                meta[g * rows + r] = if pot {
                    if !pot_scale_ok(s, bits) {
                        bail!("PoT scale {s} is not a positive normal f16 whose {bits}-bit levels stay finite: the f16 bit-add cannot decode it");
                    }
                    s.to_bits() as u32
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
        let (step, within) = (tc / 16, tc % 16);
        let (hi_col, t, half) = (within / 8, (within % 8) / 2, within % 2);
        let lane = 4 * g + t;
        let p = 4 * step + hi_row + 2 * hi_col;
        let words: Vec<u32> = (0..b).map(|i| self.words[(tile * b + i) * 32 + lane]).collect();
        pair_codes(&words, p, self.bits, self.is_pot())[half]
    }

    /// Weight `(r, c)` as the kernel decodes it (f16): PoT by the bit-add; INT as
    /// `(1024 + q − (1024 + z))·s` rounded to f16.
    pub fn weight(&self, r: usize, c: usize) -> f16 {
        let meta = self.meta[(c / self.group) * self.rows + r];
        let s = f16::from_bits(meta as u16);
        let q = self.code(r, c);
        if self.is_pot() {
            let fields = (((q >> (self.bits - 1)) as u32) << 15) | (((q as u32) & pot::qmax(self.bits)) << 10);
            f16::from_bits((s.to_bits() as u32 + fields) as u16)
        } else {
            let z = f16::from_bits((meta >> 16) as u16).to_f32() - 1024.0;
            f16::from_f32((q as f32 - z) * s.to_f32())
        }
    }
}

/// `y[t][r] = Σ_c w(r, c)·x[t][c]` in f64, with the weights as the kernel decodes them and
/// `x` as f16 `[tokens, cols]`: the CPU reference the GPU kernels are tested against.
pub fn reference_matmul(m: &GpuLayout, x: &[f16], tokens: usize) -> Vec<f64> {
    assert_eq!(x.len(), tokens * m.cols);
    let w: Vec<f64> = (0..m.rows * m.cols).map(|i| m.weight(i / m.cols, i % m.cols).to_f64()).collect();
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
    fn bit_add_decode_equals_the_quantizer() {
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
                    let want = f16::from_f32(deq[r * 320 + c]);
                    if format == Format::Pot {
                        assert_eq!(g.weight(r, c), want, "{format:?} {bits} ({r}, {c}): the bit-add is exact");
                    } else {
                        assert_eq!(g.weight(r, c), want, "{format:?} {bits} ({r}, {c})");
                    }
                }
            }
            if format == Format::Pot {
                // The two-lane decode of whole words agrees with the per-weight one.
                let b = bits as usize;
                for lane in [0, 5, 31] {
                    let words: Vec<u32> = (0..b).map(|i| g.words[i * 32 + lane]).collect();
                    for p in 0..PAIRS {
                        let (r, c) = pair_position(lane, p);
                        let s = f16::from_bits(g.meta[r] as u16);
                        assert_eq!(pot_decode_pair(&words, p, bits, s), [g.weight(r, c), g.weight(r, c + 1)]);
                    }
                }
            }
        }
    }

    #[test]
    fn scales_the_bit_add_cannot_take_are_errors() {
        assert!(pot_scale_ok(f16::from_f32(1.0), 4));
        assert!(!pot_scale_ok(f16::from_f32(-1.0), 4));
        assert!(!pot_scale_ok(f16::from_bits(1), 2), "subnormal");
        assert!(!pot_scale_ok(f16::from_f32(1024.0), 4), "1024·2^7 overflows f16");
        assert!(pot_scale_ok(f16::from_f32(256.0), 4));
        let e = GpuLayout::from_parts(Format::Pot, 4, 16, 64, 64, vec![0; 128], &vec![f16::from_f32(1024.0); 16], &[]).unwrap_err();
        assert!(e.to_string().contains("bit-add"), "{e}");
        assert!(GpuLayout::from_parts(Format::Pot, 4, 15, 64, 64, vec![0; 120], &vec![f16::ONE; 15], &[]).is_err());
        assert!(GpuLayout::from_parts(Format::Pot, 4, 16, 96, 96, vec![0; 192], &vec![f16::ONE; 16], &[]).is_err());
    }

    #[test]
    fn reference_matmul_is_the_plain_sum() {
        let c = codes(16, 128, 3, 7);
        let words = repack_codes(|r, k| c[r * 128 + k], 16, 128, 3, true).unwrap();
        let m = GpuLayout::from_parts(Format::Pot, 3, 16, 128, 128, words, &vec![f16::from_f32(0.5); 16], &[]).unwrap();
        let x: Vec<f16> = (0..2 * 128).map(|i| f16::from_f32((i % 5) as f32 - 2.0)).collect();
        let y = reference_matmul(&m, &x, 2);
        let want: f64 = (0..128).map(|k| potptq_quant::pot::decode(c[128 + k], 0.5, 3) as f64 * x[128 + k].to_f64()).sum();
        assert_eq!(y[16 + 1], want);
    }
}
