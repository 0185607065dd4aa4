//! Step 2: data-dependent refinement of the PoT scales, one block at a time.
//!
//! Each group learns a residual `Γ`, `ŝ = s ⊙ (1 + Γ)`, starting at 0 from the scales the block
//! was quantized with (Step 1's, `s0`, or GPTQ's). At every step the codes are recomputed from
//! `ŝ`, and the straight-through estimator treats them as constants: `W̃ = ŝ · P·2^E` with
//! `P·2^E` detached, so `∂W̃/∂ŝ = P·2^E`. The loss is the mean squared error between the
//! quantized block's output and the full-precision block's output on the calibration segments,
//! plus `(λ/2)‖Γ‖²`; Adam minimizes it.

use std::f64::consts::LN_2;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor, Var};
use potptq_quant::{pot, GroupLayout};
use serde::{Deserialize, Serialize};

use crate::adam::Adam;
use crate::graph::{mse, mse_with_grad, BlockGraph, BlockWeights};

/// How weight decay on `Γ` enters the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decay {
    /// `(λ/2)‖Γ‖²` added to the loss: Adam sees `∇ + λΓ` (the method as written).
    L2,
    /// AdamW's decoupled decay: `Γ ← Γ − lr·λ·Γ`, outside Adam's normalization.
    Decoupled,
}

/// How the learning rates change over a block's steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// The same rate at every step (the method as written).
    #[default]
    Constant,
    /// Half a cosine from the full rate down to zero at the block's last step, so that the
    /// final scales and weights settle instead of ending on a full-size step.
    Cosine,
}

impl Schedule {
    fn is_constant(&self) -> bool {
        *self == Schedule::Constant
    }

    /// The factor on the learning rates at `step` of `total`.
    pub fn factor(self, step: usize, total: usize) -> f64 {
        match self {
            Schedule::Constant => 1.0,
            Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total.max(1) as f64).cos()),
        }
    }
}

/// What the quantized block reads during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step2Input {
    /// The output of the already-quantized preceding blocks (the method as written).
    Quantized,
    /// The full-precision model's activations, as the FP block reads them.
    Fp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step2Options {
    pub epochs: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub decay: Decay,
    pub input: Step2Input,
    /// Calibration segments per Adam step.
    pub batch: usize,
    /// Also train the weights the codes are rounded from, with this Adam learning rate
    /// (straight-through: `∂W̃/∂W = 1`); `None` trains the scales alone, as the method states.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Schedule::is_constant")]
    pub schedule: Schedule,
    /// Keep the starting scales (and weights) of a block whose trained state fits its
    /// calibration output worse than the start did.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_better: bool,
    /// On a GPU, the f32 matrix products of the training and of the block passes that feed it
    /// (the FP block's outputs, the quantized block's) in TF32 on the tensor cores; GPTQ's
    /// Hessians and the second moments stay f32.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tf32: bool,
    /// On a GPU, the linears' products of the training in bf16 (inputs and outputs rounded to
    /// bf16, sums in f32), attention's and the block passes' in TF32.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bf16: bool,
}

impl Step2Options {
    /// Whether Step 2's f32 products (and its passes') run in TF32: with `tf32` or `bf16`.
    pub fn tensor_cores(&self) -> bool {
        self.tf32 || self.bf16
    }

    /// The method's defaults: Adam 1e-3, weight decay 0.1 in the loss, quantized inputs, one
    /// segment per step; 10 epochs at 3 and 4 bits, 40 at 2 bits.
    pub fn paper(bits: u8) -> Self {
        Self { epochs: if bits <= 2 { 40 } else { 10 }, lr: 1e-3, weight_decay: 0.1, decay: Decay::L2, input: Step2Input::Quantized, batch: 1, weight_lr: None, schedule: Schedule::Constant, keep_better: false, tf32: false, bf16: false }
    }

    pub fn check(&self) -> Result<()> {
        ensure!(self.epochs > 0, "Step 2 needs at least one epoch");
        ensure!(self.lr.is_finite() && self.lr > 0.0, "Step 2 learning rate must be positive (got {})", self.lr);
        ensure!(self.weight_decay.is_finite() && self.weight_decay >= 0.0, "Step 2 weight decay must be ≥ 0 (got {})", self.weight_decay);
        ensure!(self.batch > 0, "Step 2 needs at least one segment per step");
        if let Some(lr) = self.weight_lr {
            ensure!(lr.is_finite() && lr > 0.0, "Step 2 weight learning rate must be positive (got {lr})");
        }
        Ok(())
    }
}

/// The floor of `Γ`: a scale keeps at least a tenth of its starting value.
const MIN_GAMMA: f64 = -0.9;

/// The learnable scales of one linear, and the weights its codes are computed from.
pub struct LearnedScales {
    /// The weights the codes are rounded from, `[rows, cols]`: fixed, or trained.
    source: Source,
    /// The starting scales `s`, `[rows, groups]`.
    base: Tensor,
    gamma: Var,
    /// Column → its group, to spread group scales over columns when a ragged last group
    /// keeps the groups from tiling the rows.
    group_of_col: Tensor,
    /// `[rows, cols]`, the group size, and whether the groups tile every row exactly.
    dims: (usize, usize),
    group_size: usize,
    tiled: bool,
    qmax: f64,
    adam: Adam,
}

/// `Γ` (and trained weights) as a block's training started.
struct Start {
    gamma: Tensor,
    weight: Option<Tensor>,
}

/// `W`, held as `Wᵀ` `[cols, rows]`: the layout of `W̃ᵀ`, which the fused op reads in
/// place and a trained `W`'s straight-through gradient arrives in.
enum Source {
    Fixed { weight_t: Tensor },
    /// Moved by its own Adam.
    Trained { weight_t: Var, adam: Adam },
}

impl LearnedScales {
    /// `source` is `[rows, cols]` on the training device; `scales` are `s`, row-major
    /// `[rows, groups]`.
    pub fn new(source: &Tensor, scales: &[f32], layout: GroupLayout, bits: u8) -> Result<Self> {
        let device = source.device();
        let groups = layout.groups_per_row();
        ensure!(scales.len() == layout.rows * groups, "{} scales for {} groups", scales.len(), layout.rows * groups);
        let group_of_col: Vec<u32> = (0..layout.cols).map(|c| (c / layout.group_size) as u32).collect();
        let shape = (layout.rows, groups);
        Ok(Self {
            source: Source::Fixed { weight_t: source.t()?.contiguous()? },
            base: Tensor::from_slice(scales, shape, device)?.to_dtype(source.dtype())?,
            gamma: Var::zeros(shape, source.dtype(), device)?,
            group_of_col: Tensor::from_vec(group_of_col, layout.cols, device)?,
            dims: (layout.rows, layout.cols),
            group_size: layout.group_size,
            tiled: layout.cols.is_multiple_of(layout.group_size),
            qmax: pot::qmax(bits) as f64,
            adam: Adam::new(shape, source.dtype(), device)?,
        })
    }

    /// Trains the source weights too (see `Step2Options::weight_lr`).
    pub fn with_trained_weights(mut self) -> Result<Self> {
        if let Source::Fixed { weight_t } = &self.source {
            let adam = Adam::new(weight_t.dims2()?, weight_t.dtype(), weight_t.device())?;
            self.source = Source::Trained { weight_t: Var::from_tensor(&weight_t.copy()?)?, adam };
        }
        Ok(self)
    }

    /// `ŝ = s ⊙ (1 + Γ)`, `[rows, groups]`.
    pub fn scales(&self) -> Result<Tensor> {
        Ok(self.base.mul(&(self.gamma.as_tensor() + 1.0)?)?)
    }

    /// `W̃ᵀ` `[cols, rows]` (the layout `BlockWeights` multiplies by), `W̃ = ŝ · P·2^E`, with
    /// the codes `P·2^E` recomputed from `ŝ` and held constant in the backward pass, in
    /// `products`' dtype when given. With trained weights the rounding passes their gradient
    /// straight through: `W̃ = ŝ · P·2^E + (W − sg(W))`.
    pub fn weight_t(&self, products: Option<DType>) -> Result<Tensor> {
        let s = self.scales()?;
        if self.base.dtype() == DType::F32 {
            // One fused pass, the straight-through gradient included.
            let source = match &self.source {
                Source::Fixed { weight_t } => weight_t,
                Source::Trained { weight_t, .. } => weight_t.as_tensor(),
            };
            return Ok(crate::fakequant::pot_fake_quant_t(source, &s, self.group_size, self.qmax as u32, products.unwrap_or(DType::F32))?);
        }
        // The tensor-op form (f64, for gradient checks).
        let spread = self.spread(&s)?;
        let wt = self.levels(&spread.detach())?.broadcast_mul(&spread)?.reshape(self.dims)?.t()?;
        let wt = match &self.source {
            Source::Fixed { .. } => wt,
            Source::Trained { weight_t, .. } => (wt + (weight_t.as_tensor() - weight_t.as_tensor().detach())?)?,
        };
        Ok(match products {
            Some(dtype) => wt.to_dtype(dtype)?,
            None => wt,
        })
    }

    /// The weights the codes are rounded from, `[rows, cols]` (a view of trained ones),
    /// outside the graph.
    fn source_tensor(&self) -> Result<Tensor> {
        Ok(match &self.source {
            Source::Fixed { weight_t } => weight_t.t()?,
            Source::Trained { weight_t, .. } => weight_t.as_tensor().detach().t()?,
        })
    }

    /// Group scales `[rows, groups]` spread over the weights they scale: `[rows, groups, 1]`
    /// against the weights viewed as `[rows, groups, G]` when the groups tile the rows (a
    /// broadcast, whose gradient is a sum over each group), else `[rows, cols]` through the
    /// column → group index (whose gradient is an index-add, slow on a GPU).
    fn spread(&self, s: &Tensor) -> Result<Tensor> {
        Ok(if self.tiled { s.unsqueeze(2)? } else { s.index_select(&self.group_of_col, 1)? })
    }

    /// `[rows, cols]` weights in the shape `spread` pairs them with.
    fn grouped(&self, w: &Tensor) -> Result<Tensor> {
        let ((rows, cols), g) = (self.dims, self.group_size);
        Ok(if self.tiled { w.reshape((rows, cols / g, g))? } else { w.clone() })
    }

    /// `P·2^E`, `E = clamp(round(log2(|W| / s)), 0, q_max)`, for `s` from `spread`, in the shape
    /// of `grouped`.
    fn levels(&self, s: &Tensor) -> Result<Tensor> {
        let w = self.grouped(&self.source_tensor()?.contiguous()?)?;
        let (magnitude, sign) = (w.abs()?, sign_of(&w)?);
        let e = ((magnitude.broadcast_div(s)?.log()? / LN_2)?.round()?).clamp(0.0, self.qmax)?;
        // exp(E·ln 2) is within an ulp of 2^E; rounding makes it the exact integer.
        Ok((e * LN_2)?.exp()?.round()?.mul(&sign)?)
    }

    fn snapshot(&self) -> Result<Start> {
        let weight = match &self.source {
            Source::Trained { weight_t, .. } => Some(weight_t.as_tensor().copy()?),
            Source::Fixed { .. } => None,
        };
        Ok(Start { gamma: self.gamma.as_tensor().copy()?, weight })
    }

    fn restore(&mut self, start: Start) -> Result<()> {
        self.gamma.set(&start.gamma)?;
        if let (Source::Trained { weight_t, .. }, Some(w)) = (&mut self.source, start.weight) {
            weight_t.set(&w)?;
        }
        Ok(())
    }

    /// The weights the final codes are rounded from, row-major `[rows, cols]`.
    pub fn source_weights(&self) -> Result<Vec<f32>> {
        Ok(self.source_tensor()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// The refined scales, row-major `[rows, groups]`.
    pub fn final_scales(&self) -> Result<Vec<f32>> {
        Ok(self.scales()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    pub fn gamma(&self) -> Result<Vec<f32>> {
        Ok(self.gamma.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// `∂L/∂Γ`, and `∂L/∂Wᵀ` of trained weights, from `∂L/∂W̃ᵀ` (`grad`) at `W̃ᵀ` (`fake_t`,
    /// as `weight_t` made it from the current state).
    fn gradients(&self, fake_t: &Tensor, grad: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        if self.base.dtype() == DType::F32 {
            let d_scales = crate::fakequant::pot_fake_quant_t_scale_grad(grad, fake_t, &self.scales()?, self.group_size, self.qmax as u32)?;
            let d_weights = match self.source {
                Source::Trained { .. } => Some(crate::ops::cast::cast(grad, DType::F32)?),
                Source::Fixed { .. } => None,
            };
            // ŝ = s ⊙ (1 + Γ)
            return Ok((d_scales.mul(&self.base)?, d_weights));
        }
        // The tensor-op form (f64, for gradient checks): differentiate ⟨W̃ᵀ, grad⟩.
        let grads = self.weight_t(None)?.mul(&grad.detach())?.sum_all()?.backward()?;
        let d_gamma = grads.get(self.gamma.as_tensor()).context("Γ gets a gradient")?.clone();
        let d_weights = match &self.source {
            Source::Trained { weight_t, .. } => Some(grads.get(weight_t.as_tensor()).context("trained weights get a gradient")?.clone()),
            Source::Fixed { .. } => None,
        };
        Ok((d_gamma, d_weights))
    }

    /// One Adam step for `∂L/∂W̃ᵀ` (`grad`) at `W̃ᵀ` (`fake_t`), with the learning rates times
    /// `rate`.
    fn step(&mut self, fake_t: &Tensor, grad: &Tensor, opts: &Step2Options, rate: f64) -> Result<()> {
        let (mut g, d_weights) = self.gradients(fake_t, grad)?;
        if let (Source::Trained { weight_t, adam }, Some(lr), Some(d)) = (&mut self.source, opts.weight_lr, d_weights) {
            adam.apply_in_place(weight_t, &d, lr * rate, None)?;
        }
        let gamma = self.gamma.as_tensor();
        if opts.decay == Decay::L2 && opts.weight_decay > 0.0 {
            g = (g + (gamma * opts.weight_decay)?)?;
        }
        let lr = opts.lr * rate;
        if opts.decay == Decay::Decoupled && opts.weight_decay > 0.0 {
            // `Γ − lr·λ·Γ` of the Γ before the step: Adam's step does not depend on Γ.
            self.gamma.set(&(gamma * (1.0 - lr * opts.weight_decay))?)?;
        }
        // A scale may shrink, but never to zero or below (codes need log2(|w| / ŝ)).
        self.adam.apply_in_place(&self.gamma, &g, lr, Some(MIN_GAMMA))?;
        Ok(())
    }
}

/// `sign(W)`, +1 at zero.
fn sign_of(w: &Tensor) -> Result<Tensor> {
    Ok(((w.ge(0f64)?.to_dtype(w.dtype())? * 2.0)? - 1.0)?)
}

/// What Step 2 did to one block.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RefineReport {
    /// Mean block-output MSE of each epoch (the first is with the starting scales, as they move).
    pub epoch_losses: Vec<f64>,
    /// MSE with the starting scales and with the final ones, over all calibration batches.
    pub loss_before: f64,
    pub loss_after: f64,
    pub gamma: GammaStats,
    pub seconds: f64,
    /// The trained state was worse than the start and was dropped (`keep_better`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kept_start: bool,
}

/// The distribution of the learned `Γ` over every group of the block.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GammaStats {
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub mean_abs: f64,
}

impl GammaStats {
    pub fn of(values: &[f32]) -> Self {
        let n = values.len().max(1) as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        Self {
            mean,
            std: var.sqrt(),
            min: values.iter().fold(f64::INFINITY, |a, &v| a.min(v as f64)),
            max: values.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64)),
            mean_abs: values.iter().map(|&v| (v as f64).abs()).sum::<f64>() / n,
        }
    }
}

/// The block with the current quantized weights of `scales` (in `BLOCK_LINEARS` order), in
/// the dtype of `graph`'s products.
pub fn quantized_weights(graph: &BlockGraph, fp: &BlockWeights, scales: &[LearnedScales]) -> Result<BlockWeights> {
    let weights: Vec<Tensor> = scales.iter().map(|s| s.weight_t(graph.products())).collect::<Result<_>>()?;
    Ok(fp.with_weights_t(weights.try_into().map_err(|_| anyhow::anyhow!("a block has seven linears"))?))
}

/// Mean block-output MSE over `inputs` → `targets` with the current scales, no gradient.
pub fn block_loss(graph: &BlockGraph, fp: &BlockWeights, scales: &[LearnedScales], inputs: &[Tensor], targets: &[Tensor]) -> Result<f64> {
    // Detached weights: the forward passes record no graph.
    let w = quantized_weights(graph, fp, scales)?.detached();
    let mut sum = Tensor::zeros((), DType::F64, w.attn_norm.device())?;
    for (x, y) in inputs.iter().zip(targets) {
        sum = (sum + mse(&graph.forward(&w, x, None)?, y)?.to_dtype(DType::F64)?)?;
    }
    Ok(sum.to_scalar::<f64>()? / inputs.len().max(1) as f64)
}

/// `block_loss` as `refine_block` evaluates it: in the training's precision (`opts.tf32`,
/// `opts.bf16`).
pub fn training_loss(graph: &BlockGraph, fp: &BlockWeights, scales: &[LearnedScales], inputs: &[Tensor], targets: &[Tensor], opts: &Step2Options) -> Result<f64> {
    let _tf32 = Tf32Scope::set(opts.tensor_cores());
    block_loss(&training_graph(graph, opts), fp, scales, inputs, targets)
}

/// Seconds per Step 2 step, by phase (device synchronized between phases).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct StepProfile {
    /// `W̃` of the seven linears from the current scales (and weights).
    pub weights_s: f64,
    /// The block forward and the loss.
    pub forward_s: f64,
    pub backward_s: f64,
    /// The Adam updates.
    pub update_s: f64,
}

/// Runs `steps` training steps of `refine_block` on the first inputs and times their phases:
/// where a step's time goes, for `bench step2`. The steps train the scales as usual.
pub fn profile_steps(graph: &BlockGraph, fp: &BlockWeights, scales: &mut [LearnedScales], inputs: &[Tensor], targets: &[Tensor], opts: &Step2Options, steps: usize) -> Result<StepProfile> {
    opts.check()?;
    let device = inputs.first().context("no calibration inputs")?.device().clone();
    let _tf32 = Tf32Scope::set(opts.tensor_cores());
    let graph = &training_graph(graph, opts);
    let mut seconds = [0f64; 4];
    for (x, y) in inputs.iter().zip(targets).cycle().take(steps) {
        let mut t = Instant::now();
        train_step(graph, fp, scales, x, y, opts, 1.0, |phase| {
            device.synchronize()?;
            seconds[phase] += t.elapsed().as_secs_f64();
            t = Instant::now();
            Ok(())
        })?;
    }
    let [weights_s, forward_s, backward_s, update_s] = seconds.map(|s| s / steps.max(1) as f64);
    Ok(StepProfile { weights_s, forward_s, backward_s, update_s })
}

/// One training step on input `x` and target `y`, the learning rates times `rate`, in the
/// phases `StepProfile` times (`phase_done(i)` as phase `i` ends): the quantized weights from
/// the current state; the block's forward and the loss; the backward; Adam on every linear.
/// Returns the step's loss (before the update), on the device.
#[allow(clippy::too_many_arguments)]
fn train_step(
    graph: &BlockGraph,
    fp: &BlockWeights,
    scales: &mut [LearnedScales],
    x: &Tensor,
    y: &Tensor,
    opts: &Step2Options,
    rate: f64,
    mut phase_done: impl FnMut(usize) -> Result<()>,
) -> Result<Tensor> {
    let w = quantized_weights(graph, fp, scales)?.detached();
    phase_done(0)?;
    let (out, tape) = graph.forward_recorded(&w, x)?;
    let (loss, d_out) = mse_with_grad(&out, y)?;
    drop(out);
    phase_done(1)?;
    let grads = graph.backward(&w, &tape, &d_out)?;
    drop(tape);
    phase_done(2)?;
    for ((s, fake_t), g) in scales.iter_mut().zip(&w.weights_t).zip(&grads) {
        s.step(fake_t, g, opts, rate)?;
    }
    phase_done(3)?;
    Ok(loss)
}

/// The graph the training runs: `graph`, with the linears' products in bf16 if asked.
fn training_graph(graph: &BlockGraph, opts: &Step2Options) -> BlockGraph {
    if opts.bf16 { graph.with_products(DType::BF16) } else { graph.clone() }
}

/// candle's process-wide TF32 switch for f32 GPU products, set for one block's training (or
/// its passes) and put back as it was when that ends, however it ends.
pub struct Tf32Scope(bool);

impl Tf32Scope {
    pub fn set(on: bool) -> Self {
        let before = candle_core::cuda::gemm_reduced_precision_f32();
        candle_core::cuda::set_gemm_reduced_precision_f32(on);
        Self(before)
    }
}

impl Drop for Tf32Scope {
    fn drop(&mut self) {
        candle_core::cuda::set_gemm_reduced_precision_f32(self.0);
    }
}

/// Trains the scales of one block (`scales`, one per linear in `BLOCK_LINEARS` order) so that
/// the quantized block maps `inputs` to `targets`; batches are visited in order every epoch.
pub fn refine_block(
    graph: &BlockGraph,
    fp: &BlockWeights,
    scales: &mut [LearnedScales],
    inputs: &[Tensor],
    targets: &[Tensor],
    opts: &Step2Options,
) -> Result<RefineReport> {
    opts.check()?;
    let _tf32 = Tf32Scope::set(opts.tensor_cores());
    let graph = &training_graph(graph, opts);
    let start = Instant::now();
    let loss_before = block_loss(graph, fp, scales, inputs, targets)?;
    let starts: Vec<Start> = if opts.keep_better { scales.iter().map(|s| s.snapshot()).collect::<Result<_>>()? } else { Vec::new() };
    let mut epoch_losses = Vec::with_capacity(opts.epochs);
    let total_steps = opts.epochs * inputs.len();
    let mut step = 0;
    for _ in 0..opts.epochs {
        // Summed on the device and read once an epoch: a read each step would make the host
        // wait for the device before it queues the next step.
        let mut sum: Option<Tensor> = None;
        for (x, y) in inputs.iter().zip(targets) {
            let loss = train_step(graph, fp, scales, x, y, opts, opts.schedule.factor(step, total_steps), |_| Ok(()))?;
            step += 1;
            let loss = loss.to_dtype(DType::F64)?;
            sum = Some(match sum {
                Some(s) => (s + loss)?,
                None => loss,
            });
        }
        let sum = match sum {
            Some(s) => s.to_scalar::<f64>()?,
            None => 0.0,
        };
        let mean = sum / inputs.len().max(1) as f64;
        ensure!(mean.is_finite(), "Step 2 diverged (loss {mean}); lower the learning rate");
        epoch_losses.push(mean);
    }
    let mut loss_after = block_loss(graph, fp, scales, inputs, targets)?;
    let kept_start = opts.keep_better && loss_after > loss_before;
    if kept_start {
        for (s, start) in scales.iter_mut().zip(starts) {
            s.restore(start)?;
        }
        loss_after = block_loss(graph, fp, scales, inputs, targets)?;
    }
    let gamma: Vec<f32> = scales.iter().map(|s| s.gamma()).collect::<Result<Vec<_>>>()?.concat();
    Ok(RefineReport { epoch_losses, loss_before, loss_after, gamma: GammaStats::of(&gamma), seconds: start.elapsed().as_secs_f64(), kept_start })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use crate::graph::tests::tiny_model;
    use potptq_model::llama::BLOCK_LINEARS;
    use potptq_quant::{quantize_pot_step1, Grid};

    /// Step 1 scales for every linear of `block`, in `dtype`.
    fn learned(block: &potptq_model::llama::Block, cfg: &potptq_model::Config, bits: u8, group: usize, dtype: DType) -> Vec<LearnedScales> {
        BLOCK_LINEARS
            .iter()
            .map(|name| {
                let w = block.linear(name).unwrap().weight().unwrap();
                let (rows, cols) = cfg.linear_shape(name);
                let layout = GroupLayout::new(rows, cols, group).unwrap();
                let q = quantize_pot_step1(name, &w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), layout, bits, &Grid::default()).unwrap();
                LearnedScales::new(&w.to_dtype(dtype).unwrap(), &q.scales, layout, bits).unwrap()
            })
            .collect()
    }

    fn to_dtype(w: &BlockWeights, dtype: DType) -> BlockWeights {
        let conv = |t: &Tensor| t.to_dtype(dtype).unwrap();
        BlockWeights {
            attn_norm: conv(&w.attn_norm),
            mlp_norm: conv(&w.mlp_norm),
            weights_t: w.weights_t.clone().map(|t| conv(&t)),
            biases: w.biases.clone().map(|b| b.map(|t| conv(&t))),
        }
    }

    /// In the tensor-op form (f64), the broadcast spread (groups tiling the rows) and the index
    /// spread (ragged groups) give the same weights and the same scale and weight gradients, and
    /// they equal the fused f32 op's.
    #[test]
    fn broadcast_and_index_spreads_agree() {
        let (rows, cols, group) = (5, 96, 32);
        let w = Tensor::from_vec((0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3).collect::<Vec<_>>(), (rows, cols), &Device::Cpu).unwrap();
        let layout = GroupLayout::new(rows, cols, group).unwrap();
        let scales: Vec<f32> = (0..rows * 3).map(|i| 0.004 + 1e-4 * i as f32).collect();
        let probe = Tensor::from_vec((0..rows * cols).map(|i| ((i * 13 % 7) as f32) - 3.0).collect::<Vec<_>>(), (cols, rows), &Device::Cpu).unwrap();
        // dtype, and whether the groups may be spread by broadcast.
        let run = |dtype: DType, tiled: bool| {
            let mut ls = LearnedScales::new(&w.to_dtype(dtype).unwrap(), &scales, layout, 3).unwrap().with_trained_weights().unwrap();
            assert!(ls.tiled);
            ls.tiled = tiled;
            ls.gamma.set(&Tensor::from_vec((0..rows * 3).map(|i| 0.01 * i as f32).collect::<Vec<_>>(), (rows, 3), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()).unwrap();
            let wt = ls.weight_t(None).unwrap();
            let grads = (&wt * &probe.to_dtype(dtype).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
            let mut g: Vec<f64> = grads.get(ls.gamma.as_tensor()).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            // The trained weights' straight-through gradient after Γ's.
            let Source::Trained { weight_t, .. } = &ls.source else { unreachable!() };
            g.extend(grads.get(weight_t.as_tensor()).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap());
            (wt.to_dtype(DType::F64).unwrap().contiguous().unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap(), g)
        };
        let (w_b, g_b) = run(DType::F64, true);
        let (w_i, g_i) = run(DType::F64, false);
        let (w_f, g_f) = run(DType::F32, true);
        assert_eq!(g_b.len(), rows * 3 + rows * cols);
        assert_eq!(w_b, w_i);
        for ((a, b), f) in g_b.iter().zip(&g_i).zip(&g_f) {
            assert!((a - b).abs() <= 1e-9 * a.abs().max(1e-3), "{a} vs {b}");
            assert!((a - f).abs() <= 1e-4 * a.abs().max(1e-2), "f64 {a} vs fused f32 {f}");
        }
        for (a, f) in w_b.iter().zip(&w_f) {
            assert!((a - f).abs() <= 1e-6 * a.abs(), "f64 {a} vs fused f32 {f}");
        }
        assert!(g_b.iter().any(|g| g.abs() > 1e-4));
    }

    /// The STE gradient is the exact gradient of the loss with the codes frozen: compare the
    /// hand-written backward's with candle's autograd through the same graph, and with central
    /// differences of that function, in f64, for groups of every linear (the tiny qwen2: grouped
    /// KV heads, q/k/v biases).
    #[test]
    fn block_gradient_matches_autograd_and_finite_differences() {
        let model = tiny_model();
        let cfg = &model.config;
        let dtype = DType::F64;
        let graph = BlockGraph::new(cfg, &model.rope, 7, dtype, &Device::Cpu).unwrap();
        let block = &model.blocks[1];
        let fp = to_dtype(&BlockWeights::from_block(block, &Device::Cpu).unwrap(), dtype);
        let ids = Tensor::from_vec((0..14u32).map(|i| (i * 11 + 3) % 100).collect::<Vec<_>>(), (2, 7), &Device::Cpu).unwrap();
        let x = model.embed(&ids).unwrap().to_dtype(dtype).unwrap();
        let target = graph.forward(&fp, &x, None).unwrap();
        // Trained weights: their straight-through gradients are checked too.
        let mut scales: Vec<LearnedScales> = learned(block, cfg, 3, 32, dtype).into_iter().map(|s| s.with_trained_weights().unwrap()).collect();
        // Move Γ away from 0 so that every term of the product rule is exercised.
        for (i, s) in scales.iter_mut().enumerate() {
            let g = s.gamma.as_tensor();
            let shifted = (g.ones_like().unwrap() * (0.01 * (i as f64 + 1.0))).unwrap();
            s.gamma.set(&shifted).unwrap();
        }
        let autograd = mse(&graph.forward(&quantized_weights(&graph, &fp, &scales).unwrap(), &x, None).unwrap(), &target).unwrap().backward().unwrap();
        let w = quantized_weights(&graph, &fp, &scales).unwrap().detached();
        let (out, tape) = graph.forward_recorded(&w, &x).unwrap();
        let (_, d_out) = mse_with_grad(&out, &target).unwrap();
        let hand = graph.backward(&w, &tape, &d_out).unwrap();
        let values = |t: &Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let close = |a: &[f64], b: &[f64], what: &str| {
            assert_eq!(a.len(), b.len());
            let scale = a.iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{what}: zero gradient");
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-10 * scale, "{what}: hand-written {x} vs autograd {y}");
            }
        };
        let mut gammas = Vec::new();
        for (li, s) in scales.iter().enumerate() {
            let (d_gamma, d_weights) = s.gradients(&w.weights_t[li], &hand[li]).unwrap();
            close(&values(&d_gamma), &values(autograd.get(s.gamma.as_tensor()).unwrap()), &format!("{} Γ", BLOCK_LINEARS[li]));
            let Source::Trained { weight_t, .. } = &s.source else { unreachable!() };
            close(&values(&d_weights.unwrap()), &values(autograd.get(weight_t.as_tensor()).unwrap()), &format!("{} Wᵀ", BLOCK_LINEARS[li]));
            gammas.push(values(&d_gamma));
        }

        // The codes at the current Γ, frozen.
        let frozen: Vec<Tensor> = scales
            .iter()
            .map(|s| s.levels(&s.spread(&s.scales().unwrap()).unwrap()).unwrap())
            .collect();
        let loss_at = |scales: &[LearnedScales]| -> f64 {
            let weights: Vec<Tensor> = scales
                .iter()
                .zip(&frozen)
                .map(|(s, lv)| s.spread(&s.scales().unwrap()).unwrap().broadcast_mul(lv).unwrap().reshape(s.dims).unwrap().t().unwrap())
                .collect();
            let w = fp.with_weights_t(weights.try_into().unwrap());
            mse(&graph.forward(&w, &x, None).unwrap(), &target).unwrap().to_scalar::<f64>().unwrap()
        };
        // Central differences err by O(h²) and by rounding, O(ε·L/h): at h = 1e-5 both stay
        // below 1e-7 of the gradient here (at 1e-7, rounding alone reached 1e-5).
        let h = 1e-5;
        for (li, grad) in gammas.iter().enumerate() {
            let gamma0: Vec<f64> = values(scales[li].gamma.as_tensor());
            let shape = scales[li].gamma.as_tensor().shape().clone();
            for &k in &[0, gamma0.len() / 2, gamma0.len() - 1] {
                let at = |delta: f64| {
                    let mut g = gamma0.clone();
                    g[k] += delta;
                    scales[li].gamma.set(&Tensor::from_vec(g, shape.clone(), &Device::Cpu).unwrap()).unwrap();
                    loss_at(&scales)
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h);
                scales[li].gamma.set(&Tensor::from_vec(gamma0.clone(), shape.clone(), &Device::Cpu).unwrap()).unwrap();
                let err = (numeric - grad[k]).abs();
                assert!(err <= 1e-6 * numeric.abs().max(1e-6), "{} group {k}: hand-written {} vs finite difference {numeric}", BLOCK_LINEARS[li], grad[k]);
            }
        }
    }

    /// In f32, and with bf16 products, the fused quantizer's gradients from the hand-written
    /// backward agree with autograd through the same graph (in bf16, to its rounding: autograd
    /// sums the gate's and up's input gradients in bf16, the hand-written backward in f32).
    #[test]
    fn fused_gradients_match_autograd_in_f32_and_bf16() {
        let model = tiny_model();
        let cfg = &model.config;
        let graph = BlockGraph::new(cfg, &model.rope, 9, DType::F32, &Device::Cpu).unwrap();
        let block = &model.blocks[0];
        let fp = BlockWeights::from_block(block, &Device::Cpu).unwrap();
        let ids = Tensor::from_vec((0..18u32).map(|i| (i * 5 + 1) % 100).collect::<Vec<_>>(), (2, 9), &Device::Cpu).unwrap();
        let x = model.embed(&ids).unwrap();
        let target = graph.forward(&fp, &x, None).unwrap();
        for (graph, tolerance) in [(graph.clone(), 1e-4), (graph.with_products(DType::BF16), 2e-2)] {
            let scales: Vec<LearnedScales> = learned(block, cfg, 3, 32, DType::F32).into_iter().map(|s| s.with_trained_weights().unwrap()).collect();
            let autograd = mse(&graph.forward(&quantized_weights(&graph, &fp, &scales).unwrap(), &x, None).unwrap(), &target).unwrap().backward().unwrap();
            let w = quantized_weights(&graph, &fp, &scales).unwrap().detached();
            let (out, tape) = graph.forward_recorded(&w, &x).unwrap();
            let hand = graph.backward(&w, &tape, &mse_with_grad(&out, &target).unwrap().1).unwrap();
            for (li, s) in scales.iter().enumerate() {
                assert_eq!(hand[li].dtype(), graph.products().unwrap_or(DType::F32));
                let (d_gamma, d_weights) = s.gradients(&w.weights_t[li], &hand[li]).unwrap();
                let Source::Trained { weight_t, .. } = &s.source else { unreachable!() };
                for (ours, theirs) in [(d_gamma, s.gamma.as_tensor()), (d_weights.unwrap(), weight_t.as_tensor())] {
                    let theirs = autograd.get(theirs).unwrap();
                    let scale = theirs.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(scale > 0.0 && diff <= tolerance * scale, "{} {:?}: differs by {diff} of {scale}", BLOCK_LINEARS[li], graph.products());
                }
            }
        }
    }

    #[test]
    fn training_lowers_the_block_loss() {
        let model = tiny_model();
        let cfg = &model.config;
        let graph = BlockGraph::new(cfg, &model.rope, 16, DType::F32, &Device::Cpu).unwrap();
        let block = &model.blocks[0];
        let fp = BlockWeights::from_block(block, &Device::Cpu).unwrap();
        let inputs: Vec<Tensor> = (0..4u32)
            .map(|b| {
                let ids = Tensor::from_vec((0..16u32).map(|i| (i * 13 + b * 29) % 100).collect::<Vec<_>>(), (1, 16), &Device::Cpu).unwrap();
                model.embed(&ids).unwrap()
            })
            .collect();
        let targets: Vec<Tensor> = inputs.iter().map(|x| graph.forward(&fp, x, None).unwrap()).collect();
        let mut scales = learned(block, cfg, 2, 32, DType::F32);
        let opts = Step2Options { epochs: 30, lr: 5e-3, weight_decay: 0.0, decay: Decay::L2, input: Step2Input::Quantized, batch: 1, weight_lr: None, schedule: Schedule::Constant, keep_better: false, tf32: false, bf16: false };
        let report = refine_block(&graph, &fp, &mut scales, &inputs, &targets, &opts).unwrap();
        assert_eq!(report.epoch_losses.len(), 30);
        assert!(report.loss_after < 0.9 * report.loss_before, "{} → {}", report.loss_before, report.loss_after);
        assert!(report.gamma.mean_abs > 0.0);

        // Training the weights as well fits the block better still.
        let mut trained: Vec<LearnedScales> = learned(block, cfg, 2, 32, DType::F32).into_iter().map(|s| s.with_trained_weights().unwrap()).collect();
        let before: Vec<Vec<f32>> = trained.iter().map(|s| s.source_weights().unwrap()).collect();
        let with_weights = Step2Options { weight_lr: Some(1e-3), ..opts.clone() };
        let report_w = refine_block(&graph, &fp, &mut trained, &inputs, &targets, &with_weights).unwrap();
        assert!(report_w.loss_after < report.loss_after, "{} with weights vs {} without", report_w.loss_after, report.loss_after);
        assert!(trained.iter().zip(&before).any(|(s, b)| s.source_weights().unwrap() != *b), "the weights moved");

        // A run that ends worse than it started keeps the start when asked to.
        let mut scales = learned(block, cfg, 2, 32, DType::F32);
        let wild_kept = Step2Options { lr: 5.0, epochs: 2, keep_better: true, ..opts.clone() };
        let kept = refine_block(&graph, &fp, &mut scales, &inputs, &targets, &wild_kept).unwrap();
        assert!(kept.kept_start, "a learning rate of 5 ends worse: {} → {}", kept.loss_before, kept.loss_after);
        assert_eq!(kept.loss_after, kept.loss_before);
        assert!(scales.iter().all(|s| s.gamma().unwrap().iter().all(|&g| g == 0.0)));

        // The cosine schedule starts at the full rate and ends near zero.
        assert_eq!(Schedule::Cosine.factor(0, 10), 1.0);
        assert!(Schedule::Cosine.factor(9, 10) < 0.03 && (Schedule::Cosine.factor(5, 10) - 0.5).abs() < 1e-12);

        // A learning rate far too large still leaves every scale positive.
        let wild = Step2Options { lr: 5.0, epochs: 3, ..opts };
        let mut scales = learned(block, cfg, 2, 32, DType::F32);
        let _ = refine_block(&graph, &fp, &mut scales, &inputs, &targets, &wild);
        for s in &scales {
            assert!(s.gamma().unwrap().iter().all(|&g| g >= MIN_GAMMA as f32));
            assert!(s.final_scales().unwrap().iter().all(|&x| x > 0.0));
        }
    }
}
