//! AVX2 + FMA row kernels, read straight from the checkpoint packing.
//!
//! **8 codes in one load.** The 8 codes at columns `c..c+8` (`c` a multiple of 8) start at byte
//! `(c/32)·4b + ((c%32)/8)·b` of the row and span `8b ≤ 32` bits, so one unaligned 32-bit load,
//! broadcast to the 8 lanes and shifted right by `[0, b, …, 7b]` (`vpsrlvd`), puts code `i` in
//! the low bits of lane `i`. The lane's higher bits hold the following codes: each decode
//! below either ignores them or shifts them out, so no mask is needed.
//!
//! **PoT decode by lookup** (`vpermps` reads the low 3 bits of each lane as a table index):
//! - 3 bits: the code *is* the index; the table is `s·[1, 2, 4, 8, −1, −2, −4, −8]`.
//! - 2 bits: index bit 2 is the next code's low bit; the table repeats `s·[1, 2, −1, −2]`
//!   twice, so that bit does not matter.
//! - 4 bits: the index is the exponent; the sign (code bit 3) is applied by xor with
//!   `code << 28`, which also xors `E << 28` into the exponent field. The table holds
//!   `bits(s·2^E) ^ (E << 28)`, so the two cancel: one shift and one xor per 8 weights.
//!
//! **PoT decode by bit-add**: `bits(s) + (E << 23)`, sign by xor with the code's top bit
//! moved to bit 31 (METHOD.md's dequantization on float bits).
//!
//! **INT** (`w = s·q − s·z`): `q` converted to f32 and summed against `x` per group; the
//! group's sum is scaled by `s` once, and `−s·z·Σx` comes from the group sums of `x` that
//! `int_x_sums` computes once per token for all rows (as llama.cpp's Q4_1 does).
//!
//! Columns past the last multiple of 8 (a row whose width is not a multiple of 8) go through
//! the scalar `PackedMatrix::weight`.

use std::arch::x86_64::*;

use crate::PackedMatrix;

pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

#[inline(always)]
unsafe fn lane_shifts(b: usize) -> __m256i {
    let b = b as i32;
    _mm256_setr_epi32(0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b)
}

/// Codes `c..c+8` of a row, code `i` in the low `b` bits of lane `i`.
#[inline(always)]
unsafe fn codes8(row: *const u8, c: usize, b: usize, shifts: __m256i) -> __m256i {
    let byte = (c >> 5) * 4 * b + ((c >> 3) & 3) * b;
    let v = (row.add(byte) as *const i32).read_unaligned();
    _mm256_srlv_epi32(_mm256_set1_epi32(v), shifts)
}

/// Codes `8k..8k+8` of the 32-code chunk starting at `chunk`: offsets the addressing mode
/// absorbs, so a loop over whole chunks spends no instructions on finding its codes.
#[inline(always)]
unsafe fn chunk_codes8(chunk: *const u8, k: usize, b: usize, shifts: __m256i) -> __m256i {
    let v = (chunk.add(k * b) as *const i32).read_unaligned();
    _mm256_srlv_epi32(_mm256_set1_epi32(v), shifts)
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// The lookup table of one group with scale `s` (see the module comment).
#[inline(always)]
unsafe fn pot_table<const B: usize>(s: f32) -> __m256 {
    let levels = match B {
        2 => _mm256_setr_ps(1.0, 2.0, -1.0, -2.0, 1.0, 2.0, -1.0, -2.0),
        3 => _mm256_setr_ps(1.0, 2.0, 4.0, 8.0, -1.0, -2.0, -4.0, -8.0),
        _ => _mm256_setr_ps(1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0),
    };
    let table = _mm256_mul_ps(_mm256_set1_ps(s), levels); // exact: powers of two
    if B == 4 {
        let e_high = _mm256_setr_epi32(0, 1 << 28, 2 << 28, 3 << 28, 4 << 28, 5 << 28, 6 << 28, 7 << 28);
        _mm256_xor_ps(table, _mm256_castsi256_ps(e_high))
    } else {
        table
    }
}

#[inline(always)]
unsafe fn pot_lut8<const B: usize>(table: __m256, lanes: __m256i) -> __m256 {
    let w = _mm256_permutevar8x32_ps(table, lanes);
    if B == 4 {
        _mm256_xor_ps(w, _mm256_castsi256_ps(_mm256_slli_epi32::<28>(lanes)))
    } else {
        w
    }
}

#[inline(always)]
unsafe fn pot_bitadd8<const B: usize>(scale_bits: __m256i, lanes: __m256i) -> __m256 {
    let e = _mm256_and_si256(lanes, _mm256_set1_epi32((1 << (B - 1)) - 1));
    let magnitude = _mm256_add_epi32(scale_bits, _mm256_slli_epi32::<23>(e));
    let top = _mm256_sllv_epi32(lanes, _mm256_set1_epi32(32 - B as i32));
    let sign = _mm256_and_si256(top, _mm256_set1_epi32(i32::MIN));
    _mm256_castsi256_ps(_mm256_xor_si256(magnitude, sign))
}

#[inline(always)]
unsafe fn int8<const B: usize>(lanes: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_and_si256(lanes, _mm256_set1_epi32((1 << B) - 1)))
}

/// How a PoT kernel turns a group's scale and 8 codes into 8 weights.
trait PotDecoder<const B: usize> {
    type Group: Copy;
    unsafe fn group(s: f32) -> Self::Group;
    unsafe fn decode(g: Self::Group, lanes: __m256i) -> __m256;
}

pub struct Lut;
pub struct BitAdd;

impl<const B: usize> PotDecoder<B> for Lut {
    type Group = __m256;
    #[inline(always)]
    unsafe fn group(s: f32) -> __m256 {
        pot_table::<B>(s)
    }
    #[inline(always)]
    unsafe fn decode(g: __m256, lanes: __m256i) -> __m256 {
        pot_lut8::<B>(g, lanes)
    }
}

impl<const B: usize> PotDecoder<B> for BitAdd {
    type Group = __m256i;
    #[inline(always)]
    unsafe fn group(s: f32) -> __m256i {
        _mm256_set1_epi32(s.to_bits() as i32)
    }
    #[inline(always)]
    unsafe fn decode(g: __m256i, lanes: __m256i) -> __m256 {
        pot_bitadd8::<B>(g, lanes)
    }
}

/// Columns `[start, end)` of group `g`, cut at the last multiple of 8.
#[inline(always)]
fn vector_cols(m: &PackedMatrix, g: usize) -> (usize, usize) {
    let l = m.layout();
    let vec_end = l.cols & !7;
    ((g * l.group_size).min(vec_end), ((g + 1) * l.group_size).min(vec_end))
}

fn scalar_tail(m: &PackedMatrix, r: usize, x: &[f32]) -> f32 {
    (m.cols() & !7..m.cols()).map(|c| m.weight(r, c) * x[c]).sum()
}

/// `Σ_c W[r, c]·x[c]` of a PoT row.
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_pot<const B: usize, D: PotDecoder<B>>(m: &PackedMatrix, r: usize, x: &[f32]) -> f32 {
    let gpr = m.layout().groups_per_row();
    let scales = &m.scales()[r * gpr..(r + 1) * gpr];
    let (row, xp, shifts) = (m.row_ptr(r), x.as_ptr(), lane_shifts(B));
    let mut acc = [_mm256_setzero_ps(); 4];
    for (g, &s) in scales.iter().enumerate() {
        let (mut c, end) = vector_cols(m, g);
        let group = D::group(s);
        // Whole chunks (every group when G is a multiple of 32), four independent sums to
        // hide the FMA latency.
        if c % 32 == 0 {
            let mut chunk = row.add(c / 32 * 4 * B);
            while c + 32 <= end {
                for (k, a) in acc.iter_mut().enumerate() {
                    let w = D::decode(group, chunk_codes8(chunk, k, B, shifts));
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(c + 8 * k)), *a);
                }
                chunk = chunk.add(4 * B);
                c += 32;
            }
        }
        while c < end {
            let w = D::decode(group, codes8(row, c, B, shifts));
            acc[0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(c)), acc[0]);
            c += 8;
        }
    }
    let total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    hsum(total) + scalar_tail(m, r, x)
}

/// Row `r` of a PoT matrix as f32.
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_pot<const B: usize>(m: &PackedMatrix, r: usize, out: &mut [f32]) {
    let gpr = m.layout().groups_per_row();
    let scales = &m.scales()[r * gpr..(r + 1) * gpr];
    let (row, op, shifts) = (m.row_ptr(r), out.as_mut_ptr(), lane_shifts(B));
    for (g, &s) in scales.iter().enumerate() {
        let (mut c, end) = vector_cols(m, g);
        let table = pot_table::<B>(s);
        while c < end {
            _mm256_storeu_ps(op.add(c), pot_lut8::<B>(table, codes8(row, c, B, shifts)));
            c += 8;
        }
    }
    for (c, o) in out.iter_mut().enumerate().skip(m.cols() & !7) {
        *o = m.weight(r, c);
    }
}

/// `Σ_c W[r, c]·x[c]` of an INT row; `x_sums` from `int_x_sums`.
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_int<const B: usize>(m: &PackedMatrix, r: usize, x: &[f32], x_sums: &[f32]) -> f32 {
    let gpr = m.layout().groups_per_row();
    let scales = &m.scales()[r * gpr..(r + 1) * gpr];
    let offsets = &m.offsets()[r * gpr..(r + 1) * gpr];
    let (row, xp, shifts) = (m.row_ptr(r), x.as_ptr(), lane_shifts(B));
    let mut acc = _mm256_setzero_ps();
    let mut offset_sum = 0f32;
    for g in 0..gpr {
        let (mut c, end) = vector_cols(m, g);
        let mut q = [_mm256_setzero_ps(); 4];
        if c % 32 == 0 {
            let mut chunk = row.add(c / 32 * 4 * B);
            while c + 32 <= end {
                for (k, a) in q.iter_mut().enumerate() {
                    let w = int8::<B>(chunk_codes8(chunk, k, B, shifts));
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(c + 8 * k)), *a);
                }
                chunk = chunk.add(4 * B);
                c += 32;
            }
        }
        while c < end {
            let w = int8::<B>(codes8(row, c, B, shifts));
            q[0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(c)), q[0]);
            c += 8;
        }
        let qx = _mm256_add_ps(_mm256_add_ps(q[0], q[1]), _mm256_add_ps(q[2], q[3]));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(scales[g]), qx, acc);
        offset_sum += offsets[g] * x_sums[g];
    }
    hsum(acc) + offset_sum + scalar_tail(m, r, x)
}

/// Row `r` of an INT matrix as f32.
#[target_feature(enable = "avx2,fma")]
unsafe fn decode_int<const B: usize>(m: &PackedMatrix, r: usize, out: &mut [f32]) {
    let gpr = m.layout().groups_per_row();
    let (row, op, shifts) = (m.row_ptr(r), out.as_mut_ptr(), lane_shifts(B));
    for g in 0..gpr {
        let (mut c, end) = vector_cols(m, g);
        let s = _mm256_set1_ps(m.scales()[r * gpr + g]);
        let offset = _mm256_set1_ps(m.offsets()[r * gpr + g]);
        while c < end {
            _mm256_storeu_ps(op.add(c), _mm256_fmadd_ps(int8::<B>(codes8(row, c, B, shifts)), s, offset));
            c += 8;
        }
    }
    for (c, o) in out.iter_mut().enumerate().skip(m.cols() & !7) {
        *o = m.weight(r, c);
    }
}

/// Group sums of `x` over the columns the vector loop covers, for `dot_int`.
pub fn int_x_sums(m: &PackedMatrix, x: &[f32]) -> Vec<f32> {
    (0..m.layout().groups_per_row())
        .map(|g| {
            let (a, b) = vector_cols(m, g);
            x[a..b].iter().sum()
        })
        .collect()
}

/// Whether these kernels cover the matrix (INT above 4 bits goes the portable way).
pub fn supports(m: &PackedMatrix) -> bool {
    (2..=4).contains(&m.bits())
}

pub use crate::cpu::PotDecode;

/// # Safety
/// `available()` must be true and `supports(m)`.
pub unsafe fn dot_packed(m: &PackedMatrix, decode: PotDecode, r: usize, x: &[f32], x_sums: &[f32]) -> f32 {
    use potptq_quant::Format::*;
    match (m.format(), m.bits(), decode) {
        (Pot, 2, PotDecode::Lut) => dot_pot::<2, Lut>(m, r, x),
        (Pot, 3, PotDecode::Lut) => dot_pot::<3, Lut>(m, r, x),
        (Pot, 4, PotDecode::Lut) => dot_pot::<4, Lut>(m, r, x),
        (Pot, 2, PotDecode::BitAdd) => dot_pot::<2, BitAdd>(m, r, x),
        (Pot, 3, PotDecode::BitAdd) => dot_pot::<3, BitAdd>(m, r, x),
        (Pot, 4, PotDecode::BitAdd) => dot_pot::<4, BitAdd>(m, r, x),
        (IntAsym | IntSym, 2, _) => dot_int::<2>(m, r, x, x_sums),
        (IntAsym | IntSym, 3, _) => dot_int::<3>(m, r, x, x_sums),
        (IntAsym | IntSym, 4, _) => dot_int::<4>(m, r, x, x_sums),
        (f, b, _) => unreachable!("avx2 kernels do not cover {f:?} at {b} bits"),
    }
}

/// # Safety
/// `available()` must be true and `supports(m)`; `out.len() == m.cols()`.
pub unsafe fn decode_packed(m: &PackedMatrix, r: usize, out: &mut [f32]) {
    use potptq_quant::Format::*;
    match (m.format(), m.bits()) {
        (Pot, 2) => decode_pot::<2>(m, r, out),
        (Pot, 3) => decode_pot::<3>(m, r, out),
        (Pot, 4) => decode_pot::<4>(m, r, out),
        (IntAsym | IntSym, 2) => decode_int::<2>(m, r, out),
        (IntAsym | IntSym, 3) => decode_int::<3>(m, r, out),
        (IntAsym | IntSym, 4) => decode_int::<4>(m, r, out),
        (f, b) => unreachable!("avx2 kernels do not cover {f:?} at {b} bits"),
    }
}

/// # Safety
/// `available()` must be true; `w.len() == x.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    let n = w.len();
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut c = 0;
    while c + 32 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(c + 8 * k)), _mm256_loadu_ps(xp.add(c + 8 * k)), *a);
        }
        c += 32;
    }
    while c + 8 <= n {
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(c)), _mm256_loadu_ps(xp.add(c)), acc[0]);
        c += 8;
    }
    let total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    hsum(total) + w[c..].iter().zip(&x[c..]).map(|(a, b)| a * b).sum::<f32>()
}

#[inline(always)]
unsafe fn load_f16x8(p: *const u16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// # Safety
/// `available()` must be true; `w.len() == x.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f16(w: &[u16], x: &[f32]) -> f32 {
    let n = w.len();
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut c = 0;
    while c + 32 <= n {
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(load_f16x8(wp.add(c + 8 * k)), _mm256_loadu_ps(xp.add(c + 8 * k)), *a);
        }
        c += 32;
    }
    while c + 8 <= n {
        acc[0] = _mm256_fmadd_ps(load_f16x8(wp.add(c)), _mm256_loadu_ps(xp.add(c)), acc[0]);
        c += 8;
    }
    let total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    hsum(total) + w[c..].iter().zip(&x[c..]).map(|(&a, b)| half::f16::from_bits(a).to_f32() * b).sum::<f32>()
}

/// # Safety
/// `available()` must be true; `w.len() == out.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn decode_f16(w: &[u16], out: &mut [f32]) {
    let n = w.len();
    let mut c = 0;
    while c + 8 <= n {
        _mm256_storeu_ps(out.as_mut_ptr().add(c), load_f16x8(w.as_ptr().add(c)));
        c += 8;
    }
    for (o, &h) in out[c..].iter_mut().zip(&w[c..]) {
        *o = half::f16::from_bits(h).to_f32();
    }
}
