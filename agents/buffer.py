"""``EpisodeRolloutBuffer``: SB3's rollout buffer, yielding minibatches of whole episodes.

SB3 shuffles transitions, so every row of a minibatch needs its own LM forward. Here minibatches
are filled with whole episode segments (an episode, or the part of it inside this rollout), each
in step order, so ``LMActorCriticPolicy`` evaluates a segment with one teacher-forced forward.
Segments are shuffled with numpy's global RNG (seeded by SB3), like SB3 shuffles transitions.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import NamedTuple

import numpy as np
import torch
from stable_baselines3.common.buffers import DictRolloutBuffer


class LMRolloutSamples(NamedTuple):
    """SB3's ``DictRolloutBufferSamples`` plus the reference log-prob of each action (``None``
    unless the KL term sits in the loss)."""

    observations: dict
    actions: torch.Tensor
    old_values: torch.Tensor
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    ref_log_prob: torch.Tensor | None


class EpisodeRolloutBuffer(DictRolloutBuffer):
    """A ``DictRolloutBuffer`` whose ``get(batch_size)`` yields about ``batch_size`` transitions per
    minibatch, made of whole episode segments (a segment longer than ``batch_size`` forms its own).

    ``ref_log_probs`` (flat, filled by the agent before an update with the KL in the loss) rides
    along in every minibatch as ``ref_log_prob``."""

    ref_log_probs: np.ndarray | None = None

    def reset(self) -> None:
        super().reset()
        self.ref_log_probs = None

    def segments(self) -> list[np.ndarray]:
        """Flat indices of each episode segment, in step order."""
        self._flatten()
        starts = self.episode_starts.reshape(-1).astype(bool)
        starts[:: self.buffer_size] = True  # each env's block starts a segment
        bounds = np.append(np.flatnonzero(starts), starts.size)
        return [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    # LMRolloutSamples is DictRolloutBufferSamples plus a field, which no NamedTuple subclass can add
    def get(self, batch_size: int | None = None) -> Generator[LMRolloutSamples, None, None]:  # type: ignore[override]
        assert self.full, "the rollout buffer is not full"
        segments = self.segments()
        total = self.buffer_size * self.n_envs
        batch_size = total if batch_size is None else batch_size
        chunk: list[np.ndarray] = []
        size = 0
        for k in np.random.permutation(len(segments)):
            chunk.append(segments[k])
            size += len(segments[k])
            if size >= batch_size:
                yield self._get_samples(np.concatenate(chunk))
                chunk, size = [], 0
        if chunk:
            yield self._get_samples(np.concatenate(chunk))

    def _get_samples(self, batch_inds: np.ndarray, env=None) -> LMRolloutSamples:  # type: ignore[override]
        base = super()._get_samples(batch_inds, env)
        ref = None if self.ref_log_probs is None else self.to_torch(self.ref_log_probs[batch_inds])
        return LMRolloutSamples(*base, ref_log_prob=ref)

    def _flatten(self) -> None:
        # As SB3's get(): [n_steps, n_envs, ...] -> [n_envs * n_steps, ...], env-major, so each
        # env's steps are contiguous. episode_starts is flattened too, to find the segments.
        if self.generator_ready:
            return
        for key, obs in self.observations.items():
            self.observations[key] = self.swap_and_flatten(obs)
        for name in ("actions", "values", "log_probs", "advantages", "returns", "episode_starts"):
            self.__dict__[name] = self.swap_and_flatten(self.__dict__[name])
        self.generator_ready = True
