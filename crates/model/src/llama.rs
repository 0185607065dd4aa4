//! The llama / qwen2 / mistral decoder, as one readable forward pass.
//!
//! Weights are held in Hugging Face layout (`[out, in]`, q/k rows in the half-split rotary
//! order), whatever file they came from, so every method downstream sees one convention.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::attention::{causal_attention, AttnShape};
use crate::config::Config;

/// A linear layer `y = x Wᵀ + b`, `W` of shape `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// The weight `[out, in]`.
    pub fn weight(&self) -> Result<&Tensor> {
        Ok(&self.weight)
    }

    pub fn set_weight(&mut self, weight: Tensor) {
        self.weight = weight;
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (out_features, in_features) = self.weight.dims2()?;
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_features))?;
        let mut y = x2.matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = out_features;
        Ok(y.reshape(out_dims)?)
    }
}

/// One transformer block: pre-norm attention and pre-norm SwiGLU MLP, each with a residual.
#[derive(Debug, Clone)]
pub struct Block {
    pub attn_norm: Tensor,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub mlp_norm: Tensor,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// The names of a block's linear layers, in the order a block uses them.
pub const BLOCK_LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

impl Block {
    pub fn linear(&self, name: &str) -> Option<&Linear> {
        Some(match name {
            "self_attn.q_proj" => &self.q_proj,
            "self_attn.k_proj" => &self.k_proj,
            "self_attn.v_proj" => &self.v_proj,
            "self_attn.o_proj" => &self.o_proj,
            "mlp.gate_proj" => &self.gate_proj,
            "mlp.up_proj" => &self.up_proj,
            "mlp.down_proj" => &self.down_proj,
            _ => return None,
        })
    }

    pub fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        Some(match name {
            "self_attn.q_proj" => &mut self.q_proj,
            "self_attn.k_proj" => &mut self.k_proj,
            "self_attn.v_proj" => &mut self.v_proj,
            "self_attn.o_proj" => &mut self.o_proj,
            "mlp.gate_proj" => &mut self.gate_proj,
            "mlp.up_proj" => &mut self.up_proj,
            "mlp.down_proj" => &mut self.down_proj,
            _ => return None,
        })
    }
}

/// The points of a block where its linear layers read their input, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The normed residual read by q/k/v.
    Qkv,
    /// The attention heads' output read by o.
    O,
    /// The normed residual read by gate/up.
    GateUp,
    /// The gated activation read by down.
    Down,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Qkv, Stage::O, Stage::GateUp, Stage::Down];

    pub fn linears(self) -> &'static [&'static str] {
        match self {
            Stage::Qkv => &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            Stage::O => &["self_attn.o_proj"],
            Stage::GateUp => &["mlp.gate_proj", "mlp.up_proj"],
            Stage::Down => &["mlp.down_proj"],
        }
    }
}

/// Cosine and sine of the rotary angles for every position up to the context length.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(cfg: &Config, device: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let positions = cfg.max_position_embeddings;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (positions, half), device)?,
            sin: Tensor::from_vec(sin, (positions, half), device)?,
        })
    }

    /// The cosine and sine tables, `[positions, head_dim / 2]`.
    pub fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Rotates `x` of shape `[batch, heads, seq, head_dim]` whose first token sits at `pos`.
    fn apply(&self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let seq = x.dim(2)?;
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)?)
    }
}

/// Keys and values of the tokens seen so far, one pair per block.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers] }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    pub config: Config,
    pub embed_tokens: Tensor,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    /// `None` when the output projection is tied to the embeddings.
    pub lm_head: Option<Tensor>,
    pub rope: Rope,
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32)?)
}

impl Block {
    /// `x`: `[batch, seq, hidden]`, first token at position `pos`.
    pub fn forward(
        &self,
        cfg: &Config,
        rope: &Rope,
        x: &Tensor,
        pos: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        self.forward_inner(cfg, rope, x, pos, cache, None)
    }

    /// The input of `stage`'s linears for a full sequence `x`; the block runs only as far as
    /// that point.
    pub fn stage_input(&self, cfg: &Config, rope: &Rope, x: &Tensor, stage: Stage) -> Result<Tensor> {
        self.forward_inner(cfg, rope, x, 0, None, Some(stage))
    }

    fn forward_inner(
        &self,
        cfg: &Config,
        rope: &Rope,
        x: &Tensor,
        pos: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        stop: Option<Stage>,
    ) -> Result<Tensor> {
        let h = rms_norm(x, &self.attn_norm, cfg.rms_norm_eps)?;
        if stop == Some(Stage::Qkv) {
            return Ok(h);
        }
        let heads_out = self.attention(cfg, rope, &h, pos, cache)?;
        if stop == Some(Stage::O) {
            return Ok(heads_out);
        }
        let x = (x + self.o_proj.forward(&heads_out)?)?;
        let h = rms_norm(&x, &self.mlp_norm, cfg.rms_norm_eps)?;
        if stop == Some(Stage::GateUp) {
            return Ok(h);
        }
        let gate = self.gate_proj.forward(&h)?.silu()?;
        let up = self.up_proj.forward(&h)?;
        let act = (gate * up)?;
        if stop == Some(Stage::Down) {
            return Ok(act);
        }
        Ok((x + self.down_proj.forward(&act)?)?)
    }

    /// Attention heads' output, concatenated: the input of `o_proj`.
    fn attention(
        &self,
        cfg: &Config,
        rope: &Rope,
        x: &Tensor,
        pos: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = rope.apply(&heads(self.q_proj.forward(x)?, nh)?, pos)?;
        let mut k = rope.apply(&heads(self.k_proj.forward(x)?, nkv)?, pos)?;
        let mut v = heads(self.v_proj.forward(x)?, nkv)?;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let shape = AttnShape { batch: b, heads: nh, kv_heads: nkv, queries: t, keys: k.dim(2)?, head_dim: hd };
        let flat = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.flatten_all()?.to_vec1::<f32>()?) };
        let out = causal_attention(shape, &flat(&q)?, &flat(&k)?, &flat(&v)?)?;
        let out = Tensor::from_vec(out, (b, nh, t, hd), x.device())?;
        Ok(out.transpose(1, 2)?.reshape((b, t, nh * hd))?)
    }
}

impl Model {
    /// Builds the model from tensors named as in Hugging Face checkpoints
    /// (`model.layers.{i}.self_attn.q_proj.weight`, …), checking every shape against `config`.
    pub fn from_tensors(config: Config, mut tensors: HashMap<String, Tensor>) -> Result<Self> {
        config.validate()?;
        let device = Device::Cpu;
        let c = &config;
        let (d, ffn, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (q_dim, kv_dim) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = tensors
                .remove(name)
                .with_context(|| format!("missing tensor `{name}`"))?;
            if t.dims() != shape {
                bail!(
                    "tensor `{name}` has shape {:?}, but the config implies {:?}",
                    t.dims(),
                    shape
                );
            }
            let t = t.to_dtype(DType::F32)?;
            check_finite(name, &t)?;
            Ok(t)
        };
        let embed_tokens = take("model.embed_tokens.weight", &[v, d])?;
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let mut linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
                let weight = take(&format!("{p}.{name}.weight"), &[out, inp])?;
                let bias = if bias { Some(take(&format!("{p}.{name}.bias"), &[out])?) } else { None };
                Ok(Linear { weight, bias })
            };
            let ab = c.attention_bias;
            let q_proj = linear("self_attn.q_proj", q_dim, d, ab)?;
            let k_proj = linear("self_attn.k_proj", kv_dim, d, ab)?;
            let v_proj = linear("self_attn.v_proj", kv_dim, d, ab)?;
            let o_proj = linear("self_attn.o_proj", d, q_dim, false)?;
            let gate_proj = linear("mlp.gate_proj", ffn, d, false)?;
            let up_proj = linear("mlp.up_proj", ffn, d, false)?;
            let down_proj = linear("mlp.down_proj", d, ffn, false)?;
            blocks.push(Block {
                attn_norm: take(&format!("{p}.input_layernorm.weight"), &[d])?,
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                mlp_norm: take(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                gate_proj,
                up_proj,
                down_proj,
            });
        }
        let norm = take("model.norm.weight", &[d])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(take("lm_head.weight", &[v, d])?)
        };
        let rope = Rope::new(&config, &device)?;
        Ok(Self { config, embed_tokens, blocks, norm, lm_head, rope })
    }

    pub fn output_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Token embeddings of `tokens` (`[batch, seq]`, u32) → `[batch, seq, hidden]`.
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let flat = self.embed_tokens.index_select(&tokens.flatten_all()?, 0)?;
        Ok(flat.reshape((b, t, self.config.hidden_size))?)
    }

    /// Hidden states after the final norm, `[batch, seq, hidden]`.
    pub fn forward_hidden(&self, tokens: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (_, t) = tokens.dims2()?;
        let pos = cache.as_ref().map_or(0, |c| c.len());
        if pos + t > self.config.max_position_embeddings {
            bail!(
                "sequence of {} positions exceeds the model's context of {}",
                pos + t,
                self.config.max_position_embeddings
            );
        }
        let mut x = self.embed(tokens)?;
        match cache {
            Some(cache) => {
                for (block, slot) in self.blocks.iter().zip(cache.layers.iter_mut()) {
                    x = block.forward(&self.config, &self.rope, &x, pos, Some(slot))?;
                }
            }
            None => {
                for block in &self.blocks {
                    x = block.forward(&self.config, &self.rope, &x, pos, None)?;
                }
            }
        }
        rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    /// Logits `[batch, seq, vocab]`.
    pub fn forward(&self, tokens: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.forward_hidden(tokens, cache)?;
        Linear { weight: self.output_weight().clone(), bias: None }.forward(&h)
    }
}

/// Rejects NaN/Inf weights with the tensor's name.
pub fn check_finite(name: &str, t: &Tensor) -> Result<()> {
    let sum = t.abs()?.sum_all()?.to_scalar::<f32>()?;
    if !sum.is_finite() {
        // The sum overflows only for huge finite values too; find a real non-finite entry.
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            bail!("tensor `{name}` contains a non-finite value ({}) at flat index {i}", values[i]);
        }
    }
    Ok(())
}
