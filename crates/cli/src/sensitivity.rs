//! `potptq sensitivity`: which blocks and which kinds of linear cost the perplexity.
//!
//! A data-free method quantizes each linear from its weights alone, so the model with only
//! block `i` (or only one kind of linear, in every block) quantized is the FP model with those
//! tensors taken from one quantized copy. Each such model is evaluated on the same windows; the
//! rise over FP says where the method's loss comes from, and where more bits would pay.

use std::path::PathBuf;

use anyhow::{bail, Result};
use potptq_calib::{quantize_model, QuantizeOptions, Variant};
use potptq_model::llama::{Model, BLOCK_LINEARS};
use potptq_model::perplexity::{perplexity, PplOptions, Scoring};
use potptq_model::tokenizer::encode;
use serde::Serialize;
use serde_json::json;

use crate::common::{load_text, model_path, print_json, progress_bar, say};

#[derive(clap::Args)]
pub struct Args {
    /// GGUF file or Hugging Face directory (default: the fetched SmolLM2-135M).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A method that needs no data: rtn-int, rtn-int-sym, pot-rtn, pot-s1 (with +rot).
    #[arg(long, default_value = "pot-s1")]
    method: String,
    #[arg(long, default_value_t = 3)]
    bits: u8,
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    /// Evaluation text (default: the Brown test split).
    #[arg(long)]
    text: Option<PathBuf>,
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    #[arg(long, default_value_t = 8)]
    max_windows: usize,
    /// Print the figures as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Part {
    /// `block 11`, or a linear's name for that linear in every block.
    part: String,
    ppl: f64,
    delta_ppl: f64,
}

pub fn run(args: Args) -> Result<()> {
    let variant = Variant::parse(&args.method)?;
    if variant.uses_data() {
        bail!("sensitivity quantizes one part at a time from the weights alone; `{}` needs calibration data", args.method);
    }
    let path = model_path(args.model)?;
    let loaded = potptq_model::load(&path)?;
    let text = load_text(args.text.as_deref())?;
    let tokens = encode(loaded.tokenizer()?, &text.content)?;
    let ppl_opts = PplOptions { seq_len: args.seq_len, max_windows: Some(args.max_windows), scoring: Scoring::All, batch: (2048 / args.seq_len).clamp(1, 8) };
    let opts = QuantizeOptions {
        rotate: variant.rotate.then_some(0),
        ..QuantizeOptions::new(variant.method, args.bits, args.group_size)
    };
    let quantized = quantize_model(&loaded.model, &opts, None, None, |_, _| {})?.model;
    // With a rotation every part is compared inside the rotated model, whose FP is the same function.
    let fp = if variant.rotate { potptq_calib::rotate::rotate_model(&loaded.model, 0)? } else { loaded.model.clone() };
    let n = fp.blocks.len();
    let bar = progress_bar((n + BLOCK_LINEARS.len() + 2) as u64, "sensitivity");
    let eval = |m: &Model| -> Result<f64> { Ok(perplexity(m, &tokens, &ppl_opts, |_, _| {})?.ppl) };
    let fp_ppl = eval(&fp)?;
    let all_ppl = eval(&quantized)?;
    bar.inc(2);
    let mut parts = Vec::new();
    for i in 0..n {
        let mut m = fp.clone();
        m.blocks[i] = quantized.blocks[i].clone();
        let ppl = eval(&m)?;
        say(&bar, format!("block {i}: ppl {ppl:.3} (Δ {:+.3})", ppl - fp_ppl));
        parts.push(Part { part: format!("block {i}"), ppl, delta_ppl: ppl - fp_ppl });
        bar.inc(1);
    }
    for linear in BLOCK_LINEARS {
        let mut m = fp.clone();
        for (b, q) in m.blocks.iter_mut().zip(&quantized.blocks) {
            let src = q.linear(linear).expect("block linear").clone();
            *b.linear_mut(linear).expect("block linear") = src;
        }
        let ppl = eval(&m)?;
        say(&bar, format!("{linear}: ppl {ppl:.3} (Δ {:+.3})", ppl - fp_ppl));
        parts.push(Part { part: linear.to_string(), ppl, delta_ppl: ppl - fp_ppl });
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!("{} at {} bits, G = {}: FP {fp_ppl:.3}, everything quantized {all_ppl:.3}", variant.label(), args.bits, args.group_size);
    println!("| part | PPL | ΔPPL vs FP |\n|---|---|---|");
    for p in &parts {
        println!("| {} | {:.3} | {:+.3} |", p.part, p.ppl, p.delta_ppl);
    }
    if args.json {
        print_json(&json!({ "method": variant.label(), "bits": args.bits, "group_size": args.group_size, "fp_ppl": fp_ppl, "ppl": all_ppl, "parts": parts }));
    }
    Ok(())
}
