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
pub(super) unsafe fn hsum(v: __m256) -> f32 {
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

/// `Σ_c W[r, c]·x[c]` for the `R` PoT rows from `r0`, into `out[..R]`: each load of `x`
/// serves all `R` rows. Four independent sums hide the FMA latency whatever `R` (1, 2 or 4):
/// row `i` adds octet `k` of a chunk into sum `(i + k·R) % 4`.
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_pot_rows<const B: usize, const R: usize, D: PotDecoder<B>>(m: &PackedMatrix, r0: usize, x: &[f32], out: &mut [f32]) {
    let gpr = m.layout().groups_per_row();
    let super::RowBlock { rows, scales, .. } = super::RowBlock::<R>::new(m, r0, false);
    let (xp, shifts) = (x.as_ptr(), lane_shifts(B));
    let mut acc = [_mm256_setzero_ps(); 4];
    for g in 0..gpr {
        let (mut c, end) = vector_cols(m, g);
        let group: [D::Group; R] = std::array::from_fn(|i| D::group(*scales.get_unchecked(i * gpr + g)));
        // Whole chunks (every group when G is a multiple of 32).
        if c % 32 == 0 {
            let mut off = c / 32 * 4 * B;
            while c + 32 <= end {
                for k in 0..4 {
                    let xv = _mm256_loadu_ps(xp.add(c + 8 * k));
                    for i in 0..R {
                        let w = D::decode(group[i], chunk_codes8(rows[i].add(off), k, B, shifts));
                        let a = &mut acc[(i + k * R) % 4];
                        *a = _mm256_fmadd_ps(w, xv, *a);
                    }
                }
                off += 4 * B;
                c += 32;
            }
        }
        while c < end {
            let xv = _mm256_loadu_ps(xp.add(c));
            for i in 0..R {
                let w = D::decode(group[i], codes8(rows[i], c, B, shifts));
                acc[i] = _mm256_fmadd_ps(w, xv, acc[i]);
            }
            c += 8;
        }
    }
    for i in 0..R {
        let mut total = acc[i];
        for j in (i + R..4).step_by(R) {
            total = _mm256_add_ps(total, acc[j]);
        }
        out[i] = hsum(total) + scalar_tail(m, r0 + i, x);
    }
}

/// PoT rows `r0..r0 + out.len()`, four at a time.
unsafe fn dot_pot_packed_rows<const B: usize, D: PotDecoder<B>>(m: &PackedMatrix, r0: usize, x: &[f32], out: &mut [f32]) {
    let mut chunks = out.chunks_exact_mut(4);
    let mut r = r0;
    for c in &mut chunks {
        dot_pot_rows::<B, 4, D>(m, r, x, c);
        r += 4;
    }
    for c in chunks.into_remainder().chunks_mut(1) {
        dot_pot_rows::<B, 1, D>(m, r, x, c);
        r += 1;
    }
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

/// Rows `r0..r0 + out.len()`; `x_sums` from `int_x_sums` for INT.
///
/// # Safety
/// `available()` must be true and `supports(m)`; the rows exist.
pub unsafe fn dot_packed_rows(m: &PackedMatrix, decode: PotDecode, r0: usize, x: &[f32], x_sums: &[f32], out: &mut [f32]) {
    use potptq_quant::Format::*;
    match (m.format(), m.bits(), decode) {
        (Pot, 2, PotDecode::Lut) => dot_pot_packed_rows::<2, Lut>(m, r0, x, out),
        (Pot, 3, PotDecode::Lut) => dot_pot_packed_rows::<3, Lut>(m, r0, x, out),
        (Pot, 4, PotDecode::Lut) => dot_pot_packed_rows::<4, Lut>(m, r0, x, out),
        (Pot, 2, PotDecode::BitAdd) => dot_pot_packed_rows::<2, BitAdd>(m, r0, x, out),
        (Pot, 3, PotDecode::BitAdd) => dot_pot_packed_rows::<3, BitAdd>(m, r0, x, out),
        (Pot, 4, PotDecode::BitAdd) => dot_pot_packed_rows::<4, BitAdd>(m, r0, x, out),
        (IntAsym | IntSym, b, _) => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = match b {
                    2 => dot_int::<2>(m, r0 + i, x, x_sums),
                    3 => dot_int::<3>(m, r0 + i, x, x_sums),
                    4 => dot_int::<4>(m, r0 + i, x, x_sums),
                    _ => unreachable!("avx2 kernels do not cover INT at {b} bits"),
                };
            }
        }
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

// ---- Q8 activations (`cpu::q8`): integer products with `_mm256_maddubs_epi16` ----
//
// A chunk of 32 codes becomes 32 bytes, one code each, in the order `q8::Order` names (the
// activations were stored in that order): 4 bits, one 128-bit load broadcast to both halves,
// the high half shifted by 4 (low nibbles, then high nibbles); 2 bits, one 64-bit load
// broadcast to four quarters shifted by 0, 2, 4, 6; 3 bits, column order: `vpshufb` gathers
// the two bytes each code lies in into a 16-bit lane, `vpmullw` by `2^(13 − offset)` moves the
// code to the lane's top 3 bits and a shift by 13 brings it down, two registers of 16 lanes
// packed into one of 32 bytes.
//
// PoT products, 32 at a time, no saturation anywhere:
// - 2 and 3 bits: a `vpshufb` table gives the signed level `±2^E`; `maddubs(|q|, sign(w, q))`
//   is `Σ w·q` (|w| ≤ 8: pairs ≤ 2·127·8).
// - 4 bits (levels up to 128, not an i8): tables give `2^E` (u8) and the code's sign, the sign
//   goes onto the activation (`vpsignb`), `maddubs(2^E, ±q)`: pairs ≤ 2·128·127 = 32512.
// INT: `maddubs(code, q)` (pairs ≤ 2·15·127), the zero-point through the group sums of `q`.
// Each block's 8 partial sums (i32) are converted once and scaled by the block's `d`; each
// group's by `s`.

use crate::cpu::q8::{Order, Q8Activations, BLOCK};

/// The activation order the Q8 kernels of this width read.
pub fn q8_order(bits: u8) -> Order {
    match bits {
        4 => Order::Nibbles,
        2 => Order::Crumbs,
        _ => Order::Natural,
    }
}

/// One block of 32 activations quantized as `q8::quantize_block` does it (`x · (1/d)` rounded
/// to nearest even, which is what `vcvtps2dq` does in the default rounding mode), `q` in column
/// order; returns `d`.
///
/// # Safety
/// `available()`; `x` points at 32 readable values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn q8_quantize_block(x: *const f32, q: &mut [i8; BLOCK]) -> f32 {
    let v = [_mm256_loadu_ps(x), _mm256_loadu_ps(x.add(8)), _mm256_loadu_ps(x.add(16)), _mm256_loadu_ps(x.add(24))];
    let sign = _mm256_set1_ps(-0.0);
    let m = _mm256_max_ps(
        _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
        _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])),
    );
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let i = [0, 1, 2, 3].map(|k| _mm256_cvtps_epi32(_mm256_mul_ps(v[k], id)));
    // packs works within 128-bit halves: dwords come out in the order 0,4,1,5,2,6,3,7.
    let w = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, w);
    d
}

/// Whether the Q8 kernels cover the matrix: groups of whole 32-blocks, 2 to 4 bits.
pub fn supports_q8(m: &PackedMatrix) -> bool {
    supports(m) && m.layout().group_size.is_multiple_of(BLOCK)
}

/// The 32 codes of a chunk, one per byte (see above).
#[inline(always)]
pub(super) unsafe fn q8_codes<const B: usize>(chunk: *const u8) -> __m256i {
    match B {
        4 => {
            let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(chunk as *const __m128i));
            let v = _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
            _mm256_and_si256(v, _mm256_set1_epi8(0x0f))
        }
        2 => {
            let v = _mm256_set1_epi64x((chunk as *const i64).read_unaligned());
            let v = _mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 2, 4, 6));
            _mm256_and_si256(v, _mm256_set1_epi8(0x03))
        }
        _ => {
            // Code k at bit 3k: bytes 3k/8 and 3k/8 + 1, offset 3k % 8. Register a holds codes
            // 0..8 (low half) and 16..24 (high half); b holds 8..16 and 24..32.
            let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(chunk as *const __m128i));
            let mul = _mm256_loadu_si256(Q8_3BIT_MUL.as_ptr() as *const __m256i);
            let a = _mm256_shuffle_epi8(v, _mm256_loadu_si256(Q8_3BIT_A.as_ptr() as *const __m256i));
            let b = _mm256_shuffle_epi8(v, _mm256_loadu_si256(Q8_3BIT_B.as_ptr() as *const __m256i));
            let a = _mm256_srli_epi16::<13>(_mm256_mullo_epi16(a, mul));
            let b = _mm256_srli_epi16::<13>(_mm256_mullo_epi16(b, mul));
            _mm256_packus_epi16(a, b)
        }
    }
}

/// `vpshufb` control gathering, into 16-bit lane `j` of each half, the two bytes that hold code
/// `first + j` (low half) or `second + j` (high half) of a 3-bit chunk.
const fn q8_3bit_ctrl(first: usize, second: usize) -> [i8; 32] {
    let mut c = [0i8; 32];
    let mut j = 0;
    while j < 8 {
        let (lo, hi) = (3 * (first + j) / 8, 3 * (second + j) / 8);
        c[2 * j] = lo as i8;
        c[2 * j + 1] = lo as i8 + 1;
        c[16 + 2 * j] = hi as i8;
        c[16 + 2 * j + 1] = hi as i8 + 1;
        j += 1;
    }
    c
}
static Q8_3BIT_A: [i8; 32] = q8_3bit_ctrl(0, 16);
static Q8_3BIT_B: [i8; 32] = q8_3bit_ctrl(8, 24);
/// `2^(13 − 3j % 8)`: code `j` of 8 (and of `8 + j`, `16 + j`, `24 + j`) to the top 3 bits.
static Q8_3BIT_MUL: [i16; 16] = {
    let mut m = [0i16; 16];
    let mut j = 0;
    while j < 16 {
        m[j] = 1 << (13 - (3 * (j % 8)) % 8);
        j += 1;
    }
    m
};

#[inline(always)]
unsafe fn table16(t: [i8; 16]) -> __m256i {
    let v = _mm_loadu_si128(t.as_ptr() as *const __m128i);
    _mm256_broadcastsi128_si256(v)
}

/// `Σ w·q` of one block as 8 i32 partial sums: INT `Σ code·q`; PoT at 2 and 3 bits
/// `Σ (w + o)·q`, at 4 bits `Σ 2^E·(±q)` (see `dot_q8_rows`).
#[inline(always)]
pub(super) unsafe fn q8_block<const B: usize, const INT: bool>(codes: __m256i, xq: __m256i, t1: __m256i, t2: __m256i) -> __m256i {
    let pairs = if INT {
        _mm256_maddubs_epi16(codes, xq)
    } else if B == 4 {
        let signed = _mm256_sign_epi8(xq, _mm256_shuffle_epi8(t2, codes));
        _mm256_maddubs_epi16(_mm256_shuffle_epi8(t1, codes), signed)
    } else {
        _mm256_maddubs_epi16(_mm256_shuffle_epi8(t1, codes), xq)
    };
    _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
}

/// The `vpshufb` tables of `q8_block`'s PoT products: the level (`w + o` at 2 and 3 bits,
/// `2^E` at 4 bits), and at 4 bits the sign.
#[inline(always)]
pub(super) unsafe fn q8_tables<const B: usize>() -> (__m256i, __m256i) {
    match B {
        2 => (table16([3, 4, 1, 0, 3, 4, 1, 0, 3, 4, 1, 0, 3, 4, 1, 0]), _mm256_setzero_si256()),
        3 => (table16([9, 10, 12, 16, 7, 6, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0]), _mm256_setzero_si256()),
        _ => (
            table16([1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128]),
            table16([1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1]),
        ),
    }
}

/// `o`, the offset that makes PoT levels unsigned at 2 and 3 bits (their top level); 0 at 4
/// bits, whose sign goes onto the activations.
pub(super) fn q8_level_offset(bits: usize) -> f32 {
    match bits {
        2 => 2.0,
        3 => 8.0,
        _ => 0.0,
    }
}

/// The columns past the last whole 32-block of the row (at most one short block), in integers.
pub(super) fn q8_tail(m: &PackedMatrix, r: usize, a: &Q8Activations) -> f32 {
    let l = m.layout();
    let start = l.cols / BLOCK * BLOCK;
    if start == l.cols {
        return 0.0;
    }
    let dot: i32 = (start..l.cols).map(|c| crate::cpu::q8::integer_weight(m, r, c) * a.q[c] as i32).sum();
    a.d[start / BLOCK] * m.scales()[r * l.groups_per_row() + start / l.group_size] * dot as f32
}

/// What the activations' group sums add to row `r`'s Q8 product, summed group by group: INT
/// the offsets' `Σ_g offset_g·Σq_g` (the zero-points), PoT `−o·Σ_g s_g·Σq_g` (`o` the tables'
/// level offset, `q8_level_offset`). The AVX2 and VNNI row kernels share it.
pub(super) fn q8_group_terms(m: &PackedMatrix, r: usize, a: &Q8Activations, int: bool) -> f32 {
    let gpr = m.layout().groups_per_row();
    let level_offset = if int { 0.0 } else { q8_level_offset(m.bits() as usize) };
    let (scales, offsets) = (&m.scales()[r * gpr..(r + 1) * gpr], if int { &m.offsets()[r * gpr..(r + 1) * gpr] } else { &[][..] });
    let mut sum = 0f32;
    for (g, &group_sum) in a.group_sums.iter().enumerate() {
        sum += if int { offsets[g] * group_sum } else { -level_offset * scales[g] * group_sum };
    }
    sum
}

/// `Σ_c W[r, c]·x[c]` for the `R` rows from `r0` against Q8 activations (`supports_q8(m)`),
/// into `out[..R]`: each block's activations are loaded once for all `R` rows, and the `R`
/// independent sums hide the latency of the scaling FMAs.
///
/// PoT at 2 and 3 bits: the table holds `w + o` (`o` = 2 or 8, the top level), which is
/// unsigned, so `maddubs` takes it as is, and `Σ (w + o)·q − o·Σ q` is `Σ w·q`, the second sum
/// coming from the activations' group sums once per group. At 4 bits `w + 128` would not fit a
/// byte: the table gives `2^E` and the sign goes onto the activation. INT: `Σ code·q`, and the
/// zero-point term `−s·z·Σ q` from the same group sums.
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q8_rows<const B: usize, const R: usize, const INT: bool>(m: &PackedMatrix, r0: usize, a: &Q8Activations, out: &mut [f32]) {
    let l = m.layout();
    let gpr = l.groups_per_row();
    let (full, per_group) = (l.cols / BLOCK, l.group_size / BLOCK);
    let super::RowBlock { rows, scales, .. } = super::RowBlock::<R>::new(m, r0, INT);
    let (t1, t2) = q8_tables::<B>();
    let (qp, dp) = (a.q.as_ptr(), a.d.as_ptr());
    let mut acc = [_mm256_setzero_ps(); R];
    for g in 0..gpr {
        let (b0, b1) = (g * per_group, ((g + 1) * per_group).min(full));
        let mut sums = [_mm256_setzero_ps(); R];
        for b in b0..b1 {
            let xq = _mm256_loadu_si256(qp.add(b * BLOCK) as *const __m256i);
            let d = _mm256_broadcast_ss(&*dp.add(b));
            for i in 0..R {
                let codes = q8_codes::<B>(rows[i].add(b * 4 * B));
                let p = q8_block::<B, INT>(codes, xq, t1, t2);
                sums[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, sums[i]);
            }
        }
        for i in 0..R {
            acc[i] = _mm256_fmadd_ps(sums[i], _mm256_set1_ps(scales[i * gpr + g]), acc[i]);
        }
    }
    // A short last block (INT zero-point included) is done in integers by `q8_tail`.
    for i in 0..R {
        out[i] = hsum(acc[i]) + q8_group_terms(m, r0 + i, a, INT) + q8_tail(m, r0 + i, a);
    }
}

/// Rows `r0..r0 + out.len()` against Q8 activations, four at a time.
///
/// # Safety
/// `available()` must be true and `supports_q8(m)`; `a` was made with `q8_order(m.bits())`.
pub unsafe fn dot_packed_q8(m: &PackedMatrix, r0: usize, a: &Q8Activations, out: &mut [f32]) {
    rows_by_format!(dot_q8_rows, m, r0, a, out)
}
