//! `potptq bench decode`: whole-model decode of a synthetic Llama-2-7B-shaped model (random
//! weights, a few transformer blocks) as `generate` runs it — KV cache, logits to the host and
//! sampling there each token — for FP, INT and PoT at each width, on the CPU or a GPU, by the
//! model's tensor operations or (on a GPU) by the GPU decoder, its step launched or replayed
//! as a CUDA graph. Two block counts give what one block costs, and from it all 32 blocks'
//! tokens/s.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use potptq_kernels::PackedMatrix;
use potptq_model::generate::{generate, Sampling};
use potptq_model::llama::BLOCK_LINEARS;
use potptq_model::{Arch, Config, Model};
use potptq_quant::{Format, GroupLayout};
use serde_json::json;

use super::{median, xorshift_fill};
use crate::common::{print_json, DeviceArg};

#[derive(clap::Args)]
pub struct DecodeArgs {
    /// Code widths of the packed models.
    #[arg(long, value_delimiter = ',', default_value = "2,3,4")]
    bits: Vec<u8>,
    /// Two block counts: a block costs the difference of their times per token over the
    /// difference of the counts.
    #[arg(long, value_delimiter = ',', default_value = "2,6")]
    blocks: Vec<usize>,
    /// Tokens decoded per run, after a one-token prompt.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Runs per model; the median is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// How each step runs: ops (the model's tensor operations), launches or graph (the GPU
    /// decoder). Default: ops on the CPU, all three on a GPU.
    #[arg(long, value_enum, value_delimiter = ',')]
    engines: Option<Vec<Engine>>,
    #[arg(long)]
    json: bool,
}

/// Tensor operations timed in a row for the host's cost of one.
const OPS_TIMED: usize = 2000;

/// Llama-2-7B's shape with `blocks` transformer blocks.
fn llama2_7b(blocks: usize) -> Config {
    Config {
        arch: Arch::Llama,
        vocab_size: 32000,
        hidden_size: 4096,
        intermediate_size: 11008,
        num_layers: blocks,
        num_heads: 32,
        num_kv_heads: 32,
        head_dim: 128,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 4096,
        tie_word_embeddings: false,
        attention_bias: false,
    }
}

/// A model's linears: dense f32, or packed `bits`-bit codes of `format`.
#[derive(Clone, Copy)]
enum Linears {
    Dense,
    Packed(Format, u8),
}

impl Linears {
    fn name(self) -> String {
        match self {
            Linears::Dense => "fp32".into(),
            Linears::Packed(Format::Pot, b) => format!("pot {b}-bit"),
            Linears::Packed(_, b) => format!("int {b}-bit"),
        }
    }
}

/// Uniform values in [0, 1), 24 random bits each.
fn uniform(n: usize, seed: u64) -> impl Iterator<Item = f32> {
    xorshift_fill(n, seed, |x| (x >> 40) as u32).into_iter().map(|v| v as f32 / (1u32 << 24) as f32)
}

/// Random weights of magnitude ≲ 0.02 (the scale of trained Llama linears), or random codes
/// whose largest level is about that, for the linear `name` ([rows, cols]).
fn insert_random_linear(
    linears: Linears,
    name: String,
    (rows, cols): (usize, usize),
    seed: u64,
    tensors: &mut HashMap<String, Tensor>,
    packed: &mut HashMap<String, Arc<PackedMatrix>>,
) -> Result<()> {
    match linears {
        Linears::Dense => {
            let w: Vec<f32> = uniform(rows * cols, seed).map(|u| (2.0 * u - 1.0) * 0.02).collect();
            tensors.insert(format!("{name}.weight"), Tensor::from_vec(w, (rows, cols), &Device::Cpu)?);
        }
        Linears::Packed(format, bits) => {
            let layout = GroupLayout::new(rows, cols, 128)?;
            let words = xorshift_fill(rows * cols * bits as usize / 32, seed, |x| (x >> 32) as u32);
            let top = if format == Format::Pot { (1u32 << ((1 << (bits - 1)) - 1)) as f32 } else { (1u32 << bits) as f32 };
            let groups = layout.groups_per_row() * rows;
            // Through f16, as a checkpoint stores them (the GPU kernels take no other scale).
            let scales: Vec<f32> = uniform(groups, seed + 1).map(|u| half::f16::from_f32(0.02 / top * (0.5 + 0.5 * u)).to_f32()).collect();
            let zeros: Vec<u8> = if format == Format::Pot { Vec::new() } else { uniform(groups, seed + 2).map(|u| (u * (1 << bits) as f32) as u8).collect() };
            packed.insert(name, Arc::new(PackedMatrix::new(format, bits, layout, words, scales, zeros)?));
        }
    }
    Ok(())
}

/// The synthetic model on `device`: unit norms, random embeddings and output projection (f16
/// beside packed linears, as a packed checkpoint stores them).
fn synthetic_model(blocks: usize, linears: Linears, device: &Device) -> Result<Model> {
    let cfg = llama2_7b(blocks);
    let (d, v) = (cfg.hidden_size, cfg.vocab_size);
    let table_dtype = if matches!(linears, Linears::Dense) { DType::F32 } else { DType::F16 };
    let table = |seed| -> Result<Tensor> {
        let t = Tensor::from_vec(uniform(v * d, seed).map(|u| (2.0 * u - 1.0) * 0.02).collect::<Vec<f32>>(), (v, d), &Device::Cpu)?;
        Ok(t.to_dtype(table_dtype)?)
    };
    let mut tensors = HashMap::new();
    let mut packed = HashMap::new();
    tensors.insert("model.embed_tokens.weight".to_string(), table(1)?);
    tensors.insert("lm_head.weight".to_string(), table(2)?);
    tensors.insert("model.norm.weight".to_string(), Tensor::ones(d, DType::F32, &Device::Cpu)?);
    for i in 0..blocks {
        let p = format!("model.layers.{i}");
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            tensors.insert(format!("{p}.{norm}.weight"), Tensor::ones(d, DType::F32, &Device::Cpu)?);
        }
        for (j, name) in BLOCK_LINEARS.iter().enumerate() {
            let seed = (100 * i + j) as u64 + 3;
            insert_random_linear(linears, format!("{p}.{name}"), cfg.linear_shape(name), seed, &mut tensors, &mut packed)?;
        }
    }
    Model::from_parts(cfg, tensors, packed)?.to_device(device)
}

/// How a decode step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// The model's forward, tensor operation by tensor operation (as `eval` runs it).
    Ops,
    /// The GPU decoder's launches, issued each token (`potptq_model::gpu_decoder`).
    Launches,
    /// The GPU decoder's step replayed as a CUDA graph (as `generate --device cuda` runs it).
    Graph,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Ops => "ops",
            Engine::Launches => "launches",
            Engine::Graph => "graph",
        }
    }

    /// The FP model's linears: f32 tensors, or f16 through cuBLAS in the GPU decoder.
    fn fp_name(self) -> &'static str {
        match self {
            Engine::Ops => "fp32",
            _ => "fp16",
        }
    }
}

/// Seconds per decoded token of `model` (a one-token prompt, then `tokens` greedy tokens).
fn seconds_per_token(model: &Model, tokens: usize) -> Result<f64> {
    let sampling = Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };
    let (_, stats) = generate(model, &[1], tokens, sampling, &[], |_| Ok(()))?;
    Ok(1.0 / stats.decode_tokens_per_s)
}

/// Seconds per decoded token of `model` under `engine`, median of `reps` runs after one
/// warm-up run.
fn measure(model: &Model, engine: Engine, device: &Device, tokens: usize, reps: usize) -> Result<f64> {
    let mut run: Box<dyn FnMut() -> Result<f64>> = match engine {
        Engine::Ops => {
            let on_device = model.to_device(device)?;
            let (on_kernels, packed) = crate::common::gpu_kernel_linears(&on_device);
            ensure!(device.is_cpu() || on_kernels == packed, "{on_kernels} of {packed} packed linears on the GPU kernels");
            Box::new(move || seconds_per_token(&on_device, tokens))
        }
        #[cfg(feature = "cuda")]
        Engine::Launches | Engine::Graph => {
            let mut decoder = potptq_model::gpu_decoder::GpuDecoder::new(model, device, tokens + 1, engine == Engine::Graph)?;
            let (_, packed) = crate::common::gpu_kernel_linears(model);
            let on_kernels = decoder.kernel_linears();
            ensure!(on_kernels == packed, "{on_kernels} of {packed} packed linears on the GPU kernels");
            Box::new(move || {
                let sampling = Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };
                let (_, stats) = potptq_model::generate::generate_on_gpu(&mut decoder, &[1], tokens, sampling, &[], |_| Ok(()))?;
                Ok(1.0 / stats.decode_tokens_per_s)
            })
        }
        #[cfg(not(feature = "cuda"))]
        Engine::Launches | Engine::Graph => anyhow::bail!("--engines {}: the GPU decoder needs a build with the `cuda` feature", engine.name()),
    };
    run()?;
    Ok(median((0..reps).map(|_| run()).collect::<Result<Vec<_>>>()?))
}

pub fn run(a: DecodeArgs) -> Result<()> {
    ensure!(a.blocks.len() == 2 && a.blocks[0] >= 1 && a.blocks[1] > a.blocks[0], "--blocks takes two counts, the second larger");
    ensure!(a.tokens >= 2 && a.reps >= 1, "--tokens must be at least 2 and --reps at least 1");
    for &b in &a.bits {
        potptq_quant::check_bits(Format::Pot, b)?;
    }
    let device = a.device.inference_device()?;
    let engines = match &a.engines {
        Some(e) => e.clone(),
        None if device.is_cpu() => vec![Engine::Ops],
        None => vec![Engine::Ops, Engine::Launches, Engine::Graph],
    };
    ensure!(!engines.is_empty(), "--engines is empty");
    if device.is_cpu() {
        ensure!(engines == [Engine::Ops], "on the CPU a model decodes by its tensor operations only (--engines ops)");
    }
    let mut kinds = vec![Linears::Dense];
    for &b in &a.bits {
        kinds.push(Linears::Packed(Format::IntAsym, b));
        kinds.push(Linears::Packed(Format::Pot, b));
    }
    // What one tensor operation costs the host, whatever it computes: a small add, issued many
    // times in a row and waited for once.
    let op_us = {
        let x = Tensor::zeros(4096, DType::F32, &device)?;
        (&x + &x)?;
        device.synchronize()?;
        let t = std::time::Instant::now();
        for _ in 0..OPS_TIMED {
            (&x + &x)?;
        }
        device.synchronize()?;
        t.elapsed().as_secs_f64() / OPS_TIMED as f64 * 1e6
    };
    if !a.json {
        println!("one tensor operation (a 4096-element add, {OPS_TIMED} in a row): {op_us:.1} µs");
    }
    let (b0, b1) = (a.blocks[0], a.blocks[1]);
    if !a.json {
        println!(
            "decode of {} tokens, synthetic Llama-2-7B-shaped model ({b0} and {b1} blocks, 32000-token vocabulary), on the {}, median of {}",
            a.tokens,
            a.device.name(),
            a.reps
        );
        println!("{:>10} {:>9} {:>12} {:>12} {:>10} {:>16} {:>8}", "linears", "engine", format!("ms/tok {b0}b"), format!("ms/tok {b1}b"), "ms/block", "32 blocks tok/s", "vs FP");
    }
    // ms per token at each block count, by kind and engine.
    let mut per_token = vec![vec![[0.0f64; 2]; engines.len()]; kinds.len()];
    for (slot, &blocks) in [b0, b1].iter().enumerate() {
        for (k, &kind) in kinds.iter().enumerate() {
            let model = synthetic_model(blocks, kind, &Device::Cpu)?;
            for (e, &engine) in engines.iter().enumerate() {
                per_token[k][e][slot] = measure(&model, engine, &device, a.tokens, a.reps)?;
                eprintln!("  {} {} blocks, {}: {:.3} ms/token", kind.name(), blocks, engine.name(), per_token[k][e][slot] * 1e3);
            }
        }
    }
    let mut rows = Vec::new();
    for (e, &engine) in engines.iter().enumerate() {
        let mut fp_tokens_per_s = None;
        for (k, &kind) in kinds.iter().enumerate() {
            let [t0, t1] = per_token[k][e];
            let block_s = (t1 - t0) / (b1 - b0) as f64;
            let all_blocks_s = t0 + (32 - b0 as isize) as f64 * block_s;
            let tokens_per_s = 1.0 / all_blocks_s;
            let fp = *fp_tokens_per_s.get_or_insert(tokens_per_s);
            let name = if matches!(kind, Linears::Dense) { engine.fp_name().to_string() } else { kind.name() };
            if !a.json {
                println!("{:>10} {:>9} {:>12.3} {:>12.3} {:>10.3} {:>16.1} {:>8.2}", name, engine.name(), t0 * 1e3, t1 * 1e3, block_s * 1e3, tokens_per_s, tokens_per_s / fp);
            }
            rows.push(json!({
                "linears": name, "engine": engine.name(), "ms_per_token": [t0 * 1e3, t1 * 1e3], "ms_per_block": block_s * 1e3,
                "projected_tokens_per_s_32_blocks": tokens_per_s, "vs_fp": tokens_per_s / fp,
            }));
        }
    }
    if a.json {
        print_json(&json!({"bench": "decode", "device": a.device.name(), "blocks": [b0, b1], "tokens": a.tokens, "reps": a.reps, "op_us": op_us, "results": rows}));
    }
    Ok(())
}
