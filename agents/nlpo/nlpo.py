"""NLPO: Natural Language Policy Optimization (Ramamurthy et al. 2022, arXiv:2210.01241).

PPO whose action distribution is restricted, at every step, to the top-p tokens of a *masking
policy*: a copy of the learner refreshed every ``mask_update_interval`` rollouts. The mask cuts
the vocabulary-sized action space down to plausible tokens, which stabilises learning.

The masked policy is the env's *acting distribution* (``textgym.envs.acting``): tokens
are sampled from it, and the env's log-probs, hence the KL penalty, are taken under it (the
renormalised masked distribution that acted, not the unmasked LM, which would understate the KL by
``-log Z`` per token). Evaluation plays it, and the final model of a run is saved with its masking
model so that loading it acts the same. ``rollout/mask_mass`` logs the policy probability the mask
keeps.

Masks are never stored (a vocabulary-sized float mask per transition would be ~190 KiB for a
49k vocabulary): during rollouts the masking policy is decoded in lockstep with the policy by the
env's engine (one KV-cached forward per token), and during training its logits are recomputed with
one teacher-forced forward per episode, like the policy's own.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from textgym.envs.tickets import CachedOutputs
from textgym.lm import mask_logits, top_p_mask

from ..policy import LMActorCriticPolicy, grouped_forward
from ..ppo import PPO

__all__ = ["NLPO", "NLPOPolicy", "top_p_mask"]


class NLPOPolicy(LMActorCriticPolicy):
    """``LMActorCriticPolicy`` whose categorical is masked to the masking policy's top-p tokens.

    :param top_p: probability mass of the masking policy's tokens that stay allowed (0.9).
    :param min_tokens_to_keep: at least this many tokens stay allowed (1).
    """

    def __init__(self, *args: Any, top_p: float = 0.9, min_tokens_to_keep: int = 1, **kwargs: Any):
        # Checked where the mask is set (ActingDistribution.set_nucleus_mask), for agents and envs alike.
        self.top_p, self.min_tokens_to_keep = top_p, min_tokens_to_keep
        super().__init__(*args, **kwargs)

    def allowed_tokens(self, ids, mask, cached: CachedOutputs | None = None) -> torch.Tensor:
        """The nucleus mask ``[N, V]`` of the observations ``ids``/``mask``: the engine's (it decoded
        the masking model in lockstep) when ``cached`` holds its outputs for them, else from one
        teacher-forced forward of the masking model."""
        core = self._core
        if cached is not None and cached.allowed is not None:
            return cached.allowed
        with torch.no_grad():
            logits, _ = grouped_forward(core.acting.nucleus_model, ids, mask, self.prompt_len, dtype=core.dtype)
        return core.acting.allowed_tokens(logits)

    def shape_logits(self, logits, ids, mask, cached: CachedOutputs | None,
                     actions: torch.Tensor | None) -> torch.Tensor:
        allowed = self.allowed_tokens(ids, mask, cached)
        if actions is not None:  # a token that was sampled stays possible (float noise at the boundary)
            allowed = allowed.clone()  # the engine's own mask may be shared
            allowed[torch.arange(len(actions), device=allowed.device), actions] = True
        return mask_logits(logits, allowed)


class NLPO(PPO):
    """PPO with NLPO's masked action distribution.

    :param top_p: the masking policy's top-p (0.9, as in the paper).
    :param mask_update_interval: rollouts between refreshes of the masking policy from the learner (5).
    :param min_tokens_to_keep: lower bound on allowed tokens per step (1).

    All other arguments as ``agents.PPO``. Memory: the masking policy is one more copy of the LM.
    """

    algo_name = "nlpo"

    def __init__(
        self,
        policy: type[NLPOPolicy] | str = NLPOPolicy,
        env: Any = None,
        top_p: float = 0.9,
        mask_update_interval: int = 5,
        min_tokens_to_keep: int = 1,
        policy_kwargs: dict | None = None,
        **kwargs: Any,
    ):
        if mask_update_interval < 1:
            raise ValueError(f"mask_update_interval must be >= 1, got {mask_update_interval!r}")
        self.mask_update_interval = mask_update_interval
        self._rollouts = 0
        policy_kwargs = {"top_p": top_p, "min_tokens_to_keep": min_tokens_to_keep, **(policy_kwargs or {})}
        super().__init__(policy, env, policy_kwargs=policy_kwargs, **kwargs)

    shards = False  # its mask model is a copy of the policy LM, which a sharded model cannot give

    def _setup_model(self) -> None:
        super()._setup_model()
        core = self.core
        # Frozen, so stored in the env's precision (the learner may hold float32 master weights).
        mask_model = copy.deepcopy(core.model).to(core.dtype).requires_grad_(False).eval()
        core.acting.set_nucleus_mask(mask_model, self.policy.top_p, self.policy.min_tokens_to_keep)

    def _sync_mask_model(self) -> None:
        self.core.acting.nucleus_model.load_state_dict(self.core.model.state_dict())
        self.core.acting.mask_model_changed()

    def set_parameters(self, *args: Any, **kwargs: Any) -> None:
        super().set_parameters(*args, **kwargs)
        self._sync_mask_model()  # after agents.load, mask with the loaded policy

    def collect_rollouts(self, env, callback, rollout_buffer, n_rollout_steps: int) -> bool:
        if self._rollouts > 0 and self._rollouts % self.mask_update_interval == 0:
            self._sync_mask_model()
        self._rollouts += 1
        return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
