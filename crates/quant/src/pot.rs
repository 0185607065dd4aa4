//! Power-of-two codes: 1 sign bit + (bits−1) exponent bits, `W~ = s · P · 2^E`.
//!
//! `E = clamp(round(log2(|w| / s)), 0, q_max)`, rounded in the log domain: between `2^k` and
//! `2^(k+1)` the tie is `2^(k+0.5)`. It is read off the float's bits — the exponent field, and
//! the mantissa compared with √2 — with no `log2` call. Zero is not representable: every
//! weight becomes at least `±s`.

/// Largest exponent code: `2^(bits−1) − 1`.
pub fn qmax(bits: u8) -> u32 {
    (1u32 << (bits - 1)) - 1
}

/// Mantissa bits of the smallest f32 in [1, 2) whose log2 is ≥ 0.5 (√2 = 1.41421356…;
/// 0x3504F3 encodes 1.41421354, just below it, 0x3504F4 1.41421366, just above).
const SQRT2_MANTISSA: u32 = 0x3504F4;

/// `clamp(round(log2(ratio)), 0, qmax)` for `ratio ≥ 0`, from the float's bits.
#[inline]
pub fn pot_exponent(ratio: f32, qmax: u32) -> u32 {
    let bits = ratio.to_bits() & 0x7FFF_FFFF;
    let biased = bits >> 23;
    if biased < 127 {
        // ratio < 1 (zero and subnormals included): log2 < 0 rounds to ≤ 0 or to 0 at [√½, 1).
        return 0;
    }
    let rounded = biased - 127 + ((bits & 0x7F_FFFF) >= SQRT2_MANTISSA) as u32;
    rounded.min(qmax)
}

#[inline]
pub fn encode(w: f32, scale: f32, bits: u8) -> u8 {
    let e = pot_exponent(w.abs() / scale, qmax(bits));
    ((((w < 0.0) as u32) << (bits - 1)) | e) as u8
}

#[inline]
pub fn decode(code: u8, scale: f32, bits: u8) -> f32 {
    let e = (code as u32) & qmax(bits);
    let magnitude = scale * (1u32 << e) as f32;
    if code >> (bits - 1) & 1 == 1 {
        -magnitude
    } else {
        magnitude
    }
}

/// Squared error of quantizing `w` with `scale`.
pub fn group_sq_error(w: &[f32], scale: f32, bits: u8) -> f64 {
    w.iter()
        .map(|&x| {
            let d = (x - decode(encode(x, scale, bits), scale, bits)) as f64;
            d * d
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(ratio: f32, qmax: u32) -> u32 {
        if ratio <= 0.0 {
            return 0;
        }
        ((ratio as f64).log2().round()).clamp(0.0, qmax as f64) as u32
    }

    /// Within an ulp of a tie `√2·2^k` the naive f64 formula and the bits may disagree on
    /// which side the f32 lies; everywhere else they must agree.
    fn near_tie(ratio: f32) -> bool {
        let l = (ratio as f64).log2();
        let frac = l - l.floor();
        (frac - 0.5).abs() < 1e-6
    }

    proptest! {
        #[test]
        fn exponent_matches_log2(ratio in 0.0f32..1e6, bits in 2u8..=4) {
            prop_assume!(!near_tie(ratio));
            prop_assert_eq!(pot_exponent(ratio, qmax(bits)), naive(ratio, qmax(bits)));
        }

        #[test]
        fn exponent_matches_log2_on_small_ratios(ratio in 0.0f32..4.0, bits in 2u8..=4) {
            prop_assume!(!near_tie(ratio));
            prop_assert_eq!(pot_exponent(ratio, qmax(bits)), naive(ratio, qmax(bits)));
        }
    }

    #[test]
    fn exponent_at_tie_neighbours_and_edges() {
        for k in 0..8 {
            let tie = std::f64::consts::SQRT_2 * 2f64.powi(k);
            let below = f32::from_bits((tie as f32).to_bits() - 1);
            let above = f32::from_bits((tie as f32).to_bits() + 1);
            assert_eq!(pot_exponent(below, 7), naive(below, 7), "below tie {k}");
            assert_eq!(pot_exponent(above, 7), naive(above, 7), "above tie {k}");
        }
        assert_eq!(pot_exponent(0.0, 3), 0);
        assert_eq!(pot_exponent(f32::MIN_POSITIVE / 4.0, 3), 0);
        assert_eq!(pot_exponent(f32::INFINITY, 3), 3);
        assert_eq!(pot_exponent(1.0, 1), 0);
        assert_eq!(pot_exponent(1.5, 1), 1);
    }

    #[test]
    fn levels() {
        // 3-bit: ±s … ±8s.
        let s = 0.5;
        let values: Vec<f32> = (0..8u8).map(|c| decode(c, s, 3)).collect();
        assert_eq!(values, vec![0.5, 1.0, 2.0, 4.0, -0.5, -1.0, -2.0, -4.0]);
        assert_eq!(decode(encode(0.0, s, 3), s, 3), 0.5, "zero becomes +s");
        assert_eq!(decode(encode(-100.0, s, 3), s, 3), -4.0, "clamped to the top level");
        assert_eq!(decode(encode(-0.9, s, 2), s, 2), -1.0);
    }
}
