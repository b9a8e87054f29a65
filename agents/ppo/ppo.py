"""PPO (Schulman et al. 2017) over a causal LM, with defaults suited to text."""

from __future__ import annotations

from typing import Any

import stable_baselines3 as sb3

from agents.buffer import EpisodeRolloutBuffer
from agents.common import LMAlgorithm
from agents.policy import LMActorCriticPolicy


class PPO(LMAlgorithm, sb3.PPO):
    """stable-baselines3's PPO with ``LMActorCriticPolicy`` and an episode-grouped rollout buffer.

    Text defaults (everything overridable; other SB3 PPO arguments pass through):

    :param learning_rate: 1e-5, small as LM fine-tuning needs.
    :param n_steps: transitions (tokens) collected per env per rollout: 128.
    :param batch_size: transitions per minibatch, filled with whole episodes: 64.
    :param n_epochs: 4 passes over each rollout.
    :param gamma: 1.0: the reward comes at the end of the text and is not discounted.
    :param gae_lambda: 0.95.
    :param clip_range: 0.2, the PPO ratio clip.
    :param clip_range_vf: 0.2, value clipping around the rollout's values.
    :param normalize_advantage: True.
    :param ent_coef: 0.0, vf_coef: 0.5, max_grad_norm: 1.0.
    :param target_kl: 0.1: stop the epochs of an update early when the approximate KL between the
        old and new policy exceeds 1.5 x this (SB3's rule).
    :param lora: None, True or ``peft.LoraConfig`` options: train LoRA adapters only.
    :param policy_kwargs: e.g. ``critic="copy"`` for a separate critic (see ``LMActorCriticPolicy``).
    """

    algo_name = "ppo"

    def __init__(
        self,
        policy: type[LMActorCriticPolicy] | str = LMActorCriticPolicy,
        env: Any = None,
        learning_rate: float = 1e-5,
        n_steps: int = 128,
        batch_size: int = 64,
        n_epochs: int = 4,
        gamma: float = 1.0,
        gae_lambda: float = 0.95,
        clip_range: float = 0.2,
        clip_range_vf: float | None = 0.2,
        normalize_advantage: bool = True,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
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
