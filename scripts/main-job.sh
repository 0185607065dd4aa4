#!/usr/bin/env bash
# The main job on the default model: fetch SmolLM2-135M and the Brown corpus, build, quantize the
# model to 3 bits with PoTPTQ (Step 1 weighted by the input's second moments, then Step 2
# training the scales and the weights: the default, pot-s1-s2+hw+tw) and the INT baselines
# (RTN-INT, GPTQ-INT), print the perplexity of FP and each method side by side, and generate from
# the PoTPTQ checkpoint. Interrupted, it resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh
cargo build --release --locked
bin=target/release/potptq
out=${OUT:-runs/main-w3}
$bin inspect | sed -n 1,6p
$bin quantize --bits 3 --methods rtn-int,gptq-int,pot-s1-s2+hw+tw --out "$out"
$bin generate --model "$out/pot-s1-s2+hw+tw-w3-g128" --prompt "The history of the printing press" --max-tokens 48
