use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
#[cfg(feature = "cuda")]
use potptq_model::generate::generate_on_gpu;
use potptq_model::generate::{generate, Sampling};
#[cfg(feature = "cuda")]
use potptq_model::gpu_decoder::GpuDecoder;
use potptq_model::tokenizer::{decode, encode};
use serde_json::json;

use crate::common::{gpu_kernel_linears, model_path, print_json, DeviceArg};

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file or Hugging Face directory (default: the fetched SmolLM2-135M).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Activations of the packed products: f32 (exact) or q8 (int8 per block of 32, integer
    /// products: faster, slightly different numbers).
    #[arg(long, value_enum, default_value = "f32")]
    kernels: KernelsArg,
    /// Where the model runs: cpu, or cuda (up to 4096 positions a decoder whose steps replay as
    /// a CUDA graph: packed linears through the fused GPU kernels, dense ones through cuBLAS,
    /// in f16; beyond, the model's tensor operations).
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Print the text and figures as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// `--kernels`: what packed products multiply the weights with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelsArg {
    /// f32 activations: the model as quantized.
    F32,
    /// Activations rounded to int8 per block of 32; integer products.
    Q8,
}

impl KernelsArg {
    /// Makes every packed product of this process use these activations, and returns the
    /// device a model runs on (`eval`, `generate`); on a GPU only f32 (the GPU products take
    /// f16 activations).
    pub fn apply_on(self, device: DeviceArg) -> Result<candle_core::Device> {
        anyhow::ensure!(
            device == DeviceArg::Cpu || self == KernelsArg::F32,
            "--kernels {} is for the CPU's packed products; on a GPU they take f16 activations",
            self.name()
        );
        potptq_kernels::set_default_activations(match self {
            KernelsArg::F32 => potptq_kernels::Activations::F32,
            KernelsArg::Q8 => potptq_kernels::Activations::Q8,
        });
        device.inference_device()
    }

    pub fn name(self) -> &'static str {
        match self {
            KernelsArg::F32 => "f32",
            KernelsArg::Q8 => "q8",
        }
    }
}

/// Positions up to which `generate --device cuda` decodes through the GPU decoder; longer
/// generations go through the model's tensor operations. Measured on a 7B-shaped model (`bench
/// decode`, H200), a PoT 3-bit block through the decoder costs 0.066 ms over 128 tokens, 0.076
/// over 2048 and 0.088 over 4095, where the tensor operations took 0.172 over 4095 (INT 0.088
/// against 0.150): the decoder is faster as far as it was measured, and no further.
#[cfg(feature = "cuda")]
pub const GPU_DECODER_MAX_POSITIONS: usize = 4096;

pub fn run(args: Args) -> Result<()> {
    if args.prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let device = args.kernels.apply_on(args.device)?;
    let path = model_path(args.model)?;
    let loaded = potptq_model::load(&path)?;
    let tokenizer = loaded.tokenizer()?;
    let prompt = encode(tokenizer, &args.prompt)?;
    if prompt.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    let sampling = Sampling { temperature: args.temperature, top_p: args.top_p, seed: args.seed };
    let mut ids = Vec::new();
    let mut printed = String::new();
    print!("{}", args.prompt);
    let on_token = |id| {
        if loaded.eos_ids.contains(&id) {
            return Ok(());
        }
        ids.push(id);
        let text = decode(tokenizer, &ids)?;
        // Hold back a partial UTF-8 character until the next token completes it.
        if !text.ends_with('\u{FFFD}') && text.len() >= printed.len() && text.starts_with(printed.as_str()) {
            print!("{}", &text[printed.len()..]);
            std::io::stdout().flush()?;
            printed = text;
        }
        Ok(())
    };
    #[cfg(feature = "cuda")]
    let positions = prompt.len() + args.max_tokens;
    let (engine, on_kernels, stats) = match &device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) if positions <= GPU_DECODER_MAX_POSITIONS => {
            let capacity = positions.clamp(1, loaded.model.config.max_position_embeddings);
            let mut decoder = GpuDecoder::new(&loaded.model, &device, capacity, true)?;
            let on_kernels = decoder.kernel_linears();
            ("gpu decoder", on_kernels, generate_on_gpu(&mut decoder, &prompt, args.max_tokens, sampling, &loaded.eos_ids, on_token)?.1)
        }
        _ => {
            let model = loaded.model.to_device(&device)?;
            ("tensor ops", gpu_kernel_linears(&model).0, generate(&model, &prompt, args.max_tokens, sampling, &loaded.eos_ids, on_token)?.1)
        }
    };
    let text = decode(tokenizer, &ids)?;
    if text.len() > printed.len() && text.starts_with(printed.as_str()) {
        print!("{}", &text[printed.len()..]);
    }
    println!();
    let resident = potptq_model::memory::resident();
    eprintln!(
        "{} prompt tokens, {} generated; prefill {:.2} s, decode {:.1} tokens/s ({engine}); {}",
        stats.prompt_tokens,
        stats.generated_tokens,
        stats.prefill_seconds,
        stats.decode_tokens_per_s,
        resident.map_or("resident memory unknown".to_string(), |r| r.to_string())
    );
    if args.json {
        print_json(&json!({
            "model": path.display().to_string(),
            "prompt": args.prompt,
            "completion": text,
            "prompt_tokens": stats.prompt_tokens,
            "generated_tokens": stats.generated_tokens,
            "prefill_seconds": stats.prefill_seconds,
            "decode_tokens_per_s": stats.decode_tokens_per_s,
            "kernels": args.kernels.name(),
            "device": args.device.name(),
            "gpu_kernel_linears": on_kernels,
            "engine": engine,
            "resident_bytes": resident.map(|r| r.bytes),
            "peak_resident_bytes": resident.map(|r| r.peak_bytes),
        }));
    }
    Ok(())
}
