"""NLPO: Natural Language Policy Optimization (Ramamurthy et al. 2022, arXiv:2210.01241).

PPO whose action distribution is restricted, at every step, to the top-p tokens of a *masking
policy*: a copy of the learner refreshed every ``mask_update_interval`` rollouts. The mask cuts
the vocabulary-sized action space down to plausible tokens, which stabilises learning.

Masks are never stored (a vocabulary-sized float mask per transition would be ~190 KiB for a
49k vocabulary): during rollouts the masking policy is decoded in lockstep with the policy by the
env's engine (one KV-cached forward per token), and during training its logits are recomputed with
one teacher-forced forward per episode, like the policy's own. The KL penalty of the env uses the
unmasked policy, as in the paper.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from agents.policy import LMActorCriticPolicy, grouped_forward
from agents.ppo import PPO

MASK_FOLLOWER = "nlpo_mask"


def top_p_mask(logits: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Boolean ``[N, V]``: the smallest set of most likely tokens whose probability reaches ``top_p``
    (the token that crosses the threshold included), and at least ``min_tokens_to_keep`` tokens."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # probability mass strictly above each token
    keep_sorted = before < top_p
    keep_sorted[:, :min_tokens_to_keep] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


class NLPOPolicy(LMActorCriticPolicy):
    """``LMActorCriticPolicy`` whose categorical is masked to the masking policy's top-p tokens.

    :param top_p: probability mass of the masking policy's tokens that stay allowed (0.9).
    :param min_tokens_to_keep: at least this many tokens stay allowed (1).
    """

    def __init__(self, *args: Any, top_p: float = 0.9, min_tokens_to_keep: int = 1, **kwargs: Any):
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be >= 1, got {min_tokens_to_keep!r}")
        self.top_p, self.min_tokens_to_keep = top_p, min_tokens_to_keep
        self.mask_model: list = []  # [model]: a list so it is neither a submodule nor saved
        super().__init__(*args, **kwargs)

    def allowed_tokens(self, ids, mask, cached: bool) -> torch.Tensor:
        if cached:
            mask_logits = self._core.followers[MASK_FOLLOWER].logits
        else:
            with torch.no_grad():
                mask_logits, _ = grouped_forward(self.mask_model[0], ids, mask, self.prompt_len)
        return top_p_mask(mask_logits, self.top_p, self.min_tokens_to_keep)

    def shape_logits(self, logits, ids, mask, cached: bool, actions: torch.Tensor | None) -> torch.Tensor:
        allowed = self.allowed_tokens(ids, mask, cached)
        if actions is not None:  # a token that was sampled stays possible (float noise at the boundary)
            allowed[torch.arange(len(actions), device=allowed.device), actions] = True
        return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)


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

    def _setup_model(self) -> None:
        super()._setup_model()
        mask_model = copy.deepcopy(self.core.model).requires_grad_(False).eval()
        self.policy.mask_model = [mask_model]
        self.core.add_follower(MASK_FOLLOWER, mask_model)

    def _sync_mask_model(self) -> None:
        self.policy.mask_model[0].load_state_dict(self.core.model.state_dict())
        self.core.refresh([self.core.followers[MASK_FOLLOWER]])

    def set_parameters(self, *args: Any, **kwargs: Any) -> None:
        super().set_parameters(*args, **kwargs)
        self._sync_mask_model()  # after agents.load, mask with the loaded policy

    def collect_rollouts(self, env, callback, rollout_buffer, n_rollout_steps: int) -> bool:
        if self._rollouts > 0 and self._rollouts % self.mask_update_interval == 0:
            self._sync_mask_model()
        self._rollouts += 1
        return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
