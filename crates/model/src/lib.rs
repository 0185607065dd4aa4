//! Models in, a forward pass out: GGUF and Hugging Face loading, tokenizers, the llama/qwen2
//! forward, perplexity and generation.

pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod corpus;
pub mod generate;
pub mod gguf;
#[cfg(feature = "cuda")]
pub mod gpu_decoder;
#[cfg(feature = "cuda")]
pub mod gpu_ops;
pub mod hf;
pub mod kernel_ops;
pub mod llama;
pub mod memory;
pub mod perplexity;
pub mod tokenizer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::Serialize;
pub use tokenizers::Tokenizer;

pub use config::{Arch, Config};
pub use llama::Model;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Gguf,
    HuggingFace,
}

/// A tensor as stored in the source file, for `inspect`.
#[derive(Debug, Clone, Serialize)]
pub struct StoredTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

pub struct LoadedModel {
    pub path: PathBuf,
    pub format: Format,
    pub model: Model,
    pub tokenizer: Option<Tokenizer>,
    /// Tokens that end generation.
    pub eos_ids: Vec<u32>,
    /// For a potptq checkpoint: its quantization and the quantized linears as stored (shared
    /// with the model's linears).
    pub quantized: Option<(checkpoint::QuantConfig, HashMap<String, Arc<potptq_kernels::PackedMatrix>>)>,
}

impl LoadedModel {
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        match &self.tokenizer {
            Some(t) => Ok(t),
            None => bail!("{} has no tokenizer (tokenizer.json)", self.path.display()),
        }
    }
}

fn format_of(path: &Path) -> Result<Format> {
    if !path.exists() {
        bail!("model not found: {}", path.display());
    }
    Ok(if path.is_dir() { Format::HuggingFace } else { Format::Gguf })
}

/// Loads a GGUF file or a Hugging Face directory; weights become f32 on the CPU.
pub fn load(path: &Path) -> Result<LoadedModel> {
    let format = format_of(path)?;
    let mut quantized = None;
    let (model, tokenizer, eos_ids) = match format {
        Format::Gguf => {
            let mut gguf = gguf::GgufFile::open(path)?;
            let config = gguf.config()?;
            let tokenizer = tokenizer::from_gguf(&gguf)?;
            let eos_ids = gguf.eos_ids();
            let tensors = gguf.hf_tensors(&config)?;
            (Model::from_tensors(config, tensors)?, Some(tokenizer), eos_ids)
        }
        Format::HuggingFace => {
            let config = hf::read_config(path)?;
            let eos_ids = hf::read_eos_ids(path);
            let (tensors, packed) = match checkpoint::read_quant_config(path)? {
                Some(qc) => {
                    let loaded = checkpoint::load(path, &config, &qc)?;
                    quantized = Some((qc, loaded.packed.clone()));
                    (loaded.tensors, loaded.packed)
                }
                None => (hf::read_tensors(path)?, HashMap::new()),
            };
            let tok_path = path.join("tokenizer.json");
            let tokenizer = if tok_path.exists() { Some(tokenizer::from_file(&tok_path)?) } else { None };
            (Model::from_parts(config, tensors, packed)?, tokenizer, eos_ids)
        }
    };
    Ok(LoadedModel { path: path.to_path_buf(), format, model, tokenizer, eos_ids, quantized })
}

/// Config and stored tensors without dequantizing anything.
pub fn describe(path: &Path) -> Result<(Format, Config, Vec<StoredTensor>)> {
    let format = format_of(path)?;
    let (config, mut tensors) = match format {
        Format::Gguf => {
            let gguf = gguf::GgufFile::open(path)?;
            let config = gguf.config()?;
            let tensors = gguf
                .content
                .tensor_infos
                .iter()
                .map(|(name, info)| StoredTensor {
                    name: name.clone(),
                    dtype: format!("{:?}", info.ggml_dtype),
                    shape: info.shape.dims().to_vec(),
                })
                .collect();
            (config, tensors)
        }
        Format::HuggingFace => {
            let config = hf::read_config(path)?;
            let mut tensors = Vec::new();
            for file in hf::safetensors_files(path)? {
                let bytes = std::fs::read(&file)?;
                let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
                    .map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", file.display()))?;
                for (name, info) in meta.tensors() {
                    tensors.push(StoredTensor {
                        name,
                        dtype: format!("{:?}", info.dtype),
                        shape: info.shape.clone(),
                    });
                }
            }
            (config, tensors)
        }
    };
    tensors.sort_by(|a, b| natural_key(&a.name).cmp(&natural_key(&b.name)));
    Ok((format, config, tensors))
}

/// Sort key that orders `blk.2` before `blk.10`.
fn natural_key(name: &str) -> Vec<(String, u64)> {
    name.split('.')
        .map(|part| match part.parse::<u64>() {
            Ok(n) => (String::new(), n),
            Err(_) => (part.to_string(), 0),
        })
        .collect()
}

/// The tokens of `text` as a `[1, n]` tensor.
pub fn token_tensor(ids: &[u32]) -> Result<Tensor> {
    Ok(Tensor::from_slice(ids, (1, ids.len()), &candle_core::Device::Cpu)?)
}

/// `atomic_write` of a byte string.
pub fn atomic_write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write(path, |w| Ok(std::io::Write::write_all(w, bytes)?))
}

/// Writes `path` through a temporary file in the same directory, renamed into place only when
/// `write` succeeded: a reader never sees a half-written file.
pub fn atomic_write(path: &Path, write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>) -> Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(file);
        write(&mut w)?;
        w.flush()?;
        w.get_ref().sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("cannot write {}", path.display())));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", path.display()))?;
    Ok(())
}
