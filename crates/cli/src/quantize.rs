//! `potptq quantize`: every requested method at every requested bit width, evaluated on the
//! same text and windows as the FP model, saved as packed checkpoints, reported side by side.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use potptq_calib::segments::{self, SegmentOptions};
use potptq_calib::{quantize_model, Method, QuantizeOptions};
use potptq_model::checkpoint::{self, QuantConfig};
use potptq_model::corpus::{brown_split, Split};
use potptq_model::perplexity::{perplexity, PplOptions, Scoring};
use potptq_model::tokenizer::encode;
use potptq_quant::{Format, GptqOptions, Grid};
use serde::Serialize;
use serde_json::json;

use crate::common::{assets_dir, load_text, model_path, print_json, progress_bar};
use crate::report::{self, Row};

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file or Hugging Face directory (default: the fetched SmolLM2-135M).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Bit widths, e.g. 2,3,4.
    #[arg(long, value_delimiter = ',', default_value = "3")]
    bits: Vec<u8>,
    /// Methods: rtn-int, gptq-int, rtn-int-sym, gptq-int-sym, pot-rtn, pot-s1, pot-gptq.
    #[arg(long, value_delimiter = ',', default_value = "rtn-int,gptq-int,pot-rtn,pot-s1,pot-gptq")]
    methods: Vec<String>,
    /// Weights per scale (a row's last group may be shorter).
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    /// Output directory: one checkpoint per method and bits, plus report.{json,md}.
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
    /// Calibration segments drawn from the Brown calibration split (or --calib-text).
    #[arg(long, default_value_t = 32)]
    calib_segments: usize,
    /// Tokens per calibration segment.
    #[arg(long, default_value_t = 512)]
    calib_len: usize,
    #[arg(long)]
    calib_text: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Step-1 grid: candidate scales lo·s0 … hi·s0.
    #[arg(long, default_value_t = 0.01)]
    grid_lo: f32,
    #[arg(long, default_value_t = 2.0)]
    grid_hi: f32,
    #[arg(long, default_value_t = 200)]
    grid_points: usize,
    /// GPTQ dampening, as a fraction of the Hessian's mean diagonal.
    #[arg(long, default_value_t = 0.01)]
    damp: f32,
    /// GPTQ: quantize columns in order of decreasing Hessian diagonal.
    #[arg(long)]
    act_order: bool,
    /// Evaluation text (default: the Brown test split).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Evaluation window length.
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Evaluate at most this many windows (all when absent).
    #[arg(long, default_value_t = 32)]
    max_windows: usize,
    /// Print the report as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Settings {
    model: String,
    text: String,
    text_sha256: String,
    seq_len: usize,
    windows: usize,
    tokens_scored: usize,
    group_size: usize,
    calibration: SegmentOptions,
    calibration_text: String,
    grid: (f32, f32, usize),
    damp: f32,
    act_order: bool,
    reference: &'static str,
}

pub fn run(args: Args) -> Result<()> {
    let methods: Vec<Method> = args.methods.iter().map(|m| Method::parse(m)).collect::<Result<_>>()?;
    for &bits in &args.bits {
        for m in &methods {
            potptq_quant::qtensor::check_bits(m.format(), bits)?;
        }
    }
    if args.out.exists() && !args.force {
        bail!("output {} already exists (pass --force to replace it)", args.out.display());
    }
    let path = model_path(args.model.clone())?;
    let loaded = potptq_model::load(&path)?;
    let fp = &loaded.model;
    // Validate the group size against every linear before any long work.
    for linear in potptq_model::llama::BLOCK_LINEARS {
        let (rows, cols) = fp.config.linear_shape(linear);
        potptq_quant::GroupLayout::new(rows, cols, args.group_size).with_context(|| format!("--group-size for {linear}"))?;
    }
    let tokenizer = loaded.tokenizer()?;
    let text = load_text(args.text.as_deref())?;
    let tokens = encode(tokenizer, &text.content)?;
    let ppl_opts = PplOptions { seq_len: args.seq_len, max_windows: Some(args.max_windows), scoring: Scoring::All, batch: (2048 / args.seq_len).clamp(1, 8) };

    let calib_opts = SegmentOptions { count: args.calib_segments, len: args.calib_len, seed: args.seed };
    let needs_data = methods.iter().any(|m| m.uses_data());
    let (calib_name, calib) = if needs_data {
        let (name, content) = match &args.calib_text {
            Some(p) => (p.display().to_string(), std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?),
            None => ("brown-calibration".to_string(), brown_split(&assets_dir().join("brown"), Split::Calibration)?),
        };
        let calib_tokens = encode(tokenizer, &content)?;
        (name, Some(segments::draw(&calib_tokens, &calib_opts)?))
    } else {
        ("none".to_string(), None)
    };

    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let probe = args.out.join(".write-test");
    std::fs::write(&probe, b"").with_context(|| format!("output directory {} is not writable", args.out.display()))?;
    std::fs::remove_file(&probe)?;

    let evaluate = |model: &potptq_model::Model, what: &str| -> Result<potptq_model::perplexity::PplResult> {
        let bar = progress_bar(0, &format!("eval {what}"));
        let r = perplexity(model, &tokens, &ppl_opts, |d, t| {
            bar.set_length(t as u64);
            bar.set_position(d as u64);
        })?;
        bar.finish_and_clear();
        Ok(r)
    };

    let fp_ppl = evaluate(fp, "fp")?;
    eprintln!("fp: ppl {:.4}", fp_ppl.ppl);
    let mut rows = vec![Row::fp(fp_ppl.ppl, file_size(&path))];
    let grid = Grid { lo: args.grid_lo, hi: args.grid_hi, points: args.grid_points };
    for &bits in &args.bits {
        for &method in &methods {
            let opts = QuantizeOptions {
                method,
                bits,
                group_size: args.group_size,
                grid: grid.clone(),
                gptq: GptqOptions { damp: args.damp, block: 128, act_order: args.act_order },
                batch: 4,
            };
            let label = format!("{}-w{bits}", method.name());
            let bar = progress_bar(0, &format!("quantize {label}"));
            let q = quantize_model(fp, &opts, calib.as_deref(), |d, t| {
                bar.set_length(t as u64);
                bar.set_position(d as u64);
            })?;
            bar.finish_and_clear();
            let r = evaluate(&q.model, &label)?;
            let dir = args.out.join(format!("{label}-g{}", args.group_size));
            let qconfig = QuantConfig {
                quant_method: checkpoint::QUANT_METHOD.into(),
                format: if method.format() == Format::Pot { "pot".into() } else { "int".into() },
                bits,
                group_size: args.group_size,
                sym: method.format() == Format::IntSym,
                steps: method.steps(),
                method: method.name().into(),
                packing: checkpoint::PACKING.into(),
                clamped_scales: q.clamped_scales(),
            };
            let save_start = Instant::now();
            checkpoint::save(&dir, &q.model, &q.tensors, &qconfig, Some(tokenizer), &[], true)?;
            let row = Row {
                method: method.name().into(),
                bits: Some(bits),
                bits_per_weight: Some(q.bits_per_weight()),
                paper_bits_per_weight: Some(bits as f64 + 32.0 / args.group_size as f64),
                file_bytes: file_size(&dir.join("model.safetensors")),
                ppl: r.ppl,
                delta_ppl: r.ppl - fp_ppl.ppl,
                seconds: q.seconds,
                clamped_scales: q.clamped_scales(),
                checkpoint: Some(dir.display().to_string()),
            };
            eprintln!(
                "{label}: ppl {:.4} (Δ {:+.4}), {:.3} bits/weight, quantized in {:.1} s, saved in {:.1} s",
                r.ppl,
                row.delta_ppl,
                row.bits_per_weight.unwrap_or(0.0),
                q.seconds,
                save_start.elapsed().as_secs_f64()
            );
            rows.push(row);
        }
    }
    let settings = Settings {
        model: path.display().to_string(),
        text: text.name.clone(),
        text_sha256: text.sha256(),
        seq_len: fp_ppl.seq_len,
        windows: fp_ppl.windows,
        tokens_scored: fp_ppl.tokens_scored,
        group_size: args.group_size,
        calibration: calib_opts,
        calibration_text: calib_name,
        grid: (args.grid_lo, args.grid_hi, args.grid_points),
        damp: args.damp,
        act_order: args.act_order,
        reference: "FP = the source model's weights dequantized to f32; every method starts from them",
    };
    let settings = serde_json::to_value(&settings)?;
    let table = report::markdown_table(&rows);
    report::write(&args.out, &settings, &rows, &table)?;
    let title = format!("{} — {} (G = {})", path.file_name().map_or("model".into(), |n| n.to_string_lossy()), text.name, args.group_size);
    if let Err(e) = report::plot(&args.out.join("report.png"), &rows, &title) {
        eprintln!("warning: report.png not written: {e:#}");
    }
    println!("{table}");
    println!("report: {}", args.out.join("report.md").display());
    if args.json {
        print_json(&json!({ "settings": settings, "rows": rows, "ppl": rows[0].ppl }));
    }
    Ok(())
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}
