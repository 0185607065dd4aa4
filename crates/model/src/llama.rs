//! The llama / qwen2 / mistral decoder, as one readable forward pass.
//!
//! Weights are held in Hugging Face layout (`[out, in]`, q/k rows in the half-split rotary
//! order), whatever file they came from, so every method downstream sees one convention.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use potptq_kernels::PackedMatrix;

use crate::attention::{causal_attention, grouped_attention, AttnShape};
use crate::config::Config;
use crate::kernel_ops;

/// The weight of a linear layer: an f32 matrix, or codes + scales as a packed checkpoint
/// stores them, multiplied by the kernels crate without being expanded.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    Dense(Tensor),
    Packed {
        matrix: Arc<PackedMatrix>,
        /// A copy on a GPU for the fused kernels, which then do the products; `matrix` stays
        /// for dequantization and for moving back.
        #[cfg(feature = "cuda")]
        gpu: Option<Arc<crate::gpu_ops::GpuPacked>>,
    },
}

impl LinearWeight {
    /// Packed codes on the host only.
    pub fn packed(matrix: Arc<PackedMatrix>) -> Self {
        LinearWeight::Packed {
            matrix,
            #[cfg(feature = "cuda")]
            gpu: None,
        }
    }
}

/// A linear layer `y = x Wᵀ + b`, `W` of shape `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight: LinearWeight::Dense(weight), bias }
    }

    /// The dense weight `[out, in]`; an error for a packed linear (see `Model::to_dense`).
    pub fn weight(&self) -> Result<&Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok(w),
            LinearWeight::Packed { .. } => bail!("this linear layer is packed (a quantized checkpoint); dequantize the model first"),
        }
    }

    pub fn set_weight(&mut self, weight: Tensor) {
        self.weight = LinearWeight::Dense(weight);
    }

    pub fn packed(&self) -> Option<&Arc<PackedMatrix>> {
        match &self.weight {
            LinearWeight::Packed { matrix, .. } => Some(matrix),
            LinearWeight::Dense(_) => None,
        }
    }

    /// The weight as an f32 tensor `[out, in]`, dequantized when packed (on the CPU).
    pub fn weight_f32(&self) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok(w.clone()),
            LinearWeight::Packed { matrix: m, .. } => Ok(Tensor::from_vec(m.dequantize(), (m.rows(), m.cols()), &Device::Cpu)?),
        }
    }

    /// `(out, in)`.
    pub fn shape(&self) -> Result<(usize, usize)> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok(w.dims2()?),
            LinearWeight::Packed { matrix: m, .. } => Ok((m.rows(), m.cols())),
        }
    }

    /// The same layer on `device`. A packed weight moved to a GPU goes through the fused
    /// kernels when they take its shape, and is otherwise dequantized there to f32.
    pub fn to_device(&self, device: &Device) -> Result<Linear> {
        let bias = self.bias.as_ref().map(|b| b.to_device(device)).transpose()?;
        let weight = match &self.weight {
            LinearWeight::Dense(w) => LinearWeight::Dense(w.to_device(device)?),
            LinearWeight::Packed { matrix, .. } if device.is_cpu() => LinearWeight::packed(matrix.clone()),
            #[cfg(feature = "cuda")]
            LinearWeight::Packed { matrix, .. } => match crate::gpu_ops::GpuPacked::upload(matrix, device) {
                Ok(g) => LinearWeight::Packed { matrix: matrix.clone(), gpu: Some(Arc::new(g)) },
                Err(_) => LinearWeight::Dense(self.weight_f32()?.to_device(device)?),
            },
            #[cfg(not(feature = "cuda"))]
            LinearWeight::Packed { .. } => bail!("packed weights go to the CPU, or to a GPU in a build with the `cuda` feature"),
        };
        Ok(Linear { weight, bias })
    }

    /// True when the products run through the fused GPU kernels.
    pub fn on_gpu_kernels(&self) -> bool {
        #[cfg(feature = "cuda")]
        if let LinearWeight::Packed { gpu: Some(_), .. } = self.weight {
            return true;
        }
        false
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = match &self.weight {
            LinearWeight::Dense(w) => {
                let (out_features, in_features) = w.dims2()?;
                let dims = x.dims().to_vec();
                let rows: usize = dims[..dims.len() - 1].iter().product();
                let y = x.reshape((rows, in_features))?.matmul(&w.t()?)?;
                let mut out_dims = dims;
                *out_dims.last_mut().unwrap() = out_features;
                y.reshape(out_dims)?
            }
            #[cfg(feature = "cuda")]
            LinearWeight::Packed { gpu: Some(g), .. } => crate::gpu_ops::gpu_packed_matmul(x, g)?,
            LinearWeight::Packed { matrix, .. } => kernel_ops::packed_matmul(x, matrix)?,
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
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

    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self { cos: self.cos.to_device(device)?, sin: self.sin.to_device(device)? })
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
    layers: Vec<LayerCache>,
}

/// One block's cached keys and values.
#[derive(Debug, Default, Clone)]
pub enum LayerCache {
    #[default]
    Empty,
    /// On a GPU: tensors `[batch, kv_heads, capacity, head_dim]` written in place, the first
    /// `keys` rows of each head used, the capacity doubled when full; the attention's batched
    /// products read those rows where they lie.
    Tensors { k: Tensor, v: Tensor, keys: usize },
    /// On the CPU: buffers `[batch, kv_heads, capacity, head_dim]` written in place, the
    /// capacity doubled when full, so that a token costs copying its own keys and values, not
    /// all of them again.
    Host(HostKv),
}

/// The buffers of `LayerCache::Host`.
#[derive(Debug, Clone)]
pub struct HostKv {
    k: Vec<f32>,
    v: Vec<f32>,
    /// Rows of a head: batch × kv heads.
    heads: usize,
    head_dim: usize,
    keys: usize,
    capacity: usize,
}

impl HostKv {
    fn new(heads: usize, head_dim: usize) -> Self {
        Self { k: Vec::new(), v: Vec::new(), heads, head_dim, keys: 0, capacity: 0 }
    }

    /// Appends `t` positions: `k`, `v` `[heads, t, head_dim]`.
    fn append(&mut self, k: &[f32], v: &[f32], t: usize) {
        let (h, d) = (self.heads, self.head_dim);
        debug_assert_eq!(k.len(), h * t * d);
        if self.keys + t > self.capacity {
            let capacity = (2 * self.capacity).max(self.keys + t).max(64);
            let regrow = |old: &[f32]| -> Vec<f32> {
                let mut new = vec![0f32; h * capacity * d];
                for head in 0..h {
                    new[head * capacity * d..][..self.keys * d].copy_from_slice(&old[head * self.capacity * d..][..self.keys * d]);
                }
                new
            };
            self.k = regrow(&self.k);
            self.v = regrow(&self.v);
            self.capacity = capacity;
        }
        for head in 0..h {
            let at = (head * self.capacity + self.keys) * d;
            self.k[at..at + t * d].copy_from_slice(&k[head * t * d..][..t * d]);
            self.v[at..at + t * d].copy_from_slice(&v[head * t * d..][..t * d]);
        }
        self.keys += t;
    }
}

/// Writes `k`, `v` `[batch, kv_heads, t, head_dim]` after the keys `slot` holds (growing its
/// buffers when full) and returns views of all its keys and values.
fn append_on_device(slot: &mut LayerCache, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, h, t, d) = k.dims4()?;
    let (mut kb, mut vb, keys) = match &*slot {
        LayerCache::Empty => {
            let cap = t.max(64);
            (Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?, Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?, 0)
        }
        LayerCache::Tensors { k, v, keys } => (k.clone(), v.clone(), *keys),
        LayerCache::Host(_) => bail!("a KV cache filled on another device"),
    };
    let (cached_b, cached_h, _, _) = kb.dims4()?;
    ensure!((cached_b, cached_h) == (b, h), "a KV cache for {cached_b}×{cached_h} heads, not {b}×{h}");
    if keys + t > kb.dim(2)? {
        let cap = (2 * kb.dim(2)?).max(keys + t);
        let grow = |old: &Tensor| -> Result<Tensor> {
            let new = Tensor::zeros((b, h, cap, d), old.dtype(), old.device())?;
            new.slice_set(&old.narrow(2, 0, keys)?.contiguous()?, 2, 0)?;
            Ok(new)
        };
        kb = grow(&kb)?;
        vb = grow(&vb)?;
    }
    kb.slice_set(&k.contiguous()?, 2, keys)?;
    vb.slice_set(&v.contiguous()?, 2, keys)?;
    let views = (kb.narrow(2, 0, keys + t)?, vb.narrow(2, 0, keys + t)?);
    *slot = LayerCache::Tensors { k: kb, v: vb, keys: keys + t };
    Ok(views)
}

impl LayerCache {
    fn len(&self) -> usize {
        match self {
            LayerCache::Empty => 0,
            LayerCache::Tensors { keys, .. } => *keys,
            LayerCache::Host(kv) => kv.keys,
        }
    }
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![LayerCache::Empty; num_layers] }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LayerCache::len)
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
        cache: Option<&mut LayerCache>,
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
        cache: Option<&mut LayerCache>,
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
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = rope.apply(&heads(self.q_proj.forward(x)?, nh)?, pos)?;
        let k = rope.apply(&heads(self.k_proj.forward(x)?, nkv)?, pos)?;
        let v = heads(self.v_proj.forward(x)?, nkv)?;
        let out = if x.device().is_cpu() {
            let flat = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.flatten_all()?.to_vec1::<f32>()?) };
            let shape = AttnShape { batch: b, heads: nh, kv_heads: nkv, queries: t, keys: t, key_capacity: t, head_dim: hd };
            let (q, k, v) = (flat(&q)?, flat(&k)?, flat(&v)?);
            let out = match cache {
                Some(slot) => {
                    if let LayerCache::Empty = slot {
                        *slot = LayerCache::Host(HostKv::new(b * nkv, hd));
                    }
                    let LayerCache::Host(kv) = slot else { bail!("a KV cache filled on another device") };
                    ensure!(kv.heads == b * nkv, "a KV cache for {} heads, not {}", kv.heads, b * nkv);
                    kv.append(&k, &v, t);
                    let shape = AttnShape { keys: kv.keys, key_capacity: kv.capacity, ..shape };
                    causal_attention(shape, &q, &kv.k, &kv.v)?
                }
                None => causal_attention(shape, &q, &k, &v)?,
            };
            Tensor::from_vec(out, (b, nh, t, hd), x.device())?
        } else {
            let (k, v) = match cache {
                Some(slot) => append_on_device(slot, &k, &v)?,
                None => (k, v),
            };
            grouped_attention(&q, &k, &v)?
        };
        Ok(out.transpose(1, 2)?.reshape((b, t, nh * hd))?)
    }
}

impl Model {
    /// Builds the model from tensors named as in Hugging Face checkpoints
    /// (`model.layers.{i}.self_attn.q_proj.weight`, …), checking every shape against `config`.
    pub fn from_tensors(config: Config, tensors: HashMap<String, Tensor>) -> Result<Self> {
        Self::from_parts(config, tensors, HashMap::new())
    }

    /// As `from_tensors`, with the block linears found in `packed` (by
    /// `model.layers.{i}.{linear}`) kept packed. A model with packed linears also keeps f16
    /// embeddings and output projection in f16, as its checkpoint stores them.
    pub fn from_parts(config: Config, mut tensors: HashMap<String, Tensor>, mut packed: HashMap<String, Arc<PackedMatrix>>) -> Result<Self> {
        config.validate()?;
        let device = Device::Cpu;
        let c = &config;
        let (d, ffn, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (q_dim, kv_dim) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let keep_f16 = !packed.is_empty();
        let mut take_as = |name: &str, shape: &[usize], f16_ok: bool| -> Result<Tensor> {
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
            let t = if f16_ok && t.dtype() == DType::F16 { t } else { t.to_dtype(DType::F32)? };
            check_finite(name, &t)?;
            Ok(t)
        };
        let embed_tokens = take_as("model.embed_tokens.weight", &[v, d], keep_f16)?;
        let mut take = |name: &str, shape: &[usize]| take_as(name, shape, false);
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let mut linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
                let weight = match packed.remove(&format!("{p}.{name}")) {
                    Some(m) if (m.rows(), m.cols()) == (out, inp) => LinearWeight::packed(m),
                    Some(m) => bail!("packed `{p}.{name}` is [{}, {}], but the config implies [{out}, {inp}]", m.rows(), m.cols()),
                    None => LinearWeight::Dense(take(&format!("{p}.{name}.weight"), &[out, inp])?),
                };
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
            Some(take_as("lm_head.weight", &[v, d], keep_f16)?)
        };
        if let Some(name) = packed.keys().next() {
            bail!("packed tensor `{name}` is not a linear of this model");
        }
        let rope = Rope::new(&config, &device)?;
        Ok(Self { config, embed_tokens, blocks, norm, lm_head, rope })
    }

    /// The output projection `[vocab, hidden]`: f32, or f16 in a model loaded from a packed
    /// checkpoint (see `logits`).
    pub fn output_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Logits `[.., vocab]` of hidden states `[.., hidden]`; an f16 output projection goes
    /// through the f16 kernel, never expanded to f32.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = self.output_weight();
        match (w.dtype(), w.device()) {
            (DType::F16, Device::Cpu) => kernel_ops::f16_matmul(hidden, w),
            (DType::F16, _) => Ok(Linear::dense(w.clone(), None).forward(&hidden.to_dtype(DType::F16)?)?.to_dtype(DType::F32)?),
            _ => Linear::dense(w.clone(), None).forward(hidden),
        }
    }

    /// The same model with every linear (and the embeddings) as f32 tensors, e.g. to
    /// quantize a packed checkpoint again.
    pub fn to_dense(&self) -> Result<Model> {
        let mut m = self.clone();
        for block in &mut m.blocks {
            for name in BLOCK_LINEARS {
                let l = block.linear_mut(name).expect("block linear");
                let w = l.weight_f32()?;
                l.set_weight(w);
            }
        }
        m.embed_tokens = m.embed_tokens.to_dtype(DType::F32)?;
        m.lm_head = m.lm_head.map(|h| h.to_dtype(DType::F32)).transpose()?;
        Ok(m)
    }

    /// Where the model's tensors live.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// The same model on `device` (see `Linear::to_device` for packed layers).
    pub fn to_device(&self, device: &Device) -> Result<Model> {
        let blocks = self
            .blocks
            .iter()
            .map(|b| -> Result<Block> {
                Ok(Block {
                    attn_norm: b.attn_norm.to_device(device)?,
                    q_proj: b.q_proj.to_device(device)?,
                    k_proj: b.k_proj.to_device(device)?,
                    v_proj: b.v_proj.to_device(device)?,
                    o_proj: b.o_proj.to_device(device)?,
                    mlp_norm: b.mlp_norm.to_device(device)?,
                    gate_proj: b.gate_proj.to_device(device)?,
                    up_proj: b.up_proj.to_device(device)?,
                    down_proj: b.down_proj.to_device(device)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Model {
            config: self.config.clone(),
            embed_tokens: self.embed_tokens.to_device(device)?,
            blocks,
            norm: self.norm.to_device(device)?,
            lm_head: self.lm_head.as_ref().map(|h| h.to_device(device)).transpose()?,
            rope: self.rope.to_device(device)?,
        })
    }

    /// Token embeddings of `tokens` (`[batch, seq]`, u32) → `[batch, seq, hidden]`.
    pub fn embed(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let ids = tokens.flatten_all()?.to_device(self.device())?;
        let flat = self.embed_tokens.index_select(&ids, 0)?.to_dtype(DType::F32)?;
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
        self.logits(&h)
    }
}

/// Rejects NaN/Inf weights with the tensor's name.
pub fn check_finite(name: &str, t: &Tensor) -> Result<()> {
    if t.dtype() == DType::F16 {
        let values = t.flatten_all()?.to_vec1::<half::f16>()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            bail!("tensor `{name}` contains a non-finite value ({}) at flat index {i}", values[i]);
        }
        return Ok(());
    }
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

#[cfg(test)]
mod tests {
    use super::{append_on_device, HostKv, LayerCache};
    use candle_core::{Device, Tensor};

    /// The device cache (run here on CPU tensors) returns, after each append, exactly the
    /// concatenation of everything appended, across the buffers' growth.
    #[test]
    fn device_cache_views_are_the_concatenation() {
        let mut slot = LayerCache::Empty;
        let mut all: Option<(Tensor, Tensor)> = None;
        let mut seed = 0.0f32;
        for t in [5, 1, 70, 1, 1] {
            let n = 2 * 3 * t * 4;
            let k = Tensor::from_vec((0..n).map(|i| seed + i as f32).collect::<Vec<f32>>(), (2, 3, t, 4), &Device::Cpu).unwrap();
            let v = (&k * -1.0).unwrap();
            seed += n as f32;
            let (kv, vv) = append_on_device(&mut slot, &k, &v).unwrap();
            all = Some(match all {
                None => (k, v),
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2).unwrap(), Tensor::cat(&[&pv, &v], 2).unwrap()),
            });
            let (wk, wv) = all.as_ref().unwrap();
            let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(flat(&kv), flat(wk));
            assert_eq!(flat(&vv), flat(wv));
            assert_eq!(slot.len(), wk.dim(2).unwrap());
        }
        let wrong = Tensor::zeros((1, 3, 1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(append_on_device(&mut slot, &wrong, &wrong).is_err());
        assert_eq!(slot.len(), 78, "a refused append keeps the cache");
    }

    /// Appends of 1 to 70 positions, across the capacity's growth, keep every head's rows in
    /// order: the same as concatenating them.
    #[test]
    fn host_cache_appends_in_place_and_grows() {
        let (heads, d) = (3, 4);
        let mut kv = HostKv::new(heads, d);
        let mut want: Vec<Vec<f32>> = vec![Vec::new(); heads];
        let mut next = 0.0f32;
        for t in [5, 1, 1, 70, 1, 64, 3] {
            let k: Vec<f32> = (0..heads * t * d).map(|_| { next += 1.0; next }).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            for (h, rows) in k.chunks(t * d).enumerate() {
                want[h].extend_from_slice(rows);
            }
            kv.append(&k, &v, t);
            assert!(kv.keys <= kv.capacity);
            for (h, w) in want.iter().enumerate() {
                assert_eq!(&kv.k[h * kv.capacity * d..][..kv.keys * d], &w[..], "head {h} after {} keys", kv.keys);
                let neg: Vec<f32> = w.iter().map(|x| -x).collect();
                assert_eq!(&kv.v[h * kv.capacity * d..][..kv.keys * d], &neg[..]);
            }
        }
        assert_eq!(kv.keys, 145);
    }
}
