"""A2C (Mnih et al. 2016) over a causal LM, with AdamW and defaults suited to text.

The update is written out here (SB3's ``A2C.train`` has no place for extra loss terms): one
gradient step on the whole rollout, plus the KL term when the env puts it in the loss.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import stable_baselines3 as sb3
import torch

from ..buffer import EpisodeRolloutBuffer
from ..common import LMAlgorithm, value_loss
from ..data_parallel import share_of
from ..policy import LMActorCriticPolicy
from ..update import take_rows


class A2C(LMAlgorithm, sb3.A2C):
    """stable-baselines3's A2C with ``LMActorCriticPolicy``: one gradient step per rollout.

    Text defaults (everything overridable; other SB3 A2C arguments pass through):

    :param learning_rate: None: by model size and LoRA (``agents.common.default_learning_rate``).
    :param n_steps: 64 transitions per env per rollout.
    :param gamma: 1.0; gae_lambda: 0.95; normalize_advantage: True.
    :param ent_coef: 0.0; vf_coef: 0.5; max_grad_norm: 1.0.
    :param use_rms_prop: False: the policy's AdamW, not SB3's RMSprop default (made for Atari).
    :param lora: None, True or ``peft.LoraConfig`` options.
    """

    algo_name = "a2c"
    adds_loss_terms = True

    def __init__(
        self,
        policy: type[LMActorCriticPolicy] | str = LMActorCriticPolicy,
        env: Any = None,
        learning_rate: float | None = None,
        n_steps: int = 64,
        gamma: float = 1.0,
        gae_lambda: float = 0.95,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float = 1.0,
        normalize_advantage: bool = True,
        use_rms_prop: bool = False,
        rollout_buffer_class: type = EpisodeRolloutBuffer,
        **kwargs: Any,
    ):
        super().__init__(
            policy, env, learning_rate=learning_rate, n_steps=n_steps, gamma=gamma, gae_lambda=gae_lambda,
            ent_coef=ent_coef, vf_coef=vf_coef, max_grad_norm=max_grad_norm, normalize_advantage=normalize_advantage,
            use_rms_prop=use_rms_prop, rollout_buffer_class=rollout_buffer_class, **kwargs,
        )

    uses_ratio = False  # one on-policy step: its log-probs need no old ones to compare with

    def train(self) -> None:
        """One A2C update: a single gradient step on the whole rollout (``LMAlgorithm.run_update``)."""

        def minibatch(data):
            advantages = data.advantages
            if self.normalize_advantage:
                advantages = share_of(data).normalize(advantages)
            return partial(self.minibatch_loss, data, advantages), len(advantages), self.episode_groups(data)

        self.run_update(minibatch)
        self.logger.record("train/explained_variance", self.explained_variance())
        self.after_train()

    def minibatch_loss(self, data, advantages: torch.Tensor, rows: slice) -> tuple[torch.Tensor, dict]:
        """The share of ``rows`` in the loss of the rollout ``data`` and in its logged figures
        (advantages normalised over all of it; every mean over all its transitions, of every rank)."""
        part = take_rows(data, rows)
        mean = share_of(data).mean()
        values, log_prob, entropy = self.policy.evaluate_actions(part.observations, part.actions.long().flatten())
        policy_loss = -mean(advantages[rows] * log_prob)
        v_loss = value_loss(values.flatten(), part.old_values, part.returns, None, reduce=mean)
        entropy_loss = -mean(entropy)
        parts: dict[str, Any] = {}
        loss = self.add_kl_loss(policy_loss + self.ent_coef * entropy_loss + self.vf_coef * v_loss, parts, part,
                                log_prob, reduce=mean)
        parts.update({"train/policy_loss": policy_loss.detach(), "train/value_loss": v_loss.detach(),
                      "train/entropy_loss": entropy_loss.detach(), "train/loss": loss.detach()})
        return loss, parts
