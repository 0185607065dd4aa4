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
/// 0x3504F3 encodes 1.41421354, just below it, 0x3504F4 1.41421366, just above). No f32 is
/// exactly √2·2^k, so "≥ this mantissa" is exactly "log2 rounds up".
pub const SQRT2_MANTISSA: u32 = 0x3504F4;

/// `clamp(round(log2(ratio)), 0, qmax)` for `ratio ≥ 0`, from the float's bits: the unbiased
/// exponent field, plus one when the mantissa is at or above √2's. Below 1 (zero and
/// subnormals included) that is ≤ 0 and clamps to 0; infinity's field (255) clamps to qmax.
/// Branch-free, so loops over a group vectorize.
#[inline]
pub fn pot_exponent(ratio: f32, qmax: u32) -> u32 {
    let bits = ratio.to_bits() & 0x7FFF_FFFF;
    let rounded = (bits >> 23) as i32 - 127 + ((bits & 0x7F_FFFF) >= SQRT2_MANTISSA) as i32;
    rounded.clamp(0, qmax.min(i32::MAX as u32) as i32) as u32
}

/// The plain formula `pot_exponent` must equal, with a real `log2`. In f64 it is exact for
/// every f32 input: the f32 nearest a tie `√2·2^k` is ≥ 1.4e-8 away from it in log2 units,
/// far beyond f64's rounding.
pub fn pot_exponent_reference(ratio: f32, qmax: u32) -> u32 {
    let l = (ratio as f64).log2(); // −∞ for 0, +∞ for ∞
    l.round().clamp(0.0, qmax as f64) as u32
}

#[inline]
pub fn encode(w: f32, scale: f32, bits: u8) -> u8 {
    let e = pot_exponent(w.abs() / scale, qmax(bits));
    ((((w < 0.0) as u32) << (bits - 1)) | e) as u8
}

/// `s · sign · 2^E`; exact in f32 (a power-of-two multiple of the scale).
#[inline]
pub fn decode(code: u8, scale: f32, bits: u8) -> f32 {
    let e = (code as u32) & qmax(bits);
    let negative = ((code as u32) >> (bits - 1)) & 1;
    let magnitude = scale * (1u32 << e) as f32;
    f32::from_bits(magnitude.to_bits() ^ (negative << 31))
}

/// `Σ (w − Q(w))²` for one group quantized with `scale`.
pub fn group_sq_error(w: &[f32], scale: f32, bits: u8) -> f64 {
    w.iter().map(|&x| sq_error(x, scale, bits)).sum()
}

/// `Σ weights_j · (w_j − Q(w_j))²`.
pub fn group_weighted_sq_error(w: &[f32], weights: &[f32], scale: f32, bits: u8) -> f64 {
    assert_eq!(w.len(), weights.len(), "one weight per value");
    w.iter().zip(weights).map(|(&x, &c)| c as f64 * sq_error(x, scale, bits)).sum()
}

#[inline]
fn sq_error(x: f32, scale: f32, bits: u8) -> f64 {
    // In f64 the difference is exact, so errors of nearby scales compare without noise.
    let d = x as f64 - decode(encode(x, scale, bits), scale, bits) as f64;
    d * d
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The f32 nearest `√2·2^k`, moved by `ulps` steps.
    fn near_tie(k: i32, ulps: i32) -> f32 {
        let tie = (std::f64::consts::SQRT_2 * 2f64.powi(k)) as f32;
        f32::from_bits((tie.to_bits() as i64 + ulps as i64) as u32)
    }

    fn near_power_of_two(k: i32, ulps: i32) -> f32 {
        let p = 2f64.powi(k) as f32;
        f32::from_bits((p.to_bits() as i64 + ulps as i64).max(0) as u32)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Any non-negative f32 bit pattern: zero, subnormals, normals, infinity.
        #[test]
        fn exponent_matches_log2_on_any_float(bits in 0u32..=0x7F80_0000, qmax in prop_oneof![Just(1u32), Just(3), Just(7), 0u32..300]) {
            let ratio = f32::from_bits(bits);
            prop_assert_eq!(pot_exponent(ratio, qmax), pot_exponent_reference(ratio, qmax), "ratio {:e}", ratio);
        }

        #[test]
        fn exponent_matches_log2_on_typical_ratios(ratio in 0.0f32..300.0, bits in 2u8..=4) {
            prop_assert_eq!(pot_exponent(ratio, qmax(bits)), pot_exponent_reference(ratio, qmax(bits)));
        }

        /// Within a few ulps of the log-domain ties and of the powers of two.
        #[test]
        fn exponent_matches_log2_next_to_boundaries(k in -130i32..=127, ulps in -4i32..=4, qmax in prop_oneof![Just(1u32), Just(3), Just(7), Just(300)]) {
            let ratio = near_tie(k, ulps);
            prop_assert_eq!(pot_exponent(ratio, qmax), pot_exponent_reference(ratio, qmax), "ratio {:e}", ratio);
            let ratio = near_power_of_two(k, ulps);
            prop_assert_eq!(pot_exponent(ratio, qmax), pot_exponent_reference(ratio, qmax), "ratio {:e}", ratio);
        }
    }

    #[test]
    fn exponent_at_tie_neighbours_and_edges() {
        for k in 0..8 {
            assert_eq!(pot_exponent(near_tie(k, 0).min(near_tie(k, -1)), 100), k as u32, "below tie {k}");
            assert_eq!(pot_exponent(near_tie(k, 1), 100), k as u32 + 1, "above tie {k}");
        }
        assert_eq!(pot_exponent(f32::from_bits(0x3FB5_04F3), 7), 0, "largest f32 below √2");
        assert_eq!(pot_exponent(f32::from_bits(0x3FB5_04F4), 7), 1, "smallest f32 above √2");
        assert_eq!(pot_exponent(0.0, 3), 0);
        assert_eq!(pot_exponent(f32::MIN_POSITIVE / 4.0, 3), 0);
        assert_eq!(pot_exponent(0.7, 3), 0);
        assert_eq!(pot_exponent(f32::INFINITY, 3), 3);
        assert_eq!(pot_exponent(f32::MAX, 3), 3);
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
        assert_eq!(decode(encode(-0.0, s, 3), s, 3), 0.5, "−0 is not negative");
        assert_eq!(decode(encode(-100.0, s, 3), s, 3), -4.0, "clamped to the top level");
        assert_eq!(decode(encode(-0.9, s, 2), s, 2), -1.0);
        // 4-bit reaches ±128s.
        assert_eq!(decode(encode(1000.0, 1.0, 4), 1.0, 4), 128.0);
        // Rounding is in the log domain: 1.40 → 1, 1.42 → 2 (a linear rule would round both to 1).
        assert_eq!(decode(encode(1.40, 1.0, 3), 1.0, 3), 1.0);
        assert_eq!(decode(encode(1.42, 1.0, 3), 1.0, 3), 2.0);
    }

    #[test]
    fn errors() {
        let w = [1.0f32, -3.0];
        // 3 → 2^round(log2 3) = 4 (log2 3 = 1.58): errors 0 and 1.
        assert_eq!(group_sq_error(&w, 1.0, 3), 1.0);
        assert_eq!(group_weighted_sq_error(&w, &[5.0, 2.0], 1.0, 3), 2.0);
    }
}
