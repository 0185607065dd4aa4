#!/usr/bin/env bash
# The test suite: fetches the default model and text (pinned, hashed), then runs every test of
# the workspace, the real-model ones included, in the release profile the main job also builds.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh
cargo test --release --workspace --locked
