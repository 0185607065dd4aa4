//! Portable row kernels for CPUs without AVX2 (and INT above 4 bits): a stretch of the row is
//! decoded into a small buffer on the stack, then multiplied by a dot product written so that
//! the compiler vectorizes it for the baseline target.

use half::f16;

use crate::PackedMatrix;

/// Columns decoded at a time: small enough for the stack and L1.
const STRETCH: usize = 256;

/// Eight running sums, so the compiler may keep them in one vector register.
pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (wc, xc) = (w.chunks_exact(8), x.chunks_exact(8));
    let tail: f32 = wc.remainder().iter().zip(xc.remainder()).map(|(a, b)| a * b).sum();
    for (a, b) in wc.zip(xc) {
        for k in 0..8 {
            acc[k] += a[k] * b[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

pub fn decode_packed(m: &PackedMatrix, r: usize, out: &mut [f32]) {
    decode_stretch(m, r, 0, out);
}

fn decode_stretch(m: &PackedMatrix, r: usize, first_col: usize, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = m.weight(r, first_col + i);
    }
}

pub fn dot_packed(m: &PackedMatrix, r: usize, x: &[f32]) -> f32 {
    let mut buf = [0f32; STRETCH];
    let mut sum = 0f32;
    for start in (0..m.cols()).step_by(STRETCH) {
        let n = STRETCH.min(m.cols() - start);
        decode_stretch(m, r, start, &mut buf[..n]);
        sum += dot_f32(&buf[..n], &x[start..start + n]);
    }
    sum
}

pub fn decode_f16(w: &[u16], out: &mut [f32]) {
    for (o, &h) in out.iter_mut().zip(w) {
        *o = f16::from_bits(h).to_f32();
    }
}

pub fn dot_f16(w: &[u16], x: &[f32]) -> f32 {
    let mut buf = [0f32; STRETCH];
    let mut sum = 0f32;
    for (wc, xc) in w.chunks(STRETCH).zip(x.chunks(STRETCH)) {
        decode_f16(wc, &mut buf[..wc.len()]);
        sum += dot_f32(&buf[..wc.len()], xc);
    }
    sum
}
