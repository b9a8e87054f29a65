"""``CompletionRolloutBuffer``: a rollout buffer of whole episodes, one row per completion.

The critic-free algorithms (GRPO, RLOO, REINFORCE++) need every episode of a rollout complete (no
critic bootstraps a cut one) and compare the episodes of one prompt. Their rollouts play whole
rounds of episodes (``agents.critic_free``), so the buffer holds episodes rather than SB3's grid of
transitions: the prompt, the completion, and per completion token the log-prob under the policy
that sampled it, the reference log-prob (from the env, which computes it anyway), the env's reward,
the return and the advantage. A minibatch of episodes is evaluated with one teacher-forced forward
(``LMActorCriticPolicy.completion_log_probs``), and nothing per transition (observations of
``max_prompt_tokens + max_new_tokens`` ids each) is stored.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import NamedTuple

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import BaseBuffer

from .data_parallel import Share, minibatches, rank_lengths, whole


def rewards_to_go(rewards: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Undiscounted reward-to-go (gamma = 1): ``out[:, t] = sum of rewards[:, t:]``, 0 on padding."""
    return np.flip(np.cumsum(np.flip(rewards * mask, 1), 1), 1) * mask


class CompletionSamples(NamedTuple):
    """A minibatch of whole episodes; per-token fields are ``[B, T']`` with ``T'`` the longest
    completion of the minibatch, 0 past each completion's end (``completion_mask``). ``share``:
    this rank's part of the minibatch (``agents.data_parallel``; all of it in a single process)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    old_log_prob: torch.Tensor
    ref_log_prob: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    share: Share
    behaviour_log_prob: torch.Tensor | None = None  # the sampler's, where old_log_prob was recomputed


class CompletionRolloutBuffer(BaseBuffer):
    """Holds ``buffer_size * n_envs`` episodes: ``buffer_size`` rounds of one episode per row.

    :param buffer_size: rounds per rollout (the algorithm's ``episodes_per_row``, in SB3's
        ``n_steps`` slot).
    :param observation_space: the env's (its ``input_ids`` length is ``prompt_len + T``).
    :param prompt_len: the env's ``max_prompt_tokens``.

    ``gamma`` and ``gae_lambda`` are accepted because SB3 passes them; returns are undiscounted.
    """

    def __init__(self, buffer_size: int, observation_space: spaces.Dict, action_space: spaces.Space,
                 device: torch.device | str = "auto", gamma: float = 1.0, gae_lambda: float = 1.0, n_envs: int = 1,
                 prompt_len: int | None = None):
        super().__init__(buffer_size, observation_space, action_space, device, n_envs=n_envs)
        if prompt_len is None:
            raise ValueError("CompletionRolloutBuffer needs prompt_len (the env's max_prompt_tokens)")
        self.P = int(prompt_len)
        ids_space = observation_space["input_ids"]
        if not isinstance(ids_space, spaces.Box):
            raise ValueError(f"CompletionRolloutBuffer needs a Box 'input_ids' observation space, got {ids_space!r}")
        self.T = int(ids_space.shape[0]) - self.P
        self.capacity = buffer_size * n_envs
        self.reset()

    def reset(self) -> None:
        N, P, T = self.capacity, self.P, self.T
        self.prompt_ids = np.zeros((N, P), dtype=np.int64)
        self.prompt_mask = np.zeros((N, P), dtype=np.int64)
        self.completion_ids = np.zeros((N, T), dtype=np.int64)
        self.completion_mask = np.zeros((N, T), dtype=np.float32)
        self.log_probs = np.zeros((N, T), dtype=np.float32)
        self.behaviour_log_probs: np.ndarray | None = None  # see recompute_log_probs
        self.ref_log_probs = np.zeros((N, T), dtype=np.float32)
        self.rewards = np.zeros((N, T), dtype=np.float32)
        self.returns = np.zeros((N, T), dtype=np.float32)  # reward-to-go, undiscounted
        self.advantages = np.zeros((N, T), dtype=np.float32)
        self.groups = np.zeros(N, dtype=np.int64)  # the env's group id: episodes of one prompt share it
        self.prompt_index = np.zeros(N, dtype=np.int64)
        self.scores = np.zeros(N, dtype=np.float32)
        self._rank_lengths: list[np.ndarray] | None = None
        super().reset()

    def add_round(self, episodes, rewards: np.ndarray, scores: np.ndarray) -> None:
        """Store a round of finished episodes (``TextGenCore.episodes()``, one per env row), with
        their per-token ``rewards`` ``[n, T]`` and ``scores`` ``[n]``."""
        n = len(episodes.prompt_ids)
        if self.pos + n > self.capacity:
            raise ValueError(f"the buffer holds {self.capacity} episodes; adding {n} to {self.pos} would overflow")
        rows = slice(self.pos, self.pos + n)
        self.prompt_ids[rows], self.prompt_mask[rows] = episodes.prompt_ids, episodes.prompt_mask
        self.completion_ids[rows] = episodes.completion_ids
        self.completion_mask[rows] = episodes.completion_mask
        self.log_probs[rows] = episodes.log_probs  # under the acting distribution, at sampling time
        self.ref_log_probs[rows] = episodes.ref_log_probs
        self.rewards[rows] = rewards * self.completion_mask[rows]
        self.returns[rows] = rewards_to_go(self.rewards[rows], self.completion_mask[rows])
        self.groups[rows], self.prompt_index[rows], self.scores[rows] = episodes.group_id, episodes.prompt_index, scores
        self.pos += n
        self._rank_lengths = None
        self.full = self.pos == self.capacity

    def recompute_log_probs(self, log_prob_fn, chunk: int = 16) -> None:
        """Replace the stored (sampling-time) log-probs by the training forward's,
        ``log_prob_fn(prompt_ids, prompt_mask, completion_ids, completion_mask)`` (``[k, T']``), over
        chunks of ``chunk`` episodes, keeping the sampler's as ``behaviour_log_probs`` (see
        ``LMAlgorithm.prepare_update``)."""
        behaviour = self.log_probs.copy()
        for start in range(0, self.pos, chunk):
            idx = np.arange(start, min(start + chunk, self.pos))
            width = max(int(self.completion_mask[idx].sum(1).max()), 1)
            logp = log_prob_fn(self.to_torch(self.prompt_ids[idx]), self.to_torch(self.prompt_mask[idx]),
                               self.to_torch(self.completion_ids[idx, :width]),
                               self.to_torch(self.completion_mask[idx, :width]))
            self.log_probs[idx] = 0.0
            self.log_probs[idx, :width] = logp.cpu().numpy()
        self.behaviour_log_probs = behaviour

    def size(self) -> int:
        return self.pos

    @property
    def lengths(self) -> np.ndarray:
        return self.completion_mask[: self.pos].sum(1).astype(np.int64)

    @property
    def episode_returns(self) -> np.ndarray:
        """Each stored episode's return: the sum of its rewards."""
        return self.returns[: self.pos, 0].astype(np.float64)

    def set_episode_advantages(self, advantages: np.ndarray) -> None:
        """Give every token of each episode its episode's advantage (GRPO, RLOO)."""
        n = self.pos
        self.advantages[:n] = np.asarray(advantages, dtype=np.float32)[:, None] * self.completion_mask[:n]

    def get(self, batch_size: int | None = None) -> Generator[CompletionSamples, None, None]:
        """Minibatches of whole episodes of about ``batch_size`` completion tokens each (an episode
        longer than that forms its own), shuffled with numpy's global RNG (seeded by SB3); under
        data parallelism, this rank's part of each minibatch of the global buffer."""
        rounds = self.pos // self.n_envs  # the buffer is filled a round (one episode per row) at a time
        if self._rank_lengths is None:  # every rank's episode lengths, once per rollout
            self._rank_lengths = rank_lengths(self.lengths)
        for chosen, share in minibatches(self._rank_lengths, batch_size, rounds=rounds):
            yield self._get_samples(chosen, share=share)

    def _get_samples(self, batch_inds: np.ndarray, env=None,  # type: ignore[override]
                     share: Share | None = None) -> CompletionSamples:
        width = max(int(self.completion_mask[batch_inds].sum(1).max()), 1)
        share = whole(len(batch_inds), int(self.completion_mask[batch_inds].sum())) if share is None else share
        mask = self.completion_mask[batch_inds, :width]
        if share.stand_in:  # an episode evaluated only to take part in the step: no token of it counts
            mask = np.zeros_like(mask)
        return CompletionSamples(
            prompt_ids=self.to_torch(self.prompt_ids[batch_inds]),
            prompt_mask=self.to_torch(self.prompt_mask[batch_inds]),
            completion_ids=self.to_torch(self.completion_ids[batch_inds, :width]), completion_mask=self.to_torch(mask),
            old_log_prob=self.to_torch(self.log_probs[batch_inds, :width]),
            ref_log_prob=self.to_torch(self.ref_log_probs[batch_inds, :width]),
            advantages=self.to_torch(self.advantages[batch_inds, :width]),
            returns=self.to_torch(self.returns[batch_inds, :width]), share=share,
            behaviour_log_prob=(None if self.behaviour_log_probs is None
                                else self.to_torch(self.behaviour_log_probs[batch_inds, :width])),
        )
