//! Which instantiation of `qgemm.cu` serves a product, and what each needs (no GPU needed:
//! tested on the CPU, against the kernel source too).

/// Tokens per launch of the fused kernels; more are done in chunks (or, in the model, through
/// the weights dequantized to f16 and cuBLAS).
pub const MAX_TOKENS: usize = 64;

/// One instantiation of a kernel template: `mr` row tiles of 16 per block, `nt` token tiles
/// of 8, `ks` warps splitting K, `u` K tiles in flight per warp; held in registers, or with
/// `smem`, copied by `cp.async` into a ring of `u` stages in shared memory (one token tile).
/// With `x_shared` (one token only), the token's activations sit in shared memory and the
/// tiles in registers hold only codes and scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub mr: usize,
    pub nt: usize,
    pub ks: usize,
    pub u: usize,
    pub smem: bool,
    pub x_shared: bool,
}

const fn c(mr: usize, nt: usize, ks: usize, u: usize) -> Config {
    Config { mr, nt, ks, u, smem: false, x_shared: false }
}

const fn ring(mr: usize, ks: usize, stages: usize) -> Config {
    Config { mr, nt: 1, ks, u: stages, smem: true, x_shared: false }
}

const fn xs(mr: usize, ks: usize, u: usize) -> Config {
    Config { mr, nt: 1, ks, u, smem: false, x_shared: true }
}

/// The most columns an `x_shared` configuration takes (their f16 activations in 64 KiB).
pub const X_SHARED_MAX_COLS: usize = 32768;

impl Config {
    /// Dynamic shared memory of a block at `bits` for `cols` columns: `qgemv_async_body`'s
    /// ring (per warp, stage, row tile and lane, the codes and two scales; then the
    /// reduction), or the token's f16 activations.
    pub fn shared_bytes(&self, bits: u8, cols: usize) -> usize {
        if self.x_shared {
            return 2 * cols;
        }
        if !self.smem {
            return 0;
        }
        4 * (self.ks * self.u * self.mr * 32 * (bits as usize + 2) + self.ks * self.mr * 4 * 32)
    }

    /// The most tokens one launch takes.
    pub fn max_tokens(&self) -> usize {
        if self.x_shared {
            1
        } else {
            self.nt * 8
        }
    }

    /// Whether one launch can take `tokens` tokens of `cols` columns.
    pub fn fits(&self, tokens: usize, cols: usize) -> bool {
        tokens <= self.max_tokens() && (!self.x_shared || cols <= X_SHARED_MAX_COLS)
    }
}

/// The instantiations in `qgemm.cu` (`QGEMV_XS_CONFIGS`, `QGEMV_ASYNC_CONFIGS`, `QGEMM_CONFIGS`).
pub const CONFIGS: [Config; 27] = [
    xs(1, 16, 2),
    xs(1, 16, 4),
    xs(2, 16, 2),
    xs(2, 16, 4),
    xs(2, 8, 4),
    xs(2, 8, 8),
    ring(1, 8, 8),
    ring(1, 8, 16),
    ring(1, 16, 4),
    ring(1, 16, 8),
    ring(2, 8, 8),
    ring(2, 16, 4),
    c(1, 1, 8, 4),
    c(1, 1, 8, 8),
    c(1, 1, 16, 2),
    c(1, 1, 16, 4),
    c(1, 1, 32, 2),
    c(2, 1, 8, 4),
    c(2, 1, 16, 2),
    c(1, 2, 8, 4),
    c(1, 2, 8, 2),
    c(1, 2, 16, 2),
    c(2, 2, 8, 2),
    c(1, 4, 8, 2),
    c(1, 8, 8, 2),
    c(2, 4, 4, 2),
    c(2, 8, 4, 2),
];

/// The fewest token tiles of 8 (1, 2, 4 or 8) that hold `tokens` (≤ 64) tokens.
fn token_tiles(tokens: usize) -> usize {
    [1, 2, 4, 8].into_iter().find(|&n| n * 8 >= tokens).unwrap_or(8)
}

/// The instantiations `bench cuda --sweep` compares for `tokens` tokens in one launch: those
/// with the fewest token tiles that hold them, and those with twice as many.
pub fn sweep_configs(tokens: usize) -> impl Iterator<Item = Config> {
    let least = token_tiles(tokens);
    CONFIGS.into_iter().filter(move |c| (c.nt == least || c.nt == 2 * least) && tokens <= c.max_tokens())
}

/// The configuration for `tokens` (≤ 64) tokens through a `rows` × `cols` matrix of PoT
/// (`pot`) or INT codes at `bits`, by `bench cuda --sweep` on the H200: one token tile per 8
/// tokens.
///
/// One token (decode), from 8192 rows on (two row tiles per block): the activations in shared
/// memory, so that the tiles in flight hold only codes and scales, except for 2-bit PoT over
/// more than 4096 columns (registers) and 4-bit INT (a ring of 4 shared-memory stages, its
/// fastest by 5–20%). Over 4096 columns or fewer a warp has few K tiles: 8 warps a block, 4
/// (2-bit) or 8 tiles in flight.
/// Below 8192 rows, and 2 to 8 tokens: 16 warps with two tiles in flight each on one row tile
/// per block; from 8192 rows two row tiles per block (2-bit: registers; 3- and 4-bit from
/// 16384 rows: the ring). 9 to 16 tokens: below 8192 rows one row tile and 16 warps a block;
/// from 8192 rows 8 warps, on two row tiles at 2 bits (and 3-bit PoT), else on one. Two row
/// tiles per block from 17 tokens on (the activations are then re-read less), except for 2-bit
/// PoT at 33 tokens or more on matrices of up to 11008 × 4096 weights (Llama-2-7B's).
pub fn config_for(tokens: usize, rows: usize, cols: usize, bits: u8, pot: bool) -> Config {
    let nt = token_tiles(tokens);
    let pairs = rows.is_multiple_of(32);
    if tokens == 1 && pairs && rows >= 8192 && cols <= X_SHARED_MAX_COLS {
        let few_k_tiles = cols <= 4096;
        return match (bits, pot) {
            (2, _) if few_k_tiles => xs(2, 8, 4),
            (2, true) => c(2, 1, 16, 2),
            (3, _) if few_k_tiles => xs(2, 8, 8),
            (4, false) => ring(2, 16, 4),
            _ => xs(2, 16, 2),
        };
    }
    if nt == 1 {
        return match bits {
            2 if pairs && rows >= 8192 => c(2, 1, 16, 2),
            3 | 4 if pairs && rows >= 16384 => ring(2, 16, 4),
            _ => c(1, 1, 16, 2),
        };
    }
    if nt == 2 {
        return match bits {
            _ if !pairs || rows < 8192 => c(1, 2, 16, 2),
            2 => c(2, 2, 8, 2),
            3 if pot => c(2, 2, 8, 2),
            _ => c(1, 2, 8, 2),
        };
    }
    let one_row_tile = pot && bits == 2 && nt == 8 && rows * cols <= 11008 * 4096;
    let mr = if nt >= 4 && pairs && !one_row_tile { 2 } else { 1 };
    *CONFIGS.iter().find(|c| c.nt == nt && c.mr == mr).expect("an instantiated configuration")
}

pub fn kernel_name(pot: bool, bits: u8, c: Config) -> String {
    let depth = if c.smem {
        's'
    } else if c.x_shared {
        'x'
    } else {
        'u'
    };
    format!("{}_b{bits}_m{}_n{}_k{}_{depth}{}", if pot { "pot" } else { "int" }, c.mr, c.nt, c.ks, c.u)
}



#[cfg(test)]
mod tests {
    use super::*;

    /// The instantiations the kernel source writes out: `QGEMM(NAME, BITS, POT, mr, nt, ks, u)`
    /// and `QGEMV_ASYNC(NAME, BITS, POT, mr, ks, stages)` lines of its configuration macros.
    fn instantiated() -> Vec<Config> {
        let mut out = Vec::new();
        for line in crate::cuda::SOURCE.lines().map(str::trim) {
            let (rest, make): (&str, fn(&[usize]) -> Config) = if let Some(rest) = line.strip_prefix("QGEMM(NAME, BITS, POT,") {
                (rest, |n| c(n[0], n[1], n[2], n[3]))
            } else if let Some(rest) = line.strip_prefix("QGEMV_ASYNC(NAME, BITS, POT,") {
                (rest, |n| ring(n[0], n[1], n[2]))
            } else if let Some(rest) = line.strip_prefix("QGEMV_XS(NAME, BITS, POT,") {
                (rest, |n| xs(n[0], n[1], n[2]))
            } else {
                continue;
            };
            let n: Vec<usize> = rest.trim_end_matches(['\\', ' ', ')']).split(',').map(|v| v.trim().parse().unwrap()).collect();
            out.push(make(&n));
        }
        out
    }

    #[test]
    fn the_list_is_what_the_kernel_source_instantiates() {
        let mut want = instantiated();
        let mut got = CONFIGS.to_vec();
        let key = |c: &Config| (c.smem, c.x_shared, c.mr, c.nt, c.ks, c.u);
        want.sort_by_key(key);
        got.sort_by_key(key);
        assert_eq!(got, want);
        let mut names: Vec<String> = CONFIGS.iter().map(|&c| kernel_name(true, 4, c)).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CONFIGS.len(), "kernel names are distinct");
    }

    #[test]
    fn every_choice_is_instantiated_fits_its_rows_and_its_shared_memory() {
        for bits in 2..=4u8 {
            for pot in [true, false] {
                for rows in [16, 48, 576, 1536, 4096, 8192, 11008, 16384, 16400, 28672, 49152] {
                    for cols in [64, 576, 4096, 11008, X_SHARED_MAX_COLS, X_SHARED_MAX_COLS + 64] {
                        for tokens in 1..=MAX_TOKENS {
                            let c = config_for(tokens, rows, cols, bits, pot);
                            let what = format!("{tokens} tokens, {rows}×{cols}, {bits} bits, pot {pot}: {c:?}");
                            assert!(CONFIGS.contains(&c), "{what}");
                            assert!(c.fits(tokens, cols), "{what}");
                            assert_eq!(rows % (16 * c.mr), 0, "{what}");
                        }
                    }
                }
            }
            // The H100/H200 take at most 227 KiB of shared memory a block.
            for c in CONFIGS {
                assert!(c.shared_bytes(bits, X_SHARED_MAX_COLS) <= 227 * 1024, "{c:?} at {bits} bits");
                assert_eq!(c.shared_bytes(bits, 64) > 0, c.smem || c.x_shared);
            }
        }
        assert_eq!(config_for(1, 4096, 4096, 4, true), c(1, 1, 16, 2));
        assert_eq!(config_for(1, 8192, 8192, 2, true), c(2, 1, 16, 2));
        assert_eq!(config_for(1, 28672, 8192, 3, true), xs(2, 16, 2));
        assert_eq!(config_for(1, 28672, 8192, 4, false), ring(2, 16, 4));
        assert_eq!(config_for(1, 28672, X_SHARED_MAX_COLS + 64, 4, true), ring(2, 16, 4));
        assert_eq!(config_for(2, 28672, 8192, 3, true), ring(2, 16, 4));
        assert_eq!(config_for(16, 4096, 4096, 4, true), c(1, 2, 16, 2));
        assert_eq!(config_for(16, 11008, 4096, 3, true), c(2, 2, 8, 2));
        assert_eq!(config_for(16, 11008, 4096, 3, false), c(1, 2, 8, 2));
        assert_eq!(config_for(64, 4096, 4096, 4, true), c(2, 8, 4, 2));
        assert_eq!(config_for(64, 4096, 4096, 2, true), c(1, 8, 8, 2));
        assert_eq!(config_for(64, 4096, 4096, 2, false), c(2, 8, 4, 2));
        assert_eq!(config_for(64, 8192, 8192, 2, true), c(2, 8, 4, 2));
    }

    /// The sweep for a batch holds the configuration `config_for` picks for it, and only
    /// configurations whose token tiles hold the batch.
    #[test]
    fn the_sweep_covers_the_choice() {
        for tokens in 1..=MAX_TOKENS {
            let sweep: Vec<Config> = sweep_configs(tokens).collect();
            assert!(sweep.iter().all(|c| c.nt * 8 >= tokens), "{tokens} tokens: {sweep:?}");
            for (rows, cols) in [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192)] {
                for bits in 2..=4u8 {
                    for pot in [true, false] {
                        let c = config_for(tokens, rows, cols, bits, pot);
                        assert!(sweep.contains(&c), "{tokens} tokens, {rows}×{cols}, {bits} bits, pot {pot}: {c:?}");
                    }
                }
            }
        }
        assert_eq!(sweep_configs(1).filter(|c| c.nt == 1).count(), CONFIGS.iter().filter(|c| c.nt == 1).count());
        assert!(sweep_configs(2).all(|c| !c.x_shared));
    }
}
