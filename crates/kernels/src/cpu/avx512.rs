//! AVX-512 row kernels (F, BW, VBMI) for packed GEMV and GEMM panels: 16 weights per
//! instruction, decoded by a 16-entry table per group. `vpermps` on a 512-bit register reads 4
//! index bits, so every code is one lookup: 4-bit PoT with its sign, INT with its zero-point
//! (`s·q − s·z`), 2 and 3 bits with the table repeated (the index bits above the code's do not
//! matter). The AVX2 decode of 4-bit PoT needs a shift and an xor besides the lookup, and INT
//! a mask and a conversion.
//!
//! **16 codes in one load.** The 16 codes of half `h` of a 32-code chunk start at byte
//! `h·2b` of the chunk and span `16b ≤ 64` bits: one unaligned 64-bit load (32-bit at 2
//! bits), broadcast, and `vpmultishiftqb` (`vpsrlvd` at 2 bits) moves code `i` to the low bits
//! of lane `i`, in column order. A 3-bit half starts mid-word; its load ends at most 2 bytes
//! past the chunk, within the matrix's padding word.
//!
//! **4 bits without a byte shuffle.** `vpmultishiftqb` and `vpermps` both issue on one port
//! (5), so at 4 bits that port bounds the GEMV. There the 64 bits of a half are broadcast per
//! qword and `vpsrlvd` (port 0) shifts dword `2j` to code `j` and dword `2j + 1` to code
//! `8 + j`: the weights come out interleaved, and so must `x` (`interleave_x`, once per token
//! for all rows). GEMM panels keep the plain order.
//!
//! Groups must hold whole chunks (`G % 32 == 0`, `supports`); columns past the last whole
//! chunk go through the scalar `PackedMatrix::weight`.

use std::arch::x86_64::*;

use crate::PackedMatrix;

pub fn available() -> bool {
    super::avx2::available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vbmi")
}

/// Whether these kernels cover the matrix: 2 to 4 bits, groups of whole 32-code chunks.
pub fn supports(m: &PackedMatrix) -> bool {
    (2..=4).contains(&m.bits()) && m.layout().group_size.is_multiple_of(32)
}

/// The 16 codes of half `h` of the chunk at `chunk`, code `i` in the low bits of lane `i`.
#[inline(always)]
unsafe fn codes16<const B: usize>(chunk: *const u8, h: usize, shifts: __m512i) -> __m512i {
    if B == 2 {
        let v = (chunk.add(4 * h) as *const i32).read_unaligned();
        _mm512_srlv_epi32(_mm512_set1_epi32(v), shifts)
    } else {
        let v = (chunk.add(2 * B * h) as *const i64).read_unaligned();
        _mm512_multishift_epi64_epi8(shifts, _mm512_set1_epi64(v))
    }
}

/// The 16 codes of half `h` of a 4-bit chunk, code `j` in lane `2j` and code `8 + j` in lane
/// `2j + 1` (the order of `interleave_x`).
#[inline(always)]
unsafe fn codes16_interleaved(chunk: *const u8, h: usize, shifts: __m512i) -> __m512i {
    let v = (chunk.add(8 * h) as *const i64).read_unaligned();
    _mm512_srlv_epi32(_mm512_set1_epi64(v), shifts)
}

/// `x` in the order the 4-bit GEMV reads it: within each 16 columns of whole chunks, `j` and
/// `8 + j` side by side; the columns past the last whole chunk as they were.
pub fn interleave_x(m: &PackedMatrix, x: &[f32]) -> Vec<f32> {
    let full = m.cols() / 32 * 32;
    let mut out = Vec::with_capacity(x.len());
    for half in x[..full].chunks_exact(16) {
        for j in 0..8 {
            out.extend([half[j], half[8 + j]]);
        }
    }
    out.extend_from_slice(&x[full..]);
    out
}

/// Whether the GEMV of `m` reads `x` through `interleave_x`.
pub fn wants_interleaved_x(m: &PackedMatrix) -> bool {
    m.bits() == 4
}

/// The table index `i` reads: the weight of code `i mod 2^B` divided by the group's scale
/// (PoT `±2^E`; INT the code, the zero-point added per group).
const fn levels(bits: usize, int: bool) -> [f32; 16] {
    let mut l = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        let code = i & ((1 << bits) - 1);
        l[i] = if int {
            code as f32
        } else {
            let magnitude = (1u32 << (code & ((1 << (bits - 1)) - 1))) as f32;
            if code >> (bits - 1) == 1 { -magnitude } else { magnitude }
        };
        i += 1;
    }
    l
}
static LEVELS: [[[f32; 16]; 3]; 2] = [
    [levels(2, false), levels(3, false), levels(4, false)],
    [levels(2, true), levels(3, true), levels(4, true)],
];

/// How far ahead of each row's reads to prefetch, in bytes (measured better than the
/// hardware prefetcher alone, and than 512 or 1024).
const PREFETCH: usize = 256;

#[inline(always)]
unsafe fn hsum512(v: __m512) -> f32 {
    let h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))));
    let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// `Σ_c W[r, c]·x[c]` for the `R` rows from `r0`, into `out[..R]`; each load of `x` serves
/// all `R` rows, and each row keeps one sum per half-chunk. At 4 bits `x` is interleaved.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx2,fma")]
unsafe fn dot_rows<const B: usize, const R: usize, const INT: bool>(m: &PackedMatrix, r0: usize, x: &[f32], out: &mut [f32]) {
    let l = m.layout();
    let gpr = l.groups_per_row();
    let (full, per_group) = (l.cols / 32, l.group_size / 32);
    let super::RowBlock { rows, scales, offsets } = super::RowBlock::<R>::new(m, r0, INT);
    let shifts = if B == 4 {
        _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28)
    } else {
        _mm512_setr_epi32(0, B as i32, 2 * B as i32, 3 * B as i32, 4 * B as i32, 5 * B as i32, 6 * B as i32, 7 * B as i32,
            8 * B as i32, 9 * B as i32, 10 * B as i32, 11 * B as i32, 12 * B as i32, 13 * B as i32, 14 * B as i32, 15 * B as i32)
    };
    let levels = _mm512_loadu_ps(LEVELS[INT as usize][B - 2].as_ptr());
    let xp = x.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); R]; 2];
    for g in 0..gpr {
        let (k0, k1) = (g * per_group, ((g + 1) * per_group).min(full));
        let tables: [__m512; R] = std::array::from_fn(|i| {
            let s = _mm512_set1_ps(*scales.get_unchecked(i * gpr + g));
            if INT {
                _mm512_fmadd_ps(levels, s, _mm512_set1_ps(*offsets.get_unchecked(i * gpr + g)))
            } else {
                _mm512_mul_ps(levels, s) // exact: powers of two
            }
        });
        for k in k0..k1 {
            for i in 0..R {
                _mm_prefetch::<_MM_HINT_T0>(rows[i].add(k * 4 * B + PREFETCH) as *const i8);
            }
            for h in 0..2 {
                let xv = _mm512_loadu_ps(xp.add(32 * k + 16 * h));
                for i in 0..R {
                    let chunk = rows[i].add(k * 4 * B);
                    let codes = if B == 4 { codes16_interleaved(chunk, h, shifts) } else { codes16::<B>(chunk, h, shifts) };
                    let w = _mm512_permutexvar_ps(codes, tables[i]);
                    acc[h][i] = _mm512_fmadd_ps(w, xv, acc[h][i]);
                }
            }
        }
    }
    for i in 0..R {
        let tail: f32 = (full * 32..l.cols).map(|c| m.weight(r0 + i, c) * x[c]).sum();
        out[i] = hsum512(_mm512_add_ps(acc[0][i], acc[1][i])) + tail;
    }
}

/// Rows `r0..r0 + out.len()`, four at a time; `x` through `interleave_x` when
/// `wants_interleaved_x(m)`.
///
/// # Safety
/// `available()` must be true and `supports(m)`; the rows exist.
pub unsafe fn dot_packed_rows(m: &PackedMatrix, r0: usize, x: &[f32], out: &mut [f32]) {
    rows_by_format!(dot_rows, m, r0, x, out)
}

/// Row `r` as f32, for a GEMM panel.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx2,fma")]
unsafe fn decode_row<const B: usize, const INT: bool>(m: &PackedMatrix, r: usize, out: &mut [f32]) {
    let l = m.layout();
    let gpr = l.groups_per_row();
    let (full, per_group) = (l.cols / 32, l.group_size / 32);
    let row = m.row_ptr(r);
    let shifts = _mm512_setr_epi32(0, B as i32, 2 * B as i32, 3 * B as i32, 4 * B as i32, 5 * B as i32, 6 * B as i32, 7 * B as i32,
        8 * B as i32, 9 * B as i32, 10 * B as i32, 11 * B as i32, 12 * B as i32, 13 * B as i32, 14 * B as i32, 15 * B as i32);
    let levels = _mm512_loadu_ps(LEVELS[INT as usize][B - 2].as_ptr());
    let op = out.as_mut_ptr();
    for g in 0..gpr {
        let s = _mm512_set1_ps(m.scales()[r * gpr + g]);
        let table = if INT { _mm512_fmadd_ps(levels, s, _mm512_set1_ps(m.offsets()[r * gpr + g])) } else { _mm512_mul_ps(levels, s) };
        for k in g * per_group..((g + 1) * per_group).min(full) {
            for h in 0..2 {
                _mm512_storeu_ps(op.add(32 * k + 16 * h), _mm512_permutexvar_ps(codes16::<B>(row.add(k * 4 * B), h, shifts), table));
            }
        }
    }
    for (c, o) in out.iter_mut().enumerate().skip(full * 32) {
        *o = m.weight(r, c);
    }
}

/// # Safety
/// `available()` must be true and `supports(m)`; `out.len() == m.cols()`.
pub unsafe fn decode_packed(m: &PackedMatrix, r: usize, out: &mut [f32]) {
    use potptq_quant::Format::*;
    match (m.format(), m.bits()) {
        (Pot, 2) => decode_row::<2, false>(m, r, out),
        (Pot, 3) => decode_row::<3, false>(m, r, out),
        (Pot, 4) => decode_row::<4, false>(m, r, out),
        (IntAsym | IntSym, 2) => decode_row::<2, true>(m, r, out),
        (IntAsym | IntSym, 3) => decode_row::<3, true>(m, r, out),
        (IntAsym | IntSym, 4) => decode_row::<4, true>(m, r, out),
        (f, b) => unreachable!("avx512 kernels do not cover {f:?} at {b} bits"),
    }
}
