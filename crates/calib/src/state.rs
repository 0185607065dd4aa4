//! Per-block state of a quantization run, so that an interrupted run resumes where it stopped.
//!
//! After each block, its quantized linears (codes, scales, zero-points) and what Step 2 did to
//! it are written to `block-NNN.safetensors` in the state directory, atomically. A resumed run
//! loads the finished blocks, rebuilds the activations by running them (the same computation
//! an uninterrupted run does), and goes on with the next block, so it ends with the same
//! bytes. `identity.json` holds the settings the state was made with; a run with other
//! settings is refused rather than mixed with it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use potptq_quant::{Format, GroupLayout, QTensor};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::step2::RefineReport;

pub struct RunState {
    dir: PathBuf,
}

/// One finished block: its linears by full name, and Step 2's report when it ran.
pub struct SavedBlock {
    pub tensors: Vec<(String, QTensor)>,
    pub refine: Option<RefineReport>,
}

impl RunState {
    /// Opens (or starts) the state in `dir` for a run described by `identity`.
    pub fn open(dir: &Path, identity: &serde_json::Value) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("identity.json");
        if path.exists() {
            let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)
                .with_context(|| format!("{} is not valid JSON", path.display()))?;
            if &saved != identity {
                bail!(
                    "the saved state in {} was made with other settings ({}); run with the same settings to resume, or pass --force to start over",
                    dir.display(),
                    differences(&saved, identity).join(", ")
                );
            }
        } else {
            potptq_model::atomic_write_bytes(&path, &serde_json::to_vec_pretty(identity)?)?;
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    fn block_path(&self, block: usize) -> PathBuf {
        self.dir.join(format!("block-{block:03}.safetensors"))
    }

    /// How many blocks, from the first, are saved.
    pub fn finished_blocks(&self, blocks: usize) -> usize {
        (0..blocks).take_while(|&i| self.block_path(i).exists()).count()
    }

    pub fn save_block(&self, block: usize, tensors: &[(String, QTensor)], refine: Option<&RefineReport>) -> Result<()> {
        let mut views = Vec::new();
        let mut clamped = HashMap::new();
        let scale_bytes: Vec<(String, Vec<u8>)> =
            tensors.iter().map(|(name, q)| (name.clone(), q.scales.iter().flat_map(|s| s.to_le_bytes()).collect())).collect();
        for ((name, q), (_, scales)) in tensors.iter().zip(&scale_bytes) {
            let (rows, cols, groups) = (q.layout.rows, q.layout.cols, q.layout.groups_per_row());
            views.push((format!("{name}.codes"), TensorView::new(Dtype::U8, vec![rows, cols], &q.codes)?));
            views.push((format!("{name}.scales"), TensorView::new(Dtype::F32, vec![rows, groups], scales)?));
            if !q.zeros.is_empty() {
                views.push((format!("{name}.zeros"), TensorView::new(Dtype::U8, vec![rows, groups], &q.zeros)?));
            }
            clamped.insert(name.clone(), q.clamped_scales);
        }
        let mut meta = HashMap::new();
        meta.insert("clamped".to_string(), serde_json::to_string(&clamped)?);
        if let Some(r) = refine {
            meta.insert("refine".to_string(), serde_json::to_string(r)?);
        }
        let bytes = safetensors::serialize(views, Some(meta))?;
        potptq_model::atomic_write_bytes(&self.block_path(block), &bytes)
    }

    /// Block `block`'s linears, given each one's name and layout.
    pub fn load_block(&self, block: usize, linears: &[(String, GroupLayout)], format: Format, bits: u8) -> Result<SavedBlock> {
        let path = self.block_path(block);
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).with_context(|| format!("{} is corrupt", path.display()))?;
        let st = SafeTensors::deserialize(&bytes).with_context(|| format!("{} is corrupt", path.display()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let clamped: HashMap<String, usize> = serde_json::from_str(meta.get("clamped").context("no clamped counts")?)?;
        let refine = meta.get("refine").map(|r| serde_json::from_str(r)).transpose()?;
        let mut tensors = Vec::new();
        for (name, layout) in linears {
            let get = |suffix: &str| -> Result<Vec<u8>> {
                let t = st.tensor(&format!("{name}.{suffix}")).with_context(|| format!("{}: no `{name}.{suffix}`", path.display()))?;
                Ok(t.data().to_vec())
            };
            let codes = get("codes")?;
            ensure!(codes.len() == layout.rows * layout.cols, "{}: `{name}` has the wrong shape", path.display());
            let scales: Vec<f32> = get("scales")?.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            let zeros = if format.is_int() { get("zeros")? } else { Vec::new() };
            let mut q = QTensor::from_codes(format, bits, *layout, codes, scales, zeros)?;
            q.clamped_scales = *clamped.get(name).context("no clamped count")?;
            tensors.push((name.clone(), q));
        }
        Ok(SavedBlock { tensors, refine })
    }

    /// Drops the state once the run's result is saved.
    pub fn remove(self) -> Result<()> {
        std::fs::remove_dir_all(&self.dir).with_context(|| format!("cannot remove {}", self.dir.display()))
    }
}

/// The top-level keys whose values differ, as `key: saved → now`.
fn differences(saved: &serde_json::Value, now: &serde_json::Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let (a, b) = (saved.as_object().unwrap_or(&empty), now.as_object().unwrap_or(&empty));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| v.map_or("absent".to_string(), |v| v.to_string());
            format!("{k}: {} → {}", show(a.get(k)), show(b.get(k)))
        })
        .collect()
}
