//! `potptq bench generate`: decode speed of the FP model against INT and PoT checkpoints made
//! from it, each run as `potptq generate` in a fresh process (the real load path, and the
//! resident memory of that model alone).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use potptq_calib::{quantize_model, Method, QuantizeOptions};
use potptq_model::checkpoint::{self, QuantConfig};
use potptq_quant::Format;
use serde_json::{json, Value};

use super::median;
use crate::common::{model_path, print_json, DeviceArg};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// GGUF file or Hugging Face directory (default: the fetched SmolLM2-135M).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "2,3,4")]
    bits: Vec<u8>,
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    #[arg(long, default_value = "The history of the city begins")]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Runs per model; the median decode speed is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Activations of the packed models' products, each measured: f32 (exact) and/or q8.
    #[arg(long, value_delimiter = ',', default_value = "f32,q8")]
    kernels: Vec<crate::generate::KernelsArg>,
    /// Where the models run: cpu, or cuda (packed models through the fused GPU kernels; then
    /// `--kernels` does not apply).
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Keep the checkpoints in this directory (default: a temporary one, removed after).
    #[arg(long)]
    keep: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// The data-free methods: INT round-to-nearest, and PoT with Step 1's scales.
const METHODS: [Method; 2] = [Method::RtnInt, Method::PotS1];

fn make_checkpoint(fp: &potptq_model::LoadedModel, method: Method, bits: u8, group_size: usize, dir: &Path) -> Result<()> {
    let opts = QuantizeOptions::new(method, bits, group_size);
    let q = quantize_model(&fp.model, &opts, None, None, |_, _| {})?;
    let qc = QuantConfig {
        quant_method: checkpoint::QUANT_METHOD.into(),
        format: if method.format() == Format::Pot { "pot".into() } else { "int".into() },
        bits,
        group_size,
        sym: method.format() == Format::IntSym,
        steps: method.steps(),
        method: method.name().into(),
        packing: checkpoint::PACKING.into(),
        clamped_scales: q.clamped_scales(),
    };
    checkpoint::save(dir, &q.model, &q.tensors, &qc, fp.tokenizer.as_ref(), &[], true)
}

/// One `potptq generate --json` run: its last line.
fn generate_once(model: &Path, kernels: crate::generate::KernelsArg, args: &GenerateArgs) -> Result<Value> {
    let exe = std::env::current_exe().context("cannot find the potptq executable")?;
    let out = Command::new(exe)
        .args(["generate", "--model"])
        .arg(model)
        .args(["--prompt", &args.prompt, "--max-tokens", &args.max_tokens.to_string(), "--kernels", kernels.name(), "--json"])
        .args(["--device", args.device.name()])
        .output()
        .context("cannot run potptq generate")?;
    if !out.status.success() {
        bail!("potptq generate --model {} failed: {}", model.display(), String::from_utf8_lossy(&out.stderr));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().context("potptq generate printed nothing")?;
    serde_json::from_str(last).context("potptq generate did not end with JSON")
}

fn size_of(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::metadata(path.join("model.safetensors")).map_or(0, |m| m.len())
    } else {
        std::fs::metadata(path).map_or(0, |m| m.len())
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    for &b in &args.bits {
        potptq_quant::check_bits(Format::Pot, b)?;
    }
    if args.reps == 0 || args.max_tokens < 2 {
        bail!("--reps must be at least 1 and --max-tokens at least 2");
    }
    let path = model_path(args.model.clone())?;
    let fp = potptq_model::load(&path)?;
    let temp;
    let root = match &args.keep {
        Some(dir) => dir.clone(),
        None => {
            temp = TempDir::new()?;
            temp.0.clone()
        }
    };
    if args.kernels.is_empty() {
        bail!("--kernels needs at least one of f32, q8");
    }
    use crate::generate::KernelsArg;
    let kernels = if args.device == DeviceArg::Cpu { args.kernels.clone() } else { vec![KernelsArg::F32] };
    // The FP model has no packed products: its kernels setting changes nothing. On a GPU
    // `generate` runs its linears in f16 (cuBLAS).
    let fp_name = if args.device == DeviceArg::Cpu { "fp32" } else { "fp16" };
    let mut models = vec![(fp_name.to_string(), None, path.clone(), KernelsArg::F32)];
    for &bits in &args.bits {
        for method in METHODS {
            let dir = root.join(format!("{}-w{bits}-g{}", method.name(), args.group_size));
            eprintln!("quantizing {} at {bits} bits → {}", method.name(), dir.display());
            make_checkpoint(&fp, method, bits, args.group_size, &dir)?;
            for &k in &kernels {
                models.push((method.name().to_string(), Some(bits), dir.clone(), k));
            }
        }
    }
    drop(fp);

    println!(
        "decode of {} tokens after \"{}\" on the {}, median of {} rounds over all models, each run a fresh `potptq generate`",
        args.max_tokens,
        args.prompt,
        args.device.name(),
        args.reps
    );
    println!("{:>8} {:>5} {:>7} {:>10} {:>12} {:>10} {:>12} {:>9}", "method", "bits", "kernels", "file MB", "resident MB", "tokens/s", "generated", "vs FP");
    let mut rows = Vec::new();
    let mut fp_speed = None;
    // Rounds over all models, so that every model sees the same changes in machine load.
    let mut all_runs: Vec<Vec<Value>> = vec![Vec::new(); models.len()];
    for _ in 0..args.reps {
        for ((_, _, dir, kernels), runs) in models.iter().zip(&mut all_runs) {
            runs.push(generate_once(dir, *kernels, &args)?);
        }
    }
    for ((method, bits, dir, kernels), runs) in models.iter().zip(all_runs) {
        let speed = median(runs.iter().map(|r| r["decode_tokens_per_s"].as_f64().unwrap_or(0.0)).collect());
        let resident = median(runs.iter().map(|r| r["resident_bytes"].as_f64().unwrap_or(0.0)).collect());
        let generated = runs[0]["generated_tokens"].as_u64().unwrap_or(0);
        let fp = *fp_speed.get_or_insert(speed);
        let bits_label = bits.map_or("—".to_string(), |b| b.to_string());
        println!(
            "{method:>8} {bits_label:>5} {:>7} {:>10.1} {:>12.1} {speed:>10.1} {generated:>12} {:>9.2}",
            match (bits, args.device) {
                (None, _) => "—",
                (Some(_), DeviceArg::Cuda) => "gpu f16",
                (Some(_), DeviceArg::Cpu) => kernels.name(),
            },
            size_of(dir) as f64 / 1e6,
            resident / 1e6,
            speed / fp
        );
        rows.push(json!({
            "method": method, "bits": bits, "kernels": bits.map(|_| kernels.name()), "file_bytes": size_of(dir), "resident_bytes": resident,
            "decode_tokens_per_s": speed, "generated_tokens": generated, "speed_over_fp": speed / fp,
        }));
    }
    if args.json {
        print_json(&json!({
            "bench": "generate", "model": path.display().to_string(), "device": args.device.name(), "group_size": args.group_size,
            "max_tokens": args.max_tokens, "reps": args.reps, "results": rows,
        }));
    }
    Ok(())
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("potptq-bench-generate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
