//! The default model and text (fetched by `scripts/fetch-assets.sh`): splits, perplexity and
//! generation on the real thing.

use std::path::PathBuf;

use potptq_model::corpus::{brown_split, sha256_hex, Split, CALIBRATION_SHA256, TEST_SHA256};
use potptq_model::generate::{generate, Sampling};
use potptq_model::perplexity::{perplexity, PplOptions, Scoring};
use potptq_model::tokenizer::{decode, encode};

fn assets() -> PathBuf {
    let dir = std::env::var_os("POTPTQ_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets"));
    assert!(dir.join("brown").exists(), "assets missing at {}: run scripts/fetch-assets.sh", dir.display());
    dir
}

fn smollm2() -> potptq_model::LoadedModel {
    potptq_model::load(&assets().join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap()
}

#[test]
fn brown_splits_match_the_published_hashes() {
    let dir = assets().join("brown");
    let test = brown_split(&dir, Split::Test).unwrap();
    assert_eq!(test.len(), 615_535);
    assert_eq!(sha256_hex(test.as_bytes()), TEST_SHA256);
    let calib = brown_split(&dir, Split::Calibration).unwrap();
    assert_eq!(calib.len(), 5_512_035);
    assert_eq!(sha256_hex(calib.as_bytes()), CALIBRATION_SHA256);
}

#[test]
fn perplexity_on_the_first_windows_is_sane() {
    let m = smollm2();
    let text = brown_split(&assets().join("brown"), Split::Test).unwrap();
    let tokens = encode(m.tokenizer().unwrap(), &text).unwrap();
    assert!(tokens.len() > 100_000, "{} tokens", tokens.len());
    let opts = PplOptions { seq_len: 512, max_windows: Some(2), scoring: Scoring::All, batch: 2 };
    let r = perplexity(&m.model, &tokens, &opts, |_, _| {}).unwrap();
    assert_eq!((r.windows, r.tokens_scored), (2, 2 * 511));
    // A 135M model on edited American English of the 1960s: tens, not units or thousands.
    assert!(r.ppl.is_finite() && r.ppl > 10.0 && r.ppl < 80.0, "ppl {}", r.ppl);

    let half = PplOptions { scoring: Scoring::SecondHalf, ..opts };
    let h = perplexity(&m.model, &tokens, &half, |_, _| {}).unwrap();
    assert_eq!(h.tokens_scored, 2 * 255);
    // Later tokens see more context.
    assert!(h.ppl < r.ppl, "second half {} vs all {}", h.ppl, r.ppl);
}

#[test]
fn greedy_generation_is_english() {
    let m = smollm2();
    let tok = m.tokenizer().unwrap();
    let prompt = encode(tok, "The capital of France is").unwrap();
    let sampling = Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };
    let (ids, stats) = generate(&m.model, &prompt, 12, sampling, &m.eos_ids, |_| Ok(())).unwrap();
    let text = decode(tok, &ids).unwrap();
    assert!(text.contains("Paris"), "{text:?}");
    assert!(stats.generated_tokens >= 2);
}

/// Token ids equal llama.cpp's own tokenizer for this GGUF (`llama-tokenize`, run by
/// `tests/fixtures/make_tokenizer_fixture.sh`) on Brown test text and on tricky strings.
#[test]
fn tokenizer_matches_the_reference() {
    let m = smollm2();
    let tok = m.tokenizer().unwrap();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm2_brown_tokens.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    let text = fixture["text"].as_str().unwrap();
    assert!(text.len() > 4000);
    assert_eq!(encode(tok, text).unwrap(), ids(&fixture["ids"]), "Brown test text");
    for case in fixture["cases"].as_array().unwrap() {
        let t = case["text"].as_str().unwrap();
        assert_eq!(encode(tok, t).unwrap(), ids(&case["ids"]), "{t:?}");
    }
    // Decoding gives the text back.
    assert_eq!(decode(tok, &ids(&fixture["ids"])).unwrap(), text);
}
