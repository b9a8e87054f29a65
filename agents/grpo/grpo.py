"""GRPO: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300).

PPO without a critic: the baseline of a completion is the mean return of the G completions of the
same prompt (one group of the env's rows, ``group_size``), and the advantage of every token of
completion i is its group-normalised return (eq. 3 and section 4.1.2, outcome supervision):

    A_i = (R_i - mean(R_1..R_G)) / (std(R_1..R_G) + eps)

``std`` is the sample standard deviation (Bessel-corrected, as TRL's GRPOTrainer), ``eps`` 1e-4;
a group whose returns are all equal gets advantage 0 (no signal). ``R_i`` is the episode's return
as the env defines it: the (scaled) score, minus ``kl_coef * KL`` when the env puts the KL in the
reward.

The loss (``agents.critic_free``) is the clipped surrogate over ``n_epochs`` passes, no value
loss. Where the KL goes is the env's shared ``kl_in``. GRPO's own choice is the loss (eq. 3
subtracts ``beta * D_KL`` inside the objective instead of shaping the reward), so an env that
``agents.make`` builds for GRPO from an id gets ``kl_in="loss"``: the update adds ``kl_coef * k2``,
reduced like the policy loss. The paper's estimator in the loss is k3; textgym's is k2, because k3
differentiated through log pi follows the forward KL(pi_ref || pi) (Tang & Munos 2025, see
``textgym.kl``). An env made with ``kl_in="reward"`` also works: the KL then sits in R_i.

Loss normalisation (``loss_normalization``): ``"sequence"`` (default, the paper: each completion's
token mean, then the mean over completions), ``"token"`` (DAPO, Yu et al. 2025: one mean over every
token of the minibatch, so long completions are not down-weighted), or ``"sum"`` (Dr. GRPO, Liu et
al. 2025, up to its constant divisor ``max_new_tokens``). Dr. GRPO also drops the std division:
``scale_rewards=False``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..completion_buffer import CompletionRolloutBuffer
from ..critic_free import CriticFreeAlgorithm, group_members
from ..policy import LMActorCriticPolicy


def grpo_advantages(returns: np.ndarray, groups: np.ndarray, scale: bool = True, eps: float = 1e-4,
                    group_size: int | None = None) -> np.ndarray:
    """Per-episode GRPO advantages: return minus its group's mean, divided by the group's sample
    std plus ``eps`` when ``scale``. ``groups``: each episode's group id."""
    returns = np.asarray(returns, dtype=np.float64)
    index, counts = group_members(groups, group_size)
    means = np.bincount(index, returns) / counts
    centred = returns - means[index]
    if not scale:
        return centred
    variances = np.bincount(index, centred**2) / np.maximum(counts - 1, 1)
    return centred / (np.sqrt(variances)[index] + eps)


class GRPO(CriticFreeAlgorithm):
    """GRPO over a causal LM (see the module docstring).

    :param learning_rate: None: by model size and LoRA (``agents.common.default_learning_rate``).
    :param episodes_per_row: rounds of whole episodes per rollout (1): a rollout holds
        ``n_envs / group_size`` prompts with ``group_size`` completions each, per round.
    :param batch_size: completion tokens per minibatch, filled with whole episodes (64).
    :param n_epochs: 4 passes of the clipped objective over each rollout.
    :param clip_range: 0.2.
    :param loss_normalization: "sequence" (the paper), "token" (DAPO) or "sum" (Dr. GRPO).
    :param scale_rewards: True: divide by the group's std (the paper); False: Dr. GRPO.
    :param ent_coef: 0.0; max_grad_norm: 1.0; target_kl: None.
    :param lora: None, True or ``peft.LoraConfig`` options; ``ptx_coef``/``ptx_data``: PPO-ptx.

    The env: ``group_size`` >= 2 (``agents.make`` makes it with 4 and ``kl_in="loss"``).
    """

    algo_name = "grpo"
    min_group_size = 2
    env_defaults = {"group_size": 4, "kl_in": "loss"}

    hyperparameter_defaults = {"n_epochs": 4, "loss_normalization": "sequence"}

    def __init__(self, policy: type[LMActorCriticPolicy] | str = LMActorCriticPolicy, env: Any = None,
                 scale_rewards: bool = True, **kwargs: Any):
        if not isinstance(scale_rewards, (bool, np.bool_)):
            raise ValueError(f"scale_rewards must be True or False, got {scale_rewards!r}")
        self.scale_rewards = bool(scale_rewards)
        super().__init__(policy, env, **kwargs)
        self.textgym_hyperparameters["scale_rewards"] = self.scale_rewards  # saved with the agent

    def compute_advantages(self, buffer: CompletionRolloutBuffer) -> None:
        n = buffer.pos
        advantages = grpo_advantages(buffer.episode_returns, buffer.groups[:n], self.scale_rewards,
                                     group_size=self.core.group_size)
        buffer.set_episode_advantages(advantages)
