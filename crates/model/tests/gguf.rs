//! A tiny GGUF written here (llama.cpp's layout: renamed tensors, permuted q/k rows) loads back
//! to the weights it was written from, and to transformers' logits.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use potptq_model::gguf::{write_gguf, GgufVocab};
use potptq_model::{hf, Model};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn vocab(n: usize) -> GgufVocab {
    GgufVocab::single_bytes(n, "gpt2")
}

fn model_tensors(m: &Model) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    out.insert("model.embed_tokens.weight".to_string(), m.embed_tokens.clone());
    out.insert("model.norm.weight".to_string(), m.norm.clone());
    if let Some(h) = &m.lm_head {
        out.insert("lm_head.weight".to_string(), h.clone());
    }
    for (i, b) in m.blocks.iter().enumerate() {
        out.insert(format!("model.layers.{i}.input_layernorm.weight"), b.attn_norm.clone());
        out.insert(format!("model.layers.{i}.post_attention_layernorm.weight"), b.mlp_norm.clone());
        for name in potptq_model::llama::BLOCK_LINEARS {
            let l = b.linear(name).unwrap();
            out.insert(format!("model.layers.{i}.{name}.weight"), l.weight().unwrap().clone());
            if let Some(bias) = &l.bias {
                out.insert(format!("model.layers.{i}.{name}.bias"), bias.clone());
            }
        }
    }
    out
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-30)
}

fn round_trip(name: &str, dtype: GgmlDType, tol: f32) {
    let dir = fixture(name);
    let config = hf::read_config(&dir).unwrap();
    let source = hf::read_tensors(&dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("tiny.gguf");
    write_gguf(&path, &config, &source, &vocab(config.vocab_size), dtype).unwrap();

    let loaded = potptq_model::load(&path).unwrap();
    assert_eq!(loaded.model.config, config, "{name}: config read back from GGUF");
    let got = model_tensors(&loaded.model);
    assert_eq!(got.len(), source.len(), "{name}: tensor count");
    for (tname, want) in &source {
        let err = max_rel(&got[tname], want);
        assert!(err <= tol, "{name} {dtype:?}: `{tname}` differs by {err:e}");
    }
    if dtype == GgmlDType::F32 {
        let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
        let ids = r["input_ids"].to_dtype(candle_core::DType::U32).unwrap();
        let err = max_rel(&loaded.model.forward(&ids, None).unwrap(), &r["logits"]);
        assert!(err < 1e-4, "{name}: GGUF logits differ from transformers by {err:e}");
    }
}

#[test]
fn llama_f32_gguf_loads_to_its_source() {
    round_trip("tiny_llama", GgmlDType::F32, 0.0);
}

#[test]
fn qwen2_f32_gguf_loads_to_its_source() {
    round_trip("tiny_qwen2", GgmlDType::F32, 0.0);
}

#[test]
fn f16_and_q8_0_gguf_load_within_their_precision() {
    round_trip("tiny_llama", GgmlDType::F16, 1e-3);
    round_trip("tiny_qwen2", GgmlDType::Q8_0, 1e-2);
}

#[test]
fn rotary_permutation_round_trips() {
    let t = Tensor::arange(0f32, 8.0 * 3.0, &Device::Cpu).unwrap().reshape((8, 3)).unwrap();
    let p = potptq_model::gguf::permute_rotary(&t, 2).unwrap();
    assert_ne!(p.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    let back = potptq_model::gguf::unpermute_rotary(&p, 2).unwrap();
    assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
}
