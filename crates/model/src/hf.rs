//! Hugging Face model directories: `config.json` + single or sharded safetensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::config::{Config, HfConfig};

pub fn read_config(dir: &Path) -> Result<Config> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let hf: HfConfig = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid model config", path.display()))?;
    hf.to_config()
}

/// `eos_token_id` of config.json (a number or a list); empty when absent.
pub fn read_eos_ids(dir: &Path) -> Vec<u32> {
    let json: Option<serde_json::Value> = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    match json.as_ref().and_then(|j| j.get("eos_token_id")) {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
        _ => Vec::new(),
    }
}

/// The safetensors files of a directory: `model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        bail!("{} has neither model.safetensors nor model.safetensors.index.json", dir.display());
    }
    let text = std::fs::read_to_string(&index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no weight_map", index.display()))?;
    let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Every tensor of the directory as f32 on the CPU.
pub fn read_tensors(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for file in safetensors_files(dir)? {
        let bytes = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("{} is not a valid safetensors file", file.display()))?;
        for (name, view) in st.tensors() {
            let t = tensor_from_view(&name, &view)
                .with_context(|| format!("tensor `{name}` in {}", file.display()))?;
            out.insert(name, t);
        }
    }
    Ok(out)
}

fn tensor_from_view(name: &str, view: &safetensors::tensor::TensorView<'_>) -> Result<Tensor> {
    use safetensors::Dtype;
    let dtype = match view.dtype() {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        other => bail!("unsupported tensor type {other:?} for `{name}` (supported: F32, F16, BF16)"),
    };
    let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)?;
    Ok(t.to_dtype(DType::F32)?)
}
