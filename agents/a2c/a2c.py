"""A2C (Mnih et al. 2016) over a causal LM, with AdamW and defaults suited to text."""

from __future__ import annotations

from typing import Any

import stable_baselines3 as sb3

from agents.buffer import EpisodeRolloutBuffer
from agents.common import LMAlgorithm
from agents.policy import LMActorCriticPolicy


class A2C(LMAlgorithm, sb3.A2C):
    """stable-baselines3's A2C with ``LMActorCriticPolicy``: one gradient step per rollout.

    Text defaults (everything overridable; other SB3 A2C arguments pass through):

    :param learning_rate: 1e-5.
    :param n_steps: 64 transitions per env per rollout.
    :param gamma: 1.0; gae_lambda: 0.95; normalize_advantage: True.
    :param ent_coef: 0.0; vf_coef: 0.5; max_grad_norm: 1.0.
    :param use_rms_prop: False: the policy's AdamW, not SB3's RMSprop default (made for Atari).
    :param lora: None, True or ``peft.LoraConfig`` options.
    """

    algo_name = "a2c"

    def __init__(
        self,
        policy: type[LMActorCriticPolicy] | str = LMActorCriticPolicy,
        env: Any = None,
        learning_rate: float = 1e-5,
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
