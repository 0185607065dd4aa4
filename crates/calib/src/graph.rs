//! A transformer block as a differentiable candle graph, on any device, and its backward pass
//! written out by hand.
//!
//! The inference forward (`potptq_model::llama`) uses ops that candle cannot differentiate: the
//! fused rms-norm and rope, and a CPU attention kernel. Step 2 needs gradients through the
//! block, on a GPU as well, so this forward is built from ops that have them: the fused
//! rms-norm, rope, causal softmax and MLP gate of `ops`, and matrix products. It computes the same
//! function as `Block::forward` (a test checks it).
//!
//! Step 2 trains through `BlockGraph::backward`, the chain rule over the forward's tape: it
//! needs only the linear weights' gradients, so it skips what candle's autograd would also do
//! (the gradient of the block's input through the first linears and norm, and a zeroed buffer
//! added into for every gradient), which took half of a training step. The autograd graph
//! remains the reference the tests compare it with.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use potptq_model::llama::{Block, Rope, Stage, BLOCK_LINEARS};
use potptq_model::Config;

use crate::ops::cast::cast;
use crate::ops::rms_norm::{rms_norm, rms_norm_grad};
use crate::ops::rope::{rope_to_heads, rope_to_heads_grad};
use crate::ops::softmax::{causal_softmax, causal_softmax_grad};
use crate::ops::swap::swap_axes_1_2;
use crate::ops::swiglu::{swiglu, swiglu_grad};

/// The tensors of one block, on one device; linears in `BLOCK_LINEARS` order.
#[derive(Debug, Clone)]
pub struct BlockWeights {
    pub attn_norm: Tensor,
    pub mlp_norm: Tensor,
    /// Each linear's weight transposed, `[in, out]` (a view or contiguous): a linear is the
    /// plain product `x · Wᵀ`, and the gradient of a trained `Wᵀ` arrives in its own layout.
    pub weights_t: [Tensor; 7],
    pub biases: [Option<Tensor>; 7],
}

impl BlockWeights {
    pub fn from_block(block: &Block, device: &Device) -> Result<Self> {
        let linear = |i: usize| block.linear(BLOCK_LINEARS[i]).context("block linear");
        let mut weights = Vec::with_capacity(7);
        let mut biases = Vec::with_capacity(7);
        for i in 0..7 {
            let l = linear(i)?;
            weights.push(l.weight()?.to_device(device)?.t()?);
            biases.push(match &l.bias {
                Some(b) => Some(b.to_device(device)?),
                None => None,
            });
        }
        let weights_t: [Tensor; 7] = weights.try_into().expect("seven linears");
        let biases: [Option<Tensor>; 7] = biases.try_into().expect("seven linears");
        Ok(Self { attn_norm: block.attn_norm.to_device(device)?, mlp_norm: block.mlp_norm.to_device(device)?, weights_t, biases })
    }

    /// The same block with other linear weights, transposed (e.g. quantized ones, or ones
    /// that carry a gradient).
    pub fn with_weights_t(&self, weights_t: [Tensor; 7]) -> Self {
        Self { weights_t, ..self.clone() }
    }

    /// The same block with its linear weights detached from any gradient graph.
    pub fn detached(&self) -> Self {
        self.with_weights_t(self.weights_t.clone().map(|t| t.detach()))
    }

    /// `x · Wᵀ (+ bias)` of linear `i` for `x` as `BlockGraph::operand` gives it, `[b · t, in]`;
    /// the result `[b, t, out]` in `dtype`.
    fn product(&self, i: usize, x: &Tensor, (b, t): (usize, usize), dtype: DType) -> Result<Tensor> {
        let wt = &self.weights_t[i];
        let y = cast(&x.matmul(wt)?, dtype)?;
        let y = match &self.biases[i] {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        Ok(y.reshape((b, t, wt.dim(1)?))?)
    }

    /// `∂L/∂x` `[b, t, in]` in `dtype` of `x · Wᵀ` of linear `i`, from `∂L/∂y` as
    /// `BlockGraph::operand` gives it.
    fn input_grad(&self, i: usize, dy: &Tensor, (b, t): (usize, usize), dtype: DType) -> Result<Tensor> {
        let wt = &self.weights_t[i];
        Ok(cast(&dy.matmul(&wt.t()?)?, dtype)?.reshape((b, t, wt.dim(0)?))?)
    }
}

/// The linears' positions in `BLOCK_LINEARS`.
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// The constant parts of the block graph for sequences of one length: the rotary tables; and
/// the dtype of the linears' products.
#[derive(Debug, Clone)]
pub struct BlockGraph {
    cfg: Config,
    cos: Tensor,
    sin: Tensor,
    products: Option<DType>,
}

impl BlockGraph {
    /// Builds the graph's constants in `dtype` (f32 to train; f64 to check gradients).
    pub fn new(cfg: &Config, rope: &Rope, seq_len: usize, dtype: DType, device: &Device) -> Result<Self> {
        let (cos, sin) = rope.tables();
        Ok(Self {
            cfg: cfg.clone(),
            cos: cos.narrow(0, 0, seq_len)?.to_dtype(dtype)?.to_device(device)?,
            sin: sin.narrow(0, 0, seq_len)?.to_dtype(dtype)?.to_device(device)?,
            products: None,
        })
    }

    /// The same graph with the linears' products in `dtype` (bf16 on a GPU's tensor cores:
    /// twice TF32's rate), everything else as before.
    pub fn with_products(&self, dtype: DType) -> Self {
        Self { products: Some(dtype), ..self.clone() }
    }

    /// The dtype of the linears' products, if not their operands'.
    pub fn products(&self) -> Option<DType> {
        self.products
    }

    /// The block's output for `x` (`[batch, seq, hidden]`), or, with `stop`, the input of that
    /// stage's linears.
    pub fn forward(&self, w: &BlockWeights, x: &Tensor, stop: Option<Stage>) -> Result<Tensor> {
        Ok(self.run(w, x, stop)?.0)
    }

    /// The block's output for `x`, and what `backward` needs of the way there.
    pub fn forward_recorded(&self, w: &BlockWeights, x: &Tensor) -> Result<(Tensor, Tape)> {
        let (y, tape) = self.run(w, x, None)?;
        Ok((y, tape.context("a full forward records its tape")?))
    }

    /// `x` `[b, t, n]` as a linear's operand: `[b · t, n]`, in the products' dtype.
    fn operand(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, n) = x.dims3()?;
        let x = x.reshape((b * t, n))?;
        Ok(match self.products {
            Some(dtype) => cast(&x, dtype)?,
            None => x,
        })
    }

    fn run(&self, w: &BlockWeights, x: &Tensor, stop: Option<Stage>) -> Result<(Tensor, Option<Tape>)> {
        let eps = self.cfg.rms_norm_eps;
        let (b, t, _) = x.dims3()?;
        let dtype = x.dtype();
        let h = rms_norm(x, &w.attn_norm, eps)?;
        if stop == Some(Stage::Qkv) {
            return Ok((h, None));
        }
        let attn_in = self.operand(&h)?;
        let (heads_out, q, k, v, probs) = self.attention(w, &attn_in, (b, t), dtype)?;
        if stop == Some(Stage::O) {
            return Ok((heads_out, None));
        }
        let attn_out = self.operand(&heads_out)?;
        let mid = (x + w.product(O, &attn_out, (b, t), dtype)?)?;
        let h = rms_norm(&mid, &w.mlp_norm, eps)?;
        if stop == Some(Stage::GateUp) {
            return Ok((h, None));
        }
        let mlp_in = self.operand(&h)?;
        let gate = w.product(GATE, &mlp_in, (b, t), dtype)?;
        let up = w.product(UP, &mlp_in, (b, t), dtype)?;
        let act = swiglu(&gate, &up)?;
        if stop == Some(Stage::Down) {
            return Ok((act, None));
        }
        let down_in = self.operand(&act)?;
        let y = (&mid + w.product(DOWN, &down_in, (b, t), dtype)?)?;
        Ok((y, Some(Tape { attn_in, q, k, v, probs, attn_out, mid, mlp_in, gate, up, down_in })))
    }

    /// Causal attention with grouped KV heads: the query heads of a KV group stacked along
    /// the query axis, as `potptq_model::attention::grouped_attention` has them, the softmax
    /// fused. Returns the heads' outputs `[b, t, heads · head_dim]`, and the roped queries
    /// `[b, kv, group · t, head_dim]`, keys and values `[b, kv, t, head_dim]` and the
    /// probabilities `[b, kv, group · t, t]` for the backward pass.
    fn attention(&self, w: &BlockWeights, x: &Tensor, (b, t): (usize, usize), dtype: DType) -> Result<(Tensor, Tensor, Tensor, Tensor, Tensor)> {
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let tokens = |i: usize, n: usize| -> Result<Tensor> { Ok(w.product(i, x, (b, t), dtype)?.reshape((b, t, n, hd))?) };
        let q = rope_to_heads(&tokens(Q, nh)?, &self.cos, &self.sin)?.reshape((b, nkv, nh / nkv * t, hd))?;
        let k = rope_to_heads(&tokens(K, nkv)?, &self.cos, &self.sin)?;
        let v = swap_axes_1_2(&tokens(V, nkv)?)?;
        let probs = causal_softmax(&q.matmul(&k.t()?)?, t, self.attention_scale())?;
        let out = swap_axes_1_2(&probs.matmul(&v)?.reshape((b, nh, t, hd))?)?;
        Ok((out.reshape((b, t, nh * hd))?, q, k, v, probs))
    }

    fn attention_scale(&self) -> f64 {
        1.0 / (self.cfg.head_dim as f64).sqrt()
    }

    /// The gradients `∂L/∂W̃ᵀ` of the seven linears (`BLOCK_LINEARS` order, `[in, out]`, in the
    /// products' dtype) from `∂L/∂y` of the block's output, by the chain rule written out
    /// over the forward's tape. The block's input is a constant: the first linears' input
    /// gradient, and the first norm's, are never formed, and no gradient of the norm weights
    /// or biases either. Each gradient is made once, where candle's autograd would add every
    /// contribution into a zeroed buffer of its own.
    pub fn backward(&self, w: &BlockWeights, tape: &Tape, dy: &Tensor) -> Result<[Tensor; 7]> {
        let (b, t, _) = dy.dims3()?;
        let dtype = dy.dtype();
        // y = mid + swiglu(gate, up) · W̃_downᵀ
        let dy_op = self.operand(dy)?;
        let d_down = tape.down_in.t()?.matmul(&dy_op)?;
        let (d_gate, d_up) = swiglu_grad(&w.input_grad(DOWN, &dy_op, (b, t), dtype)?, &tape.gate, &tape.up)?;
        // gate, up = rms_norm(mid) · W̃ᵀ
        let (d_gate, d_up) = (self.operand(&d_gate)?, self.operand(&d_up)?);
        let d_mlp_in = (w.input_grad(GATE, &d_gate, (b, t), dtype)? + w.input_grad(UP, &d_up, (b, t), dtype)?)?;
        let d_gate = tape.mlp_in.t()?.matmul(&d_gate)?;
        let d_up = tape.mlp_in.t()?.matmul(&d_up)?;
        // mid = x + attention · W̃_oᵀ
        let d_mid = (dy + rms_norm_grad(&d_mlp_in, &tape.mid, &w.mlp_norm, self.cfg.rms_norm_eps)?)?;
        let d_mid = self.operand(&d_mid)?;
        let d_o = tape.attn_out.t()?.matmul(&d_mid)?;
        let d_heads = w.input_grad(O, &d_mid, (b, t), dtype)?;
        let [d_q, d_k, d_v] = self.attention_grad(tape, &d_heads)?.map(|d| self.operand(&d));
        let weight_grad = |d: Result<Tensor>| -> Result<Tensor> { Ok(tape.attn_in.t()?.matmul(&d?)?) };
        Ok([weight_grad(d_q)?, weight_grad(d_k)?, weight_grad(d_v)?, d_o, d_gate, d_up, d_down])
    }

    /// `∂L/∂` the query, key and value linears' outputs, `[b, t, n · head_dim]`, from `∂L/∂`
    /// the heads' outputs.
    fn attention_grad(&self, tape: &Tape, d_heads: &Tensor) -> Result<[Tensor; 3]> {
        let (b, t, _) = d_heads.dims3()?;
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let d_out = swap_axes_1_2(&d_heads.reshape((b, t, nh, hd))?)?.reshape((b, nkv, nh / nkv * t, hd))?;
        let d_scores = causal_softmax_grad(&d_out.matmul(&tape.v.t()?)?, &tape.probs, t, self.attention_scale())?;
        let d_v = tape.probs.t()?.matmul(&d_out)?;
        let d_q = rope_to_heads_grad(&d_scores.matmul(&tape.k)?.reshape((b, nh, t, hd))?, &self.cos, &self.sin)?;
        let d_k = rope_to_heads_grad(&d_scores.t()?.matmul(&tape.q)?, &self.cos, &self.sin)?;
        Ok([d_q.reshape((b, t, nh * hd))?, d_k.reshape((b, t, nkv * hd))?, swap_axes_1_2(&d_v)?.reshape((b, t, nkv * hd))?])
    }
}

/// What `BlockGraph::backward` reads of a forward pass: the linears' operands (`[b · t, in]`,
/// in the products' dtype), attention's roped queries and keys, values and probabilities,
/// and the inputs of the second norm and of the MLP's gate.
pub struct Tape {
    attn_in: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    probs: Tensor,
    attn_out: Tensor,
    mid: Tensor,
    mlp_in: Tensor,
    gate: Tensor,
    up: Tensor,
    down_in: Tensor,
}

/// Mean squared error over every element: sums over rows first, since candle reduces a
/// whole tensor in one GPU thread block.
pub fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(mse_with_grad(a, b)?.0)
}

/// `mse(a, b)` and its gradient for `a`, `2 (a − b) / n`.
pub fn mse_with_grad(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = a.elem_count().max(1) as f64;
    let diff = (a - b)?;
    let loss = (diff.sqr()?.sum_keepdim(candle_core::D::Minus1)?.sum_all()? / n)?;
    Ok((loss, (diff * (2.0 / n))?))
}

/// Embeds token segments (all of one length) in mini-batches of `batch` segments, on `device`.
pub fn embed_batches(model: &potptq_model::Model, segments: &[Vec<u32>], batch: usize, device: &Device) -> Result<Vec<Tensor>> {
    segments
        .chunks(batch.max(1))
        .map(|chunk| {
            let len = chunk[0].len();
            let ids = Tensor::from_vec(chunk.concat(), (chunk.len(), len), &Device::Cpu)?;
            Ok(model.embed(&ids)?.to_dtype(DType::F32)?.to_device(device)?)
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use potptq_model::llama::Model;

    /// The tiny qwen2 fixture: grouped KV heads, q/k/v biases.
    pub(crate) fn tiny_model() -> Model {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny_qwen2");
        potptq_model::load(&dir).unwrap().model
    }

    #[test]
    fn graph_forward_equals_the_inference_forward() {
        let model = tiny_model();
        let graph = BlockGraph::new(&model.config, &model.rope, 9, DType::F32, &Device::Cpu).unwrap();
        let ids = Tensor::from_vec((0..18u32).map(|i| (i * 7) % 64).collect::<Vec<_>>(), (2, 9), &Device::Cpu).unwrap();
        let x = model.embed(&ids).unwrap();
        for block in &model.blocks {
            let w = BlockWeights::from_block(block, &Device::Cpu).unwrap();
            let ours = graph.forward(&w, &x, None).unwrap();
            let theirs = block.forward(&model.config, &model.rope, &x, 0, None).unwrap();
            let diff = (ours - &theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "block output differs by {diff}");
            for stage in Stage::ALL {
                let ours = graph.forward(&w, &x, Some(stage)).unwrap();
                let theirs = block.stage_input(&model.config, &model.rope, &x, stage).unwrap();
                let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-5, "{stage:?} input differs by {diff}");
            }
        }
    }
}
