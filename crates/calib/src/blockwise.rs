//! The quantization pipeline, one transformer block at a time.
//!
//! For each block in order: quantize its linears (from the weights alone, or by GPTQ on the
//! block's calibration inputs), optionally refine the PoT scales with Step 2, then run the
//! quantized block to produce the next block's inputs. GPTQ follows its sequential recipe:
//! q/k/v, then o, then gate/up, then down, each stage's Hessian taken through the block with
//! the stages before it already quantized. Memory holds one block's activations, never the
//! whole model's. With a state directory every finished block is saved, and a rerun resumes.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use potptq_model::checkpoint::through_f16;
use potptq_model::llama::{Block, Model, Stage, BLOCK_LINEARS};
use potptq_model::Config;
use potptq_quant::{gptq, gptq_with_inputs, quantize_pot_step1, quantize_pot_step1_weighted, quantize_pot_with_scales, quantize_rtn, GptqOptions, Grid, GroupLayout, Hessian, QTensor};

use crate::graph::{embed_batches, BlockGraph, BlockWeights};
use crate::methods::{Init, Method, Variant};
use crate::rotate::rotate_model;
use crate::state::RunState;
use crate::step2::{refine_block, LearnedScales, RefineReport, Step2Input, Step2Options, Tf32Scope};

#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub method: Method,
    /// Rotate the residual stream (with this seed) before quantizing.
    pub rotate: Option<u64>,
    /// Step 1 weighted by the input's second moments.
    pub weighted_step1: bool,
    pub bits: u8,
    pub group_size: usize,
    pub grid: Grid,
    pub gptq: GptqOptions,
    /// Calibration segments per forward pass of GPTQ's Hessian collection.
    pub batch: usize,
    /// Used by the methods that refine scales.
    pub step2: Step2Options,
    /// Where Step 2 (and the activations it reads) runs.
    pub device: Device,
    /// Stop with an error after this many blocks are saved (to test resuming).
    pub stop_after_blocks: Option<usize>,
}

impl QuantizeOptions {
    /// Options with the method's defaults, on the CPU.
    pub fn new(method: Method, bits: u8, group_size: usize) -> Self {
        Self {
            method,
            rotate: None,
            weighted_step1: false,
            bits,
            group_size,
            grid: Grid::default(),
            gptq: GptqOptions::default(),
            batch: 4,
            step2: Step2Options::paper(bits),
            device: Device::Cpu,
            stop_after_blocks: None,
        }
    }

    pub fn variant(&self) -> Variant {
        Variant { method: self.method, rotate: self.rotate.is_some(), weighted_step1: self.weighted_step1, train_weights: self.step2.weight_lr.is_some() }
    }

    fn uses_data(&self) -> bool {
        self.variant().uses_data()
    }

    /// Everything that decides the result, for a resumable state: a rerun must match it.
    pub fn identity(&self, model: &str, calib: Option<&[Vec<u32>]>) -> serde_json::Value {
        let m = self.method;
        let calib_hash = calib.map(|c| {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            for seg in c {
                h.update((seg.len() as u64).to_le_bytes());
                for t in seg {
                    h.update(t.to_le_bytes());
                }
            }
            format!("{:x}", h.finalize())
        });
        let mut id = serde_json::json!({
            "model": model,
            "method": m.name(),
            "bits": self.bits,
            "group_size": self.group_size,
            "calibration_sha256": if self.uses_data() { calib_hash } else { None },
            "rotate": self.rotate,
            "weighted_step1": self.weighted_step1,
        });
        if m.init() == Init::Step1 || (m.init() == Init::Gptq && !m.format().is_int()) {
            id["grid"] = serde_json::json!([self.grid.lo, self.grid.hi, self.grid.points]);
        }
        if m.init() == Init::Gptq {
            id["gptq"] = serde_json::json!({ "damp": self.gptq.damp, "block": self.gptq.block, "act_order": self.gptq.act_order });
            if !m.refines() {
                id["batch"] = self.batch.into();
            }
        }
        if m.refines() {
            id["step2"] = serde_json::to_value(&self.step2).expect("plain options");
            id["device"] = if self.device.is_cpu() { "cpu" } else { "gpu" }.into();
        }
        id
    }
}

pub struct QuantizedModel {
    /// The model as it evaluates: dequantized linears, embeddings through f16 as stored.
    pub model: Model,
    /// Every block linear, by `model.layers.{i}.{linear}`.
    pub tensors: HashMap<String, QTensor>,
    pub blocks: Vec<BlockSummary>,
    pub seconds: f64,
}

/// What happened to one block.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BlockSummary {
    pub block: usize,
    /// Seconds spent on it (0 when loaded from a saved state).
    pub seconds: f64,
    pub resumed: bool,
    pub refine: Option<RefineReport>,
}

impl QuantizedModel {
    pub fn clamped_scales(&self) -> usize {
        self.tensors.values().map(|q| q.clamped_scales).sum()
    }

    /// Bits per weight over all quantized linears, scales (and zero-points) included.
    pub fn bits_per_weight(&self) -> f64 {
        let (bits, weights) = self.tensors.values().fold((0.0, 0.0), |(b, w), q| {
            let n = (q.layout.rows * q.layout.cols) as f64;
            (b + q.bits_per_weight() * n, w + n)
        });
        bits / weights
    }
}

fn weight_of(block: &Block, linear: &str) -> Result<Vec<f32>> {
    Ok(block.linear(linear).context("block linear")?.weight()?.flatten_all()?.to_vec1::<f32>()?)
}

fn set_weight(block: &mut Block, linear: &str, q: &QTensor) -> Result<()> {
    let w = Tensor::from_vec(q.dequantize(), (q.layout.rows, q.layout.cols), &Device::Cpu)?;
    block.linear_mut(linear).context("block linear")?.set_weight(w);
    Ok(())
}

/// The name and group layout of every linear of block `i`.
fn block_layouts(cfg: &Config, i: usize, group_size: usize) -> Result<Vec<(String, GroupLayout)>> {
    BLOCK_LINEARS
        .iter()
        .map(|linear| {
            let (rows, cols) = cfg.linear_shape(linear);
            Ok((format!("model.layers.{i}.{linear}"), GroupLayout::new(rows, cols, group_size)?))
        })
        .collect()
}

/// The activations the pipeline carries from block to block.
enum Streams {
    /// Data-free methods carry none.
    None,
    /// GPTQ: the quantized model's activations through the inference forward, on the CPU.
    Inference(Vec<Tensor>),
    /// Step 2: the FP model's activations and (unless it trains on FP inputs) the quantized
    /// model's, through the differentiable graph on the training device.
    Graph { graph: BlockGraph, fp: Vec<Tensor>, quantized: Option<Vec<Tensor>>, targets: Option<Vec<Tensor>> },
}

impl Streams {
    fn new(model: &Model, opts: &QuantizeOptions, calib: Option<&[Vec<u32>]>) -> Result<Self> {
        if !opts.uses_data() {
            return Ok(Streams::None);
        }
        let segments = calib.context("this method needs calibration data")?;
        if !opts.method.refines() {
            return Ok(Streams::Inference(embed_batches(model, segments, opts.batch, &Device::Cpu)?));
        }
        let len = segments[0].len();
        let graph = BlockGraph::new(&model.config, &model.rope, len, DType::F32, &opts.device)?;
        let fp = embed_batches(model, segments, opts.step2.batch, &opts.device)?;
        let quantized = (opts.step2.input == Step2Input::Quantized).then(|| fp.clone());
        Ok(Streams::Graph { graph, fp, quantized, targets: None })
    }

    /// The Hessian of `stage`'s input over the calibration activations, through `block` as it
    /// is now (its earlier stages already quantized).
    fn hessian(&self, block: &Block, model: &Model, stage: Stage) -> Result<Hessian> {
        let cols = model.config.linear_shape(stage.linears()[0]).1;
        let mut h = Hessian::new(cols);
        match self {
            Streams::None => bail!("GPTQ needs calibration activations"),
            Streams::Inference(xs) => {
                for x in xs {
                    let v = block.stage_input(&model.config, &model.rope, x, stage)?.flatten_all()?.to_vec1::<f32>()?;
                    h.add(&v, v.len() / cols);
                }
            }
            Streams::Graph { graph, fp, quantized, .. } => {
                let w = BlockWeights::from_block(block, fp[0].device())?;
                for x in quantized.as_ref().unwrap_or(fp) {
                    let input = graph.forward(&w, x, Some(stage))?;
                    let tokens = input.elem_count() / cols;
                    let flat = input.reshape((tokens, cols))?;
                    let gram = flat.t()?.matmul(&flat)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
                    h.add_gram(&gram, tokens);
                }
            }
        }
        Ok(h)
    }

    /// Moves the activations past block `i`: through the FP block and the quantized one (Step 2's
    /// passes with its products' precision, `Step2Options::tensor_cores`).
    fn advance(&mut self, model: &Model, fp_block: &Block, quantized_block: &Block, step2: &Step2Options) -> Result<()> {
        match self {
            Streams::None => {}
            Streams::Inference(xs) => {
                for x in xs.iter_mut() {
                    *x = quantized_block.forward(&model.config, &model.rope, x, 0, None)?;
                }
            }
            Streams::Graph { graph, fp, quantized, targets } => {
                let _tf32 = Tf32Scope::set(step2.tensor_cores());
                let device = fp[0].device().clone();
                *fp = match targets.take() {
                    Some(t) => t,
                    None => fp_outputs(graph, &BlockWeights::from_block(fp_block, &device)?, fp)?,
                };
                if let Some(xs) = quantized {
                    let w = BlockWeights::from_block(quantized_block, &device)?;
                    for x in xs.iter_mut() {
                        *x = graph.forward(&w, x, None)?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn fp_outputs(graph: &BlockGraph, fp_weights: &BlockWeights, xs: &[Tensor]) -> Result<Vec<Tensor>> {
    xs.iter().map(|x| graph.forward(fp_weights, x, None)).collect()
}

/// Quantizes every block linear of `fp` with `opts.method`. `calib` (token segments, all of one
/// length) is needed by the methods that use data. With `state`, finished blocks are saved
/// there and a rerun continues after the last saved one. `progress` sees each block as it ends.
pub fn quantize_model(
    fp: &Model,
    opts: &QuantizeOptions,
    calib: Option<&[Vec<u32>]>,
    state: Option<&RunState>,
    mut progress: impl FnMut(&BlockSummary, usize),
) -> Result<QuantizedModel> {
    potptq_quant::qtensor::check_bits(opts.method.format(), opts.bits)?;
    if opts.method.refines() {
        opts.step2.check()?;
    }
    let start = Instant::now();
    let rotated;
    let fp = match opts.rotate {
        Some(seed) => {
            rotated = rotate_model(fp, seed)?;
            &rotated
        }
        None => fp,
    };
    let mut model = fp.clone();
    model.embed_tokens = through_f16(&fp.embed_tokens)?;
    if let Some(h) = &fp.lm_head {
        model.lm_head = Some(through_f16(h)?);
    }
    let n_blocks = model.blocks.len();
    let mut streams = Streams::new(&model, opts, calib)?;
    let finished = state.map_or(0, |s| s.finished_blocks(n_blocks));
    let mut tensors = HashMap::new();
    let mut summaries = Vec::with_capacity(n_blocks);

    for i in 0..n_blocks {
        let block_start = Instant::now();
        let layouts = block_layouts(&model.config, i, opts.group_size)?;
        let resumed = i < finished;
        let (quantized, refine) = if resumed {
            let saved = state.expect("finished blocks come from a state").load_block(i, &layouts, opts.method.format(), opts.bits)?;
            (saved.tensors, saved.refine)
        } else {
            quantize_block(&model, i, &layouts, &mut streams, opts)?
        };
        let mut block = model.blocks[i].clone();
        for ((_, q), linear) in quantized.iter().zip(BLOCK_LINEARS) {
            set_weight(&mut block, linear, q)?;
        }
        streams.advance(&model, &fp.blocks[i], &block, &opts.step2)?;
        model.blocks[i] = block;
        if let (Some(s), false) = (state, resumed) {
            s.save_block(i, &quantized, refine.as_ref())?;
        }
        tensors.extend(quantized);
        let summary = BlockSummary { block: i, seconds: if resumed { 0.0 } else { block_start.elapsed().as_secs_f64() }, resumed, refine };
        progress(&summary, n_blocks);
        summaries.push(summary);
        // Only a block this run quantized stops it, so each rerun gets one block further.
        if opts.stop_after_blocks == Some(i + 1) && !resumed && i + 1 < n_blocks {
            bail!("stopped after {} blocks, as asked (--stop-after-blocks); run again to resume", i + 1);
        }
    }
    Ok(QuantizedModel { model, tensors, blocks: summaries, seconds: start.elapsed().as_secs_f64() })
}

/// Quantizes block `i` of `model` (still full precision there) and, for the methods that
/// refine, trains its scales. Returns the linears in `BLOCK_LINEARS` order.
fn quantize_block(
    model: &Model,
    i: usize,
    layouts: &[(String, GroupLayout)],
    streams: &mut Streams,
    opts: &QuantizeOptions,
) -> Result<(Vec<(String, QTensor)>, Option<RefineReport>)> {
    let fp_block = &model.blocks[i];
    let mut block = fp_block.clone();
    let (format, bits) = (opts.method.format(), opts.bits);
    let mut quantized = Vec::with_capacity(layouts.len());
    // What GPTQ rounded each linear from (its weights plus the feedback), kept only for Step 2
    // to train.
    let train_weights = opts.method.refines() && opts.step2.weight_lr.is_some();
    let mut gptq_inputs: Vec<Vec<f32>> = Vec::new();
    let staged = opts.method.init() == Init::Gptq || opts.weighted_step1;
    if staged {
        // GPTQ's sequential recipe: each stage's input taken through the stages before it,
        // already quantized; stages run in `BLOCK_LINEARS` order. Weighted Step 1 uses only the
        // Hessian's diagonal, the input's second moments.
        for stage in Stage::ALL {
            let hessian = streams.hessian(&block, model, stage)?;
            let moments = (opts.method.init() == Init::Step1).then(|| hessian.diag());
            for linear in stage.linears() {
                let (name, layout) = &layouts[BLOCK_LINEARS.iter().position(|l| l == linear).expect("block linear")];
                let w = weight_of(&block, linear)?;
                let q = match &moments {
                    Some(moments) => quantize_pot_step1_weighted(name, &w, *layout, bits, &opts.grid, moments)?,
                    None => {
                        let gptq_opts = GptqOptions { weighted_scales: opts.weighted_step1, ..opts.gptq.clone() };
                        if train_weights {
                            let (q, inputs) = gptq_with_inputs(name, &w, *layout, &hessian, format, bits, &opts.grid, &gptq_opts)?;
                            gptq_inputs.push(inputs);
                            q
                        } else {
                            gptq(name, &w, *layout, &hessian, format, bits, &opts.grid, &gptq_opts)?
                        }
                    }
                };
                set_weight(&mut block, linear, &q)?;
                quantized.push((name.clone(), q));
            }
        }
    } else {
        for ((name, layout), linear) in layouts.iter().zip(BLOCK_LINEARS) {
            let w = weight_of(&block, linear)?;
            let q = match opts.method.init() {
                Init::Step1 => quantize_pot_step1(name, &w, *layout, bits, &opts.grid)?,
                _ => quantize_rtn(name, &w, *layout, format, bits)?,
            };
            set_weight(&mut block, linear, &q)?;
            quantized.push((name.clone(), q));
        }
    }
    if !opts.method.refines() {
        return Ok((quantized, None));
    }

    let Streams::Graph { graph, fp, quantized: quantized_xs, targets } = streams else {
        bail!("Step 2 needs calibration activations");
    };
    let device = fp[0].device().clone();
    let fp_weights = BlockWeights::from_block(fp_block, &device)?;
    let fp_out = {
        let _tf32 = Tf32Scope::set(opts.step2.tensor_cores());
        fp_outputs(graph, &fp_weights, fp)?
    };
    // Codes are recomputed from the FP weights, or, after GPTQ, from its updated weights (whose
    // codes the refined scales then keep: a scale moves far less than the √2 it takes to flip one).
    // Trained weights start from what GPTQ rounded (its codes at Γ = 0, and free to move).
    let sources: Vec<Vec<f32>> = if train_weights && opts.method.init() == Init::Gptq {
        gptq_inputs
    } else {
        let source = if opts.method.init() == Init::Gptq { &block } else { fp_block };
        BLOCK_LINEARS.iter().map(|l| weight_of(source, l)).collect::<Result<_>>()?
    };
    let mut scales: Vec<LearnedScales> = quantized
        .iter()
        .zip(&sources)
        .map(|((_, q), w)| {
            let w = Tensor::from_slice(w, (q.layout.rows, q.layout.cols), &device)?;
            let s = LearnedScales::new(&w, &q.scales, q.layout, bits)?;
            if train_weights {
                s.with_trained_weights()
            } else {
                Ok(s)
            }
        })
        .collect::<Result<_>>()?;
    let inputs = quantized_xs.as_ref().unwrap_or(fp);
    let report = refine_block(graph, &fp_weights, &mut scales, inputs, &fp_out, &opts.step2)?;
    let refined = quantized
        .iter()
        .zip(sources)
        .zip(&scales)
        .map(|(((name, q), w), s)| {
            let w = if train_weights { s.source_weights()? } else { w };
            Ok((name.clone(), quantize_pot_with_scales(name, &w, q.layout, bits, &s.final_scales()?)?))
        })
        .collect::<Result<Vec<_>>>()?;
    *targets = Some(fp_out);
    Ok((refined, Some(report)))
}
