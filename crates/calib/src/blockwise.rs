//! The quantization pipeline, one transformer block at a time.
//!
//! Data-free methods quantize each linear from its weights alone. Methods that use data follow
//! GPTQ's sequential recipe: the calibration segments are embedded once; for each block, the
//! inputs of its linears are captured (q/k/v, then o, then gate/up, then down, each stage seeing
//! the already-quantized stages before it, the block run only as far as the stage), a Hessian is built from them, the linears are
//! quantized, and the quantized block produces the next block's inputs. Memory holds one
//! block's activations, never the whole model's.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use potptq_model::checkpoint::through_f16;
use potptq_model::llama::{Block, Model, Stage, BLOCK_LINEARS};
use potptq_model::Config;
use potptq_quant::{gptq, quantize_pot_step1, quantize_rtn, GptqOptions, Grid, GroupLayout, Hessian, QTensor};

use crate::methods::Method;

#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub method: Method,
    pub bits: u8,
    pub group_size: usize,
    pub grid: Grid,
    pub gptq: GptqOptions,
    /// Calibration segments per forward pass.
    pub batch: usize,
}

pub struct QuantizedModel {
    /// The model as it evaluates: dequantized linears, embeddings through f16 as stored.
    pub model: Model,
    /// Every block linear, by `model.layers.{i}.{linear}`.
    pub tensors: HashMap<String, QTensor>,
    pub seconds: f64,
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
    Ok(block.linear(linear).context("block linear")?.weight.flatten_all()?.to_vec1::<f32>()?)
}

fn set_weight(block: &mut Block, linear: &str, q: &QTensor) -> Result<()> {
    let w = Tensor::from_vec(q.dequantize(), (q.layout.rows, q.layout.cols), &Device::Cpu)?;
    block.linear_mut(linear).context("block linear")?.weight = w;
    Ok(())
}

fn quantize_data_free(name: &str, w: &[f32], layout: GroupLayout, opts: &QuantizeOptions) -> Result<QTensor> {
    match opts.method {
        Method::RtnInt | Method::RtnIntSym | Method::PotRtn => quantize_rtn(name, w, layout, opts.method.format(), opts.bits),
        Method::PotS1 => quantize_pot_step1(name, w, layout, opts.bits, &opts.grid),
        Method::GptqInt | Method::GptqIntSym | Method::PotGptq => unreachable!("data-aware methods go through GPTQ"),
    }
}

/// Quantizes every block linear of `fp` with `opts.method`. `calib` (token segments) is needed
/// by the methods that use data. `progress(block, blocks)` is called after each block.
pub fn quantize_model(
    fp: &Model,
    opts: &QuantizeOptions,
    calib: Option<&[Vec<u32>]>,
    mut progress: impl FnMut(usize, usize),
) -> Result<QuantizedModel> {
    potptq_quant::qtensor::check_bits(opts.method.format(), opts.bits)?;
    let start = Instant::now();
    let mut model = fp.clone();
    model.embed_tokens = through_f16(&fp.embed_tokens)?;
    if let Some(h) = &fp.lm_head {
        model.lm_head = Some(through_f16(h)?);
    }
    let cfg: Config = model.config.clone();
    let mut tensors = HashMap::new();
    let n_blocks = model.blocks.len();

    let mut activations = if opts.method.uses_data() {
        let segments = calib.context("this method needs calibration data")?;
        let mut batches = Vec::new();
        for chunk in segments.chunks(opts.batch.max(1)) {
            let len = chunk[0].len();
            let flat: Vec<u32> = chunk.concat();
            let ids = Tensor::from_vec(flat, (chunk.len(), len), &Device::Cpu)?;
            batches.push(model.embed(&ids)?);
        }
        Some(batches)
    } else {
        None
    };

    progress(0, n_blocks);
    for i in 0..n_blocks {
        let mut block = model.blocks[i].clone();
        match activations.as_mut() {
            None => {
                for linear in BLOCK_LINEARS {
                    let name = format!("model.layers.{i}.{linear}");
                    let (rows, cols) = cfg.linear_shape(linear);
                    let layout = GroupLayout::new(rows, cols, opts.group_size)?;
                    let q = quantize_data_free(&name, &weight_of(&block, linear)?, layout, opts)?;
                    set_weight(&mut block, linear, &q)?;
                    tensors.insert(name, q);
                }
            }
            Some(xs) => {
                for stage in Stage::ALL {
                    let hessian = stage_hessian(&block, &cfg, &model, xs, stage)?;
                    for linear in stage.linears() {
                        let name = format!("model.layers.{i}.{linear}");
                        let (rows, cols) = cfg.linear_shape(linear);
                        let layout = GroupLayout::new(rows, cols, opts.group_size)?;
                        let w = weight_of(&block, linear)?;
                        let q = gptq(&name, &w, layout, &hessian, opts.method.format(), opts.bits, &opts.grid, &opts.gptq)?;
                        set_weight(&mut block, linear, &q)?;
                        tensors.insert(name, q);
                    }
                }
                for x in xs.iter_mut() {
                    *x = block.forward(&cfg, &model.rope, x, 0, None)?;
                }
            }
        }
        model.blocks[i] = block;
        progress(i + 1, n_blocks);
    }
    Ok(QuantizedModel { model, tensors, seconds: start.elapsed().as_secs_f64() })
}

/// The Hessian of `stage`'s input over all calibration batches, through `block` as it is now
/// (its earlier stages already quantized).
fn stage_hessian(block: &Block, cfg: &Config, model: &Model, xs: &[Tensor], stage: Stage) -> Result<Hessian> {
    let cols = cfg.linear_shape(stage.linears()[0]).1;
    let mut h = Hessian::new(cols);
    for x in xs {
        let input = block.stage_input(cfg, &model.rope, x, stage)?;
        let v = input.flatten_all()?.to_vec1::<f32>()?;
        h.add(&v, v.len() / cols);
    }
    Ok(h)
}
