#!/usr/bin/env bash
# The algorithm benchmark of the README: the offline algorithms' data first (the untrained model's
# completions of the 200 training openings, 2 each: DPO ranks each pair by its VADER score, ILQL
# learns from all 400), then every algorithm at equal wall time, the recording's seconds charged to
# ILQL and DPO.
set -euo pipefail
test -e runs/bench_recording || textgym record textgym/smollm2-135m --env textgym/Sentiment-v0 \
  --out runs/bench_recording --samples 2 --n-envs 64
textgym bench algos examples/bench_algos.yaml
