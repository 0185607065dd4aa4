//! Bad input gets a clear message and a non-zero exit, never a panic.

mod common;

use std::path::{Path, PathBuf};

use common::{fails_with, fixture, potptq, s, tiny_gguf, tiny_gguf_with_pre};

/// A copy of a fixture directory to damage.
fn copy_fixture(name: &str, dir: &Path) -> PathBuf {
    let dst = dir.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(f), dst.join(f)).unwrap();
    }
    dst
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

#[test]
fn missing_model() {
    fails_with(&["eval", "--model", "/no/such/model.gguf"], "model not found: /no/such/model.gguf");
    fails_with(&["inspect", "--model", "/no/such/dir"], "model not found");
}

#[test]
fn default_assets_missing_names_the_fetch_script() {
    fails_with(&["eval"], "model not found: /nonexistent-assets/SmolLM2-135M-Instruct.Q4_1.gguf");
}

#[test]
fn truncated_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tiny_gguf(tmp.path());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
    fails_with(&["eval", "--model", s(&path)], "cannot read tensor");
    // Cut inside the header too.
    std::fs::write(&path, &bytes[..200]).unwrap();
    fails_with(&["inspect", "--model", s(&path)], "is not a valid GGUF file");
}

#[test]
fn corrupt_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("junk.gguf");
    std::fs::write(&path, (0..4096u32).map(|i| (i * 2654435761u32 >> 24) as u8).collect::<Vec<_>>()).unwrap();
    fails_with(&["eval", "--model", s(&path)], "is not a valid GGUF file");
}

#[test]
fn unsupported_gguf_tensor_type() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tiny_gguf(tmp.path());
    let mut bytes = std::fs::read(&path).unwrap();
    // The tensor-info entry of `output_norm.weight`: name, n_dims (u32), one u64 dim, then the
    // ggml type (u32). Make it type 16 (IQ2_XXS), which potptq cannot dequantize.
    let name = b"output_norm.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 8;
    bytes[at..at + 4].copy_from_slice(&16u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    fails_with(&["eval", "--model", s(&path)], "unsupported tensor type (ggml type 16)");
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("tiny_llama", tmp.path());
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(&["eval", "--model", s(&dir)], "is not a valid safetensors file");
    let mut junk = bytes.clone();
    junk[8..40].fill(b'#');
    std::fs::write(&st, &junk).unwrap();
    fails_with(&["eval", "--model", s(&dir)], "is not a valid safetensors file");
}

#[test]
fn unsupported_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("tiny_llama", tmp.path());
    edit_config(&dir, |v| v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]));
    fails_with(&["eval", "--model", s(&dir)], "unsupported architecture `GPT2LMHeadModel`");

    let path = tiny_gguf(tmp.path());
    let mut bytes = std::fs::read(&path).unwrap();
    // `general.architecture` = "llama" → "gpt2!" would change the length; swap in a same-length name.
    let at = bytes.windows(5).position(|w| w == b"llama").unwrap();
    bytes[at..at + 5].copy_from_slice(b"bloom");
    std::fs::write(&path, &bytes).unwrap();
    fails_with(&["eval", "--model", s(&path)], "unsupported architecture `bloom`");
}

#[test]
fn unsupported_safetensors_tensor_type() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("tiny_llama", tmp.path());
    let st = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &candle_core::Device::Cpu).unwrap();
    let norm = tensors["model.norm.weight"].to_dtype(candle_core::DType::U32).unwrap();
    tensors.insert("model.norm.weight".into(), norm);
    candle_core::safetensors::save(&tensors, &st).unwrap();
    fails_with(&["eval", "--model", s(&dir)], "unsupported tensor type U32 for `model.norm.weight`");
}

#[test]
fn config_and_tensor_shapes_disagree() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("tiny_llama", tmp.path());
    edit_config(&dir, |v| v["intermediate_size"] = serde_json::json!(100));
    fails_with(&["eval", "--model", s(&dir)], "has shape [96, 64], but the config implies [100, 64]");
}

#[test]
fn non_finite_weights_name_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("tiny_llama", tmp.path());
    let st = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &candle_core::Device::Cpu).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    let mut v = tensors[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[17] = f32::NAN;
    let shape = tensors[name].dims().to_vec();
    tensors.insert(name.into(), candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, &st).unwrap();
    fails_with(&["eval", "--model", s(&dir)], "tensor `model.layers.1.mlp.up_proj.weight` contains a non-finite value");
}

#[test]
fn text_shorter_than_one_window() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_gguf(tmp.path());
    let text = tmp.path().join("short.txt");
    std::fs::write(&text, "A short text.").unwrap();
    fails_with(&["eval", "--model", s(&model), "--text", s(&text), "--seq-len", "64"], "fewer than one window of 64");
    fails_with(&["eval", "--model", s(&model), "--text", "/no/such/text.txt"], "cannot read text /no/such/text.txt");
}

#[test]
fn seq_len_beyond_context() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_gguf(tmp.path());
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "word ".repeat(2000)).unwrap();
    fails_with(
        &["eval", "--model", s(&model), "--text", s(&text), "--seq-len", "4096"],
        "--seq-len 4096 is larger than the model's context of 128 tokens",
    );
}

#[test]
fn empty_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_gguf(tmp.path());
    fails_with(&["generate", "--model", s(&model), "--prompt", ""], "the prompt is empty");
}

#[test]
fn generation_beyond_context() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_gguf(tmp.path());
    fails_with(&["generate", "--model", s(&model), "--prompt", "the", "--max-tokens", "200"], "plus --max-tokens (200) exceeds the model's context of 128");
}

#[test]
fn tiny_model_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_gguf(tmp.path());
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "the quick brown fox jumps over the lazy dog\n".repeat(20)).unwrap();
    let out = potptq(&["eval", "--model", s(&model), "--text", s(&text), "--seq-len", "64", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let ppl = last["ppl"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "ppl {ppl}");
    assert_eq!(last["tokens_scored"].as_u64().unwrap(), last["windows"].as_u64().unwrap() * 63);

    let out = potptq(&["generate", "--model", s(&model), "--prompt", "the", "--max-tokens", "5", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["generated_tokens"].as_u64(), Some(5));

    let out = potptq(&["inspect", "--model", s(&model), "--json"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["config"]["num_layers"].as_u64(), Some(2));
    assert_eq!(last["tensors"].as_array().unwrap().len(), 2 * 9 + 2);
}

#[test]
fn unsupported_pre_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_gguf_with_pre(tmp.path(), "tekken");
    fails_with(&["generate", "--model", s(&model), "--prompt", "hi"], "unsupported tokenizer pre-tokenizer `tekken`");
}

#[test]
fn export_refuses_bad_settings_and_writes_a_loadable_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_gguf(tmp.path());
    let out = tmp.path().join("exported");
    fails_with(&["export", "--model", s(&model), "--out", s(&out)], "only --dequantized export is available");
    let ok = potptq(&["export", "--model", s(&model), "--out", s(&out), "--dequantized"]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    fails_with(&["export", "--model", s(&model), "--out", s(&out), "--dequantized"], "already exists (pass --force to replace it)");
    let insp = potptq(&["inspect", "--model", s(&out), "--json"]);
    assert!(insp.status.success(), "{}", String::from_utf8_lossy(&insp.stderr));
}

/// Without the `cuda` feature (CI's build), `--device cuda` is refused by name, before any work.
#[cfg(not(feature = "cuda"))]
#[test]
fn device_cuda_without_a_cuda_build() {
    let model = fixture("tiny_llama");
    let m = s(&model);
    fails_with(&["eval", "--model", m, "--device", "cuda"], "--device cuda needs a build with the `cuda` feature");
    fails_with(&["generate", "--model", m, "--prompt", "hi", "--device", "cuda"], "--device cuda needs a build with the `cuda` feature");
    fails_with(&["eval", "--model", m, "--device", "cuda", "--kernels", "q8"], "--kernels q8 is for the CPU's packed products");
}

/// `bench decode` refuses bad settings before it builds anything.
#[test]
fn bench_decode_refuses_bad_settings() {
    fails_with(&["bench", "decode", "--blocks", "4"], "--blocks takes two counts");
    fails_with(&["bench", "decode", "--blocks", "6,2"], "--blocks takes two counts");
    fails_with(&["bench", "decode", "--tokens", "1"], "--tokens must be at least 2");
    fails_with(&["bench", "decode", "--bits", "5"], "bits");
    fails_with(&["bench", "decode", "--engines", "graph"], "on the CPU a model decodes by its tensor operations only");
}
