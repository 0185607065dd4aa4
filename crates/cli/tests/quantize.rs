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
    args.extend(["--bits", "2,3,4", "--group-size", "64", "--calib-segments", "6", "--json"]);
    let report = last_json(&potptq(&args));
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1 + 3 * 5, "fp + 5 methods × 3 widths");
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
    run(&["--calib-segments", "200", "--methods", "gptq-int"], "too few calibration tokens");
    std::fs::create_dir_all(&st.out).unwrap();
    run(&["--methods", "rtn-int"], "already exists (pass --force to replace it)");
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
