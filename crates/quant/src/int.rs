//! Uniform INT codes with a per-group scale and integer zero-point: `W~ = s · (q − z)`.
//!
//! Parameters follow GPTQ's quantizer (as AutoGPTQ uses it): the min-max range is widened to
//! include 0 (so 0 is exact), an all-zero group gets the range [−1, 1], and the symmetric
//! variant centres the range on 0 with `z = (2^bits)/2`. The scale is rounded to f16 *before*
//! the zero-point and the codes are computed, so what is evaluated is what is stored; it is
//! rounded *up*, so that `2^bits − 1` steps still span the range and no weight is clipped by
//! more than half a step (at 8 bits, rounding down could clip the extremes by 0.13 steps more).

use half::f16;

/// Largest code, `2^bits − 1`.
fn maxq(bits: u8) -> f32 {
    ((1u32 << bits) - 1) as f32
}

/// `(min(w ∪ {0}), max(w ∪ {0}))`, or `(−1, 1)` for an all-zero group.
fn range(w: &[f32]) -> (f32, f32) {
    let lo = w.iter().fold(0.0f32, |m, &x| m.min(x));
    let hi = w.iter().fold(0.0f32, |m, &x| m.max(x));
    if lo == 0.0 && hi == 0.0 {
        (-1.0, 1.0)
    } else {
        (lo, hi)
    }
}

/// Asymmetric min-max: `(scale, zero)`.
pub fn params_asym(w: &[f32], bits: u8) -> (f32, u8) {
    let (scale, zero, _) = asym(w, bits);
    (scale, zero)
}

/// Symmetric: the range `[−max|w|, max|w|]`, zero-point in the middle.
pub fn params_sym(w: &[f32], bits: u8) -> (f32, u8) {
    let (scale, zero, _) = sym(w, bits);
    (scale, zero)
}

/// The smallest normal f16 at or above `scale`, within the f16 range; and whether it had to be
/// clamped into that range.
fn f16_scale_up(scale: f32) -> (f32, bool) {
    let (lo, hi) = (f16::MIN_POSITIVE.to_f32(), f16::MAX.to_f32());
    let clamped = scale.clamp(lo, hi);
    let mut rounded = f16::from_f32(clamped);
    if rounded.to_f32() < clamped {
        rounded = f16::from_bits(rounded.to_bits() + 1); // positive and below MAX: the next f16 up
    }
    (rounded.to_f32(), clamped != scale)
}

/// `params_asym`, and whether the scale had to be clamped into the normal f16 range.
pub(crate) fn asym(w: &[f32], bits: u8) -> (f32, u8, bool) {
    let (lo, hi) = range(w);
    let (scale, clamped) = f16_scale_up((hi - lo) / maxq(bits));
    let zero = (-lo / scale).round_ties_even().clamp(0.0, maxq(bits));
    (scale, zero as u8, clamped)
}

/// `params_sym`, and whether the scale was clamped.
pub(crate) fn sym(w: &[f32], bits: u8) -> (f32, u8, bool) {
    let (lo, hi) = range(w);
    let (scale, clamped) = f16_scale_up(2.0 * lo.abs().max(hi) / maxq(bits));
    (scale, ((maxq(bits) + 1.0) / 2.0) as u8, clamped)
}

/// `clamp(round(w / s) + z, 0, 2^bits − 1)`, rounding half to even as torch does.
#[inline]
pub fn encode(w: f32, scale: f32, zero: u8, bits: u8) -> u8 {
    ((w / scale).round_ties_even() + zero as f32).clamp(0.0, maxq(bits)) as u8
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
        assert_eq!(decode(encode(0.0, s, z, 2), s, z), 0.0, "0 is exact");
    }

    #[test]
    fn symmetric_is_centred() {
        let w = [-0.7f32, 0.2, 0.35];
        let (s, z) = params_sym(&w, 4);
        assert_eq!(z, 8);
        assert!(s >= 1.4 / 15.0 && s - 1.4 / 15.0 < 1.4 / 15.0 / 1024.0, "the next f16 up: {s}");
        assert_eq!(decode(encode(0.0, s, z, 4), s, z), 0.0);
        assert_eq!(encode(10.0, s, z, 4), 15, "clamped to the top code");
    }

    #[test]
    fn scale_is_an_f16_and_zero_groups_are_finite() {
        for bits in 2..=8 {
            let (s, z) = params_asym(&[0.0; 8], bits);
            assert!(s.is_finite() && s > 0.0);
            assert_eq!(decode(encode(0.0, s, z, bits), s, z), 0.0);
            let (s, _) = params_asym(&[0.013, -0.2, 0.07], bits);
            assert_eq!(half::f16::from_f32(s).to_f32(), s);
            // Rounded up: the extremes are reproduced to half a step.
            let w = [0.013f32, -0.2, 0.07, 0.11];
            let (s, z) = params_asym(&w, bits);
            for x in w {
                assert!((decode(encode(x, s, z, bits), s, z) - x).abs() <= 0.5 * s * (1.0 + 1e-6), "{bits}: {x}");
            }
        }
        let (s, _, clamped) = asym(&[1e-9, -1e-9], 4);
        assert!(clamped && s == half::f16::MIN_POSITIVE.to_f32());
    }
}
