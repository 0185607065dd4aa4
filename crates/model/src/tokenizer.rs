//! Tokenizers: built from a GGUF file's own fields, or read from `tokenizer.json`.
//!
//! GGUF files carry GPT-2 style byte-level BPE (`tokenizer.ggml.tokens`, `.merges`) and name
//! the pre-tokenizer by `tokenizer.ggml.pre`; each name below reproduces the split llama.cpp's
//! `llama-vocab.cpp` performs for it (and the model's own `tokenizer.json`).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::gguf::GgufFile;

/// Pre-tokenizer names (`tokenizer.ggml.pre`) this module implements.
pub const SUPPORTED_PRE: [&str; 5] = ["gpt2", "smollm", "qwen2", "llama-bpe", "llama3"];

const REGEX_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const REGEX_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split_then_bytes(regex: &str) -> Result<PreTokenizerWrapper> {
    let split = Split::new(SplitPattern::Regex(regex.into()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| anyhow!("bad pre-tokenizer regex: {e}"))?;
    Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, false, false).into()]).into())
}

fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    Ok(match pre {
        // GPT-2's own regex, applied by the byte-level pre-tokenizer itself.
        "gpt2" => ByteLevel::new(false, true, true).into(),
        // StarCoder family: every digit on its own, then the GPT-2 regex.
        "smollm" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        "qwen2" => split_then_bytes(REGEX_QWEN2)?,
        "llama-bpe" | "llama3" => split_then_bytes(REGEX_LLAMA3)?,
        other => bail!(
            "unsupported tokenizer pre-tokenizer `{other}` (supported: {})",
            SUPPORTED_PRE.join(", ")
        ),
    })
}

fn string_array(v: Option<&Value>, key: &str) -> Result<Vec<String>> {
    let arr = v
        .with_context(|| format!("GGUF file has no `{key}`"))?
        .to_vec()
        .map_err(|_| anyhow!("GGUF `{key}` is not an array"))?;
    arr.iter()
        .map(|v| v.to_string().cloned().map_err(|_| anyhow!("GGUF `{key}` holds a non-string")))
        .collect()
}

pub fn from_gguf(gguf: &GgufFile) -> Result<Tokenizer> {
    let model = gguf.meta_str("tokenizer.ggml.model").context("GGUF file has no tokenizer (`tokenizer.ggml.model`)")?;
    if model != "gpt2" {
        bail!("unsupported tokenizer model `{model}` (supported: gpt2 byte-level BPE)");
    }
    let pre = gguf.meta_str("tokenizer.ggml.pre").unwrap_or("gpt2");
    let pre_tokenizer = pre_tokenizer(pre)?;
    let tokens = string_array(gguf.meta("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = string_array(gguf.meta("tokenizer.ggml.merges"), "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| anyhow!("invalid GGUF merge entry `{m}`"))
        })
        .collect::<Result<_>>()?;
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow!("cannot build the BPE tokenizer: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);
    if pre == "qwen2" {
        tokenizer
            .with_normalizer(Some(NFC))
            .map_err(|e| anyhow!("cannot set the normalizer: {e}"))?;
    }
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    // Control and user-defined tokens (types 3 and 4) are matched whole, as llama.cpp does.
    if let Some(Value::Array(types)) = gguf.meta("tokenizer.ggml.token_type") {
        let special: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(t, _)| matches!(t, Value::I32(3) | Value::I32(4)))
            .map(|(_, tok)| AddedToken::from(tok.clone(), true))
            .collect();
        tokenizer
            .add_special_tokens(special)
            .map_err(|e| anyhow!("cannot add special tokens: {e}"))?;
    }
    Ok(tokenizer)
}

pub fn from_file(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| anyhow!("cannot load tokenizer {}: {e}", path.display()))
}

/// Token ids of `text`, with no BOS/EOS added.
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let enc = tokenizer
        .encode_fast(text, false)
        .map_err(|e| anyhow!("tokenization failed: {e}"))?;
    Ok(enc.get_ids().to_vec())
}

pub fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
    tokenizer.decode(ids, false).map_err(|e| anyhow!("detokenization failed: {e}"))
}
