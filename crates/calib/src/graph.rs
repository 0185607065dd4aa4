//! A transformer block as a differentiable candle graph, on any device.
//!
//! The inference forward (`potptq_model::llama`) uses ops that candle cannot differentiate: the
//! fused rms-norm and rope, and a CPU attention kernel. Step 2 needs gradients through the
//! block, on a GPU as well, so this forward is built from ops that have them: the fused
//! rms-norm, rope, causal softmax and MLP gate of `ops`, and matrix products. It computes the same
//! function as `Block::forward` (a test checks it).

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use potptq_model::llama::{Block, Rope, Stage, BLOCK_LINEARS};
use potptq_model::Config;

use crate::ops::{cast::cast, rms_norm::rms_norm, rope::rope, softmax::causal_softmax, swiglu::swiglu};

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

    /// `x · Wᵀ (+ bias)`, the product in `products` when given (inputs rounded to it, sums in
    /// f32, the output returned in `x`'s dtype).
    fn linear(&self, products: Option<DType>, name: &str, x: &Tensor) -> Result<Tensor> {
        let i = BLOCK_LINEARS.iter().position(|n| *n == name).context("block linear")?;
        let wt = &self.weights_t[i];
        let (b, t, inp) = x.dims3()?;
        let x2 = x.reshape((b * t, inp))?;
        let y = match products {
            Some(dtype) if dtype != x.dtype() => cast(&cast(&x2, dtype)?.matmul(&cast(wt, dtype)?)?, x.dtype())?,
            _ => x2.matmul(wt)?,
        };
        let y = match &self.biases[i] {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        Ok(y.reshape((b, t, wt.dim(1)?))?)
    }
}

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
        let eps = self.cfg.rms_norm_eps;
        let h = rms_norm(x, &w.attn_norm, eps)?;
        if stop == Some(Stage::Qkv) {
            return Ok(h);
        }
        let heads_out = self.attention(w, &h)?;
        if stop == Some(Stage::O) {
            return Ok(heads_out);
        }
        let x = (x + w.linear(self.products, "self_attn.o_proj", &heads_out)?)?;
        let h = rms_norm(&x, &w.mlp_norm, eps)?;
        if stop == Some(Stage::GateUp) {
            return Ok(h);
        }
        let act = swiglu(&w.linear(self.products, "mlp.gate_proj", &h)?, &w.linear(self.products, "mlp.up_proj", &h)?)?;
        if stop == Some(Stage::Down) {
            return Ok(act);
        }
        Ok((x + w.linear(self.products, "mlp.down_proj", &act)?)?)
    }

    /// Causal attention with grouped KV heads: the query heads of a
    /// KV group stacked along the query axis, as `potptq_model::attention::grouped_attention`
    /// has them, the softmax fused.
    fn attention(&self, w: &BlockWeights, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            let y = y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?;
            Ok(rope(&y, &self.cos, &self.sin)?)
        };
        let q = heads(w.linear(self.products, "self_attn.q_proj", x)?, nh)?;
        let k = heads(w.linear(self.products, "self_attn.k_proj", x)?, nkv)?;
        let v = w.linear(self.products, "self_attn.v_proj", x)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        let q = q.reshape((b, nkv, nh / nkv * t, hd))?;
        let scores = q.matmul(&k.t()?)?;
        let probs = causal_softmax(&scores, t, 1.0 / (hd as f64).sqrt())?;
        let out = probs.matmul(&v.contiguous()?)?.reshape((b, nh, t, hd))?;
        Ok(out.transpose(1, 2)?.reshape((b, t, nh * hd))?)
    }
}

/// Mean squared error over every element: sums over rows first, since candle reduces a
/// whole tensor in one GPU thread block.
pub fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let n = a.elem_count().max(1) as f64;
    Ok(((a - b)?.sqr()?.sum_keepdim(candle_core::D::Minus1)?.sum_all()? / n)?)
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
