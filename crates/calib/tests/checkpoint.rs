//! A quantized model saved as a packed checkpoint loads back to identical tensors.

use std::path::PathBuf;

use potptq_calib::{quantize_model, Method, QuantizeOptions};
use potptq_model::checkpoint::{self, QuantConfig};

fn tiny(name: &str) -> potptq_model::LoadedModel {
    potptq_model::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)).unwrap()
}

fn values(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn save_then_load_gives_identical_tensors() {
    for (fixture, method, bits, group) in [
        ("tiny_llama", Method::PotS1, 3, 64),
        ("tiny_qwen2", Method::RtnInt, 4, 32),
        ("tiny_mistral", Method::PotRtn, 2, 40),
        ("tiny_llama", Method::RtnIntSym, 3, 32),
    ] {
        let fp = tiny(fixture);
        let opts = QuantizeOptions::new(method, bits, group);
        let q = quantize_model(&fp.model, &opts, None, None, |_, _| {}).unwrap();
        let qc = QuantConfig {
            quant_method: checkpoint::QUANT_METHOD.into(),
            format: if method.format() == potptq_quant::Format::Pot { "pot".into() } else { "int".into() },
            bits,
            group_size: group,
            sym: false,
            steps: method.steps(),
            method: method.name().into(),
            packing: checkpoint::PACKING.into(),
            clamped_scales: q.clamped_scales(),
        };
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        checkpoint::save(&dir, &q.model, &q.tensors, &qc, None, &[], false).unwrap();
        // No partial directory is left beside it.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
        let err = checkpoint::save(&dir, &q.model, &q.tensors, &qc, None, &[], false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");

        let back = potptq_model::load(&dir).unwrap();
        let (qc_back, tensors_back) = back.quantized.as_ref().unwrap();
        assert_eq!(qc_back, &qc);
        assert_eq!(tensors_back.len(), q.tensors.len());
        for (name, t) in &q.tensors {
            let b = &tensors_back[name].to_qtensor().unwrap();
            assert_eq!((&b.codes, &b.scales, &b.zeros), (&t.codes, &t.scales, &t.zeros), "{fixture}: {name}");
        }
        let (a, b) = (&q.model, &back.model);
        assert_eq!(values(&a.embed_tokens), values(&b.embed_tokens), "{fixture}: embeddings");
        assert_eq!(a.lm_head.as_ref().map(values), b.lm_head.as_ref().map(values), "{fixture}: lm_head");
        for (x, y) in a.blocks.iter().zip(&b.blocks) {
            for l in potptq_model::llama::BLOCK_LINEARS {
                let (lx, ly) = (x.linear(l).unwrap(), y.linear(l).unwrap());
                assert_eq!(values(&lx.weight_f32().unwrap()), values(&ly.weight_f32().unwrap()), "{fixture}: {l}");
                assert!(ly.packed().is_some(), "{fixture}: {l} stays packed");
                assert_eq!(lx.bias.as_ref().map(values), ly.bias.as_ref().map(values), "{fixture}: {l} bias");
            }
            assert_eq!(values(&x.attn_norm), values(&y.attn_norm));
        }
    }
}
