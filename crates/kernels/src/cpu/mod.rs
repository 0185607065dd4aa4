//! Matrix products on the CPU: `y[t, r] = Σ_c W[r, c]·x[t, c]` for `x` of `tokens` rows, with
//! `W` packed (PoT or INT codes + scales), f16 or f32, never expanded to a whole f32 matrix.
//!
//! Two shapes of work, both parallel over output rows with rayon:
//! - **GEMV** (a few tokens, e.g. decoding): each row is decoded in registers and multiplied
//!   as it is read (`avx2::dot_*`); the weights are read once per token, at their packed size.
//! - **GEMM** (many tokens: prefill, evaluation): a panel of rows is decoded into an f32
//!   buffer that stays in cache, and the `gemm` crate multiplies it with all tokens at once;
//!   the decode is paid once per panel, the arithmetic is the dense kernel's.
//!
//! The instruction set is picked at run time (`Isa::best`); `reference` holds the plain
//! definition the kernels are tested against.

/// The body of a row kernels' entry point: rows `$r0..$r0 + $out.len()` through
/// `$kernel::<BITS, ROWS, INT>(m, r, x, out)`, four rows per call (the activations loaded
/// once for four) and the rest one by one, the instance picked by `$m`'s format and bits.
#[cfg(target_arch = "x86_64")]
macro_rules! rows_by_format {
    ($kernel:ident, $m:expr, $r0:expr, $x:expr, $out:expr) => {{
        use potptq_quant::Format::*;
        macro_rules! four_then_one {
            ($b:literal, $int:literal) => {{
                let mut chunks = $out.chunks_exact_mut(4);
                let mut r = $r0;
                for c in &mut chunks {
                    $kernel::<$b, 4, $int>($m, r, $x, c);
                    r += 4;
                }
                for c in chunks.into_remainder().chunks_mut(1) {
                    $kernel::<$b, 1, $int>($m, r, $x, c);
                    r += 1;
                }
            }};
        }
        match ($m.format(), $m.bits()) {
            (Pot, 2) => four_then_one!(2, false),
            (Pot, 3) => four_then_one!(3, false),
            (Pot, 4) => four_then_one!(4, false),
            (IntAsym | IntSym, 2) => four_then_one!(2, true),
            (IntAsym | IntSym, 3) => four_then_one!(3, true),
            (IntAsym | IntSym, 4) => four_then_one!(4, true),
            (f, b) => unreachable!("{} does not cover {f:?} at {b} bits", stringify!($kernel)),
        }
    }};
}

/// What a row kernel over the `R` rows from `r0` reads of each row besides the activations:
/// where its codes start, and its group scales and (INT) offsets, all of the `R` rows' groups.
#[cfg(target_arch = "x86_64")]
struct RowBlock<'a, const R: usize> {
    rows: [*const u8; R],
    scales: &'a [f32],
    offsets: &'a [f32],
}

#[cfg(target_arch = "x86_64")]
impl<'a, const R: usize> RowBlock<'a, R> {
    #[inline(always)]
    fn new(m: &'a PackedMatrix, r0: usize, int: bool) -> Self {
        let gpr = m.layout().groups_per_row();
        let groups = r0 * gpr..(r0 + R) * gpr;
        Self {
            rows: std::array::from_fn(|i| m.row_ptr(r0 + i)),
            scales: &m.scales()[groups.clone()],
            offsets: if int { &m.offsets()[groups] } else { &[] },
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod portable;
pub mod q8;
pub mod reference;
#[cfg(target_arch = "x86_64")]
mod vnni;

use std::borrow::Cow;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use anyhow::{bail, ensure, Result};
use potptq_quant::Format;
use rayon::prelude::*;

use crate::PackedMatrix;

/// Which row kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust that any target compiles (the compiler vectorizes the dot products).
    Portable,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// AVX2 plus AVX-512 F, BW and VBMI: the packed GEMV decodes 16 weights per lookup
    /// (`avx512`), and so do GEMM panels; with VNNI too, the Q8 GEMV multiplies 64 weights per
    /// instruction (`vnni`); everything else runs the AVX2 kernels.
    Avx512,
}

impl Isa {
    /// The fastest one this CPU has, detected once.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| [Isa::Avx512, Isa::Avx2].into_iter().find(|i| i.available()).unwrap_or(Isa::Portable))
    }

    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::available(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::available(),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512 => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether the AVX2 kernels may run (AVX-512 includes them).
    fn has_avx2(self) -> bool {
        self != Isa::Portable
    }
}

/// How a PoT code becomes a weight inside a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PotDecode {
    /// `bits(s) + (E << 23)`, sign by xor.
    BitAdd,
    /// A per-group table of `±s·2^E`, indexed by the code with `vpermps`.
    Lut,
}

impl PotDecode {
    /// The faster of the two on AVX2 at every width, as `potptq bench kernels` measures it: the
    /// table needs 1 instruction per 8 weights at 2 and 3 bits (the sign is part of the index)
    /// and 3 at 4 bits; the bit-add needs 6.
    pub fn chosen(_bits: u8) -> PotDecode {
        PotDecode::Lut
    }

    pub fn name(self) -> &'static str {
        match self {
            PotDecode::BitAdd => "bit-add",
            PotDecode::Lut => "lut",
        }
    }
}

/// What a packed product multiplies the weights with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activations {
    /// The f32 activations as they are: the product of the weights as the quantizer defines
    /// them (the default; `eval` numbers are exact up to f32 summation).
    #[default]
    F32,
    /// Activations rounded to 8-bit integers per block of 32 (`q8`), integer products: faster,
    /// and a different (slightly less exact) model.
    Q8,
}

impl Activations {
    pub fn name(self) -> &'static str {
        match self {
            Activations::F32 => "f32",
            Activations::Q8 => "q8",
        }
    }
}

static DEFAULT_ACTIVATIONS: AtomicU8 = AtomicU8::new(0);

/// The activations `Kernel::default()` uses from now on in this process (e.g. `--kernels q8`).
pub fn set_default_activations(a: Activations) {
    DEFAULT_ACTIVATIONS.store(a as u8, Ordering::Relaxed);
}

pub fn default_activations() -> Activations {
    if DEFAULT_ACTIVATIONS.load(Ordering::Relaxed) == Activations::Q8 as u8 {
        Activations::Q8
    } else {
        Activations::F32
    }
}

/// A choice of kernels; `Kernel::default()` is the fastest available, with the process's
/// default activations (`set_default_activations`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernel {
    pub isa: Isa,
    /// `None`: `PotDecode::chosen(bits)`.
    pub pot_decode: Option<PotDecode>,
    pub activations: Activations,
}

impl Default for Kernel {
    fn default() -> Self {
        Kernel { isa: Isa::best(), pot_decode: None, activations: default_activations() }
    }
}

/// At most this many tokens go the GEMV way (decoding the weights once per token); more are
/// a GEMM.
pub const GEMV_MAX_TOKENS: usize = 4;

/// `y = x Wᵀ` for a packed `W` (`x`: `[tokens, cols]`, `y`: `[tokens, rows]`, row-major).
pub fn matmul(m: &PackedMatrix, x: &[f32], tokens: usize, y: &mut [f32]) -> Result<()> {
    matmul_with(Kernel::default(), m, x, tokens, y)
}

pub fn matmul_with(kernel: Kernel, m: &PackedMatrix, x: &[f32], tokens: usize, y: &mut [f32]) -> Result<()> {
    check_shapes(m.rows(), m.cols(), x, tokens, y)?;
    let rows = PackedRows::new(m, kernel)?;
    run(&rows, x, tokens, y);
    Ok(())
}

/// `y = x Wᵀ` for a row-major f32 `W` of `[rows, cols]`.
pub fn matmul_f32(isa: Isa, w: &[f32], rows: usize, cols: usize, x: &[f32], tokens: usize, y: &mut [f32]) -> Result<()> {
    ensure!(w.len() == rows * cols, "{} weights for a [{rows}, {cols}] matrix", w.len());
    check_shapes(rows, cols, x, tokens, y)?;
    check_isa(isa)?;
    run(&F32Rows { w, rows, cols, isa }, x, tokens, y);
    Ok(())
}

/// `y = x Wᵀ` for a row-major f16 `W` (as bits) of `[rows, cols]`.
pub fn matmul_f16(isa: Isa, w: &[u16], rows: usize, cols: usize, x: &[f32], tokens: usize, y: &mut [f32]) -> Result<()> {
    ensure!(w.len() == rows * cols, "{} weights for a [{rows}, {cols}] matrix", w.len());
    check_shapes(rows, cols, x, tokens, y)?;
    check_isa(isa)?;
    run(&F16Rows { w, rows, cols, isa }, x, tokens, y);
    Ok(())
}

/// Rows `first_row..` of `m` as f32, as many as fill `out`.
pub(crate) fn decode_rows(m: &PackedMatrix, first_row: usize, out: &mut [f32]) {
    let rows = PackedRows::new(m, Kernel { activations: Activations::F32, ..Kernel::default() }).expect("the best ISA is available");
    out.par_chunks_mut(m.cols()).enumerate().for_each(|(i, row)| rows.decode(first_row + i, row));
}

fn check_shapes(rows: usize, cols: usize, x: &[f32], tokens: usize, y: &[f32]) -> Result<()> {
    ensure!(rows > 0 && cols > 0, "empty weight matrix [{rows}, {cols}]");
    ensure!(x.len() == tokens * cols, "input has {} values, expected {tokens} tokens × {cols}", x.len());
    ensure!(y.len() == tokens * rows, "output has room for {} values, expected {tokens} tokens × {rows}", y.len());
    Ok(())
}

fn check_isa(isa: Isa) -> Result<()> {
    if !isa.available() {
        bail!("this CPU has no {} kernels", isa.name());
    }
    Ok(())
}

/// Work shared by every row for one token.
enum Prepared {
    None,
    /// INT with f32 activations: the group sums of `x`.
    XSums(Vec<f32>),
    /// Q8 activations.
    Q8(q8::Q8Activations),
    /// `x` in the order the AVX-512 4-bit GEMV reads it (`avx512::interleave_x`).
    Interleaved(Vec<f32>),
}

/// A weight matrix bound to its row kernels: all the threading below needs.
trait Rows: Sync {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    fn prepare(&self, _x: &[f32]) -> Prepared {
        Prepared::None
    }
    fn dot(&self, r: usize, x: &[f32], prepared: &Prepared) -> f32;
    /// Rows `r0..r0 + out.len()` (at most `ROWS_PER_CALL`).
    fn dot_rows(&self, r0: usize, x: &[f32], prepared: &Prepared, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.dot(r0 + i, x, prepared);
        }
    }
    fn decode(&self, r: usize, out: &mut [f32]);
    /// The rows themselves when they are f32 already (GEMM then reads them in place).
    fn as_f32(&self) -> Option<&[f32]> {
        None
    }
    /// The activations a GEMM multiplies with (Q8: rounded as the GEMV rounds them).
    fn gemm_input<'x>(&self, x: &'x [f32]) -> Cow<'x, [f32]> {
        Cow::Borrowed(x)
    }
}

struct PackedRows<'a> {
    m: &'a PackedMatrix,
    simd: bool,
    decode: PotDecode,
    activations: Activations,
    /// The AVX2 Q8 kernels cover `m` (else Q8 goes the scalar way).
    simd_q8: bool,
    /// The AVX-512 VNNI Q8 kernels cover `m` (their activations are the AVX2 kernels').
    vnni_q8: bool,
    /// The AVX-512 GEMV kernels cover `m` and the decode (f32 activations).
    wide: bool,
    /// The AVX-512 kernels cover `m` (GEMM panels decode with them).
    wide_decode: bool,
}

impl<'a> PackedRows<'a> {
    fn new(m: &'a PackedMatrix, kernel: Kernel) -> Result<Self> {
        check_isa(kernel.isa)?;
        #[cfg(target_arch = "x86_64")]
        let (simd, simd_q8) = (kernel.isa.has_avx2() && avx2::supports(m), kernel.isa.has_avx2() && avx2::supports_q8(m));
        #[cfg(not(target_arch = "x86_64"))]
        let (simd, simd_q8) = (false, false);
        let decode = kernel.pot_decode.unwrap_or(PotDecode::chosen(m.bits()));
        #[cfg(target_arch = "x86_64")]
        let wide_decode = kernel.isa == Isa::Avx512 && avx512::supports(m);
        #[cfg(not(target_arch = "x86_64"))]
        let wide_decode = false;
        let wide = wide_decode && (m.format() != Format::Pot || decode == PotDecode::Lut);
        #[cfg(target_arch = "x86_64")]
        let vnni_q8 = kernel.isa == Isa::Avx512 && vnni::available() && vnni::supports(m);
        #[cfg(not(target_arch = "x86_64"))]
        let vnni_q8 = false;
        Ok(Self { m, simd, decode, activations: kernel.activations, simd_q8, vnni_q8, wide, wide_decode })
    }

    fn q8_order(&self) -> q8::Order {
        #[cfg(target_arch = "x86_64")]
        if self.simd_q8 {
            return avx2::q8_order(self.m.bits());
        }
        q8::Order::Natural
    }
}

impl Rows for PackedRows<'_> {
    fn rows(&self) -> usize {
        self.m.rows()
    }
    fn cols(&self) -> usize {
        self.m.cols()
    }
    fn prepare(&self, x: &[f32]) -> Prepared {
        if self.activations == Activations::Q8 {
            return Prepared::Q8(q8::Q8Activations::new(x, self.m.layout(), self.q8_order(), self.simd_q8));
        }
        #[cfg(target_arch = "x86_64")]
        if self.wide && avx512::wants_interleaved_x(self.m) {
            return Prepared::Interleaved(avx512::interleave_x(self.m, x));
        }
        #[cfg(target_arch = "x86_64")]
        if self.simd && !self.wide && self.m.format() != Format::Pot {
            return Prepared::XSums(avx2::int_x_sums(self.m, x));
        }
        let _ = x;
        Prepared::None
    }
    fn dot(&self, r: usize, x: &[f32], prepared: &Prepared) -> f32 {
        let mut out = [0f32];
        self.dot_rows(r, x, prepared, &mut out);
        out[0]
    }
    fn dot_rows(&self, r0: usize, x: &[f32], prepared: &Prepared, out: &mut [f32]) {
        match prepared {
            Prepared::Q8(a) => {
                #[cfg(target_arch = "x86_64")]
                if self.vnni_q8 {
                    // SAFETY: `vnni_q8` is set only when the CPU has the features and the
                    // kernels cover m (so the AVX2 ones do: `a` is in their order); the rows
                    // exist.
                    return unsafe { vnni::dot_packed_q8(self.m, r0, a, out) };
                }
                #[cfg(target_arch = "x86_64")]
                if self.simd_q8 {
                    // SAFETY: `simd_q8` is set only when the CPU has the features and the Q8
                    // kernels cover m; `a` was made in `q8_order()`; the rows exist.
                    return unsafe { avx2::dot_packed_q8(self.m, r0, a, out) };
                }
                for (i, o) in out.iter_mut().enumerate() {
                    *o = q8::dot_scalar(self.m, r0 + i, a);
                }
            }
            _ => {
                #[cfg(target_arch = "x86_64")]
                if self.wide {
                    let x = if let Prepared::Interleaved(xi) = prepared { xi } else { x };
                    // SAFETY: `wide` is set only when the CPU has the features and the
                    // kernels cover m; the rows exist; `prepare` interleaved x when the kernel
                    // wants it.
                    return unsafe { avx512::dot_packed_rows(self.m, r0, x, out) };
                }
                #[cfg(target_arch = "x86_64")]
                if self.simd {
                    let sums: &[f32] = if let Prepared::XSums(s) = prepared { s } else { &[] };
                    // SAFETY: `simd` is set only when the CPU has the features and the kernels
                    // cover m; the rows exist.
                    return unsafe { avx2::dot_packed_rows(self.m, self.decode, r0, x, sums, out) };
                }
                for (i, o) in out.iter_mut().enumerate() {
                    *o = portable::dot_packed(self.m, r0 + i, x);
                }
            }
        }
    }
    fn gemm_input<'x>(&self, x: &'x [f32]) -> Cow<'x, [f32]> {
        if self.activations == Activations::F32 {
            return Cow::Borrowed(x);
        }
        let mut out = vec![0f32; x.len()];
        let cols = self.m.cols();
        out.par_chunks_mut(cols)
            .zip(x.par_chunks(cols))
            .for_each(|(o, t)| q8::Q8Activations::dequantize_into(t, self.m.layout(), o));
        Cow::Owned(out)
    }
    fn decode(&self, r: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.wide_decode {
            // SAFETY: as above; `out` is one row.
            return unsafe { avx512::decode_packed(self.m, r, out) };
        }
        #[cfg(target_arch = "x86_64")]
        if self.simd {
            // SAFETY: as above; `out` is one row.
            return unsafe { avx2::decode_packed(self.m, r, out) };
        }
        portable::decode_packed(self.m, r, out)
    }
}

struct F32Rows<'a> {
    w: &'a [f32],
    rows: usize,
    cols: usize,
    isa: Isa,
}

impl Rows for F32Rows<'_> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn dot(&self, r: usize, x: &[f32], _: &Prepared) -> f32 {
        let w = &self.w[r * self.cols..(r + 1) * self.cols];
        #[cfg(target_arch = "x86_64")]
        if self.isa.has_avx2() {
            // SAFETY: the ISA was checked available; lengths are equal.
            return unsafe { avx2::dot_f32(w, x) };
        }
        portable::dot_f32(w, x)
    }
    fn decode(&self, r: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.w[r * self.cols..(r + 1) * self.cols]);
    }
    fn as_f32(&self) -> Option<&[f32]> {
        Some(self.w)
    }
}

struct F16Rows<'a> {
    w: &'a [u16],
    rows: usize,
    cols: usize,
    isa: Isa,
}

impl Rows for F16Rows<'_> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn dot(&self, r: usize, x: &[f32], _: &Prepared) -> f32 {
        let w = &self.w[r * self.cols..(r + 1) * self.cols];
        #[cfg(target_arch = "x86_64")]
        if self.isa.has_avx2() {
            // SAFETY: the ISA was checked available; lengths are equal.
            return unsafe { avx2::dot_f16(w, x) };
        }
        portable::dot_f16(w, x)
    }
    fn decode(&self, r: usize, out: &mut [f32]) {
        let w = &self.w[r * self.cols..(r + 1) * self.cols];
        #[cfg(target_arch = "x86_64")]
        if self.isa.has_avx2() {
            // SAFETY: as above.
            return unsafe { avx2::decode_f16(w, out) };
        }
        portable::decode_f16(w, out)
    }
}

fn run(rows: &impl Rows, x: &[f32], tokens: usize, y: &mut [f32]) {
    if tokens <= GEMV_MAX_TOKENS {
        gemv(rows, x, tokens, y)
    } else {
        gemm(rows, x, tokens, y)
    }
}

/// `y` shared by tasks that write disjoint elements of it.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every task writes only the outputs of its own rows.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// Rows a GEMV asks of its row kernels at once (the PoT and Q8 kernels share activation loads).
const ROWS_PER_CALL: usize = 4;

/// Weights per GEMV task: enough to amortize rayon's scheduling, small enough to balance.
const TASK_WEIGHTS: usize = 32 * 1024;

fn gemv(rows: &impl Rows, x: &[f32], tokens: usize, y: &mut [f32]) {
    let (n, cols) = (rows.rows(), rows.cols());
    let prepared: Vec<Prepared> = (0..tokens).map(|t| rows.prepare(&x[t * cols..(t + 1) * cols])).collect();
    let per_task = (TASK_WEIGHTS / cols).max(1).next_multiple_of(ROWS_PER_CALL);
    let out = SharedOut(y.as_mut_ptr());
    (0..n.div_ceil(per_task)).into_par_iter().for_each(|task| {
        let out = out;
        let (first, end) = (task * per_task, ((task + 1) * per_task).min(n));
        let mut buf = [0f32; ROWS_PER_CALL];
        for r in (first..end).step_by(ROWS_PER_CALL) {
            let k = ROWS_PER_CALL.min(end - r);
            for (t, prep) in prepared.iter().enumerate() {
                rows.dot_rows(r, &x[t * cols..(t + 1) * cols], prep, &mut buf[..k]);
                for (i, &v) in buf[..k].iter().enumerate() {
                    // SAFETY: rows r..r + k belong to this task only; t·n + r + i < y.len().
                    unsafe { *out.0.add(t * n + r + i) = v };
                }
            }
        }
    });
}

/// Rows decoded per GEMM panel: the panel (f32) stays within about half a MiB.
fn panel_rows(cols: usize) -> usize {
    ((512 * 1024 / 4 / cols) / 8 * 8).clamp(8, 64)
}

fn gemm(rows: &impl Rows, x: &[f32], tokens: usize, y: &mut [f32]) {
    let (n, cols) = (rows.rows(), rows.cols());
    let x = rows.gemm_input(x);
    let x: &[f32] = &x;
    let panel = panel_rows(cols);
    let out = SharedOut(y.as_mut_ptr());
    (0..n.div_ceil(panel)).into_par_iter().for_each_init(Vec::new, |buf: &mut Vec<f32>, p| {
        let out = out;
        let (r0, count) = (p * panel, panel.min(n - p * panel));
        let w: &[f32] = match rows.as_f32() {
            Some(w) => &w[r0 * cols..(r0 + count) * cols],
            None => {
                buf.resize(count * cols, 0.0);
                for (i, row) in buf.chunks_mut(cols).enumerate() {
                    rows.decode(r0 + i, row);
                }
                buf
            }
        };
        // y[t, r0 + j] = Σ_k x[t, k] · w[j, k]: lhs = x (tokens × cols), rhs = wᵀ (cols × count).
        // SAFETY: the pointers cover the strided extents; this task's columns of y are its own.
        unsafe {
            gemm::gemm(
                tokens,
                count,
                cols,
                out.0.add(r0),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                cols as isize,
                w.as_ptr(),
                cols as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    });
}
