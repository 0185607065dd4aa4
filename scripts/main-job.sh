#!/usr/bin/env bash
# The main job on the default model: fetch SmolLM2-135M and the Brown corpus, build, report the
# model, its perplexity on the Brown test split, and a generated sample.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh
cargo build --release --locked
bin=target/release/potptq
$bin inspect | sed -n 1,6p
# The whole test split at seq 512 takes ~9 minutes on 2 cores; MAX_WINDOWS bounds it.
$bin eval --seq-len "${SEQ_LEN:-512}" ${MAX_WINDOWS:+--max-windows "$MAX_WINDOWS"}
$bin generate --prompt "The history of the printing press" --max-tokens 48
