use std::path::PathBuf;

use anyhow::Result;
use clap::ValueEnum;
use potptq_model::perplexity::{perplexity, PplOptions, Scoring};
use potptq_model::tokenizer::encode;
use serde_json::json;

use crate::common::{gpu_kernel_linears, load_text, model_path, print_json, progress_bar, DeviceArg};

#[derive(Clone, Copy, ValueEnum)]
pub enum ScoringArg {
    /// Every token but the first of each window.
    All,
    /// Only the second half of each window (llama.cpp's llama-perplexity).
    SecondHalf,
}

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file or Hugging Face directory (default: the fetched SmolLM2-135M).
    #[arg(long)]
    model: Option<PathBuf>,
    /// UTF-8 text to score (default: the Brown test split).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Window length in tokens (default: 2048, or the model's context if shorter).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Score at most this many windows.
    #[arg(long)]
    max_windows: Option<usize>,
    #[arg(long, value_enum, default_value = "all")]
    scoring: ScoringArg,
    /// Windows per forward pass (default: as many as make about 2048 tokens).
    #[arg(long)]
    batch: Option<usize>,
    /// Activations of the packed products: f32 (exact, the default) or q8 (int8 per block of
    /// 32, integer products).
    #[arg(long, value_enum, default_value = "f32")]
    kernels: crate::generate::KernelsArg,
    /// Where the model runs: cpu, or cuda (packed linears through the fused GPU kernels, with
    /// f16 activations).
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Print the figures as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let device = args.kernels.apply_on(args.device)?;
    let path = model_path(args.model)?;
    let loaded = potptq_model::load(&path)?;
    let text = load_text(args.text.as_deref())?;
    let tokens = encode(loaded.tokenizer()?, &text.content)?;
    let ctx = loaded.model.config.max_position_embeddings;
    let seq_len = args.seq_len.unwrap_or(2048.min(ctx));
    let opts = PplOptions {
        seq_len,
        max_windows: args.max_windows,
        scoring: match args.scoring {
            ScoringArg::All => Scoring::All,
            ScoringArg::SecondHalf => Scoring::SecondHalf,
        },
        batch: args.batch.unwrap_or((2048 / seq_len.max(1)).clamp(1, 8)),
    };
    let model = loaded.model.to_device(&device)?;
    let (on_kernels, packed) = gpu_kernel_linears(&model);
    let bar = progress_bar(0, "windows");
    let r = perplexity(&model, &tokens, &opts, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    println!("model          {}", path.display());
    println!("text           {} ({} bytes, sha256 {}, {} tokens)", text.name, text.content.len(), text.sha256(), tokens.len());
    println!("seq_len        {}  scoring {:?}  windows {}", r.seq_len, r.scoring, r.windows);
    println!("tokens scored  {}", r.tokens_scored);
    match args.device {
        DeviceArg::Cpu => println!("kernels        {} activations", args.kernels.name()),
        DeviceArg::Cuda => println!(
            "device         cuda: {on_kernels} of {packed} packed linears through the fused kernels (f16 activations){}",
            if on_kernels < packed { ", the rest dequantized to f32" } else { "" }
        ),
    }
    println!("perplexity     {:.4}", r.ppl);
    println!("speed          {:.1} tokens/s ({:.1} s)", r.tokens_per_s, r.seconds);
    if args.json {
        print_json(&json!({
            "model": path.display().to_string(),
            "text": text.name,
            "text_sha256": text.sha256(),
            "text_tokens": tokens.len(),
            "seq_len": r.seq_len,
            "scoring": r.scoring,
            "windows": r.windows,
            "tokens_scored": r.tokens_scored,
            "kernels": args.kernels.name(),
            "device": args.device.name(),
            "gpu_kernel_linears": on_kernels,
            "packed_linears": packed,
            "ppl": r.ppl,
            "nll_sum": r.nll_sum,
            "seconds": r.seconds,
            "tokens_per_s": r.tokens_per_s,
        }));
    }
    Ok(())
}
