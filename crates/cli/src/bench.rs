//! `potptq bench …`: timings with their baseline measured in the same run. Medians throughout.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::Subcommand;
use potptq_model::{Config, Model};
use serde_json::json;

use crate::common::{model_path, print_json};

mod cuda;
mod decode;
mod generate;
mod kernels;
mod step2;

#[derive(Subcommand)]
pub enum Bench {
    /// Evaluation forward pass: tokens/s and GFLOP/s against a bare f32 matmul of the same shapes.
    Forward(ForwardArgs),
    /// Step 1 weights/s against PoT-RTN, and GPTQ seconds per layer, on SmolLM2 and Llama-7B shapes.
    Quant(QuantArgs),
    /// Packed PoT and INT matrix products against dense f32, per layer shape, bits and batch.
    Kernels(kernels::KernelArgs),
    /// Decode tokens/s of the FP model against INT and PoT checkpoints made from it.
    Generate(generate::GenerateArgs),
    /// Whole-model decode tokens/s of a synthetic Llama-2-7B-shaped model: FP, INT and PoT.
    Decode(decode::DecodeArgs),
    /// Fused PoT and INT dequant-GEMV/GEMM on the GPU against cuBLAS f16 (feature `cuda`).
    Cuda(cuda::CudaArgs),
    /// Step 2 of one random block of a given shape (default Llama-2-7B) on the CPU or GPU.
    Step2(step2::Step2Args),
}

#[derive(clap::Args)]
pub struct QuantArgs {
    /// Layer shapes as OUTxIN.
    #[arg(long, value_delimiter = ',', default_value = "576x576,1536x576,576x1536,4096x4096,11008x4096")]
    shapes: Vec<String>,
    #[arg(long, default_value_t = 3)]
    bits: u8,
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    /// Timed repetitions of the data-free quantizers (median reported); GPTQ runs once.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Skip GPTQ (it dominates the run time on the large shapes).
    #[arg(long)]
    no_gptq: bool,
    #[arg(long)]
    json: bool,
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
        Bench::Quant(a) => quant(a),
        Bench::Kernels(a) => kernels::run(a),
        Bench::Generate(a) => generate::run(a),
        Bench::Decode(a) => decode::run(a),
        Bench::Cuda(a) => cuda::run(a),
        Bench::Step2(a) => step2::run(a),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `n` pseudo-random values, element `i` from its own xorshift-multiply hash of `i` and
/// `seed` (so the fill runs in parallel and does not depend on the thread count), through `f`.
fn xorshift_fill(n: usize, seed: u64, f: impl Fn(u64) -> u32 + Sync) -> Vec<u32> {
    use rayon::prelude::*;
    (0..n)
        .into_par_iter()
        .map(|i| {
            let mut x = (i as u64 ^ seed).wrapping_mul(0x9E3779B97F4A7C15).wrapping_add(seed) | 1;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x = x.wrapping_mul(0x2545F4914F6CDD1D);
            f(x)
        })
        .collect()
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
    let _logits = model.logits(&h)?;
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

fn parse_shape(s: &str) -> Result<(usize, usize)> {
    let (o, i) = s.split_once('x').with_context(|| format!("shape `{s}` is not OUTxIN"))?;
    Ok((o.trim().parse().with_context(|| format!("shape `{s}`"))?, i.trim().parse().with_context(|| format!("shape `{s}`"))?))
}

/// Deterministic Gaussian-ish weights (sum of uniforms), std ≈ 0.02.
fn synthetic(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n).map(|_| ((0..4).map(|_| next()).sum::<f32>() - 2.0) * 0.035).collect()
}

fn quant(args: QuantArgs) -> Result<()> {
    use potptq_quant::{gptq, quantize_pot_step1, quantize_rtn, Format, GptqOptions, Grid, GroupLayout, Hessian};
    let grid = Grid::default();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("bits {}  group {}  grid {}..{} × {} points  ({} threads)", args.bits, args.group_size, grid.lo, grid.hi, grid.points, threads);
    println!("{:>12} {:>16} {:>16} {:>8} {:>12} {:>12}", "shape", "step1 Mw/s", "pot-rtn Mw/s", "ratio", "gptq-int s", "pot-gptq s");
    let mut rows = Vec::new();
    for spec in &args.shapes {
        let (out, inp) = parse_shape(spec)?;
        let layout = GroupLayout::new(out, inp, args.group_size)?;
        let w = synthetic(out * inp, (out * 31 + inp) as u64);
        let n = (out * inp) as f64;
        let s1 = time_median(args.reps, || quantize_pot_step1("bench", &w, layout, args.bits, &grid).map(|_| ()))?;
        let rtn = time_median(args.reps, || quantize_rtn("bench", &w, layout, Format::Pot, args.bits).map(|_| ()))?;
        let (mut g_int, mut g_pot) = (None, None);
        if !args.no_gptq {
            // A Hessian from correlated synthetic inputs: 2048 tokens mixing 64 latent factors.
            let tokens = 2048;
            let z = synthetic(tokens * 64, 7);
            let mix = synthetic(64 * inp, 8);
            let mut x = vec![0f32; tokens * inp];
            for t in 0..tokens {
                for f in 0..64 {
                    let zf = z[t * 64 + f];
                    x[t * inp..(t + 1) * inp].iter_mut().zip(&mix[f * inp..(f + 1) * inp]).for_each(|(a, m)| *a += zf * m);
                }
            }
            let mut h = Hessian::new(inp);
            h.add(&x, tokens);
            let opts = GptqOptions::default();
            let t = Instant::now();
            gptq("bench", &w, layout, &h, Format::IntAsym, args.bits, &grid, &opts)?;
            g_int = Some(t.elapsed().as_secs_f64());
            let t = Instant::now();
            gptq("bench", &w, layout, &h, Format::Pot, args.bits, &grid, &opts)?;
            g_pot = Some(t.elapsed().as_secs_f64());
        }
        let fmt = |v: Option<f64>| v.map_or("—".to_string(), |s| format!("{s:.2}"));
        println!(
            "{:>12} {:>16.1} {:>16.1} {:>8.3} {:>12} {:>12}",
            spec,
            n / s1 / 1e6,
            n / rtn / 1e6,
            rtn / s1,
            fmt(g_int),
            fmt(g_pot)
        );
        rows.push(json!({
            "shape": [out, inp],
            "step1_weights_per_s": n / s1,
            "pot_rtn_weights_per_s": n / rtn,
            "step1_over_pot_rtn_speed": rtn / s1,
            "gptq_int_seconds": g_int,
            "pot_gptq_seconds": g_pot,
        }));
    }
    if args.json {
        print_json(&json!({ "bench": "quant", "bits": args.bits, "group_size": args.group_size, "threads": threads, "results": rows }));
    }
    Ok(())
}
