//! Which instantiation of `qgemm.cu` serves a product, and what each needs (no GPU needed:
//! tested on the CPU, against the kernel source too).

/// Tokens per launch of the fused kernels; more are done in chunks (or, in the model, through
/// the weights dequantized to f16 and cuBLAS).
pub const MAX_TOKENS: usize = 64;

/// One instantiation of a kernel template: `mr` row tiles of 16 per block, `nt` token tiles
/// of 8, `ks` warps splitting K, `u` K tiles in flight per warp; held in registers, or with
/// `smem`, copied by `cp.async` into a ring of `u` stages in shared memory (one token tile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub mr: usize,
    pub nt: usize,
    pub ks: usize,
    pub u: usize,
    pub smem: bool,
}

const fn c(mr: usize, nt: usize, ks: usize, u: usize) -> Config {
    Config { mr, nt, ks, u, smem: false }
}

const fn ring(mr: usize, ks: usize, stages: usize) -> Config {
    Config { mr, nt: 1, ks, u: stages, smem: true }
}

impl Config {
    /// Dynamic shared memory of a block at `bits` (`qgemv_async_body`): per warp, stage, row
    /// tile and lane, the codes and two scales; then the reduction.
    pub fn shared_bytes(&self, bits: u8) -> usize {
        if !self.smem {
            return 0;
        }
        4 * (self.ks * self.u * self.mr * 32 * (bits as usize + 2) + self.ks * self.mr * 4 * 32)
    }
}

/// The instantiations in `qgemm.cu` (`QGEMV_ASYNC_CONFIGS`, `QGEMM_CONFIGS`).
pub const CONFIGS: [Config; 18] = [
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
    c(1, 4, 8, 2),
    c(1, 8, 8, 2),
    c(2, 4, 4, 2),
    c(2, 8, 4, 2),
];

/// The instantiations `bench cuda --sweep` compares for `tokens` tokens in one launch: those
/// with the fewest token tiles that hold them, and those with twice as many.
pub fn sweep_configs(tokens: usize) -> impl Iterator<Item = Config> {
    let least = [1, 2, 4, 8].into_iter().find(|&n| n * 8 >= tokens).unwrap_or(8);
    CONFIGS.into_iter().filter(move |c| c.nt == least || c.nt == 2 * least)
}

/// The configuration for `tokens` (≤ 64) tokens at `bits`: one token tile per 8 tokens. One
/// token tile (decode), by `bench cuda --sweep` on the H200: 16 warps with two tiles in flight
/// each, on one row tile per block, up to 4096 rows; from 8192 rows two row tiles per block
/// (2-bit: registers; 3- and 4-bit from 16384 rows: a ring of 4 shared-memory stages). Two row
/// tiles per block from 17 tokens on (the activations are then re-read less).
pub fn config_for(tokens: usize, rows: usize, bits: u8) -> Config {
    let nt = [1, 2, 4, 8].into_iter().find(|&n| n * 8 >= tokens).unwrap_or(8);
    let pairs = rows.is_multiple_of(32);
    if nt == 1 {
        return match bits {
            2 if pairs && rows >= 8192 => c(2, 1, 16, 2),
            3 | 4 if pairs && rows >= 16384 => ring(2, 16, 4),
            _ => c(1, 1, 16, 2),
        };
    }
    let mr = if nt >= 4 && pairs { 2 } else { 1 };
    *CONFIGS.iter().find(|c| c.nt == nt && c.mr == mr).expect("an instantiated configuration")
}

pub fn kernel_name(pot: bool, bits: u8, c: Config) -> String {
    let depth = if c.smem { 's' } else { 'u' };
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
            let (name, ring_stages) = if let Some(rest) = line.strip_prefix("QGEMM(NAME, BITS, POT,") {
                (rest, false)
            } else if let Some(rest) = line.strip_prefix("QGEMV_ASYNC(NAME, BITS, POT,") {
                (rest, true)
            } else {
                continue;
            };
            let n: Vec<usize> = name.trim_end_matches(['\\', ' ', ')']).split(',').map(|v| v.trim().parse().unwrap()).collect();
            out.push(if ring_stages { ring(n[0], n[1], n[2]) } else { c(n[0], n[1], n[2], n[3]) });
        }
        out
    }

    #[test]
    fn the_list_is_what_the_kernel_source_instantiates() {
        let mut want = instantiated();
        let mut got = CONFIGS.to_vec();
        let key = |c: &Config| (c.smem, c.mr, c.nt, c.ks, c.u);
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
            for rows in [16, 48, 576, 1536, 4096, 8192, 11008, 16384, 16400, 28672, 49152] {
                for tokens in 1..=MAX_TOKENS {
                    let c = config_for(tokens, rows, bits);
                    assert!(CONFIGS.contains(&c), "{c:?}");
                    assert_eq!(rows % (16 * c.mr), 0, "{tokens} tokens, {rows} rows, {bits} bits: {c:?}");
                    assert!(c.nt * 8 >= tokens, "{tokens} tokens in {c:?}");
                }
            }
            // The H100/H200 take at most 227 KiB of shared memory a block.
            for c in CONFIGS {
                assert!(c.shared_bytes(bits) <= 227 * 1024, "{c:?} at {bits} bits");
                assert_eq!(c.shared_bytes(bits) > 0, c.smem);
            }
        }
        assert_eq!(config_for(1, 4096, 4), c(1, 1, 16, 2));
        assert_eq!(config_for(1, 8192, 2), c(2, 1, 16, 2));
        assert_eq!(config_for(1, 28672, 4), ring(2, 16, 4));
        assert_eq!(config_for(64, 4096, 4), c(2, 8, 4, 2));
    }

    /// The sweep for a batch holds the configuration `config_for` picks for it, and only
    /// configurations whose token tiles hold the batch.
    #[test]
    fn the_sweep_covers_the_choice() {
        for tokens in 1..=MAX_TOKENS {
            let sweep: Vec<Config> = sweep_configs(tokens).collect();
            assert!(sweep.iter().all(|c| c.nt * 8 >= tokens), "{tokens} tokens: {sweep:?}");
            for rows in [4096, 11008, 28672] {
                for bits in 2..=4u8 {
                    assert!(sweep.contains(&config_for(tokens, rows, bits)), "{tokens} tokens, {rows} rows, {bits} bits");
                }
            }
        }
        assert_eq!(sweep_configs(1).filter(|c| c.nt == 1).count(), CONFIGS.iter().filter(|c| c.nt == 1).count());
    }
}
