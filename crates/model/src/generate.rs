//! Autoregressive generation with a KV cache: greedy, temperature and nucleus (top-p) sampling.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::llama::{KvCache, Model};

#[derive(Debug, Clone)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Generated tokens per second after the prompt.
    pub decode_tokens_per_s: f64,
}

pub struct Sampler {
    cfg: Sampling,
    rng: StdRng,
}

impl Sampler {
    pub fn new(cfg: Sampling) -> Result<Self> {
        if !(cfg.temperature.is_finite() && cfg.temperature >= 0.0) {
            bail!("--temperature must be a non-negative number");
        }
        if !(cfg.top_p > 0.0 && cfg.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1]");
        }
        let rng = StdRng::seed_from_u64(cfg.seed);
        Ok(Self { cfg, rng })
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.cfg.temperature;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) as f64 * inv_t).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        if self.cfg.top_p < 1.0 {
            probs.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    acc += p.1;
                    acc >= self.cfg.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let mass: f64 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f64>() * mass;
        for &(id, p) in &probs {
            r -= p;
            if r <= 0.0 {
                return id;
            }
        }
        probs.last().map_or(0, |p| p.0)
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// That `prompt` and `max_tokens` new tokens fit in `room` positions (`what` names them).
fn ensure_room(prompt: &[u32], max_tokens: usize, room: usize, what: String) -> Result<()> {
    if prompt.len() + max_tokens > room {
        bail!("prompt ({} tokens) plus --max-tokens ({max_tokens}) exceeds {what}", prompt.len());
    }
    Ok(())
}

/// Generates up to `max_tokens` after `prompt`, calling `on_token` with each new id; stops early
/// at a token in `stop`.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    max_tokens: usize,
    sampling: Sampling,
    stop: &[u32],
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, GenerationStats)> {
    let ctx = model.config.max_position_embeddings;
    ensure_room(prompt, max_tokens, ctx, format!("the model's context of {ctx}"))?;
    let mut cache = KvCache::new(model.config.num_layers);
    let last_logits = |tokens: &[u32]| -> Result<Vec<f32>> {
        let input = Tensor::from_slice(tokens, (1, tokens.len()), &Device::Cpu)?;
        let hidden = model.forward_hidden(&input, Some(&mut cache))?;
        let last = hidden.get(0)?.narrow(0, tokens.len() - 1, 1)?;
        let logits = model.logits(&last)?;
        Ok(logits.squeeze(0)?.to_vec1::<f32>()?)
    };
    sample_tokens(prompt, max_tokens, sampling, stop, on_token, last_logits)
}

/// `generate` through a GPU decoder (its KV cache emptied first): the prompt fed one token at
/// a time, then each new token.
#[cfg(feature = "cuda")]
pub fn generate_on_gpu(
    decoder: &mut crate::gpu_decoder::GpuDecoder,
    prompt: &[u32],
    max_tokens: usize,
    sampling: Sampling,
    stop: &[u32],
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, GenerationStats)> {
    ensure_room(prompt, max_tokens, decoder.capacity(), format!("the GPU decoder's {} positions", decoder.capacity()))?;
    decoder.reset();
    sample_tokens(prompt, max_tokens, sampling, stop, on_token, |tokens| decoder.prefill(tokens))
}

/// The generation loop: `last_logits` feeds tokens (the prompt, then one at a time) and returns
/// the logits after the last.
fn sample_tokens(
    prompt: &[u32],
    max_tokens: usize,
    sampling: Sampling,
    stop: &[u32],
    mut on_token: impl FnMut(u32) -> Result<()>,
    mut last_logits: impl FnMut(&[u32]) -> Result<Vec<f32>>,
) -> Result<(Vec<u32>, GenerationStats)> {
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let mut sampler = Sampler::new(sampling)?;
    let start = Instant::now();
    let mut logits = last_logits(prompt)?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();
    let mut out = Vec::new();
    while out.len() < max_tokens {
        let next = sampler.sample(&logits);
        out.push(next);
        on_token(next)?;
        if stop.contains(&next) || out.len() == max_tokens {
            break;
        }
        logits = last_logits(&[next])?;
    }
    let decode_seconds = decode_start.elapsed().as_secs_f64();
    Ok((
        out.clone(),
        GenerationStats {
            prompt_tokens: prompt.len(),
            generated_tokens: out.len(),
            prefill_seconds,
            decode_seconds,
            decode_tokens_per_s: out.len().saturating_sub(1) as f64 / decode_seconds.max(1e-9),
        },
    ))
}
