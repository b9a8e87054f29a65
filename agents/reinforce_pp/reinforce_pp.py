"""REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
Models", arXiv:2501.03262).

PPO's machinery without a critic: the KL penalty sits in the reward *per token* (section 2.1,
``r_t = 1[t = end] * score - beta * k1_t``, the env's ``kl_in="reward"`` with
``kl_mode="per_token"``), the advantage of token t is its undiscounted reward-to-go (gamma = 1)

    A_t = score - beta * sum_{s >= t} k1_s

normalised over every token of the whole rollout (the global batch, section 2.2), not per prompt:

    A_t <- (A_t - mean(A)) / (std(A) + 1e-8)

and the update is PPO's clipped surrogate (token mean, as OpenRLHF's implementation; one pass over
the rollout, ``n_epochs=1``). It needs no groups (``group_size`` 1 is fine): each prompt may be
sampled once.

The per-token KL needs the reference's log-prob of every token, not when the step is taken but
before the update. ``agents.make`` therefore makes the env with ``kl_mode="final"``: when an episode
ends, the env scores it and computes the reference's log-probs in one teacher-forced forward, and
the rollout charges ``-beta * k1_t`` to each token t and the rest of the episode's reward to its
last (``critic_free.spread_kl``): the rewards a ``kl_mode="per_token"`` env pays step by step (that
mode works too, with the same returns), without its KV-cached reference forward per generated token
(decoding is memory-bound: on 2 CPU cores the reference's decode cost as much as the policy's).
With ``kl_in="loss"`` the reward-to-go is the score and the update adds ``kl_coef * k2``.
"""

from __future__ import annotations

import numpy as np

from textgym import distributed

from ..completion_buffer import CompletionRolloutBuffer
from ..critic_free import CriticFreeAlgorithm


def reinforce_pp_advantages(returns_to_go: np.ndarray, mask: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """REINFORCE++ advantages: each token's reward-to-go ``[N, T]``, normalised by the mean and
    (population) std over all real tokens (``mask``) of the batch; 0 on padding. Data-parallel,
    the batch is the global one: the real tokens of every rank (``textgym.distributed.mean_std``)."""
    returns_to_go = np.asarray(returns_to_go, dtype=np.float64)
    real = np.asarray(mask) > 0
    mean, std = distributed.mean_std(returns_to_go[real])
    return np.where(real, (returns_to_go - mean) / (std + eps), 0.0)


class ReinforcePP(CriticFreeAlgorithm):
    """REINFORCE++ over a causal LM (see the module docstring).

    :param learning_rate: None: by model size and LoRA (``agents.common.default_learning_rate``).
    :param episodes_per_row: rounds of whole episodes per rollout (1).
    :param batch_size: completion tokens per minibatch, filled with whole episodes (64).
    :param n_epochs: 1 pass over each rollout.
    :param clip_range: 0.2.
    :param loss_normalization: "token" (OpenRLHF), "sequence" or "sum".
    :param ent_coef: 0.0; max_grad_norm: 1.0; target_kl: None.
    :param lora: None, True or ``peft.LoraConfig`` options; ``ptx_coef``/``ptx_data``: PPO-ptx.
    """

    algo_name = "reinforce++"
    env_defaults = {"kl_in": "reward", "kl_mode": "final"}
    kl_per_token = True

    def compute_advantages(self, buffer: CompletionRolloutBuffer) -> None:
        n = buffer.pos
        buffer.advantages[:n] = reinforce_pp_advantages(buffer.returns[:n], buffer.completion_mask[:n])
