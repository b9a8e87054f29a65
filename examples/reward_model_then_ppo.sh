#!/usr/bin/env bash
# Synthetic preferences ranked by a gold reward (VADER) -> reward model -> PPO against it.
# Pass MODEL=textgym/tiny for a quick run of the whole chain.
set -euo pipefail
MODEL=${MODEL:-textgym/smollm2-135m}
python examples/make_preferences.py --model "$MODEL" --k 4 --out runs/prefs.jsonl
textgym rm examples/rm_from_preferences.yaml
textgym train examples/ppo_with_reward_model.yaml model.name="$MODEL"
textgym eval runs/sentiment_rm
