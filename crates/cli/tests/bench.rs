//! The benchmarks run end to end on tiny shapes and report in JSON (their timings are not
//! checked: they belong to the benchmarks, not to tests).

mod common;

use common::{last_json, potptq};

/// Step 2 of a random block whose MLP width (96) ends in a short group (64 + 32), as
/// SmolLM2's 576 columns do in groups of 128: the block trains and its loss is finite.
#[test]
fn bench_step2_takes_a_short_last_group() {
    let out = potptq(&[
        "bench", "step2", "--hidden", "64", "--heads", "4", "--intermediate", "96", "--segments", "2", "--seq-len", "16",
        "--group-size", "64", "--epochs", "1", "--blocks", "1", "--profile-steps", "1", "--json",
    ]);
    let r = last_json(&out);
    assert_eq!(r["group_size"], 64);
    assert_eq!(r["epochs_run"], 1);
    for key in ["loss_before", "loss_after"] {
        let v = r[key].as_f64().unwrap();
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
}
