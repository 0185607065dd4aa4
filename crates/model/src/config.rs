//! The hyper-parameters that change the math of a llama-family forward pass.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Architectures whose forward pass is the one in `llama.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
    Mistral,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Mistral => "mistral",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (qwen2).
    pub attention_bias: bool,
}

impl Config {
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                bail!("model config: {name} must be positive");
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!(
                "model config: num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads,
                self.num_kv_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("model config: head_dim ({}) must be even for rotary embeddings", self.head_dim);
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bail!("model config: rope_theta must be a positive number");
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            bail!("model config: rms_norm_eps must be a positive number");
        }
        Ok(())
    }

    /// `[out, in]` of a block linear (`self_attn.q_proj`, …, `mlp.down_proj`).
    pub fn linear_shape(&self, linear: &str) -> (usize, usize) {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        match linear {
            "self_attn.q_proj" => (q, d),
            "self_attn.k_proj" | "self_attn.v_proj" => (kv, d),
            "self_attn.o_proj" => (d, q),
            "mlp.gate_proj" | "mlp.up_proj" => (f, d),
            "mlp.down_proj" => (d, f),
            other => panic!("not a block linear: {other}"),
        }
    }

    /// `config.json` as transformers writes it for this architecture.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (class, model_type) = match self.arch {
            Arch::Llama => ("LlamaForCausalLM", "llama"),
            Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
            Arch::Mistral => ("MistralForCausalLM", "mistral"),
        };
        serde_json::json!({
            "architectures": [class],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": "silu",
        })
    }

    /// Parameters of the transformer (embeddings counted once when tied).
    pub fn parameter_count(&self) -> usize {
        let d = self.hidden_size;
        let kv = self.num_kv_heads * self.head_dim;
        let q = self.num_heads * self.head_dim;
        let attn = d * q + 2 * d * kv + q * d + if self.attention_bias { q + 2 * kv } else { 0 };
        let mlp = 3 * d * self.intermediate_size;
        let block = attn + mlp + 2 * d;
        let embed = self.vocab_size * d;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        embed + head + d + self.num_layers * block
    }
}

#[derive(Debug, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
}

/// The fields of a Hugging Face `config.json` that potptq reads.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rope_theta: Option<f64>,
    pub rms_norm_eps: Option<f64>,
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub attention_bias: Option<bool>,
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers ≥ 5 keeps `rope_theta` and the scaling type here.
    pub rope_parameters: Option<RopeParameters>,
    pub mlp_bias: Option<bool>,
    pub hidden_act: Option<String>,
    pub sliding_window: Option<serde_json::Value>,
    pub use_sliding_window: Option<bool>,
}

impl HfConfig {
    pub fn to_config(&self) -> Result<Config> {
        let arch_name = self.architectures.first().map(String::as_str).unwrap_or("");
        let arch = match arch_name {
            "LlamaForCausalLM" => Arch::Llama,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "MistralForCausalLM" => Arch::Mistral,
            "" => bail!("config.json has no `architectures` entry"),
            other => bail!(
                "unsupported architecture `{other}` (supported: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)"
            ),
        };
        if let Some(scaling) = &self.rope_scaling {
            if !scaling.is_null() {
                bail!("unsupported rope_scaling {scaling} (only plain rotary embeddings are implemented)");
            }
        }
        if let Some(kind) = self.rope_parameters.as_ref().and_then(|r| r.rope_type.as_deref()) {
            if kind != "default" {
                bail!("unsupported rope_type `{kind}` (only plain rotary embeddings are implemented)");
            }
        }
        if self.mlp_bias == Some(true) {
            bail!("unsupported: mlp_bias = true");
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                bail!("unsupported hidden_act `{act}` (only silu)");
            }
        }
        if self.use_sliding_window == Some(true) {
            bail!("unsupported: use_sliding_window = true");
        }
        if arch == Arch::Mistral {
            if let Some(w) = self.sliding_window.as_ref().and_then(|w| w.as_u64()) {
                let ctx = self.max_position_embeddings.unwrap_or(usize::MAX) as u64;
                if w < ctx {
                    bail!("unsupported: sliding_window {w} shorter than the context {ctx}");
                }
            }
        }
        if self.num_attention_heads == 0 {
            bail!("model config: num_attention_heads must be positive");
        }
        let config = Config {
            arch,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads),
            rope_theta: self
                .rope_theta
                .or_else(|| self.rope_parameters.as_ref().and_then(|r| r.rope_theta))
                .unwrap_or(10_000.0),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: self.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: self.attention_bias.unwrap_or(arch == Arch::Qwen2),
        };
        config.validate()?;
        Ok(config)
    }
}
