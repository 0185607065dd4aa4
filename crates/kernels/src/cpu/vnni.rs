//! AVX-512 VNNI row kernels for Q8 activations (`cpu::q8`): `vpdpbusd` multiplies 64 unsigned
//! bytes by 64 signed bytes and adds each 4 products into one of 16 i32 lanes, so a pair of
//! 32-blocks (64 weights) is one instruction, where AVX2 takes `maddubs` + `madd` per block.
//!
//! The activations are the AVX2 kernels' (`avx2::q8_order`, block by block); the weights of a
//! pair of blocks are unpacked to one byte per code in an order that lets the same 64 activation
//! bytes, permuted once per pair for all rows, line up with them:
//! - 2 bits (16 bytes, blocks A, B): broadcast to four 128-bit lanes, qwords `2l` and `2l + 1`
//!   shifted by `2l`: qword `2l` holds A's codes `8l..8l + 8` of the crumb order, `2l + 1` B's.
//! - 4 bits (32 bytes): broadcast to both 256-bit halves, the high half shifted by 4: 128-bit
//!   lanes A's low nibbles, B's low nibbles, A's high nibbles, B's high nibbles.
//! - 3 bits (24 bytes, column order): `vpermb` copies bytes `3j..3j + 3` to qword `j`, and
//!   `vpmultishiftqb` takes code `8j + i` from bit `3i` of it.
//!
//! Then `vpermb` maps each byte's low 6 bits through a 64-entry table that repeats every
//! `2^bits` entries (the bits above the code are left over from its neighbours and do not
//! matter) to the unsigned byte the products need: PoT `w + o` at 2 and 3 bits, `2^E` at 4 bits
//! (its sign goes onto the activation by a masked negation), INT the code; the offsets and
//! the zero-points come back through the activations' group sums, as in the AVX2 kernels.
//! Each pair's 16 lanes are converted once and scaled by their blocks' `d`.
//!
//! Groups must hold whole pairs of blocks except possibly the last group of a row (`supports`);
//! a single whole block left in a group goes through the AVX2 block kernel.

use std::arch::x86_64::*;

use super::avx2;
use super::q8::{Q8Activations, BLOCK};
use crate::PackedMatrix;

pub fn available() -> bool {
    super::avx512::available() && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
}

/// Whether these kernels cover the matrix: the AVX2 Q8 kernels do, and groups are pairs of
/// blocks.
pub fn supports(m: &PackedMatrix) -> bool {
    avx2::supports_q8(m) && m.layout().group_size.is_multiple_of(2 * BLOCK)
}

/// The 64-entry `vpermb` table for `B`-bit codes (see the module docs).
const fn table(bits: usize, int: bool) -> [u8; 64] {
    let mut t = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        let code = i & ((1 << bits) - 1);
        let e = code & ((1 << (bits - 1)) - 1);
        let negative = code >> (bits - 1) == 1;
        t[i] = if int {
            code as u8
        } else if bits == 4 {
            (1u32 << e) as u8
        } else {
            // w + o, o the top level.
            let top = 1i32 << ((1 << (bits - 1)) - 1);
            let w = if negative { -(1i32 << e) } else { 1i32 << e };
            (w + top) as u8
        };
        i += 1;
    }
    t
}
static TABLES: [[[u8; 64]; 3]; 2] = [
    [table(2, false), table(3, false), table(4, false)],
    [table(2, true), table(3, true), table(4, true)],
];

/// Byte `8j + b` ← byte `3j + b`: the 3 bytes of each 8 codes into a qword of their own.
static GATHER_3BIT: [u8; 64] = {
    let mut g = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        g[i] = (3 * (i / 8) + i % 8) as u8;
        i += 1;
    }
    g
};

/// The 64 codes of the pair of chunks at `pair`, one per byte (see the module docs).
#[inline(always)]
unsafe fn codes64<const B: usize>(pair: *const u8) -> __m512i {
    match B {
        2 => {
            let v = _mm512_broadcast_i32x4(_mm_loadu_si128(pair as *const __m128i));
            _mm512_srlv_epi64(v, _mm512_setr_epi64(0, 0, 2, 2, 4, 4, 6, 6))
        }
        4 => {
            let v = _mm512_broadcast_i64x4(_mm256_loadu_si256(pair as *const __m256i));
            _mm512_srlv_epi64(v, _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4))
        }
        _ => {
            // 24 bytes: the mask keeps the load inside the pair.
            let v = _mm512_castsi256_si512(_mm256_maskz_loadu_epi8(0x00ff_ffff, pair as *const i8));
            let v = _mm512_permutexvar_epi8(_mm512_loadu_si512(GATHER_3BIT.as_ptr() as *const _), v);
            _mm512_multishift_epi64_epi8(_mm512_set1_epi64(0x1512_0f0c_0906_0300), v)
        }
    }
}

/// The pair's 64 activations in the byte order of `codes64`, and each i32 lane's block scale.
#[inline(always)]
unsafe fn pair_activations<const B: usize>(q: *const i8, d: *const f32) -> (__m512i, __m512) {
    let x = _mm512_loadu_si512(q as *const _);
    let (da, db) = (_mm512_set1_ps(*d), _mm512_set1_ps(*d.add(1)));
    match B {
        2 => (_mm512_permutexvar_epi64(_mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7), x), _mm512_mask_blend_ps(0b1100_1100_1100_1100, da, db)),
        4 => (_mm512_shuffle_i64x2::<0b11_01_10_00>(x, x), _mm512_mask_blend_ps(0b1111_0000_1111_0000, da, db)),
        _ => (x, _mm512_mask_blend_ps(0b1111_1111_0000_0000, da, db)),
    }
}

/// `Σ_c W[r, c]·x[c]` for the `R` rows from `r0` against Q8 activations (`supports(m)`), into
/// `out[..R]`; each pair's activations are loaded and permuted once for all `R` rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni,avx512vl,avx2,fma")]
unsafe fn dot_rows<const B: usize, const R: usize, const INT: bool>(m: &PackedMatrix, r0: usize, a: &Q8Activations, out: &mut [f32]) {
    let l = m.layout();
    let gpr = l.groups_per_row();
    let (full, per_group) = (l.cols / BLOCK, l.group_size / BLOCK);
    let super::RowBlock { rows, scales, .. } = super::RowBlock::<R>::new(m, r0, INT);
    let table = _mm512_loadu_si512(TABLES[INT as usize][B - 2].as_ptr() as *const _);
    let (t1, t2) = avx2::q8_tables::<B>();
    let (qp, dp) = (a.q.as_ptr(), a.d.as_ptr());
    let mut acc = [_mm512_setzero_ps(); R];
    let mut acc_single = [_mm256_setzero_ps(); R];
    for g in 0..gpr {
        let (b0, b1) = (g * per_group, ((g + 1) * per_group).min(full));
        let mut sums = [_mm512_setzero_ps(); R];
        let mut b = b0;
        while b + 2 <= b1 {
            let (x, d) = pair_activations::<B>(qp.add(b * BLOCK), dp.add(b));
            for i in 0..R {
                let chunk = rows[i].add(b * 4 * B);
                _mm_prefetch::<_MM_HINT_T0>(chunk.add(PREFETCH) as *const i8);
                let codes = codes64::<B>(chunk);
                let w = _mm512_permutexvar_epi8(codes, table);
                let x = if !INT && B == 4 {
                    let negative = _mm512_test_epi8_mask(codes, _mm512_set1_epi8(0x08));
                    _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x)
                } else {
                    x
                };
                let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
                sums[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), d, sums[i]);
            }
            b += 2;
        }
        // Only a row's last group can end in a single block.
        if b < b1 {
            let xq = _mm256_loadu_si256(qp.add(b * BLOCK) as *const __m256i);
            let d = _mm256_broadcast_ss(&*dp.add(b));
            for i in 0..R {
                let p = avx2::q8_block::<B, INT>(avx2::q8_codes::<B>(rows[i].add(b * 4 * B)), xq, t1, t2);
                let single = _mm256_mul_ps(_mm256_cvtepi32_ps(p), d);
                acc_single[i] = _mm256_fmadd_ps(single, _mm256_set1_ps(scales[i * gpr + g]), acc_single[i]);
            }
        }
        for i in 0..R {
            acc[i] = _mm512_fmadd_ps(sums[i], _mm512_set1_ps(scales[i * gpr + g]), acc[i]);
        }
    }
    // A short last block (INT zero-point included) is done in integers by `q8_tail`.
    for i in 0..R {
        out[i] = _mm512_reduce_add_ps(acc[i]) + avx2::hsum(acc_single[i]) + avx2::q8_group_terms(m, r0 + i, a, INT) + avx2::q8_tail(m, r0 + i, a);
    }
}

/// How far ahead of each row's reads to prefetch, in bytes.
const PREFETCH: usize = 256;

/// Rows `r0..r0 + out.len()` against Q8 activations, four at a time.
///
/// # Safety
/// `available()` must be true and `supports(m)`; `a` was made with `avx2::q8_order(m.bits())`.
pub unsafe fn dot_packed_q8(m: &PackedMatrix, r0: usize, a: &Q8Activations, out: &mut [f32]) {
    rows_by_format!(dot_rows, m, r0, a, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables give what the AVX2 kernels' 16-entry tables give, for every code and every
    /// pattern of the bits above it.
    #[test]
    fn tables_repeat_the_avx2_levels() {
        for bits in 2..=4usize {
            for int in [false, true] {
                let t = &TABLES[int as usize][bits - 2];
                for i in 0..64 {
                    let code = i & ((1 << bits) - 1);
                    let w = if int {
                        code as i32
                    } else {
                        let e = code & ((1 << (bits - 1)) - 1);
                        if code >> (bits - 1) == 1 { -(1 << e) } else { 1 << e }
                    };
                    let want = match (int, bits) {
                        (true, _) => w,
                        (false, 4) => w.abs(),
                        (false, _) => w + avx2::q8_level_offset(bits) as i32,
                    };
                    assert_eq!(t[i] as i32, want, "{bits} bits int {int} index {i}");
                }
            }
        }
    }

    /// `codes64` puts every code of a pair where `pair_activations` puts its column's
    /// activation, at every width.
    #[test]
    fn codes_land_where_the_activations_are() {
        if !available() {
            eprintln!("no AVX-512 VNNI: the unpacking is not tested");
            return;
        }
        for bits in [2u8, 3, 4] {
            let codes: Vec<u8> = (0..64).map(|k| ((7 * k + k / 32) % (1 << bits)) as u8).collect();
            let layout = potptq_quant::GroupLayout::new(1, 64, 64).unwrap();
            let m = PackedMatrix::new(potptq_quant::Format::IntAsym, bits, layout, potptq_quant::pack::pack(&codes, 1, 64, bits), vec![1.0], vec![0]).unwrap();
            // Each activation byte holds its own column, stored in the AVX2 order.
            let order = avx2::q8_order(bits);
            let mut columns = [0i8; 64];
            for k in 0..64 {
                columns[32 * (k / 32) + order.position(k % 32)] = k as i8;
            }
            let (mut unpacked, mut column_of) = ([0u8; 64], [0i8; 64]);
            // SAFETY: `available()`; the row holds the pair; 64 activations and 2 scales.
            unsafe {
                let (v, (x, _)) = match bits {
                    2 => (codes64::<2>(m.row_ptr(0)), pair_activations::<2>(columns.as_ptr(), [1f32; 2].as_ptr())),
                    3 => (codes64::<3>(m.row_ptr(0)), pair_activations::<3>(columns.as_ptr(), [1f32; 2].as_ptr())),
                    _ => (codes64::<4>(m.row_ptr(0)), pair_activations::<4>(columns.as_ptr(), [1f32; 2].as_ptr())),
                };
                _mm512_storeu_si512(unpacked.as_mut_ptr() as *mut _, v);
                _mm512_storeu_si512(column_of.as_mut_ptr() as *mut _, x);
            }
            let mut by_column = vec![0u8; 64];
            for i in 0..64 {
                by_column[column_of[i] as usize] = unpacked[i] & ((1 << bits) - 1);
            }
            assert_eq!(by_column, codes, "{bits} bits");
        }
    }
}
