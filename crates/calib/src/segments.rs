//! Calibration segments: random windows of the calibration text, drawn with a seeded RNG.

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SegmentOptions {
    pub count: usize,
    pub len: usize,
    pub seed: u64,
}

/// `count` segments of `len` tokens at random offsets of `tokens`.
pub fn draw(tokens: &[u32], opts: &SegmentOptions) -> Result<Vec<Vec<u32>>> {
    if opts.count == 0 || opts.len < 2 {
        bail!("calibration needs at least one segment of at least 2 tokens");
    }
    // Segments may overlap, but the text must hold at least as many tokens as they ask for.
    if tokens.len() < opts.len * opts.count {
        bail!(
            "too few calibration tokens: {} tokens for {} segments of {} (use a longer calibration text or fewer/shorter segments)",
            tokens.len(),
            opts.count,
            opts.len
        );
    }
    let mut rng = StdRng::seed_from_u64(opts.seed);
    Ok((0..opts.count)
        .map(|_| {
            let start = rng.random_range(0..=tokens.len() - opts.len);
            tokens[start..start + opts.len].to_vec()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_and_in_range() {
        let tokens: Vec<u32> = (0..10_000).collect();
        let o = SegmentOptions { count: 8, len: 100, seed: 3 };
        let a = draw(&tokens, &o).unwrap();
        assert_eq!(a, draw(&tokens, &o).unwrap());
        assert_ne!(a, draw(&tokens, &SegmentOptions { seed: 4, ..o.clone() }).unwrap());
        for s in &a {
            assert_eq!(s.len(), 100);
            assert!(s.windows(2).all(|w| w[1] == w[0] + 1), "contiguous");
        }
    }

    #[test]
    fn too_few_tokens() {
        let e = draw(&[1, 2, 3], &SegmentOptions { count: 4, len: 512, seed: 0 }).unwrap_err();
        assert!(e.to_string().contains("too few calibration tokens"), "{e}");
    }
}
