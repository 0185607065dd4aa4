//! What the CLI tests share: running the binary, checking failures, tiny models.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::quantized::GgmlDType;
use potptq_model::gguf::{write_gguf, GgufVocab};
use potptq_model::hf;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

pub fn potptq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_potptq"))
        .args(args)
        .env("POTPTQ_ASSETS", "/nonexistent-assets")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run potptq")
}

/// Runs `potptq args` and checks it fails cleanly with `needle` in its message.
pub fn fails_with(args: &[&str], needle: &str) {
    let out = potptq(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?} should exit 1, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: expected `{needle}` in: {stderr}");
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The tiny llama fixture as a GGUF file with a usable byte-level vocabulary.
pub fn tiny_gguf(dir: &Path) -> PathBuf {
    tiny_gguf_with_pre(dir, "gpt2")
}

pub fn tiny_gguf_with_pre(dir: &Path, pre: &str) -> PathBuf {
    let src = fixture("tiny_llama");
    let config = hf::read_config(&src).unwrap();
    let tensors = hf::read_tensors(&src).unwrap();
    let path = dir.join("tiny.gguf");
    write_gguf(&path, &config, &tensors, &GgufVocab::single_bytes(config.vocab_size, pre), GgmlDType::F32).unwrap();
    path
}

/// The last line of a successful run's stdout, as JSON.
pub fn last_json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}
