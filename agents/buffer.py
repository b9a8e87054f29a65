"""``EpisodeRolloutBuffer``: SB3's rollout buffer, yielding minibatches of whole episodes.

SB3 shuffles transitions, so every row of a minibatch needs its own LM forward. Here minibatches
are filled with whole episode segments (an episode, or the part of it inside this rollout), each
in step order, so ``LMActorCriticPolicy`` evaluates a segment with one teacher-forced forward.
Segments are shuffled with numpy's global RNG (seeded by SB3), like SB3 shuffles transitions.
Under data parallelism each rank yields its part of every minibatch of the global buffer
(``agents.data_parallel``).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import NamedTuple

import numpy as np
import torch
from stable_baselines3.common.buffers import DictRolloutBuffer

from .data_parallel import Share, minibatches, rank_lengths, whole


class LMRolloutSamples(NamedTuple):
    """SB3's ``DictRolloutBufferSamples`` plus the reference log-prob of each action (``None``
    unless the KL term sits in the loss) and this rank's ``Share`` of the minibatch (the whole of
    it in a single process; see ``agents.data_parallel``)."""

    observations: dict
    actions: torch.Tensor
    old_values: torch.Tensor
    old_log_prob: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    ref_log_prob: torch.Tensor | None
    share: Share
    behaviour_log_prob: torch.Tensor | None = None  # the sampler's, where old_log_prob was recomputed


class EpisodeRolloutBuffer(DictRolloutBuffer):
    """A ``DictRolloutBuffer`` whose ``get(batch_size)`` yields about ``batch_size`` transitions per
    minibatch, made of whole episode segments (a segment longer than ``batch_size`` forms its own).

    ``ref_log_probs`` (flat, filled by the agent before an update with the KL in the loss) rides
    along in every minibatch as ``ref_log_prob``."""

    ref_log_probs: np.ndarray | None = None
    # The sampler's log-probs, kept when ``log_probs`` were recomputed by the training forward
    # (``recompute_log_probs``); None while ``log_probs`` are the sampler's own.
    behaviour_log_probs: np.ndarray | None = None
    _rank_lengths: list[np.ndarray] | None = None  # every rank's segment lengths, once per rollout

    def reset(self) -> None:
        super().reset()
        self.ref_log_probs = None
        self.behaviour_log_probs = None
        self._rank_lengths = None

    def recompute_log_probs(self, log_prob_fn, chunk: int = 8) -> None:
        """Replace the stored (sampling-time) log-probs by ``log_prob_fn(observations, actions)``,
        the training forward's, over chunks of ``chunk`` whole episode segments, keeping the
        sampler's as ``behaviour_log_probs`` (see ``LMAlgorithm.prepare_update``)."""
        segments = self.segments()  # flattens the buffer
        behaviour = self.log_probs.copy()
        for start in range(0, len(segments), chunk):
            idx = np.concatenate(segments[start : start + chunk])
            obs = {key: self.to_torch(value[idx]) for key, value in self.observations.items()}
            self.log_probs[idx] = log_prob_fn(obs, self.to_torch(self.actions[idx])).cpu().numpy().reshape(len(idx), -1)
        self.behaviour_log_probs = behaviour

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
        if self._rank_lengths is None:
            self._rank_lengths = rank_lengths(np.array([len(segment) for segment in segments]))
        for chosen, share in minibatches(self._rank_lengths, batch_size, items_are_tokens=True):
            yield self._get_samples(np.concatenate([segments[k] for k in chosen]), share=share)

    def _get_samples(self, batch_inds: np.ndarray, env=None,  # type: ignore[override]
                     share: Share | None = None) -> LMRolloutSamples:
        base = super()._get_samples(batch_inds, env)
        ref = None if self.ref_log_probs is None else self.to_torch(self.ref_log_probs[batch_inds])
        behaviour = None if self.behaviour_log_probs is None else self.to_torch(self.behaviour_log_probs[batch_inds])
        share = whole(len(batch_inds), len(batch_inds)) if share is None else share
        return LMRolloutSamples(*base, ref_log_prob=ref, share=share, behaviour_log_prob=behaviour)

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
