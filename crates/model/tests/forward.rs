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

/// A directory sharded the way transformers shards it (`model.safetensors.index.json`) loads
/// to the same model, whatever dtype each shard stores.
#[test]
fn sharded_bf16_and_f16_directory_loads() {
    let src = fixture("tiny_llama");
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part, dtype) in [("model-00001-of-00002.safetensors", first, candle_core::DType::F16), ("model-00002-of-00002.safetensors", second, candle_core::DType::BF16)] {
        let sub: std::collections::HashMap<String, Tensor> =
            part.iter().map(|n| (n.to_string(), tensors[*n].to_dtype(dtype).unwrap())).collect();
        candle_core::safetensors::save(&sub, dir.join(shard)).unwrap();
        for n in part.iter() {
            weight_map.insert(n.to_string(), shard.into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let loaded = potptq_model::load(dir).unwrap();
    let (ids, want) = reference("tiny_llama");
    let err = rel_err(&loaded.model.forward(&ids, None).unwrap(), &want);
    // Half-precision weights: close to the f32 logits, not equal.
    assert!(err < 2e-2, "sharded half-precision model differs by {err:e}");
    assert!(err > 0.0);
}

/// A KV cache filled for one batch size refuses another, with the cache kept as it was.
#[test]
fn kv_cache_refuses_another_batch_size() {
    let loaded = potptq_model::load(&fixture("tiny_qwen2")).unwrap();
    let mut cache = KvCache::new(loaded.model.config.num_layers);
    let one = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    loaded.model.forward(&one, Some(&mut cache)).unwrap();
    let two = Tensor::new(&[[4u32], [5]], &Device::Cpu).unwrap();
    let e = loaded.model.forward(&two, Some(&mut cache)).unwrap_err();
    assert!(e.to_string().contains("a KV cache for"), "{e}");
    assert_eq!(cache.len(), 3);
}
