//! The forward pass against transformers' logits for tiny random models
//! (`tests/fixtures/make_tiny_models.py` made them).

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use potptq_model::llama::KvCache;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn reference(name: &str) -> (Tensor, Tensor) {
    let r = candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = r["input_ids"].to_dtype(candle_core::DType::U32).unwrap();
    (ids, r["logits"].clone())
}

/// max |a - b| / max |b|
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / scale
}

fn check(name: &str) {
    let loaded = potptq_model::load(&fixture(name)).unwrap();
    let (ids, want) = reference(name);
    let got = loaded.model.forward(&ids, None).unwrap();
    let err = rel_err(&got, &want);
    assert!(err < 1e-4, "{name}: logits differ from transformers by {err:e} (relative)");
}

#[test]
fn llama_tied_gqa_matches_transformers() {
    check("tiny_llama");
}

#[test]
fn qwen2_untied_bias_matches_transformers() {
    check("tiny_qwen2");
}

#[test]
fn mistral_explicit_head_dim_matches_transformers() {
    check("tiny_mistral");
}

/// Decoding token by token through the KV cache gives the same logits as one full pass.
#[test]
fn kv_cache_decode_matches_full_pass() {
    let loaded = potptq_model::load(&fixture("tiny_qwen2")).unwrap();
    let (ids, want) = reference("tiny_qwen2");
    let ids = ids.get(0).unwrap().unsqueeze(0).unwrap();
    let want = want.get(0).unwrap();
    let n = ids.dim(1).unwrap();
    let mut cache = KvCache::new(loaded.model.config.num_layers);
    // A 5-token prefill, then one token at a time.
    let mut rows = vec![loaded.model.forward(&ids.narrow(1, 0, 5).unwrap(), Some(&mut cache)).unwrap().get(0).unwrap()];
    for i in 5..n {
        let step = loaded.model.forward(&ids.narrow(1, i, 1).unwrap(), Some(&mut cache)).unwrap();
        rows.push(step.get(0).unwrap());
    }
    let got = Tensor::cat(&rows, 0).unwrap();
    let err = rel_err(&got, &want);
    assert!(err < 1e-4, "cached decode differs by {err:e}");
}
