"""RLOO: REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
Optimization for Learning from Human Feedback in LLMs", arXiv:2402.14740; after Kool et al. 2019).

No critic: each prompt gets k completions (a group of the env's rows, ``group_size``), and the
baseline of completion i is the mean return of the *other* k - 1 (section 3.3):

    A_i = R_i - 1/(k-1) * sum_{j != i} R_j  =  k/(k-1) * (R_i - mean(R_1..R_k))

an unbiased baseline, since it does not depend on completion i. The whole completion is one action
and ``R_i = score - kl_coef * sum_t k1_t`` is the sequence-level reward of the paper's eq. 1: the
env's ``kl_in="reward"`` with ``kl_mode="final"`` pays exactly this at the completion's end (with
``kl_mode="per_token"`` it pays the same sum spread over the tokens, and R_i, their sum, is the same).
``agents.make`` makes the env so from an id; an env with ``kl_in="loss"`` also works (the update
then adds ``kl_coef * k2``).

The estimator of the paper is REINFORCE: ``-A_i * log pi(completion_i)``, the log-prob summed over
the completion's tokens, which is ``loss_normalization="sum"`` (the default) with one gradient step
per rollout (``n_epochs=1, batch_size=None``). The defaults keep one pass (``n_epochs=1``) but take
several minibatch steps (``batch_size=64`` tokens), as TRL's RLOOTrainer does with PPO's clipped
ratio: the ratio is 1 on the first minibatch, where the clipped objective's gradient is exactly
REINFORCE's, and the clip (0.2) bounds the later minibatches, sampled by slightly older weights.
"""

from __future__ import annotations

import numpy as np

from ..completion_buffer import CompletionRolloutBuffer
from ..critic_free import CriticFreeAlgorithm, group_members


def rloo_advantages(returns: np.ndarray, groups: np.ndarray, group_size: int | None = None) -> np.ndarray:
    """Per-episode RLOO advantages: return minus the mean return of the other episodes of its
    group (``groups``: each episode's group id; every group needs at least 2 episodes)."""
    returns = np.asarray(returns, dtype=np.float64)
    index, counts = group_members(groups, group_size)
    if (counts < 2).any():
        raise ValueError("the leave-one-out baseline needs at least 2 episodes per group")
    others = (np.bincount(index, returns)[index] - returns) / (counts[index] - 1)
    return returns - others


class RLOO(CriticFreeAlgorithm):
    """RLOO over a causal LM (see the module docstring).

    :param learning_rate: None: by model size and LoRA (``agents.common.default_learning_rate``).
    :param episodes_per_row: rounds of whole episodes per rollout (1).
    :param batch_size: completion tokens per minibatch, filled with whole episodes (64); None: one
        gradient step per rollout, the paper's estimator.
    :param n_epochs: 1 pass over each rollout.
    :param clip_range: 0.2 (inactive on the first minibatch, whose ratio is 1).
    :param loss_normalization: "sum" (REINFORCE on the whole sequence, the paper), "token" (TRL) or
        "sequence".
    :param ent_coef: 0.0; max_grad_norm: 1.0; target_kl: None.
    :param lora: None, True or ``peft.LoraConfig`` options; ``ptx_coef``/``ptx_data``: PPO-ptx.

    The env: ``group_size`` >= 2 (``agents.make`` makes it with 4, the KL in the reward at the end).
    """

    algo_name = "rloo"
    min_group_size = 2
    env_defaults = {"group_size": 4, "kl_in": "reward", "kl_mode": "final"}

    hyperparameter_defaults = {"loss_normalization": "sum"}

    def compute_advantages(self, buffer: CompletionRolloutBuffer) -> None:
        n = buffer.pos
        buffer.set_episode_advantages(rloo_advantages(buffer.episode_returns, buffer.groups[:n],
                                                      group_size=self.core.group_size))
