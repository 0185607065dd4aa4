//! `potptq bench …`: timings with their baseline measured in the same run. Medians throughout.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::{Device, Tensor};
use clap::Subcommand;
use potptq_model::{Config, Model};
use serde_json::json;

use crate::common::{model_path, print_json};

#[derive(Subcommand)]
pub enum Bench {
    /// Evaluation forward pass: tokens/s and GFLOP/s against a bare f32 matmul of the same shapes.
    Forward(ForwardArgs),
}

#[derive(clap::Args)]
pub struct ForwardArgs {
    /// GGUF file or Hugging Face directory (default: the fetched SmolLM2-135M).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Sequence lengths to measure.
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    seq_lens: Vec<usize>,
    /// Timed repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long)]
    json: bool,
}

pub fn run(bench: Bench) -> Result<()> {
    match bench {
        Bench::Forward(a) => forward(a),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of `f` over `reps` runs after one warm-up.
fn time_median(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

/// `(in, out, count)` of every matmul against a weight in one forward pass (the output
/// projection included).
fn linear_shapes(c: &Config) -> Vec<(usize, usize, usize)> {
    let (d, q, kv, f, l) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size, c.num_layers);
    vec![(d, q, l), (d, kv, 2 * l), (q, d, l), (d, f, 2 * l), (f, d, l), (d, c.vocab_size, 1)]
}

fn attention_flops(c: &Config, t: usize) -> f64 {
    // Scores and weighted values, 2·head_dim each per (query, visible key) pair: the causal half.
    (c.num_layers * c.num_heads * 2 * 2 * c.head_dim) as f64 * (t * (t + 1) / 2) as f64
}

fn forward_pass(model: &Model, tokens: &Tensor) -> Result<()> {
    let h = model.forward_hidden(tokens, None)?;
    let h = h.squeeze(0)?;
    let _logits = h.matmul(&model.output_weight().t()?)?;
    Ok(())
}

fn forward(args: ForwardArgs) -> Result<()> {
    let path = model_path(args.model)?;
    let loaded = potptq_model::load(&path)?;
    let model = &loaded.model;
    let c = &model.config;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("model {}  ({} threads)", path.display(), threads);
    println!(
        "{:>6} {:>12} {:>14} {:>16} {:>8}",
        "seq", "tokens/s", "fwd GFLOP/s", "matmul GFLOP/s", "ratio"
    );
    let mut rows = Vec::new();
    for &t in &args.seq_lens {
        if t > c.max_position_embeddings {
            anyhow::bail!("--seq-lens {t} is larger than the model's context of {}", c.max_position_embeddings);
        }
        let ids: Vec<u32> = (0..t).map(|i| ((i * 7919 + 13) % c.vocab_size) as u32).collect();
        let tokens = Tensor::from_slice(&ids, (1, t), &Device::Cpu)?;
        let fwd_s = time_median(args.reps, || forward_pass(model, &tokens))?;

        let mut linear_flops = 0.0;
        let mut matmul_s = 0.0;
        for (inp, out, count) in linear_shapes(c) {
            let x = Tensor::randn(0f32, 1.0, (t, inp), &Device::Cpu)?;
            let w = Tensor::randn(0f32, 0.02, (out, inp), &Device::Cpu)?;
            let s = time_median(args.reps, || {
                x.matmul(&w.t()?)?;
                Ok(())
            })?;
            matmul_s += s * count as f64;
            linear_flops += (2 * t * inp * out * count) as f64;
        }
        let fwd_flops = linear_flops + attention_flops(c, t);
        let fwd_gflops = fwd_flops / fwd_s / 1e9;
        let mm_gflops = linear_flops / matmul_s / 1e9;
        let ratio = fwd_gflops / mm_gflops;
        println!("{t:>6} {:>12.1} {fwd_gflops:>14.1} {mm_gflops:>16.1} {ratio:>8.2}", t as f64 / fwd_s);
        rows.push(json!({
            "seq_len": t,
            "forward_seconds": fwd_s,
            "tokens_per_s": t as f64 / fwd_s,
            "forward_gflops": fwd_gflops,
            "matmul_gflops": mm_gflops,
            "ratio": ratio,
        }));
    }
    if args.json {
        print_json(&json!({ "bench": "forward", "model": path.display().to_string(), "threads": threads, "reps": args.reps, "results": rows }));
    }
    Ok(())
}
