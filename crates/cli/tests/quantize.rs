//! `potptq quantize` end to end on the tiny model: every method and bit width, checkpoints
//! that load back to the same perplexity, and the bad input it must refuse.

mod common;

use std::path::PathBuf;

use common::{fails_with, last_json, potptq, s, tiny_gguf};

struct Setup {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    text: PathBuf,
    out: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_gguf(tmp.path());
    let text = tmp.path().join("text.txt");
    std::fs::write(&text, "a quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n".repeat(30)).unwrap();
    let out = tmp.path().join("out");
    Setup { _tmp: tmp, model, text, out }
}

fn base_args<'a>(st: &'a Setup) -> Vec<&'a str> {
    vec![
        "quantize", "--model", s(&st.model), "--text", s(&st.text), "--calib-text", s(&st.text),
        "--seq-len", "64", "--max-windows", "3", "--calib-len", "48",
        "--out", s(&st.out),
    ]
}

#[test]
fn every_method_and_width_saves_a_checkpoint_that_loads_back() {
    let st = setup();
    let mut args = base_args(&st);
    args.extend(["--bits", "2,3,4", "--group-size", "64", "--calib-segments", "6", "--s2-epochs", "2", "--json"]);
    args.extend(["--methods", "rtn-int,gptq-int,ablation"]);
    let report = last_json(&potptq(&args));
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1 + 3 * 8, "fp + 8 methods × 3 widths");
    // Step 2 reports its loss per epoch and Γ per block, in report.json and report.md.
    let md = std::fs::read_to_string(st.out.join("report.md")).unwrap();
    assert!(md.contains("## Step 2: pot-s1-s2 (3 bits)"), "{md}");
    for row in rows.iter().filter(|r| r["method"].as_str().unwrap().ends_with("-s2")) {
        let blocks = row["blocks"].as_array().unwrap();
        assert_eq!(blocks.len(), 2, "{row}");
        for b in blocks {
            assert_eq!(b["refine"]["epoch_losses"].as_array().unwrap().len(), 2);
            assert!(b["refine"]["gamma"]["min"].as_f64().unwrap() >= -0.9, "{b}");
        }
    }
    for name in ["report.json", "report.md"] {
        assert!(st.out.join(name).exists(), "{name}");
    }
    for row in &rows[1..] {
        let ppl = row["ppl"].as_f64().unwrap();
        assert!(ppl.is_finite() && ppl > 1.0, "{row}");
        let dir = row["checkpoint"].as_str().unwrap();
        // The checkpoint evaluates to the perplexity the report measured before saving.
        let eval = last_json(&potptq(&["eval", "--model", dir, "--text", s(&st.text), "--seq-len", "64", "--max-windows", "3", "--json"]));
        let again = eval["ppl"].as_f64().unwrap();
        assert!((again - ppl).abs() <= 1e-9 * ppl, "{dir}: {again} after loading vs {ppl}");
        let insp = last_json(&potptq(&["inspect", "--model", dir, "--json"]));
        assert!(insp["tensors"].as_array().unwrap().iter().any(|t| t["name"].as_str().unwrap().ends_with(".qweight")));
    }
}

#[test]
fn refuses_bad_settings() {
    let st = setup();
    let with = |extra: &[&'static str]| {
        let mut a = base_args(&st).iter().map(|x| x.to_string()).collect::<Vec<_>>();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let run = |extra: &[&'static str], needle: &str| {
        let a = with(extra);
        fails_with(&a.iter().map(String::as_str).collect::<Vec<_>>(), needle);
    };
    run(&["--bits", "5", "--methods", "pot-s1"], "5 bits is out of range for Pot (supported: 2 to 4)");
    run(&["--bits", "1", "--methods", "rtn-int"], "1 bits is out of range");
    run(&["--group-size", "0"], "group size 0 must be a positive multiple of 8");
    run(&["--group-size", "12"], "group size 12 must be a positive multiple of 8");
    run(&["--methods", "awq"], "unknown method `awq`");
    run(&["--methods", "pot-s1+zero"], "unknown option `+zero` in `pot-s1+zero`");
    run(&["--methods", "rtn-int+hw"], "`+hw` weights Step 1's scale search: it applies to pot-s1, pot-s1-s2 and the PoT GPTQ methods, not rtn-int");
    run(&["--methods", "pot-gptq+tw"], "`+tw` trains the weights in Step 2: it applies to pot-s2, pot-s1-s2 and pot-gptq-s2, not pot-gptq");
    run(&["--methods", "pot-s1-s2+tw", "--s2-weight-lr", "0"], "Step 2 weight learning rate must be positive");
    run(&["--calib-segments", "200", "--methods", "gptq-int"], "too few calibration tokens");
    run(&["--methods", "pot-s1-s2", "--s2-epochs", "0"], "Step 2 needs at least one epoch");
    run(&["--methods", "pot-s1-s2", "--s2-lr=-1"], "learning rate must be positive");
    run(&["--methods", "pot-s1-s2", "--device", "cuda"], "--device cuda needs a build with the `cuda` feature");
    run(&["--methods", "pot-s1-s2", "--s2-tf32"], "--s2-tf32 needs --device cuda");
    run(&["--methods", "pot-s1-s2", "--s2-bf16"], "--s2-bf16 needs --device cuda");
    std::fs::create_dir_all(&st.out).unwrap();
    std::fs::write(st.out.join("notes.txt"), b"mine").unwrap();
    run(&["--methods", "rtn-int"], "already exists and is not a potptq run (pass --force to replace it)");
}

#[test]
fn unwritable_output() {
    let st = setup();
    let blocker = st.out.parent().unwrap().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    let out = blocker.join("sub");
    let mut args = base_args(&st);
    let i = args.iter().position(|a| *a == s(&st.out)).unwrap();
    args[i] = s(&out);
    args.extend(["--methods", "rtn-int"]);
    fails_with(&args, "cannot create");
}

/// Every file of every checkpoint under `out`, by relative path.
fn checkpoint_files(out: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(out).unwrap() {
        let dir = entry.unwrap().path();
        if dir.is_dir() && !dir.file_name().unwrap().to_string_lossy().starts_with('.') {
            for f in std::fs::read_dir(&dir).unwrap() {
                let f = f.unwrap().path();
                files.insert(format!("{}/{}", dir.file_name().unwrap().to_string_lossy(), f.file_name().unwrap().to_string_lossy()), std::fs::read(&f).unwrap());
            }
        }
    }
    files
}

#[test]
fn an_interrupted_run_resumes_to_identical_checkpoints() {
    let st = setup();
    let settings = ["--bits", "3", "--group-size", "32", "--calib-segments", "4", "--s2-epochs", "3", "--methods", "pot-s1-s2,gptq-int,pot-gptq-s2+hw+tw", "--json"];
    let mut args = base_args(&st);
    args.extend(settings);
    let whole = last_json(&potptq(&args));

    // The same run, stopped after the first block of each method and run again each time.
    let resumed_out = st.out.with_file_name("resumed");
    let mut args = base_args(&st);
    let i = args.iter().position(|a| *a == s(&st.out)).unwrap();
    args[i] = s(&resumed_out);
    args.extend(settings);
    let mut stopping = args.clone();
    stopping.extend(["--stop-after-blocks", "1"]);
    // Each method (two blocks each) is interrupted once: the second run finishes the first
    // method and stops the second, and so on.
    for label in ["pot-s1-s2-w3", "gptq-int-w3", "pot-gptq-s2+hw+tw-w3"] {
        fails_with(&stopping, "stopped after 1 blocks");
        assert!(resumed_out.join(".state").join(label).join("block-000.safetensors").exists(), "{label}");
    }
    // A damaged state is an error that names the file, not a panic or a silent restart.
    let block = resumed_out.join(".state/pot-gptq-s2+hw+tw-w3/block-000.safetensors");
    let saved = std::fs::read(&block).unwrap();
    std::fs::write(&block, &saved[..saved.len() / 2]).unwrap();
    fails_with(&args, "block-000.safetensors is corrupt");
    std::fs::write(&block, &saved).unwrap();
    let run_json = resumed_out.join(".state/run.json");
    let settings_saved = std::fs::read(&run_json).unwrap();
    std::fs::write(&run_json, b"{ not json").unwrap();
    fails_with(&args, "run.json is corrupt (pass --force to start over)");
    std::fs::write(&run_json, &settings_saved).unwrap();
    // Settings that differ from the saved state are refused, not mixed in.
    let mut other = args.clone();
    other.extend(["--s2-lr", "0.05"]);
    fails_with(&other, "holds a run with other settings");
    let resumed = last_json(&potptq(&args));

    assert_eq!(whole["rows"].as_array().unwrap().len(), 4);
    for (a, b) in whole["rows"].as_array().unwrap().iter().zip(resumed["rows"].as_array().unwrap()) {
        assert_eq!(a["method"], b["method"]);
        assert_eq!(a["ppl"], b["ppl"], "{}", a["method"]);
    }
    let (a, b) = (checkpoint_files(&st.out), checkpoint_files(&resumed_out));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a.keys().filter(|k| k.ends_with("model.safetensors")).count() == 3, "{:?}", a.keys());
    for (name, bytes) in &a {
        assert!(bytes == &b[name], "{name} differs after resuming");
    }
    // Per-block state is gone once each checkpoint is saved.
    let leftover: Vec<_> = std::fs::read_dir(resumed_out.join(".state")).unwrap().filter(|e| e.as_ref().unwrap().path().is_dir()).collect();
    assert!(leftover.is_empty(), "{leftover:?}");
}

#[test]
fn sensitivity_scores_each_block_and_each_linear() {
    let st = setup();
    let args = ["sensitivity", "--model", s(&st.model), "--text", s(&st.text), "--seq-len", "64", "--max-windows", "2", "--bits", "2", "--group-size", "32", "--json"];
    let report = last_json(&potptq(&args));
    let parts = report["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 2 + 7, "two blocks and seven kinds of linear");
    let fp = report["fp_ppl"].as_f64().unwrap();
    for p in parts {
        let ppl = p["ppl"].as_f64().unwrap();
        assert!(ppl.is_finite() && (ppl - fp - p["delta_ppl"].as_f64().unwrap()).abs() < 1e-9, "{p}");
    }
    fails_with(&["sensitivity", "--model", s(&st.model), "--text", s(&st.text), "--method", "gptq-int"], "needs calibration data");
}
