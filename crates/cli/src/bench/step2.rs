//! `potptq bench step2`: Step 2 (scale refinement, `potptq_calib::step2::refine_block`) of one
//! block with random weights of a given shape (default Llama-2-7B's: hidden 4096, 32 heads, MLP
//! 11008) on random calibration activations (default the paper's 128 segments × 2048 tokens),
//! on `--device cpu` or `cuda`: seconds per block and the projection for the whole model.
//!
//! Timed, each in the precision the pipeline gives it: the FP block over all segments (one
//! stream pass: the pipeline runs two, FP and quantized), one full-set loss evaluation
//! (`refine_block` runs two), and `refine_block` for `--epochs`; an epoch is
//! `(refine − 2·loss)/epochs`. The projection is
//! `blocks × (2·pass + 2·loss + target_epochs·epoch)`. Step 1's grid search (on the CPU cores,
//! as the pipeline runs it) gives the starting scales; its time per block is added in a second
//! projection, the whole PoTPTQ of the model's blocks. Loading, packing and evaluation are not
//! included.

use std::time::Instant;

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};
use potptq_calib::graph::{BlockGraph, BlockWeights};
use potptq_calib::step2::{profile_steps, refine_block, training_loss, LearnedScales, Tf32Scope};
use potptq_calib::Step2Options;
use potptq_model::config::Arch;
use potptq_model::llama::{Rope, BLOCK_LINEARS};
use potptq_model::Config;
use potptq_quant::{quantize_pot_step1, GroupLayout, Grid};
use serde_json::json;

use crate::common::{print_json, DeviceArg};

#[derive(clap::Args)]
pub struct Step2Args {
    #[arg(long, default_value_t = 4096)]
    hidden: usize,
    #[arg(long, default_value_t = 32)]
    heads: usize,
    #[arg(long, default_value_t = 11008)]
    intermediate: usize,
    /// Calibration segments (one per Adam step, as the method has it).
    #[arg(long, default_value_t = 128)]
    segments: usize,
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    #[arg(long, default_value_t = 3)]
    bits: u8,
    #[arg(long, default_value_t = 128)]
    group_size: usize,
    /// Epochs run and timed.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Epochs the projection is for (default: the method's, 10 at 3/4 bits, 40 at 2 bits).
    #[arg(long)]
    target_epochs: Option<usize>,
    /// Blocks of the model the projection is for (Llama-2-7B: 32).
    #[arg(long, default_value_t = 32)]
    blocks: usize,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// On cuda: the training's f32 matrix products in TF32 on the tensor cores.
    #[arg(long)]
    tf32: bool,
    /// On cuda: the linears' products in bf16 (attention's in TF32).
    #[arg(long)]
    bf16: bool,
    /// Train the weights too (the `+tw` methods), with this Adam learning rate.
    #[arg(long)]
    weight_lr: Option<f64>,
    /// Steps timed phase by phase after the epochs (0: none).
    #[arg(long, default_value_t = 8)]
    profile_steps: usize,
    #[arg(long)]
    json: bool,
}

fn sync(d: &Device) -> Result<()> {
    Ok(d.synchronize()?)
}

pub fn run(a: Step2Args) -> Result<()> {
    let device = match a.device.as_str() {
        "cpu" => DeviceArg::Cpu,
        "cuda" => DeviceArg::Cuda,
        other => bail!("--device {other}: cpu or cuda"),
    }
    .device()?;
    ensure!(!a.tf32 || matches!(device, Device::Cuda(_)), "--tf32 needs --device cuda");
    ensure!(!a.bf16 || matches!(device, Device::Cuda(_)), "--bf16 needs --device cuda");
    ensure!(a.hidden.is_multiple_of(a.heads), "hidden size {} is not a multiple of {} heads", a.hidden, a.heads);
    ensure!(a.segments > 0 && a.epochs > 0, "need segments and epochs");
    let cfg = Config {
        arch: Arch::Llama,
        vocab_size: 32000,
        hidden_size: a.hidden,
        intermediate_size: a.intermediate,
        num_layers: a.blocks,
        num_heads: a.heads,
        num_kv_heads: a.heads,
        head_dim: a.hidden / a.heads,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        max_position_embeddings: a.seq_len,
        tie_word_embeddings: false,
        attention_bias: false,
    };
    cfg.validate()?;
    let rope = Rope::new(&cfg, &Device::Cpu)?;
    let graph = BlockGraph::new(&cfg, &rope, a.seq_len, DType::F32, &device)?;
    let mut weights = Vec::new();
    let mut scales = Vec::new();
    // Step 1 (the grid search, on the CPU cores, as the pipeline runs it; unweighted, the
    // bench's activations being white) gives Step 2 its starting scales, and its time joins the
    // projection.
    let mut step1_s = 0.0;
    for name in BLOCK_LINEARS {
        let (r, c) = cfg.linear_shape(name);
        let layout = GroupLayout::new(r, c, a.group_size)?;
        let w = Tensor::randn(0f32, 0.02, (r, c), &device)?;
        let wv = w.flatten_all()?.to_vec1::<f32>()?;
        let t = Instant::now();
        let s = quantize_pot_step1(name, &wv, layout, a.bits, &Grid::default())?.scales;
        step1_s += t.elapsed().as_secs_f64();
        let ls = LearnedScales::new(&w, &s, layout, a.bits)?;
        scales.push(if a.weight_lr.is_some() { ls.with_trained_weights()? } else { ls });
        weights.push(w);
    }
    let fp = BlockWeights {
        attn_norm: Tensor::ones(a.hidden, DType::F32, &device)?,
        mlp_norm: Tensor::ones(a.hidden, DType::F32, &device)?,
        weights_t: weights.into_iter().map(|w| w.t()).collect::<candle_core::Result<Vec<_>>>()?.try_into().map_err(|_| anyhow::anyhow!("seven linears"))?,
        biases: Default::default(),
    };
    let inputs: Vec<Tensor> = (0..a.segments).map(|_| Tensor::randn(0f32, 1.0, (1, a.seq_len, a.hidden), &device)).collect::<candle_core::Result<_>>()?;
    sync(&device)?;

    let opts = Step2Options { epochs: a.epochs, weight_lr: a.weight_lr, tf32: a.tf32, bf16: a.bf16, ..Step2Options::paper(a.bits) };
    let pass_precision = Tf32Scope::set(opts.tensor_cores());
    // Timed warm: the first forward also compiles the graph's kernels and sets up cuBLAS.
    graph.forward(&fp, &inputs[0], None)?;
    sync(&device)?;
    let t = Instant::now();
    let targets: Vec<Tensor> = inputs.iter().map(|x| graph.forward(&fp, x, None).map(|y| y.detach())).collect::<Result<_>>()?;
    sync(&device)?;
    let pass_s = t.elapsed().as_secs_f64();
    drop(pass_precision);

    // Timed warm: the first evaluation also compiles the quantizer's kernel.
    training_loss(&graph, &fp, &scales, &inputs[..1], &targets[..1], &opts)?;
    sync(&device)?;
    let t = Instant::now();
    let loss0 = training_loss(&graph, &fp, &scales, &inputs, &targets, &opts)?;
    sync(&device)?;
    let loss_s = t.elapsed().as_secs_f64();

    let report = refine_block(&graph, &fp, &mut scales, &inputs, &targets, &opts)?;
    sync(&device)?;
    let profile = if a.profile_steps > 0 { Some(profile_steps(&graph, &fp, &mut scales, &inputs, &targets, &opts, a.profile_steps)?) } else { None };
    let refine_s = report.seconds;
    let epoch_s = ((refine_s - 2.0 * loss_s) / a.epochs as f64).max(0.0);
    let target_epochs = a.target_epochs.unwrap_or(Step2Options::paper(a.bits).epochs);
    let block_s = 2.0 * pass_s + 2.0 * loss_s + target_epochs as f64 * epoch_s;
    let total_s = a.blocks as f64 * block_s;
    let whole_s = a.blocks as f64 * (step1_s + block_s);
    let device_name = device_name(&device);
    if !a.json {
        println!(
            "Step 2 on {device_name}{}: block {}×{} (MLP {}), {} segments × {} tokens, {} bits: pass {pass_s:.2} s, loss {loss_s:.2} s, {} epochs {refine_s:.1} s ({epoch_s:.2} s/epoch); loss {loss0:.3e} → {:.3e}",
            match (a.bf16, a.tf32) {
                (true, _) => " (bf16 linear products, TF32 attention)",
                (false, true) => " (TF32 products)",
                _ => "",
            },
            a.hidden, a.heads, a.intermediate, a.segments, a.seq_len, a.bits, a.epochs, report.loss_after
        );
        println!("projected: {block_s:.1} s per block with {target_epochs} epochs, {:.1} min for {} blocks", total_s / 60.0, a.blocks);
        println!(
            "Step 1 (grid search on {} CPU threads): {step1_s:.2} s per block; Step 1 + Step 2: {:.1} min for {} blocks",
            rayon::current_num_threads(),
            whole_s / 60.0,
            a.blocks
        );
        if let Some(p) = profile {
            println!(
                "per step ({} steps): W̃ {:.1} ms, forward + loss {:.1} ms, backward {:.1} ms, Adam {:.1} ms",
                a.profile_steps,
                p.weights_s * 1e3,
                p.forward_s * 1e3,
                p.backward_s * 1e3,
                p.update_s * 1e3
            );
        }
    }
    print_json(&json!({
        "device": device_name, "hidden": a.hidden, "heads": a.heads, "intermediate": a.intermediate,
        "segments": a.segments, "seq_len": a.seq_len, "bits": a.bits, "tf32": a.tf32, "bf16": a.bf16, "weight_lr": a.weight_lr, "step_profile": profile, "group_size": a.group_size,
        "epochs_run": a.epochs, "stream_pass_s": pass_s, "loss_eval_s": loss_s, "refine_s": refine_s,
        "epoch_s": epoch_s, "loss_before": report.loss_before, "loss_after": report.loss_after,
        "epoch_losses": report.epoch_losses, "target_epochs": target_epochs,
        "projected_block_s": block_s, "blocks": a.blocks, "projected_total_s": total_s,
        "step1_block_s": step1_s, "step1_threads": rayon::current_num_threads(), "projected_step1_step2_s": whole_s,
    }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command end to end on a tiny block on the CPU (CI covers the 7B path's code), a
    /// short last group included.
    #[test]
    fn tiny_block_on_the_cpu() {
        let a = Step2Args {
            hidden: 64,
            heads: 4,
            intermediate: 128,
            segments: 2,
            seq_len: 8,
            bits: 3,
            group_size: 32,
            epochs: 2,
            target_epochs: None,
            blocks: 3,
            device: "cpu".into(),
            tf32: false,
            bf16: false,
            weight_lr: Some(1e-3),
            profile_steps: 2,
            json: true,
        };
        run(a).unwrap();
        assert!(run(Step2Args { device: "tpu".into(), ..tiny() }).is_err());
        // 64 columns in groups of 48 end in a short group of 16, as SmolLM2's 576 do at 128.
        run(Step2Args { group_size: 48, ..tiny() }).unwrap();
        let e = run(Step2Args { group_size: 12, ..tiny() }).unwrap_err();
        assert!(e.to_string().contains("group size 12 must be a positive multiple of 8"), "{e}");
        let e = run(Step2Args { tf32: true, ..tiny() }).unwrap_err();
        assert!(e.to_string().contains("--tf32 needs --device cuda"), "{e}");
        let e = run(Step2Args { bf16: true, ..tiny() }).unwrap_err();
        assert!(e.to_string().contains("--bf16 needs --device cuda"), "{e}");
    }

    fn tiny() -> Step2Args {
        Step2Args { hidden: 64, heads: 4, intermediate: 128, segments: 1, seq_len: 4, bits: 2, group_size: 32, epochs: 1, target_epochs: None, blocks: 1, device: "cpu".into(), tf32: false, bf16: false, weight_lr: None, profile_steps: 1, json: true }
    }
}

#[cfg(feature = "cuda")]
fn device_name(device: &Device) -> String {
    match device {
        Device::Cuda(d) => d.cuda_stream().context().name().unwrap_or_default(),
        _ => "cpu".to_string(),
    }
}

#[cfg(not(feature = "cuda"))]
fn device_name(_: &Device) -> String {
    "cpu".to_string()
}
