use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use potptq_model::generate::{generate, Sampling};
use potptq_model::tokenizer::{decode, encode};
use serde_json::json;

use crate::common::{model_path, print_json};

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
    /// Print the text and figures as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.prompt.is_empty() {
        bail!("the prompt is empty");
    }
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
    let (_, stats) = generate(&loaded.model, &prompt, args.max_tokens, sampling, &loaded.eos_ids, |id| {
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
    })?;
    let text = decode(tokenizer, &ids)?;
    if text.len() > printed.len() && text.starts_with(printed.as_str()) {
        print!("{}", &text[printed.len()..]);
    }
    println!();
    let resident = potptq_model::memory::resident();
    eprintln!(
        "{} prompt tokens, {} generated; prefill {:.2} s, decode {:.1} tokens/s; {}",
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
            "resident_bytes": resident.map(|r| r.bytes),
            "peak_resident_bytes": resident.map(|r| r.peak_bytes),
        }));
    }
    Ok(())
}
