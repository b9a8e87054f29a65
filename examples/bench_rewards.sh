#!/usr/bin/env bash
# The reward-function benchmark of the README, offline: gold = VADER; proxies = a reward model trained
# from gold-ranked completions (MiniLM backbone), length, and VADER itself; three seeds each. Then an
# Elo rating of the resulting policies (seed 0) judged by VADER.
set -euo pipefail
mkdir -p runs/bench_data
python examples/make_preferences.py --model textgym/smollm2-135m --k 4 --limit 128 --out runs/bench_data/prefs.jsonl
textgym rm backbone=minilm data=runs/bench_data/prefs.jsonl output_dir=runs/bench_data/reward_model epochs=2
textgym bench rewards examples/bench_rewards.yaml
textgym bench elo textgym/smollm2-135m runs/bench_rewards/{reward_model,length,vader}/seed0 \
  --judge vader --n 24 --output-dir runs/bench_elo
