"""Evaluate an agent: play whole episodes on its env with its policy and summarise them."""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def evaluate(model, n_episodes: int = 32, deterministic: bool = False) -> dict:
    """Play at least ``n_episodes`` episodes on ``model``'s env (from fresh resets; the training
    state of the env is re-encoded afterwards) and return the mean score, KL, reward and
    completion length, plus the episodes' final infos under ``"episodes"``."""
    env = model.get_env()
    obs = env.reset()
    episodes: list[dict] = []
    model.policy.set_training_mode(False)
    while len(episodes) < n_episodes:
        actions, _ = model.predict(obs, deterministic=deterministic)
        obs, _, dones, infos = env.step(actions)
        episodes.extend({k: v for k, v in info.items() if k != "terminal_observation"} for info in infos if "score" in info)
    model._last_obs = env.reset()  # learning continues from fresh episodes
    model._last_episode_starts = np.ones((env.num_envs,), dtype=bool)
    summary = {key: float(np.mean([e[key] for e in episodes])) for key in ("score", "kl", "length")}
    summary["reward"] = float(np.mean([e["episode"]["r"] for e in episodes]))
    summary["episodes"] = episodes
    return summary
