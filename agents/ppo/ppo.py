"""PPO (Schulman et al. 2017) over a causal LM, with defaults suited to text.

The update is written out here (SB3's ``PPO.train`` has no place for extra loss terms), in the
order of the paper: clipped surrogate, value loss, entropy bonus, plus the KL term when the env
puts it in the loss (``kl_in="loss"``, ``textgym.kl``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import stable_baselines3 as sb3
import torch

from ..buffer import EpisodeRolloutBuffer
from ..common import LMAlgorithm, behaviour_weight, value_loss
from ..data_parallel import share_of
from ..policy import LMActorCriticPolicy
from ..update import take_rows


class PPO(LMAlgorithm, sb3.PPO):
    """stable-baselines3's PPO with ``LMActorCriticPolicy`` and an episode-grouped rollout buffer.

    Text defaults (everything overridable; other SB3 PPO arguments pass through):

    :param learning_rate: None: by model size and LoRA (``agents.common.default_learning_rate``:
        3e-4 with LoRA, 1e-5 for full fine-tuning of a real LM, 3e-3 for ``textgym/tiny``).
    :param n_steps: transitions (tokens) collected per env per rollout: 128.
    :param batch_size: transitions per minibatch, filled with whole episodes: 64.
    :param n_epochs: 4 passes over each rollout.
    :param gamma: 1.0: the reward comes at the end of the text and is not discounted.
    :param gae_lambda: 0.95.
    :param clip_range: 0.2, the PPO ratio clip.
    :param clip_range_vf: None: no value clipping, so the critic learns any reward scale (the
        value loss flows into the shared LM trunk). A number clips PPO2-style:
        ``max(unclipped, clipped)`` squared error, never the clipped term alone.
    :param normalize_advantage: True.
    :param ent_coef: 0.0.
    :param vf_coef: 0.1 (TRL's value): the value loss shares the LM trunk, and a larger weight let
        the unclipped value loss pull the tiny model's policy off course in our tests.
    :param max_grad_norm: 1.0.
    :param target_kl: 0.1: stop the epochs of an update early when the approximate KL between the
        old and new policy exceeds 1.5 x this (SB3's rule).
    :param lora: None, True or ``peft.LoraConfig`` options: train LoRA adapters only.
    :param policy_kwargs: e.g. ``critic="copy"`` for a separate critic (see ``LMActorCriticPolicy``).
    """

    algo_name = "ppo"
    adds_loss_terms = True

    def __init__(
        self,
        policy: type[LMActorCriticPolicy] | str = LMActorCriticPolicy,
        env: Any = None,
        learning_rate: float | None = None,
        n_steps: int = 128,
        batch_size: int = 64,
        n_epochs: int = 4,
        gamma: float = 1.0,
        gae_lambda: float = 0.95,
        clip_range: float = 0.2,
        clip_range_vf: float | None = None,
        normalize_advantage: bool = True,
        ent_coef: float = 0.0,
        vf_coef: float = 0.1,
        max_grad_norm: float = 1.0,
        target_kl: float | None = 0.1,
        rollout_buffer_class: type = EpisodeRolloutBuffer,
        **kwargs: Any,
    ):
        super().__init__(
            policy, env, learning_rate=learning_rate, n_steps=n_steps, batch_size=batch_size, n_epochs=n_epochs,
            gamma=gamma, gae_lambda=gae_lambda, clip_range=clip_range, clip_range_vf=clip_range_vf,
            normalize_advantage=normalize_advantage, ent_coef=ent_coef, vf_coef=vf_coef, max_grad_norm=max_grad_norm,
            target_kl=target_kl, rollout_buffer_class=rollout_buffer_class, **kwargs,
        )

    def train(self) -> None:
        """One PPO update: ``n_epochs`` passes over the rollout in minibatches of whole episodes
        (``LMAlgorithm.run_update``), advantages normalised per minibatch."""
        # SB3 types clip_range(_vf) by the constructor's float; _setup_model made them schedules (SB3's ignores too)
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        clip_range_vf = (None if self.clip_range_vf is None
                         else self.clip_range_vf(self._current_progress_remaining))  # type: ignore[operator]

        def minibatch(data):
            advantages, share = data.advantages, share_of(data)
            if self.normalize_advantage and share.total["items"] > 1:  # SB3 issue #325: not for batch size 1
                advantages = share.normalize(advantages)
            loss_fn = partial(self.minibatch_loss, data, advantages, clip_range, clip_range_vf)
            return loss_fn, len(advantages), self.episode_groups(data)

        self.run_update(minibatch, n_epochs=self.n_epochs, batch_size=self.batch_size, target_kl=self.target_kl)
        self.logger.record("train/explained_variance", self.explained_variance())
        self.logger.record("train/clip_range", clip_range)
        if clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)
        self.after_train()

    def minibatch_loss(self, data, advantages: torch.Tensor, clip_range: float, clip_range_vf: float | None,
                       rows: slice) -> tuple[torch.Tensor, dict]:
        """The share of ``rows`` in the loss of the minibatch ``data`` (advantages normalised over
        all of it), and in its logged figures: every mean is over the minibatch's transitions (of
        every rank, ``agents.data_parallel``)."""
        part = take_rows(data, rows)
        mean = share_of(data).mean()
        values, log_prob, entropy = self.policy.evaluate_actions(part.observations, part.actions.long().flatten())
        adv = advantages[rows]
        # Clipped surrogate objective (Schulman et al. 2017, eq. 7).
        ratio = torch.exp(log_prob - part.old_log_prob)
        surrogate = torch.min(adv * ratio, adv * torch.clamp(ratio, 1 - clip_range, 1 + clip_range))
        policy_loss = -mean(behaviour_weight(part) * surrogate)  # weight 1 in float32
        v_loss = value_loss(values.flatten(), part.old_values, part.returns, clip_range_vf, reduce=mean)
        entropy_loss = -mean(entropy)
        loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * v_loss
        parts: dict[str, Any] = {}
        loss = self.add_kl_loss(loss, parts, part, log_prob, reduce=mean)
        with torch.no_grad():
            # k3 of the old -> new policy change, SB3's early-stopping statistic (SB3 PR #419).
            log_ratio = log_prob - part.old_log_prob
            parts.update({"train/policy_gradient_loss": policy_loss.detach(), "train/value_loss": v_loss.detach(),
                          "train/entropy_loss": entropy_loss.detach(), "train/loss": loss.detach(),
                          "train/approx_kl": mean(torch.expm1(log_ratio) - log_ratio),
                          "train/clip_fraction": mean((torch.abs(ratio - 1) > clip_range).float())})
        return loss, parts
