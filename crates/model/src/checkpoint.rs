//! Packed checkpoints: a Hugging Face style directory whose quantized linears are stored as
//! dense-packed codes (`<name>.qweight`, i32), f16 group scales (`<name>.scales`,
//! `[out, ceil(in/G)]`) and, for INT, integer zero-points (`<name>.zeros`, u8), described by
//! `quantization_config` in `config.json`. Every other tensor is stored as f16 (embeddings,
//! output projection) or f32 (norms, biases), exactly as the quantized model evaluates them.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use half::f16;
use potptq_kernels::PackedMatrix;
use potptq_quant::{Format, GroupLayout, QTensor};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::llama::{Model, BLOCK_LINEARS};
use crate::Tokenizer;

pub const QUANT_METHOD: &str = "potptq";

/// `quantization_config` of `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantConfig {
    pub quant_method: String,
    /// "pot" or "int".
    pub format: String,
    pub bits: u8,
    pub group_size: usize,
    /// For INT: symmetric (true) or asymmetric with zero-points.
    #[serde(default)]
    pub sym: bool,
    /// What produced the scales, in order (e.g. ["step1"], ["gptq"], ["step1", "step2"]).
    pub steps: Vec<String>,
    /// The method name of the report (e.g. "pot-s1").
    pub method: String,
    /// Packing of `qweight`: rows in chunks of 32 codes, each chunk `bits` little-endian u32 words.
    pub packing: String,
    /// Scales clamped to keep the f16 power-of-two bit-add decode exact.
    #[serde(default)]
    pub clamped_scales: usize,
}

pub const PACKING: &str = "rows-of-32-codes-lsb-first";

impl QuantConfig {
    pub fn format(&self) -> Result<Format> {
        Ok(match (self.format.as_str(), self.sym) {
            ("pot", _) => Format::Pot,
            ("int", false) => Format::IntAsym,
            ("int", true) => Format::IntSym,
            (other, _) => bail!("unknown quantization format `{other}`"),
        })
    }
}

/// Where a block linear's weight lives in the checkpoint.
fn linear_names(num_layers: usize) -> impl Iterator<Item = (usize, &'static str, String)> {
    (0..num_layers).flat_map(|i| BLOCK_LINEARS.iter().map(move |l| (i, *l, format!("model.layers.{i}.{l}"))))
}

/// Little-endian bytes of a numeric slice.
fn raw_bytes<T: bytemuck::Pod>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Entry {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32_entry(t: &Tensor, as_f16: bool) -> Result<Entry> {
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(if as_f16 {
        let h: Vec<u16> = v.iter().map(|x| f16::from_f32(*x).to_bits()).collect();
        Entry { dtype: Dtype::F16, shape: t.dims().to_vec(), data: raw_bytes(&h) }
    } else {
        Entry { dtype: Dtype::F32, shape: t.dims().to_vec(), data: raw_bytes(&v) }
    })
}

/// Rounds a tensor through f16, as the checkpoint stores it.
pub fn through_f16(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F16)?.to_dtype(DType::F32)?)
}

fn refuse_existing(dir: &Path, force: bool) -> Result<()> {
    if dir.exists() && !force {
        bail!("output {} already exists (pass --force to replace it)", dir.display());
    }
    Ok(())
}

/// Every tensor but the block linears' weights: embeddings and output projection in f16,
/// norms and biases in f32 (or f16 too, with `all_f16`).
fn unquantized_entries(model: &Model, all_f16: bool) -> Result<Vec<(String, Entry)>> {
    let mut entries = vec![
        ("model.embed_tokens.weight".to_string(), f32_entry(&model.embed_tokens, true)?),
        ("model.norm.weight".to_string(), f32_entry(&model.norm, all_f16)?),
    ];
    if let Some(h) = &model.lm_head {
        entries.push(("lm_head.weight".into(), f32_entry(h, true)?));
    }
    for (i, block) in model.blocks.iter().enumerate() {
        let p = format!("model.layers.{i}");
        entries.push((format!("{p}.input_layernorm.weight"), f32_entry(&block.attn_norm, all_f16)?));
        entries.push((format!("{p}.post_attention_layernorm.weight"), f32_entry(&block.mlp_norm, all_f16)?));
    }
    for (i, lname, full) in linear_names(model.config.num_layers) {
        if let Some(b) = &model.blocks[i].linear(lname).expect("block linear").bias {
            entries.push((format!("{full}.bias"), f32_entry(b, all_f16)?));
        }
    }
    Ok(entries)
}

/// Writes the checkpoint directory `dir`. The directory is assembled beside it and renamed
/// into place; an existing `dir` is replaced only with `force`.
pub fn save(
    dir: &Path,
    model: &Model,
    quantized: &HashMap<String, QTensor>,
    qconfig: &QuantConfig,
    tokenizer: Option<&Tokenizer>,
    extra_files: &[(&str, &[u8])],
    force: bool,
) -> Result<()> {
    refuse_existing(dir, force)?;
    let c = &model.config;
    let mut entries = unquantized_entries(model, false)?;
    for (_, _, full) in linear_names(c.num_layers) {
        let q = quantized.get(&full).with_context(|| format!("no quantized tensor for `{full}`"))?;
        let packed = q.packed_codes();
        let rows = q.layout.rows;
        entries.push((
            format!("{full}.qweight"),
            Entry { dtype: Dtype::I32, shape: vec![rows, packed.len() / rows], data: raw_bytes(&packed) },
        ));
        let groups = q.layout.groups_per_row();
        let scales: Vec<u16> = q.scales.iter().map(|s| f16::from_f32(*s).to_bits()).collect();
        entries.push((format!("{full}.scales"), Entry { dtype: Dtype::F16, shape: vec![rows, groups], data: raw_bytes(&scales) }));
        if !q.zeros.is_empty() {
            entries.push((format!("{full}.zeros"), Entry { dtype: Dtype::U8, shape: vec![rows, groups], data: q.zeros.clone() }));
        }
    }
    let mut config = c.to_hf_json();
    config["torch_dtype"] = "float16".into();
    config["quantization_config"] = serde_json::to_value(qconfig)?;

    write_model_dir(dir, &entries, &config, tokenizer, extra_files)
}

/// Assembles a model directory beside `dir` and renames it into place (replacing `dir`).
fn write_model_dir(
    dir: &Path,
    entries: &[(String, Entry)],
    config: &serde_json::Value,
    tokenizer: Option<&Tokenizer>,
    extra_files: &[(&str, &[u8])],
) -> Result<()> {
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let name = dir.file_name().context("output path has no name")?.to_string_lossy().to_string();
    let staging = parent.join(format!(".{name}.partial{}", std::process::id()));
    let result = (|| -> Result<()> {
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        std::fs::create_dir(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
        let refs: Vec<(&str, &Entry)> = entries.iter().map(|(n, e)| (n.as_str(), e)).collect();
        safetensors::serialize_to_file(refs, None, &staging.join("model.safetensors"))
            .map_err(|e| anyhow::anyhow!("cannot write safetensors: {e}"))?;
        std::fs::write(staging.join("config.json"), serde_json::to_string_pretty(config)?)?;
        if let Some(t) = tokenizer {
            t.save(staging.join("tokenizer.json"), false).map_err(|e| anyhow::anyhow!("cannot write tokenizer.json: {e}"))?;
        }
        for (fname, bytes) in extra_files {
            std::fs::write(staging.join(fname), bytes)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e.context(format!("cannot write {}", dir.display())));
    }
    if dir.exists() {
        let old = parent.join(format!(".{name}.old{}", std::process::id()));
        std::fs::rename(dir, &old)?;
        std::fs::rename(&staging, dir)?;
        std::fs::remove_dir_all(&old)?;
    } else {
        std::fs::rename(&staging, dir).with_context(|| format!("cannot move the output into {}", dir.display()))?;
    }
    Ok(())
}

/// Writes `model` as a plain Hugging Face directory that transformers loads: every tensor (the
/// quantized linears dequantized) in f16, `config.json` without `quantization_config`.
pub fn export_dequantized(dir: &Path, model: &Model, tokenizer: Option<&Tokenizer>, force: bool) -> Result<()> {
    refuse_existing(dir, force)?;
    let mut entries = unquantized_entries(model, true)?;
    for (i, lname, full) in linear_names(model.config.num_layers) {
        let linear = model.blocks[i].linear(lname).expect("block linear");
        entries.push((format!("{full}.weight"), f32_entry(&linear.weight_f32()?, true)?));
    }
    let mut config = model.config.to_hf_json();
    config["torch_dtype"] = "float16".into();
    write_model_dir(dir, &entries, &config, tokenizer, &[])
}

/// `quantization_config` of a directory's config.json, when it is a potptq checkpoint.
pub fn read_quant_config(dir: &Path) -> Result<Option<QuantConfig>> {
    let text = std::fs::read_to_string(dir.join("config.json"))
        .with_context(|| format!("cannot read {}", dir.join("config.json").display()))?;
    let json: serde_json::Value = serde_json::from_str(&text).context("config.json is not valid JSON")?;
    let Some(q) = json.get("quantization_config") else { return Ok(None) };
    let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
    if method != QUANT_METHOD {
        bail!("unsupported quantization method `{method}` in config.json (potptq reads its own checkpoints and unquantized models)");
    }
    let qc: QuantConfig = serde_json::from_value(q.clone()).context("invalid quantization_config")?;
    if qc.packing != PACKING {
        bail!("unsupported packing `{}` in quantization_config", qc.packing);
    }
    Ok(Some(qc))
}

/// A loaded checkpoint: the unquantized tensors (Hugging Face names; f16 as stored, f32
/// otherwise) and the quantized linears, packed as stored.
pub struct Loaded {
    pub tensors: HashMap<String, Tensor>,
    pub packed: HashMap<String, Arc<PackedMatrix>>,
}

fn le_u32s(data: &[u8]) -> Vec<u32> {
    data.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// Reads `dir/model.safetensors` of a checkpoint described by `qc`. The quantized linears stay
/// packed (codes as stored, scales as f32): memory holds about what the file holds.
pub fn load(dir: &Path, config: &Config, qc: &QuantConfig) -> Result<Loaded> {
    let format = qc.format()?;
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file: {e}", path.display()))?;
    let mut raw: HashMap<String, safetensors::tensor::TensorView> = st.tensors().into_iter().collect();
    let mut packed = HashMap::new();
    for (_, lname, full) in linear_names(config.num_layers) {
        let mut take = |suffix: &str| {
            raw.remove(&format!("{full}.{suffix}"))
                .with_context(|| format!("checkpoint {} has no `{full}.{suffix}`", dir.display()))
        };
        let qweight = take("qweight")?;
        let scales = take("scales")?;
        let zeros = if format == Format::Pot { None } else { Some(take("zeros")?) };
        let (rows, cols) = config.linear_shape(lname);
        let layout = GroupLayout::new(rows, cols, qc.group_size)?;
        let groups = layout.groups_per_row();
        let words = potptq_quant::pack::words_per_row(cols, qc.bits);
        ensure!(
            qweight.dtype() == Dtype::I32 && qweight.shape() == [rows, words],
            "`{full}.qweight` must be I32 [{rows}, {words}], found {:?} {:?}",
            qweight.dtype(),
            qweight.shape()
        );
        ensure!(
            scales.dtype() == Dtype::F16 && scales.shape() == [rows, groups],
            "`{full}.scales` must be F16 [{rows}, {groups}], found {:?} {:?}",
            scales.dtype(),
            scales.shape()
        );
        let scales: Vec<f32> = scales.data().chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
        let zeros = match zeros {
            None => Vec::new(),
            Some(z) => {
                ensure!(z.dtype() == Dtype::U8 && z.shape() == [rows, groups], "`{full}.zeros` must be U8 [{rows}, {groups}]");
                z.data().to_vec()
            }
        };
        let m = PackedMatrix::new(format, qc.bits, layout, le_u32s(qweight.data()), scales, zeros).with_context(|| format!("tensor `{full}`"))?;
        packed.insert(full, Arc::new(m));
    }
    let mut tensors = HashMap::new();
    for (name, t) in raw {
        let dtype = match t.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => bail!("unsupported tensor type {other:?} for `{name}` in the checkpoint"),
        };
        let tensor = Tensor::from_raw_buffer(t.data(), dtype, t.shape(), &Device::Cpu)?;
        let tensor = if dtype == DType::F16 { tensor } else { tensor.to_dtype(DType::F32)? };
        tensors.insert(name, tensor);
    }
    Ok(Loaded { tensors, packed })
}
