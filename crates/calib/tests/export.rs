//! A quantized tiny model exported with `--dequantized` gives transformers' logits
//! (`tests/fixtures/make_export_reference.py` ran transformers on the exported files).

use std::path::PathBuf;

use candle_core::Device;
use potptq_calib::{quantize_model, Method, QuantizeOptions};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn exported_model_matches_transformers() {
    let fp = potptq_model::load(&fixtures().join("tiny_qwen2")).unwrap();
    let opts = QuantizeOptions::new(Method::PotS1, 3, 32);
    let q = quantize_model(&fp.model, &opts, None, None, |_, _| {}).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("export");
    potptq_model::checkpoint::export_dequantized(&dir, &q.model, None, false).unwrap();

    let fixture = fixtures().join("tiny_qwen2_pot3_export");
    if std::env::var_os("POTPTQ_WRITE_FIXTURES").is_some() {
        std::fs::create_dir_all(&fixture).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(dir.join(f), fixture.join(f)).unwrap();
        }
    }
    // The fixture was made from exactly these files.
    let ours = std::fs::read(dir.join("model.safetensors")).unwrap();
    assert_eq!(ours, std::fs::read(fixture.join("model.safetensors")).unwrap(), "export differs from the fixture");

    let exported = potptq_model::load(&dir).unwrap();
    let r = candle_core::safetensors::load(fixture.join("reference.safetensors"), &Device::Cpu).unwrap();
    let ids = r["input_ids"].to_dtype(candle_core::DType::U32).unwrap();
    let got = exported.model.forward(&ids, None).unwrap();
    let want = &r["logits"];
    let diff = (&got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff / scale < 1e-4, "exported model's logits differ from transformers' by {:e}", diff / scale);
}
