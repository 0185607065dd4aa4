use std::path::PathBuf;

use anyhow::Result;
use serde_json::json;

use crate::common::{model_path, print_json};

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file or Hugging Face directory (default: the fetched SmolLM2-135M).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Only read the file's description; do not load the model (no resident memory figure).
    #[arg(long)]
    no_load: bool,
}

pub fn run(args: Args) -> Result<()> {
    let path = model_path(args.model)?;
    let (format, config, tensors) = potptq_model::describe(&path)?;
    let stored: usize = tensors.iter().map(|t| t.shape.iter().product::<usize>()).sum();
    let file_bytes = file_bytes(&path);
    // Resident memory once loaded for inference: a packed checkpoint stays packed.
    let resident = if args.no_load {
        None
    } else {
        let loaded = potptq_model::load(&path)?;
        let r = potptq_model::memory::resident();
        drop(loaded);
        r
    };
    if args.json {
        print_json(&json!({
            "model": path.display().to_string(),
            "format": format,
            "config": config,
            "parameters": config.parameter_count(),
            "stored_elements": stored,
            "file_bytes": file_bytes,
            "resident_bytes": resident.map(|r| r.bytes),
            "peak_resident_bytes": resident.map(|r| r.peak_bytes),
            "tensors": tensors,
        }));
        return Ok(());
    }
    println!("model       {}", path.display());
    println!("format      {format:?}");
    println!("arch        {}", config.arch.name());
    println!(
        "layers {}  hidden {}  ffn {}  heads {}/{} kv  head_dim {}  vocab {}",
        config.num_layers,
        config.hidden_size,
        config.intermediate_size,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.vocab_size
    );
    println!(
        "rope_theta {}  rms_eps {:e}  context {}  tied embeddings {}  qkv bias {}",
        config.rope_theta, config.rms_norm_eps, config.max_position_embeddings, config.tie_word_embeddings, config.attention_bias
    );
    println!("parameters  {} ({:.1} M)", config.parameter_count(), config.parameter_count() as f64 / 1e6);
    println!("file        {:.1} MB", file_bytes as f64 / 1e6);
    if let Some(r) = resident {
        println!("loaded      {r}");
    }
    println!("tensors     {}", tensors.len());
    for t in &tensors {
        println!("  {:<48} {:<6} {:?}", t.name, t.dtype, t.shape);
    }
    Ok(())
}

/// Size of a model file, or of every file in a model directory.
fn file_bytes(path: &std::path::Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path).map_or(0, |d| d.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
    } else {
        std::fs::metadata(path).map_or(0, |m| m.len())
    }
}
