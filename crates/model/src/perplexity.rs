//! Perplexity over non-overlapping windows of a tokenized text.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use serde::Serialize;

use crate::llama::Model;

/// Which tokens of a window are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scoring {
    /// Every token but the first of each window (the papers' protocol).
    All,
    /// Only the second half of each window (llama.cpp's `llama-perplexity`).
    SecondHalf,
}

impl Scoring {
    /// Positions `p` whose logits are scored against token `p + 1`.
    fn positions(self, seq_len: usize) -> std::ops::Range<usize> {
        match self {
            Scoring::All => 0..seq_len - 1,
            Scoring::SecondHalf => seq_len / 2..seq_len - 1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PplOptions {
    pub seq_len: usize,
    pub max_windows: Option<usize>,
    pub scoring: Scoring,
    /// Windows evaluated together in one forward pass.
    pub batch: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct PplResult {
    pub ppl: f64,
    pub nll_sum: f64,
    pub tokens_scored: usize,
    pub windows: usize,
    pub seq_len: usize,
    pub scoring: Scoring,
    pub seconds: f64,
    /// Tokens run through the model per second.
    pub tokens_per_s: f64,
}

/// Windows of `seq_len` tokens that `tokens` fills completely, capped by `max_windows`.
pub fn window_count(n_tokens: usize, opts: &PplOptions) -> Result<usize> {
    if opts.seq_len < 2 {
        bail!("--seq-len must be at least 2");
    }
    let full = n_tokens / opts.seq_len;
    if full == 0 {
        bail!(
            "the text has {n_tokens} tokens, fewer than one window of {} (use a longer text or a smaller --seq-len)",
            opts.seq_len
        );
    }
    Ok(opts.max_windows.map_or(full, |m| m.min(full)).max(1))
}

/// Sum of the negative log-likelihoods of `targets` under `logits` (`[n, vocab]`).
fn nll_sum(logits: &Tensor, targets: &[u32]) -> Result<f64> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let idx = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    let picked = logp.gather(&idx, 1)?.to_dtype(DType::F64)?;
    Ok(-picked.sum_all()?.to_scalar::<f64>()?)
}

pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    opts: &PplOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<PplResult> {
    let ctx = model.config.max_position_embeddings;
    if opts.seq_len > ctx {
        bail!("--seq-len {} is larger than the model's context of {ctx} tokens", opts.seq_len);
    }
    let windows = window_count(tokens.len(), opts)?;
    let t = opts.seq_len;
    let positions = opts.scoring.positions(t);
    let start = Instant::now();
    let (mut nll, mut scored) = (0.0f64, 0usize);
    let batch = opts.batch.max(1);
    let mut w = 0;
    progress(0, windows);
    while w < windows {
        let b = batch.min(windows - w);
        let chunk = &tokens[w * t..(w + b) * t];
        let input = Tensor::from_slice(chunk, (b, t), &Device::Cpu)?;
        let hidden = model.forward_hidden(&input, None)?;
        for i in 0..b {
            // Only the scored positions go through the output projection.
            let h = hidden.get(i)?.narrow(0, positions.start, positions.len())?;
            let logits = model.logits(&h)?;
            let targets = &chunk[i * t + positions.start + 1..i * t + positions.end + 1];
            nll += nll_sum(&logits, targets)?;
            scored += targets.len();
        }
        w += b;
        progress(w, windows);
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(PplResult {
        ppl: (nll / scored as f64).exp(),
        nll_sum: nll,
        tokens_scored: scored,
        windows,
        seq_len: t,
        scoring: opts.scoring,
        seconds,
        tokens_per_s: (windows * t) as f64 / seconds,
    })
}
