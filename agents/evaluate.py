"""Evaluate an agent: play whole episodes with its acting policy and summarise them."""

from __future__ import annotations

from typing import Any

import numpy as np

from textgym import sampling


def evaluate(model, n_episodes: int = 32, deterministic: bool = False, seed: int = 0) -> dict:
    """Play ``n_episodes`` episodes of ``model``'s task with its acting policy (NLPO's through its
    mask), on prompts drawn from the env's prompt set, and return the mean score, KL, reward and
    completion length, plus the episodes' final infos under ``"episodes"``.

    Episodes are spread over the env's rows as stable-baselines3's ``evaluate_policy`` does (row
    ``i`` plays ``(n_episodes + i) // n_envs``), so short completions are not over-represented. They
    run on an evaluation copy of the env's engine with their own RNG: training (running episodes,
    KV cache, KL controller, RNG state) continues exactly as if no evaluation had happened.
    """
    core = model.env.core
    episodes = sampling.episodes_per_row(core, n_episodes, seed=seed, greedy=deterministic)
    summary: dict[str, Any] = {key: float(np.mean([e[key] for e in episodes])) for key in ("score", "kl", "length")}
    summary["reward"] = float(np.mean([sampling.episode_return(core, e) for e in episodes]))
    summary["episodes"] = episodes
    return summary
