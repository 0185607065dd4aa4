//! `potptq quantize`: every requested method at every requested bit width, evaluated on the
//! same text and windows as the FP model, saved as packed checkpoints, reported side by side.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use potptq_calib::segments::{self, SegmentOptions};
use potptq_calib::{quantize_model, BlockSummary, Decay, QuantizeOptions, RunState, Schedule, Step2Input, Step2Options, Variant};
use potptq_model::checkpoint::{self, QuantConfig};
use potptq_model::corpus::{brown_split, Split};
use potptq_model::perplexity::{perplexity, PplOptions, Scoring};
use potptq_model::tokenizer::encode;
use potptq_quant::{Format, GptqOptions, Grid};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::common::{assets_dir, load_text, model_path, print_json, progress_bar, say, DeviceArg};
use crate::report::{self, Row};

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file or Hugging Face directory (default: the fetched SmolLM2-135M).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Bit widths, e.g. 2,3,4.
    #[arg(long, value_delimiter = ',', default_value = "3")]
    bits: Vec<u8>,
    /// Methods: rtn-int, gptq-int, rtn-int-sym, gptq-int-sym, pot-rtn, pot-s1, pot-gptq, pot-s2,
    /// pot-s1-s2 (= potptq), pot-gptq-s2; or a set: `ablation` (the paper's four rows, then
    /// PoT-GPTQ with and without Step 2), `compare` (the INT baselines against the PoT methods).
    /// Options follow a `+`: `+rot` rotates the residual stream first, `+hw` weights Step 1 by
    /// the input's second moments (e.g. `pot-gptq+rot`, `pot-s1-s2+hw+rot`).
    #[arg(long, value_delimiter = ',', default_value = "rtn-int,gptq-int,pot-s1-s2+hw+tw")]
    methods: Vec<String>,
    /// Weights per scale (a row's last group may be shorter).
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    /// Output directory: one checkpoint per method and bits, plus report.{json,md}.
    #[arg(long)]
    out: PathBuf,
    /// Start over: replace an existing output directory instead of resuming the run in it.
    #[arg(long)]
    force: bool,
    /// `paper`: 128 calibration segments of 2048 tokens (the model's context if shorter) and
    /// 10 Step 2 epochs (40 at 2 bits), as the paper calibrates. Default: the CPU budget,
    /// 16 segments of 512 tokens and 2 epochs (8 at 2 bits).
    #[arg(long)]
    protocol: Option<Protocol>,
    /// Calibration segments drawn from the Brown calibration split (or --calib-text).
    #[arg(long)]
    calib_segments: Option<usize>,
    /// Tokens per calibration segment.
    #[arg(long)]
    calib_len: Option<usize>,
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
    /// Step 2 epochs (default: by --protocol and bits).
    #[arg(long)]
    s2_epochs: Option<usize>,
    /// Step 2 Adam learning rate (default: 1e-2 with the CPU budget's few steps, 1e-3 with
    /// --protocol paper).
    #[arg(long)]
    s2_lr: Option<f64>,
    /// Step 2 weight decay λ on Γ.
    #[arg(long, default_value_t = 0.1)]
    s2_weight_decay: f64,
    /// `l2`: (λ/2)‖Γ‖² in the loss (the method as written); `decoupled`: AdamW's decay.
    #[arg(long, value_enum, default_value = "l2")]
    s2_decay: DecayArg,
    /// What the block being trained reads: the quantized model's activations or the FP model's.
    #[arg(long, value_enum, default_value = "quantized")]
    s2_input: InputArg,
    /// Calibration segments per Step 2 step.
    #[arg(long, default_value_t = 1)]
    s2_batch: usize,
    /// Step 2 learning-rate schedule over each block's steps.
    #[arg(long, value_enum, default_value = "constant")]
    s2_schedule: ScheduleArg,
    /// Keep a block's starting scales (and weights) when its trained state fits worse.
    #[arg(long)]
    s2_keep_better: bool,
    /// Adam learning rate of the weights Step 2 trains in the `+tw` methods.
    #[arg(long, default_value_t = DEFAULT_WEIGHT_LR)]
    s2_weight_lr: f64,
    /// Where Step 2 and the evaluations run: cpu, or cuda (a build with the `cuda` feature).
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// With `--device cuda`: Step 2's f32 matrix products (its training and the block passes
    /// that feed it) on the tensor cores in TF32 (10-bit mantissa inputs, f32 accumulation);
    /// GPTQ's Hessians, the second moments and the evaluation stay f32.
    #[arg(long)]
    s2_tf32: bool,
    /// With `--device cuda`: Step 2's linear products in bf16 (inputs and outputs rounded to
    /// bf16, f32 sums; twice TF32's rate), attention's and the block passes' in TF32.
    #[arg(long)]
    s2_bf16: bool,
    /// Stop after this many blocks of a method (to exercise resuming).
    #[arg(long, hide = true)]
    stop_after_blocks: Option<usize>,
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

#[derive(Clone, Copy, clap::ValueEnum)]
enum Protocol {
    Paper,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ScheduleArg {
    Constant,
    Cosine,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DecayArg {
    L2,
    Decoupled,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum InputArg {
    Quantized,
    Fp,
}

/// The CPU budget: 32 Adam steps of 512 tokens per block, so that Step 2 of SmolLM2-135M takes
/// minutes, not hours, on a 2-core machine.
const CPU_CALIBRATION: (usize, usize) = (16, 512);
/// Step 2 epochs of the CPU budget at 3/4 bits and at 2 bits (the paper's 1 : 4).
const CPU_EPOCHS: (usize, usize) = (2, 8);
/// Adam's learning rate for the CPU budget: with ~32 steps per block, the paper's 1e-3 moves a
/// scale by at most ~3% (measured: PoTPTQ 3-bit PPL 4108 at 1e-3, 333 at 1e-2).
const CPU_LR: f64 = 1e-2;
/// Step 2's learning rate for trained weights (`+tw`; measured at 4 bits, pot-s1-s2+hw+tw: PPL
/// 57.35 at 1e-4, 53.99 at 1e-3).
const DEFAULT_WEIGHT_LR: f64 = 1e-3;

fn default_weight_lr() -> f64 {
    DEFAULT_WEIGHT_LR
}
const PAPER_CALIBRATION: (usize, usize) = (128, 2048);

/// Named sets of methods for `--methods`.
fn expand_methods(names: &[String]) -> Result<Vec<Variant>> {
    let mut out = Vec::new();
    for name in names {
        let set: &[&str] = match name.as_str() {
            "ablation" => &["pot-rtn", "pot-s1", "pot-s2", "pot-s1-s2", "pot-gptq", "pot-gptq-s2"],
            "compare" => &["rtn-int", "gptq-int", "pot-s1", "pot-s1-s2", "pot-gptq", "pot-gptq-s2"],
            other => &[other][..],
        };
        for m in set {
            let m = Variant::parse(m)?;
            if !out.contains(&m) {
                out.push(m);
            }
        }
    }
    Ok(out)
}

#[derive(Serialize, Deserialize, PartialEq)]
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
    step2: Step2Settings,
    reference: String,
}

/// Step 2's settings as given; epochs `None` means the per-bits default.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
struct Step2Settings {
    epochs: Option<usize>,
    /// `None`: the CPU budget.
    protocol: Option<String>,
    lr: f64,
    weight_decay: f64,
    decay: Decay,
    input: Step2Input,
    batch: usize,
    /// Absent from runs made before it existed.
    #[serde(default)]
    schedule: Schedule,
    /// Absent from runs made before it existed.
    #[serde(default)]
    keep_better: bool,
    /// Of the `+tw` methods (absent from runs made before they existed).
    #[serde(default = "default_weight_lr")]
    weight_lr: f64,
    device: String,
    /// Absent from runs made before it existed.
    #[serde(default)]
    tf32: bool,
    #[serde(default)]
    bf16: bool,
}

/// Where a run keeps what it needs to resume: its settings, finished rows, per-block states.
fn state_dir(out: &Path) -> PathBuf {
    out.join(".state")
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("{} is corrupt (pass --force to start over)", path.display()))?))
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    potptq_model::atomic_write_bytes(path, &serde_json::to_vec_pretty(value)?)
}

pub fn run(args: Args) -> Result<()> {
    let methods = expand_methods(&args.methods)?;
    for &bits in &args.bits {
        for m in &methods {
            potptq_quant::qtensor::check_bits(m.method.format(), bits)?;
        }
    }
    let (default_segments, default_len) = match args.protocol {
        Some(Protocol::Paper) => PAPER_CALIBRATION,
        None => CPU_CALIBRATION,
    };
    let device = args.device.device()?;
    ensure!(!args.s2_tf32 || args.device == DeviceArg::Cuda, "--s2-tf32 needs --device cuda");
    ensure!(!args.s2_bf16 || args.device == DeviceArg::Cuda, "--s2-bf16 needs --device cuda");
    let path = model_path(args.model.clone())?;
    let loaded = potptq_model::load(&path)?;
    let fp = &loaded.model;
    // Validate the group size against every linear before any long work.
    for linear in potptq_model::llama::BLOCK_LINEARS {
        let (rows, cols) = fp.config.linear_shape(linear);
        potptq_quant::GroupLayout::new(rows, cols, args.group_size).with_context(|| format!("--group-size for {linear}"))?;
    }
    let calib_opts = SegmentOptions {
        count: args.calib_segments.unwrap_or(default_segments),
        len: args.calib_len.unwrap_or(default_len.min(fp.config.max_position_embeddings)),
        seed: args.seed,
    };
    let s2_settings = Step2Settings {
        epochs: args.s2_epochs,
        protocol: args.protocol.map(|_| "paper".to_string()),
        lr: args.s2_lr.unwrap_or(match args.protocol {
            Some(Protocol::Paper) => 1e-3,
            None => CPU_LR,
        }),
        weight_decay: args.s2_weight_decay,
        decay: match args.s2_decay {
            DecayArg::L2 => Decay::L2,
            DecayArg::Decoupled => Decay::Decoupled,
        },
        input: match args.s2_input {
            InputArg::Quantized => Step2Input::Quantized,
            InputArg::Fp => Step2Input::Fp,
        },
        batch: args.s2_batch,
        schedule: match args.s2_schedule {
            ScheduleArg::Constant => Schedule::Constant,
            ScheduleArg::Cosine => Schedule::Cosine,
        },
        weight_lr: args.s2_weight_lr,
        keep_better: args.s2_keep_better,
        device: args.device.name().into(),
        tf32: args.s2_tf32,
        bf16: args.s2_bf16,
    };
    let default_epochs = |bits: u8| match args.protocol {
        Some(Protocol::Paper) => Step2Options::paper(bits).epochs,
        None if bits <= 2 => CPU_EPOCHS.1,
        None => CPU_EPOCHS.0,
    };
    let step2_for = |bits: u8, train_weights: bool| Step2Options {
        epochs: s2_settings.epochs.unwrap_or(default_epochs(bits)),
        lr: s2_settings.lr,
        weight_decay: s2_settings.weight_decay,
        decay: s2_settings.decay,
        input: s2_settings.input,
        batch: s2_settings.batch,
        weight_lr: train_weights.then_some(s2_settings.weight_lr),
        schedule: s2_settings.schedule,
        keep_better: s2_settings.keep_better,
        tf32: s2_settings.tf32,
        bf16: s2_settings.bf16,
    };
    for &bits in &args.bits {
        step2_for(bits, true).check()?;
    }
    let tokenizer = loaded.tokenizer()?;
    let text = load_text(args.text.as_deref())?;
    let tokens = encode(tokenizer, &text.content)?;
    let ppl_opts = PplOptions { seq_len: args.seq_len, max_windows: Some(args.max_windows), scoring: Scoring::All, batch: (2048 / args.seq_len).clamp(1, 8) };

    let needs_data = methods.iter().any(|m| m.uses_data());
    let calib_name = match &args.calib_text {
        Some(p) => p.display().to_string(),
        None => "brown-calibration".to_string(),
    };
    let calib = if needs_data {
        let content = match &args.calib_text {
            Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
            None => brown_split(&assets_dir().join("brown"), Split::Calibration)?,
        };
        Some(segments::draw(&encode(tokenizer, &content)?, &calib_opts)?)
    } else {
        None
    };

    let model_id = format!("{} ({} bytes)", path.display(), file_size(&path));
    let settings = Settings {
        model: model_id.clone(),
        text: text.name.clone(),
        text_sha256: text.sha256(),
        seq_len: args.seq_len,
        windows: args.max_windows,
        tokens_scored: 0,
        group_size: args.group_size,
        calibration: calib_opts.clone(),
        calibration_text: calib_name,
        grid: (args.grid_lo, args.grid_hi, args.grid_points),
        damp: args.damp,
        act_order: args.act_order,
        step2: s2_settings.clone(),
        reference: "FP = the source model's weights dequantized to f32; every method starts from them".into(),
    };
    let state = prepare_output(&args.out, args.force, &settings)?;

    let evaluate = |model: &potptq_model::Model, what: &str| -> Result<potptq_model::perplexity::PplResult> {
        let bar = progress_bar(0, &format!("eval {what}"));
        let model = model.to_device(&device)?;
        let r = perplexity(&model, &tokens, &ppl_opts, |d, t| {
            bar.set_length(t as u64);
            bar.set_position(d as u64);
        })?;
        bar.finish_and_clear();
        Ok(r)
    };

    let fp_row = match read_json::<FpResult>(&state.join("fp.json"))? {
        Some(r) => {
            eprintln!("fp: ppl {:.4} (from the earlier run)", r.ppl);
            r
        }
        None => {
            let r = evaluate(fp, "fp")?;
            let r = FpResult { ppl: r.ppl, windows: r.windows, tokens_scored: r.tokens_scored, seq_len: r.seq_len };
            write_json(&state.join("fp.json"), &r)?;
            eprintln!("fp: ppl {:.4}", r.ppl);
            r
        }
    };
    let mut rows = vec![Row::fp(fp_row.ppl, file_size(&path))];
    let grid = Grid { lo: args.grid_lo, hi: args.grid_hi, points: args.grid_points };
    for &bits in &args.bits {
        for variant in &methods {
            let method = variant.method;
            let label = format!("{}-w{bits}", variant.label());
            let dir = args.out.join(format!("{label}-g{}", args.group_size));
            let row_path = state.join(format!("{label}.row.json"));
            if let (Some(row), true) = (read_json::<Row>(&row_path)?, dir.exists()) {
                eprintln!("{label}: ppl {:.4} (from the earlier run)", row.ppl);
                rows.push(row);
                continue;
            }
            let opts = QuantizeOptions {
                method,
                rotate: variant.rotate.then_some(args.seed),
                weighted_step1: variant.weighted_step1,
                bits,
                group_size: args.group_size,
                grid: grid.clone(),
                gptq: GptqOptions { damp: args.damp, block: 128, act_order: args.act_order, weighted_scales: false },
                batch: 4,
                step2: step2_for(bits, variant.train_weights),
                device: device.clone(),
                stop_after_blocks: args.stop_after_blocks,
            };
            let run_state = RunState::open(&state.join(&label), &opts.identity(&model_id, calib.as_deref()))?;
            let bar = progress_bar(0, &format!("quantize {label}"));
            let mut worked = (0.0, 0usize);
            let q = quantize_model(fp, &opts, calib.as_deref(), Some(&run_state), |b: &BlockSummary, blocks| {
                bar.set_length(blocks as u64);
                bar.set_position(b.block as u64 + 1);
                if b.resumed {
                    return;
                }
                worked = (worked.0 + b.seconds, worked.1 + 1);
                let projected = worked.0 / worked.1 as f64 * blocks as f64;
                if let Some(r) = &b.refine {
                    say(&bar, format!(
                        "{label} block {}/{blocks}: {:.1} s (projected {:.0} s for all blocks), block MSE {:.3e} → {:.3e}, |Γ| mean {:.4}",
                        b.block + 1,
                        b.seconds,
                        projected,
                        r.loss_before,
                        r.loss_after,
                        r.gamma.mean_abs
                    ));
                }
            })?;
            bar.finish_and_clear();
            let r = evaluate(&q.model, &label)?;
            let qconfig = QuantConfig {
                quant_method: checkpoint::QUANT_METHOD.into(),
                format: if method.format() == Format::Pot { "pot".into() } else { "int".into() },
                bits,
                group_size: args.group_size,
                sym: method.format() == Format::IntSym,
                steps: variant.steps(),
                method: variant.label(),
                packing: checkpoint::PACKING.into(),
                clamped_scales: q.clamped_scales(),
            };
            let save_start = Instant::now();
            // A checkpoint left by a run stopped before its row was written is replaced.
            checkpoint::save(&dir, &q.model, &q.tensors, &qconfig, Some(tokenizer), &[], true)?;
            let row = Row {
                method: variant.label(),
                bits: Some(bits),
                bits_per_weight: Some(q.bits_per_weight()),
                paper_bits_per_weight: Some(bits as f64 + 32.0 / args.group_size as f64),
                file_bytes: file_size(&dir.join("model.safetensors")),
                ppl: r.ppl,
                delta_ppl: r.ppl - fp_row.ppl,
                seconds: q.seconds,
                clamped_scales: q.clamped_scales(),
                checkpoint: Some(dir.display().to_string()),
                blocks: q.blocks.iter().filter(|b| b.refine.is_some()).cloned().collect(),
            };
            write_json(&row_path, &row)?;
            run_state.remove()?;
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
    let mut settings = serde_json::to_value(&settings)?;
    settings["windows"] = fp_row.windows.into();
    settings["tokens_scored"] = fp_row.tokens_scored.into();
    settings["seq_len"] = fp_row.seq_len.into();
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

#[derive(Serialize, Deserialize)]
struct FpResult {
    ppl: f64,
    windows: usize,
    tokens_scored: usize,
    seq_len: usize,
}

/// Makes `out` ready for this run and returns its state directory: a new run starts there, a
/// rerun with the same settings resumes, anything else is refused.
fn prepare_output(out: &Path, force: bool, settings: &Settings) -> Result<PathBuf> {
    let state = state_dir(out);
    if out.exists() {
        if force {
            std::fs::remove_dir_all(out).with_context(|| format!("cannot remove {}", out.display()))?;
        } else {
            match read_json::<Settings>(&state.join("run.json"))? {
                Some(saved) if &saved == settings => eprintln!("resuming the run in {}", out.display()),
                Some(_) => bail!(
                    "{} holds a run with other settings (model, text, group size, calibration or Step 2); use the same settings to resume, or pass --force to start over",
                    out.display()
                ),
                None if std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false) => {}
                None => bail!("output {} already exists and is not a potptq run (pass --force to replace it)", out.display()),
            }
        }
    }
    std::fs::create_dir_all(&state).with_context(|| format!("cannot create {}", out.display()))?;
    let probe = state.join(".write-test");
    std::fs::write(&probe, b"").with_context(|| format!("output directory {} is not writable", out.display()))?;
    std::fs::remove_file(&probe)?;
    write_json(&state.join("run.json"), settings)?;
    Ok(state)
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}
