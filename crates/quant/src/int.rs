//! Uniform INT codes with a per-group scale and integer zero-point: `W~ = s · (q − z)`.
//! Parameters follow GPTQ's quantizer: the min-max range is widened to include 0; the
//! symmetric variant centres it (`z = (2^bits)/2`).

use crate::qtensor::to_f16_scale;

fn maxq(bits: u8) -> f32 {
    ((1u32 << bits) - 1) as f32
}

fn range(w: &[f32]) -> (f32, f32) {
    let lo = w.iter().cloned().fold(0.0f32, f32::min);
    let hi = w.iter().cloned().fold(0.0f32, f32::max);
    if lo == 0.0 && hi == 0.0 {
        (-1.0, 1.0)
    } else {
        (lo, hi)
    }
}

/// Asymmetric min-max: `(scale, zero)`.
pub fn params_asym(w: &[f32], bits: u8) -> (f32, u8) {
    let (lo, hi) = range(w);
    let scale = to_f16_scale((hi - lo) / maxq(bits), 1.0).0;
    let zero = (-lo / scale).round().clamp(0.0, maxq(bits));
    (scale, zero as u8)
}

/// Symmetric: the range `[−max|w|, max|w|]`, zero-point in the middle.
pub fn params_sym(w: &[f32], bits: u8) -> (f32, u8) {
    let (lo, hi) = range(w);
    let m = lo.abs().max(hi);
    let scale = to_f16_scale(2.0 * m / maxq(bits), 1.0).0;
    (scale, ((maxq(bits) + 1.0) / 2.0) as u8)
}

#[inline]
pub fn encode(w: f32, scale: f32, zero: u8, bits: u8) -> u8 {
    ((w / scale).round() + zero as f32).clamp(0.0, maxq(bits)) as u8
}

#[inline]
pub fn decode(q: u8, scale: f32, zero: u8) -> f32 {
    scale * (q as f32 - zero as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asymmetric_covers_the_range_with_zero() {
        let w = [0.1f32, 0.5, 0.9, 0.3];
        let (s, z) = params_asym(&w, 4);
        assert_eq!(z, 0, "the range starts at 0");
        for &x in &w {
            let e = (decode(encode(x, s, z, 4), s, z) - x).abs();
            assert!(e <= s / 2.0 + 1e-6, "{x}: error {e} > s/2");
        }
        let neg = [-2.0f32, 1.0];
        let (s, z) = params_asym(&neg, 2);
        assert_eq!(decode(encode(-2.0, s, z, 2), s, z), -2.0);
    }

    #[test]
    fn zero_group_is_finite() {
        let (s, z) = params_asym(&[0.0; 8], 3);
        assert!(s.is_finite() && s > 0.0);
        assert_eq!(decode(encode(0.0, s, z, 3), s, z), 0.0);
    }
}
