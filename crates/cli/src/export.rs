use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::common::model_path;

#[derive(clap::Args)]
pub struct Args {
    /// Any model potptq loads: a packed checkpoint, a GGUF file, a Hugging Face directory.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Write plain f16 weights (quantized linears dequantized) that transformers loads.
    #[arg(long)]
    dequantized: bool,
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> Result<()> {
    if !args.dequantized {
        bail!("only --dequantized export is available; packed checkpoints are written by `potptq quantize`");
    }
    if args.out.exists() && !args.force {
        bail!("output {} already exists (pass --force to replace it)", args.out.display());
    }
    let path = model_path(args.model)?;
    let loaded = potptq_model::load(&path)?;
    potptq_model::checkpoint::export_dequantized(&args.out, &loaded.model, loaded.tokenizer.as_ref(), args.force)?;
    println!("exported {} to {} (f16 safetensors + config.json)", path.display(), args.out.display());
    Ok(())
}
