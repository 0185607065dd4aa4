//! A packed checkpoint runs through the kernels crate and gives what its dequantized f32
//! weights give: the same perplexity (batched windows: the GEMM path), the same logits token
//! by token with the KV cache (the GEMV path), and an export that matches.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use potptq_model::checkpoint::{self, through_f16, QuantConfig};
use potptq_model::llama::{KvCache, Model, BLOCK_LINEARS};
use potptq_model::perplexity::{perplexity, PplOptions, Scoring};
use potptq_quant::{quantize_rtn, Format, GroupLayout, QTensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// Quantizes every block linear of `fp` by RTN; returns the dequantized f32 model (embeddings
/// through f16, as the checkpoint stores them) and the codes.
fn quantize(fp: &Model, format: Format, bits: u8, group: usize) -> (Model, HashMap<String, QTensor>) {
    let mut model = fp.clone();
    model.embed_tokens = through_f16(&fp.embed_tokens).unwrap();
    model.lm_head = fp.lm_head.as_ref().map(|h| through_f16(h).unwrap());
    let mut tensors = HashMap::new();
    for (i, block) in model.blocks.iter_mut().enumerate() {
        for name in BLOCK_LINEARS {
            let l = block.linear_mut(name).unwrap();
            let (rows, cols) = l.shape().unwrap();
            let w = l.weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let q = quantize_rtn(name, &w, GroupLayout::new(rows, cols, group).unwrap(), format, bits).unwrap();
            l.set_weight(Tensor::from_vec(q.dequantize(), (rows, cols), &Device::Cpu).unwrap());
            tensors.insert(format!("model.layers.{i}.{name}"), q);
        }
    }
    (model, tensors)
}

fn qconfig(format: Format, bits: u8, group: usize) -> QuantConfig {
    QuantConfig {
        quant_method: checkpoint::QUANT_METHOD.into(),
        format: if format == Format::Pot { "pot".into() } else { "int".into() },
        bits,
        group_size: group,
        sym: false,
        steps: vec!["test".into()],
        method: "test".into(),
        packing: checkpoint::PACKING.into(),
        clamped_scales: 0,
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The FP fixture, its RTN-quantized dense model, and that model saved as a packed checkpoint
/// under `root` (in a folder named after `what`).
fn saved_checkpoint(root: &std::path::Path, fixture_name: &str, format: Format, bits: u8, group: usize, what: &str) -> (Model, Model, PathBuf) {
    let fp = potptq_model::load(&fixture(fixture_name)).unwrap().model;
    let (dense, tensors) = quantize(&fp, format, bits, group);
    let dir = root.join(what.replace(' ', "-"));
    checkpoint::save(&dir, &dense, &tensors, &qconfig(format, bits, group), None, &[], false).unwrap();
    (fp, dense, dir)
}

/// Four windows of 48 tokens.
fn test_tokens(vocab: usize) -> Vec<u32> {
    (0..4 * 48u32).map(|i| (i * 37 + 11) % vocab as u32).collect()
}

/// Perplexity over the windows of `test_tokens`, two per pass (more tokens than the GEMV path
/// takes).
fn ppl(m: &Model, tokens: &[u32]) -> f64 {
    let opts = PplOptions { seq_len: 48, max_windows: None, scoring: Scoring::All, batch: 2 };
    perplexity(m, tokens, &opts, |_, _| {}).unwrap().ppl
}

/// The largest relative gap between the logits of `a` and `b` fed `tokens` one at a time with
/// the KV cache (one-token products).
fn max_logit_gap(a: &Model, b: &Model, tokens: &[u32]) -> f32 {
    let (mut ca, mut cb) = (KvCache::new(a.config.num_layers), KvCache::new(b.config.num_layers));
    let mut gap = 0f32;
    for &t in tokens {
        let ids = Tensor::from_slice(&[t], (1, 1), &Device::Cpu).unwrap();
        let la = values(&a.forward(&ids, Some(&mut ca)).unwrap());
        let lb = values(&b.forward(&ids, Some(&mut cb)).unwrap());
        gap = gap.max(max_rel(&lb, &la));
    }
    gap
}

#[test]
fn packed_checkpoint_equals_its_dequantized_weights() {
    let tmp = tempfile::tempdir().unwrap();
    for (fixture_name, format, bits, group) in [
        ("tiny_llama", Format::Pot, 2, 32),
        ("tiny_llama", Format::Pot, 3, 40),
        ("tiny_qwen2", Format::Pot, 4, 64),
        ("tiny_mistral", Format::IntAsym, 3, 40),
        ("tiny_llama", Format::IntAsym, 4, 32),
    ] {
        let what = format!("{fixture_name} {format:?} {bits} bits g{group}");
        let (fp, dense, dir) = saved_checkpoint(tmp.path(), fixture_name, format, bits, group, &what);
        let loaded = potptq_model::load(&dir).unwrap();
        let packed = &loaded.model;
        assert!(packed.blocks.iter().all(|b| BLOCK_LINEARS.iter().all(|n| b.linear(n).unwrap().packed().is_some())), "{what}");
        assert_eq!(packed.embed_tokens.dtype(), DType::F16, "{what}: embeddings stay f16");

        let tokens = test_tokens(fp.config.vocab_size);
        let (want, got) = (ppl(&dense, &tokens), ppl(packed, &tokens));
        assert!(((got - want) / want).abs() <= 1e-4, "{what}: ppl {got} vs {want}");
        let gap = max_logit_gap(&dense, packed, &tokens[..6]);
        assert!(gap <= 1e-5, "{what}: logits differ by {gap}");

        // Export from the packed model writes the dequantized weights.
        let out = tmp.path().join(format!("{}-export", what.replace(' ', "-")));
        checkpoint::export_dequantized(&out, packed, None, false).unwrap();
        let exported = potptq_model::load(&out).unwrap().model;
        for (x, y) in exported.blocks.iter().zip(&dense.blocks) {
            for n in BLOCK_LINEARS {
                let (a, b) = (values(x.linear(n).unwrap().weight().unwrap()), values(y.linear(n).unwrap().weight().unwrap()));
                assert!(max_rel(&a, &b) <= 1e-3, "{what}: exported {n} (f16) differs");
            }
        }
        // A packed model converts back to a dense one with the same weights.
        let back = packed.to_dense().unwrap();
        assert_eq!(values(back.blocks[0].q_proj.weight().unwrap()), values(dense.blocks[0].q_proj.weight().unwrap()), "{what}");
    }
}

/// On a GPU (a build with the `cuda` feature), a packed checkpoint runs its linears through
/// the fused kernels with f16 activations where their layout takes the shape (here the linears
/// of 64 columns; those of 96 are dequantized on the GPU), and gives what it gives on the CPU:
/// the same perplexity over batched windows (GEMM) and the same logits token by token (GEMV).
/// The FP model gives the same on both devices too. Skipped without a GPU.
#[cfg(feature = "cuda")]
#[test]
fn on_a_gpu_the_packed_checkpoint_equals_the_cpu() {
    let Ok(gpu) = Device::new_cuda(0) else {
        eprintln!("no CUDA device: skipped");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    for (fixture_name, format, bits) in [
        ("tiny_llama", Format::Pot, 2),
        ("tiny_qwen2", Format::Pot, 3),
        ("tiny_mistral", Format::Pot, 4),
        ("tiny_llama", Format::IntAsym, 4),
        ("tiny_qwen2", Format::IntAsym, 3),
    ] {
        let what = format!("{fixture_name} {format:?} {bits} bits g64");
        let (fp, _, dir) = saved_checkpoint(tmp.path(), fixture_name, format, bits, 64, &what);
        let cpu = potptq_model::load(&dir).unwrap().model;
        let on_gpu = cpu.to_device(&gpu).unwrap();
        for b in &on_gpu.blocks {
            for n in BLOCK_LINEARS {
                let l = b.linear(n).unwrap();
                assert_eq!(l.on_gpu_kernels(), l.shape().unwrap().1 % 64 == 0, "{what}: {n}");
            }
        }

        let tokens = test_tokens(fp.config.vocab_size);
        let (want, got) = (ppl(&cpu, &tokens), ppl(&on_gpu, &tokens));
        assert!(((got - want) / want).abs() <= 2e-3, "{what}: ppl {got} on the GPU vs {want}");
        let (want, got) = (ppl(&fp, &tokens), ppl(&fp.to_device(&gpu).unwrap(), &tokens));
        assert!(((got - want) / want).abs() <= 1e-4, "{fixture_name} FP: ppl {got} on the GPU vs {want}");
        let gap = max_logit_gap(&cpu, &on_gpu, &tokens[..6]);
        assert!(gap <= 1e-2, "{what}: logits differ by {gap}");
    }
}

/// The logits of `cpu` fed `tokens` one at a time with the KV cache.
#[cfg(feature = "cuda")]
fn cpu_logits(cpu: &Model, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(cpu.config.num_layers);
    tokens.iter().map(|&t| values(&cpu.forward(&Tensor::from_slice(&[t], (1, 1), &Device::Cpu).unwrap(), Some(&mut cache)).unwrap())).collect()
}

/// The GPU decoder (its steps launched one by one, or replayed as a CUDA graph) gives the CPU
/// model's logits token by token: packed checkpoints (fused kernels for the linears of 64
/// columns, f16 cuBLAS for those of 96), the FP model (all cuBLAS, f32 embeddings), GQA and
/// q/k/v biases (qwen2); after `reset` it starts over, and a prefill gives the same logits and
/// cache. It refuses a full cache, a prefill past it or of no tokens, an unknown token,
/// `generate_on_gpu` beyond the cache, a cache beyond the model's context and a CPU device.
/// Skipped without a GPU.
#[cfg(feature = "cuda")]
#[test]
fn the_gpu_decoder_equals_the_cpu() {
    use potptq_model::gpu_decoder::GpuDecoder;
    let Ok(gpu) = Device::new_cuda(0) else {
        eprintln!("no CUDA device: skipped");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    for (fixture_name, quant) in [
        ("tiny_llama", Some((Format::Pot, 2))),
        ("tiny_qwen2", Some((Format::Pot, 3))),
        ("tiny_mistral", Some((Format::Pot, 4))),
        ("tiny_llama", Some((Format::IntAsym, 4))),
        ("tiny_qwen2", Some((Format::IntAsym, 3))),
        ("tiny_qwen2", None),
        ("tiny_llama", None),
    ] {
        let (what, cpu) = match quant {
            Some((format, bits)) => {
                let what = format!("{fixture_name} {format:?} {bits} bits g64");
                let (_, _, dir) = saved_checkpoint(tmp.path(), fixture_name, format, bits, 64, &what);
                (what, potptq_model::load(&dir).unwrap().model)
            }
            None => (format!("{fixture_name} FP"), potptq_model::load(&fixture(fixture_name)).unwrap().model),
        };
        let tokens = &test_tokens(cpu.config.vocab_size)[..20];
        let want = cpu_logits(&cpu, tokens);
        for graph in [false, true] {
            let mut dec = GpuDecoder::new(&cpu, &gpu, tokens.len(), graph).unwrap();
            if quant.is_some() {
                assert!(dec.kernel_linears() > 0, "{what}: no linear on the fused kernels");
            }
            for round in 0..2 {
                for (i, &t) in tokens.iter().enumerate() {
                    let got = dec.step(t).unwrap();
                    let gap = max_rel(&got, &want[i]);
                    assert!(gap <= 1e-2, "{what} graph={graph} round {round}: token {i}: logits differ by {gap}");
                }
                let e = dec.step(tokens[0]).unwrap_err();
                assert!(e.to_string().contains("KV cache is full"), "{e}");
                dec.reset();
            }
            let e = dec.step(cpu.config.vocab_size as u32).unwrap_err();
            assert!(e.to_string().contains("outside the vocabulary"), "{e}");
            // A prefill queues its steps and returns the last one's logits; the cache it
            // wrote serves the steps after it.
            dec.reset();
            let split = tokens.len() - 5;
            let got = dec.prefill(&tokens[..split]).unwrap();
            assert!(max_rel(&got, &want[split - 1]) <= 1e-2, "{what} graph={graph}: prefill logits");
            for (i, &t) in tokens.iter().enumerate().skip(split) {
                let gap = max_rel(&dec.step(t).unwrap(), &want[i]);
                assert!(gap <= 1e-2, "{what} graph={graph}: token {i} after the prefill: logits differ by {gap}");
            }
            dec.reset();
            let e = dec.prefill(&[tokens, &tokens[..1]].concat()).unwrap_err();
            assert!(e.to_string().contains("KV cache is full") && dec.position() == 0, "{e}");
            let e = dec.prefill(&[]).unwrap_err();
            assert!(e.to_string().contains("no tokens"), "{e}");
            let e = potptq_model::generate::generate_on_gpu(&mut dec, &tokens[..10], 11, potptq_model::generate::Sampling { temperature: 0.0, top_p: 1.0, seed: 0 }, &[], |_| Ok(())).unwrap_err();
            assert!(e.to_string().contains("exceeds the GPU decoder's 20 positions"), "{e}");
        }
        let context = cpu.config.max_position_embeddings;
        let e = GpuDecoder::new(&cpu, &gpu, context + 1, true).err().unwrap();
        assert!(e.to_string().contains(&format!("the model's context is {context}")), "{e}");
        let e = GpuDecoder::new(&cpu, &Device::Cpu, 8, true).err().unwrap();
        assert!(e.to_string().contains("needs a CUDA device"), "{e}");
    }
}

/// Past one round of the attention block's 256 threads (and many of its 8 warps): the GPU
/// decoder over 600 positions of the FP llama fixture, its context widened to 600, against
/// the CPU model, token by token after a prefill. Skipped without a GPU.
#[cfg(feature = "cuda")]
#[test]
fn the_gpu_decoder_attends_over_long_caches() {
    use potptq_model::gpu_decoder::GpuDecoder;
    let Ok(gpu) = Device::new_cuda(0) else {
        eprintln!("no CUDA device: skipped");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = fixture("tiny_llama");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();
    assert!(config.contains("\"max_position_embeddings\": 128"));
    std::fs::write(tmp.path().join("config.json"), config.replace("\"max_position_embeddings\": 128", "\"max_position_embeddings\": 600")).unwrap();
    let cpu = potptq_model::load(tmp.path()).unwrap().model;
    assert_eq!(cpu.config.max_position_embeddings, 600);
    let tokens: Vec<u32> = (0..600u32).map(|i| (i * 37 + 11) % cpu.config.vocab_size as u32).collect();
    let want = cpu_logits(&cpu, &tokens);
    let mut dec = GpuDecoder::new(&cpu, &gpu, tokens.len(), true).unwrap();
    let got = dec.prefill(&tokens[..300]).unwrap();
    assert!(max_rel(&got, &want[299]) <= 1e-2, "prefill of 300 tokens");
    for (i, &t) in tokens.iter().enumerate().skip(300) {
        let gap = max_rel(&dec.step(t).unwrap(), &want[i]);
        assert!(gap <= 1e-2, "token {i}: logits differ by {gap}");
    }
}
