//! GGUF files of the `llama` and `qwen2` architectures, dequantized to f32 and renamed to the
//! Hugging Face layout.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::config::{Arch, Config};

pub struct GgufFile {
    pub content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .map_err(|e| {
                // candle appends a backtrace when RUST_BACKTRACE is set: keep the message.
                let msg = e.to_string().lines().next().unwrap_or_default().to_string();
                match msg.strip_prefix("unknown dtype for tensor ") {
                    Some(id) => anyhow::anyhow!(
                        "unsupported tensor type (ggml type {id}); supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K..Q8_K"
                    ),
                    None => anyhow::Error::msg(msg),
                }
            })
            .with_context(|| format!("{} is not a valid GGUF file", path.display()))?;
        Ok(Self { content, reader })
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn meta_str(&self, key: &str) -> Option<&str> {
        self.meta(key).and_then(|v| v.to_string().ok()).map(String::as_str)
    }

    pub fn arch(&self) -> Result<&str> {
        self.meta_str("general.architecture")
            .context("GGUF file has no `general.architecture`")
    }

    fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        Ok(match self.meta(key) {
            None => None,
            Some(v) => Some(value_as_u64(v).with_context(|| format!("GGUF key `{key}` is not an integer"))? as usize),
        })
    }

    fn meta_f64(&self, key: &str) -> Option<f64> {
        match self.meta(key)? {
            // The shortest decimal that round-trips the f32: 1e-5, not 9.99999974e-6.
            Value::F32(v) => v.to_string().parse().ok(),
            Value::F64(v) => Some(*v),
            other => value_as_u64(other).ok().map(|v| v as f64),
        }
    }

    pub fn config(&self) -> Result<Config> {
        let arch_name = self.arch()?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => bail!("unsupported architecture `{other}` (supported GGUF architectures: llama, qwen2)"),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let need = |k: &str| -> Result<usize> {
            self.meta_usize(&key(k))?.with_context(|| format!("GGUF file has no `{}`", key(k)))
        };
        let hidden_size = need("embedding_length")?;
        let num_heads = need("attention.head_count")?;
        if num_heads == 0 {
            bail!("GGUF `{}` is zero", key("attention.head_count"));
        }
        let num_kv_heads = self.meta_usize(&key("attention.head_count_kv"))?.unwrap_or(num_heads);
        let head_dim = self.meta_usize(&key("attention.key_length"))?.unwrap_or(hidden_size / num_heads);
        if let Some(rope_dim) = self.meta_usize(&key("rope.dimension_count"))? {
            if rope_dim != head_dim {
                bail!("unsupported: partial rotary embedding ({rope_dim} of {head_dim} dimensions)");
            }
        }
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            bail!("unsupported: rope frequency scaling (`rope_freqs.weight`)");
        }
        let embed = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .context("GGUF file has no tensor `token_embd.weight`")?;
        let vocab_size = match self.meta_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => embed.shape.dims()[0],
        };
        let config = Config {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: need("feed_forward_length")?,
            num_layers: need("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: self.meta_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
            rms_norm_eps: self
                .meta_f64(&key("attention.layer_norm_rms_epsilon"))
                .context("GGUF file has no rms-norm epsilon")?,
            max_position_embeddings: need("context_length")?,
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        };
        config.validate()?;
        Ok(config)
    }

    /// End-of-sequence token ids named by the file.
    pub fn eos_ids(&self) -> Vec<u32> {
        ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
            .iter()
            .filter_map(|k| self.meta(k).and_then(|v| value_as_u64(v).ok()))
            .map(|v| v as u32)
            .collect()
    }

    /// Reads one tensor, dequantized to f32.
    pub fn tensor_f32(&mut self, name: &str) -> Result<Tensor> {
        let q = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("cannot read tensor `{name}`"))?;
        Ok(q.dequantize(&Device::Cpu)?)
    }

    /// All tensors under Hugging Face names; llama q/k rows are put back in the half-split
    /// rotary order that `llama.rs` (and transformers) use.
    pub fn hf_tensors(&mut self, config: &Config) -> Result<HashMap<String, Tensor>> {
        let mut names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        names.sort();
        let mut out = HashMap::new();
        for name in names {
            let Some(hf) = hf_name(&name) else { continue };
            let mut t = self.tensor_f32(&name)?;
            if config.arch == Arch::Llama {
                if hf.ends_with("self_attn.q_proj.weight") || hf.ends_with("self_attn.q_proj.bias") {
                    t = unpermute_rotary(&t, config.num_heads)?;
                } else if hf.ends_with("self_attn.k_proj.weight") || hf.ends_with("self_attn.k_proj.bias") {
                    t = unpermute_rotary(&t, config.num_kv_heads)?;
                }
            }
            out.insert(hf, t);
        }
        Ok(out)
    }
}

fn value_as_u64(v: &Value) -> Result<u64> {
    Ok(match v {
        Value::U8(x) => *x as u64,
        Value::U16(x) => *x as u64,
        Value::U32(x) => *x as u64,
        Value::U64(x) => *x,
        Value::I8(x) if *x >= 0 => *x as u64,
        Value::I16(x) if *x >= 0 => *x as u64,
        Value::I32(x) if *x >= 0 => *x as u64,
        Value::I64(x) if *x >= 0 => *x as u64,
        other => bail!("expected a non-negative integer, got {other:?}"),
    })
}

/// GGUF tensor name → Hugging Face name (`None` for tensors the forward does not use).
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, kind) = rest.rsplit_once('.')?;
    let hf = match base {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// llama.cpp's converter interleaves the two rotary halves of each head's q/k rows
/// (`reshape(h, 2, d/2).swap(1, 2)`); this is its inverse.
pub fn unpermute_rotary(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    if !rows.is_multiple_of(2 * heads) {
        bail!("cannot undo the rotary permutation: {rows} rows for {heads} heads");
    }
    let half = rows / heads / 2;
    let rest: usize = dims[1..].iter().product();
    let u = t
        .reshape((heads, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?;
    Ok(u)
}

/// The inverse of [`unpermute_rotary`]: Hugging Face order → llama.cpp order.
pub fn permute_rotary(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let half = dims[0] / heads / 2;
    let rest: usize = dims[1..].iter().product();
    Ok(t.reshape((heads, 2, half, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

/// Hugging Face name → GGUF name (the inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (base, kind) = rest.rsplit_once('.')?;
    let g = match base {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// A byte-level BPE vocabulary to store in a GGUF file.
pub struct GgufVocab {
    pub pre: String,
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub eos_id: Option<u32>,
}

impl GgufVocab {
    /// A vocabulary of `n` single-character byte-level tokens (printable ASCII, space `Ġ`,
    /// newline `Ċ`, then fillers) and no merges: enough to tokenize plain English text with
    /// the tiny test models.
    pub fn single_bytes(n: usize, pre: &str) -> Self {
        let mut tokens: Vec<String> = (33u8..=126).map(|b| (b as char).to_string()).collect();
        tokens.push("\u{120}".to_string());
        tokens.push("\u{10a}".to_string());
        tokens.truncate(n);
        while tokens.len() < n {
            tokens.push(format!("<filler{}>", tokens.len()));
        }
        GgufVocab { pre: pre.into(), tokens, merges: vec![], eos_id: None }
    }
}

/// Writes `tensors` (Hugging Face names and layout) as a GGUF file of `config.arch` (llama or
/// qwen2), with matrices stored as `matrix_dtype` and vectors as f32. Written to a temporary
/// file and renamed into place.
pub fn write_gguf(
    path: &Path,
    config: &Config,
    tensors: &HashMap<String, Tensor>,
    vocab: &GgufVocab,
    matrix_dtype: candle_core::quantized::GgmlDType,
) -> Result<()> {
    use candle_core::quantized::{GgmlDType, QTensor};
    let arch = match config.arch {
        Arch::Llama => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Mistral => bail!("GGUF has no `mistral` architecture; write it as llama"),
    };
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut qtensors = Vec::new();
    for name in names {
        let Some(gname) = gguf_name(name) else { continue };
        let mut t = tensors[name].to_dtype(candle_core::DType::F32)?;
        if config.arch == Arch::Llama {
            if name.contains("self_attn.q_proj.") {
                t = permute_rotary(&t, config.num_heads)?;
            } else if name.contains("self_attn.k_proj.") {
                t = permute_rotary(&t, config.num_kv_heads)?;
            }
        }
        let dtype = if t.rank() == 2 { matrix_dtype } else { GgmlDType::F32 };
        qtensors.push((gname, QTensor::quantize(&t, dtype)?));
    }
    let u32v = |v: usize| Value::U32(v as u32);
    let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.block_count"), u32v(config.num_layers)),
        (format!("{arch}.context_length"), u32v(config.max_position_embeddings)),
        (format!("{arch}.embedding_length"), u32v(config.hidden_size)),
        (format!("{arch}.feed_forward_length"), u32v(config.intermediate_size)),
        (format!("{arch}.attention.head_count"), u32v(config.num_heads)),
        (format!("{arch}.attention.head_count_kv"), u32v(config.num_kv_heads)),
        (format!("{arch}.attention.key_length"), u32v(config.head_dim)),
        (format!("{arch}.attention.value_length"), u32v(config.head_dim)),
        (format!("{arch}.rope.dimension_count"), u32v(config.head_dim)),
        (format!("{arch}.rope.freq_base"), Value::F32(config.rope_theta as f32)),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(config.rms_norm_eps as f32)),
        (format!("{arch}.vocab_size"), u32v(config.vocab_size)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(vocab.pre.clone())),
        ("tokenizer.ggml.tokens".into(), strings(&vocab.tokens)),
        ("tokenizer.ggml.merges".into(), strings(&vocab.merges)),
    ];
    if let Some(eos) = vocab.eos_id {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    crate::atomic_write(path, |file| {
        candle_core::quantized::gguf_file::write(file, &meta_refs, &tensor_refs).map_err(anyhow::Error::msg)
    })
}
