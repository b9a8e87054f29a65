"""TRPO (Schulman et al. 2015, "Trust Region Policy Optimization") over a causal LM.

One policy step per rollout, read top to bottom in ``TRPO.train``:

1. the surrogate ``L(theta) = mean_t A_t pi_theta(a_t|s_t) / pi_old(a_t|s_t)`` over every transition
   of the rollout, and its gradient ``g``;
2. the search direction ``s ~= F^-1 g`` by conjugate gradient (``conjugate_gradient``), where ``F`` is
   the Hessian at ``theta_old`` of the mean KL(pi_old || pi_theta) over the rollout's states, the
   Fisher information of the policy, applied to a vector by differentiating the KL's gradient once
   more (``F v = d/dtheta (grad KL . v)``, plus ``cg_damping * v``) and never formed;
3. the step scaled to the trust region's edge under the quadratic model, ``sqrt(2 delta / s^T F s) s``
   with ``delta = target_kl``, then shrunk by ``line_search_shrinking_factor`` until the surrogate
   improves and the mean KL(old || new), measured on the full next-token distributions, is at most
   ``delta`` (at most ``line_search_max_iter`` tries; else no step);
4. the critic fitted to the returns by ``n_critic_updates`` passes of minibatched squared error, as
   PPO's value loss. Its gradient must not move the policy (the step above is the policy's whole
   change), so with the value head on the LM's own hidden states (the default) only the head learns,
   on states computed once after the step; a separate critic (``policy_kwargs={"critic": "copy"}``)
   learns whole.

As in sb3-contrib's TRPO (which follows the paper and OpenAI's baselines): a single batch for the
policy step, CG on the damped Fisher-vector product, backtracking on both conditions, the critic apart.

The second derivative goes through the attention of the LM, which PyTorch's fused CPU and GPU
attention kernels cannot differentiate twice: the Fisher-vector products run on the math kernel
(``torch.nn.attention.SDPBackend.MATH``), the same function computed without fusion.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import stable_baselines3 as sb3
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from textgym import distributed

from ..buffer import EpisodeRolloutBuffer
from ..common import LMAlgorithm, value_loss
from ..policy import LMActorCriticPolicy, grouped_forward

# sb3.PPO's arguments that TRPO sets itself (not hyperparameters of it), with why.
_FIXED = {"clip_range": "no ratio clipping: the trust region bounds the step",
          "clip_range_vf": "the critic's loss is unclipped",
          "n_epochs": "one policy step per rollout; the critic's passes are n_critic_updates",
          "ent_coef": "no entropy bonus in the surrogate", "vf_coef": "the critic is fitted apart from the policy"}


def conjugate_gradient(matrix_vector: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, max_steps: int,
                       tolerance: float = 1e-10) -> torch.Tensor:
    """Solve ``A x = b`` for a symmetric positive-definite ``A`` given as ``matrix_vector(v) = A v``,
    by at most ``max_steps`` conjugate-gradient iterations from ``x = 0`` (Nocedal & Wright, Alg. 5.2)."""
    x = torch.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    rr = residual @ residual
    for _ in range(max_steps):
        if rr <= tolerance:
            break
        a_direction = matrix_vector(direction)
        alpha = rr / (direction @ a_direction)
        x += alpha * direction
        residual -= alpha * a_direction
        rr_new = residual @ residual
        direction = residual + (rr_new / rr) * direction
        rr = rr_new
    return x


def _flat_grad(output: torch.Tensor, params: list[torch.nn.Parameter], **kwargs: Any) -> torch.Tensor:
    """The gradient of ``output`` with respect to ``params`` as one vector (zeros for unused ones)."""
    grads = torch.autograd.grad(output, params, allow_unused=True, **kwargs)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


class TrustRegionOnPolicy(sb3.PPO):
    """The stable-baselines3 layer (as ``sb3.PPO`` is for ``agents.PPO``): TRPO's hyperparameters
    mapped onto SB3's on-policy machinery (rollouts, GAE, the buffer)."""

    fixed_hyperparameters = tuple(_FIXED)

    def __init__(self, policy, env, learning_rate, n_steps: int = 128, batch_size: int = 64, gamma: float = 1.0,
                 gae_lambda: float = 0.95, normalize_advantage: bool = True, target_kl: float = 0.01,
                 cg_max_steps: int = 15, cg_damping: float = 0.1, line_search_shrinking_factor: float = 0.8,
                 line_search_max_iter: int = 10, n_critic_updates: int = 10, max_grad_norm: float = 1.0,
                 rollout_buffer_class: type = EpisodeRolloutBuffer, **kwargs: Any):
        fixed = sorted(set(kwargs) & set(_FIXED))
        if fixed:
            raise ValueError(f"{', '.join(fixed)}: not hyperparameter(s) of {type(self).__name__} ("
                             + "; ".join(f"{k}: {_FIXED[k]}" for k in fixed) + ")")
        for key, value in (("cg_max_steps", cg_max_steps), ("line_search_max_iter", line_search_max_iter),
                           ("n_critic_updates", n_critic_updates)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        for key, number, top in (("target_kl", target_kl, math.inf), ("cg_damping", cg_damping, math.inf),
                                 ("line_search_shrinking_factor", line_search_shrinking_factor, 1.0)):
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 < number < top:
                raise ValueError(f"{key} must be a number in (0, {top}), got {number!r}")
        super().__init__(policy, env, learning_rate=learning_rate, n_steps=n_steps, batch_size=batch_size,
                         n_epochs=n_critic_updates, gamma=gamma, gae_lambda=gae_lambda, clip_range=0.2,
                         normalize_advantage=normalize_advantage, ent_coef=0.0, vf_coef=1.0,
                         max_grad_norm=max_grad_norm, target_kl=target_kl, rollout_buffer_class=rollout_buffer_class,
                         **kwargs)
        self.cg_max_steps, self.cg_damping = int(cg_max_steps), float(cg_damping)
        self.line_search_shrinking_factor = float(line_search_shrinking_factor)
        self.line_search_max_iter, self.n_critic_updates = int(line_search_max_iter), int(n_critic_updates)


class TRPO(LMAlgorithm, TrustRegionOnPolicy):
    """TRPO with ``LMActorCriticPolicy`` and an episode-grouped rollout buffer (module docstring).

    :param learning_rate: the critic's (AdamW); None: by model size and LoRA, as for PPO.
    :param n_steps: transitions (tokens) collected per env per rollout: 128.
    :param batch_size: transitions per minibatch of the critic's fit, filled with whole episodes: 64.
    :param gamma: 1.0: the reward comes at the end of the text and is not discounted.
    :param gae_lambda: 0.95.
    :param normalize_advantage: True.
    :param target_kl: the trust region: the largest mean KL(old || new) per state a step may take (0.01).
    :param cg_max_steps: conjugate-gradient iterations for the step's direction (15).
    :param cg_damping: added to the Fisher-vector product, ``(F + damping I) v``, for a stable solve (0.1).
    :param line_search_shrinking_factor: the step is multiplied by this until accepted (0.8).
    :param line_search_max_iter: tries of the line search before the step is given up (10).
    :param n_critic_updates: passes of the critic's fit over each rollout (10).
    :param max_grad_norm: gradient clipping of the critic's steps (1.0).
    :param lora: None, True or ``peft.LoraConfig`` options: the step moves the LoRA adapters only.
    """

    algo_name = "trpo"

    def __init__(self, policy: Any = LMActorCriticPolicy, env: Any = None, learning_rate: float | None = None,
                 **kwargs: Any):
        super().__init__(policy, env, learning_rate=learning_rate, **kwargs)

    def _setup_model(self) -> None:
        asked = {"micro_batch_size": self.micro_batch_size is not None,
                 "gradient_checkpointing": self.gradient_checkpointing,
                 "ptx_coef": self.ptx_coef > 0,
                 f"{distributed.world_size()} data-parallel ranks": distributed.world_size() > 1}
        if any(asked.values()):
            raise ValueError(f"trpo takes one natural-gradient step on the whole rollout in one process: "
                             f"{', '.join(k for k, on in asked.items() if on)} not supported")
        super()._setup_model()  # refuses kl_in="loss" (the surrogate has no KL term) and float16 (adds_loss_terms)

    def _parameters(self) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
        """The policy's trainable weights (the LM's, or its LoRA adapters) and the critic's (the
        value head, and a separate critic's trunk)."""
        actor: list[torch.nn.Parameter] = []
        critic: list[torch.nn.Parameter] = []
        for name, param in self.policy.named_parameters():
            if param.requires_grad:
                (critic if name.startswith(("value_head.", "critic.")) else actor).append(param)
        return actor, critic

    def _log_probs(self, obs) -> torch.Tensor:
        """Next-token log-probs ``[N, V]`` of the policy at every observation (the acting distribution)."""
        dist = self.policy.get_distribution(obs).distribution
        return torch.log_softmax(dist.logits, -1)

    def train(self) -> None:
        """One TRPO update on the rollout (module docstring)."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        self.prepare_update()  # in bfloat16, pi_old's log-probs by the training forward: the first ratio is 1
        self.start_update_logs()
        actor, critic = self._parameters()
        data = next(self.rollout_buffer.get(None))  # the whole rollout
        obs, actions = data.observations, data.actions.long().flatten()
        advantages = data.advantages
        if self.normalize_advantage and len(advantages) > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        old_log_prob = data.old_log_prob

        def surrogate_and_kl(old: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            log_probs = self._log_probs(obs)
            ratio = torch.exp(log_probs.gather(-1, actions[:, None]).squeeze(-1) - old_log_prob)
            objective = (advantages * ratio).mean()
            reference = log_probs.detach() if old is None else old
            kl = (reference.exp() * (reference - log_probs)).sum(-1).mean()  # KL(old || new), exact per state
            return objective, kl, log_probs

        with sdpa_kernel([SDPBackend.MATH]):  # twice differentiable attention (module docstring)
            objective, kl, log_probs = surrogate_and_kl(None)
            old_dist = log_probs.detach()
            direction, curvature = self._natural_direction(objective, kl, actor)
        objective = objective.detach()
        delta = float(self.target_kl)  # type: ignore[arg-type]  # checked > 0 by the constructor
        step = torch.sqrt(2 * delta / curvature.clamp(min=1e-12)) * direction
        start = parameters_to_vector(actor).detach()
        accepted, new_kl, new_objective, fraction = False, 0.0, float(objective), 0.0
        with torch.no_grad():
            for i in range(self.line_search_max_iter):
                fraction = self.line_search_shrinking_factor ** i
                vector_to_parameters(start + fraction * step, actor)
                candidate, candidate_kl, _ = surrogate_and_kl(old_dist)
                if candidate_kl <= delta and candidate > objective:
                    accepted, new_kl, new_objective = True, float(candidate_kl), float(candidate)
                    break
            if not accepted:
                vector_to_parameters(start, actor)
                fraction = 0.0
        self.log_update("train/policy_objective", float(objective))
        self.log_update("train/policy_objective_after", new_objective)
        self.log_update("train/approx_kl", new_kl)  # exact here: the mean KL(old || new) of the step taken
        self.log_update("train/line_search_success", float(accepted))
        self.log_update("train/step_fraction", fraction)
        self._fit_critic(actor, critic)
        self.record_update_logs()
        self.logger.record("train/explained_variance", self.explained_variance())
        self._n_updates += 1
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.after_train()

    def _natural_direction(self, objective: torch.Tensor, kl: torch.Tensor,
                           actor: list[torch.nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor]:
        """``s ~= (F + damping I)^-1 g`` by conjugate gradient and ``s^T (F + damping I) s``, with
        ``g`` the surrogate's gradient and ``F`` the Hessian of the mean KL (the Fisher matrix),
        applied as the derivative of ``grad KL . v``. The graph of the KL's gradient lives only here."""
        gradient = _flat_grad(objective, actor, retain_graph=True).detach()
        kl_gradient = _flat_grad(kl, actor, create_graph=True)

        def fisher_vector(v: torch.Tensor) -> torch.Tensor:
            return _flat_grad(kl_gradient @ v, actor, retain_graph=True).detach() + self.cg_damping * v

        direction = conjugate_gradient(fisher_vector, gradient, self.cg_max_steps)
        return direction, direction @ fisher_vector(direction)

    def _fit_critic(self, actor: list[torch.nn.Parameter], critic: list[torch.nn.Parameter]) -> None:
        """``n_critic_updates`` passes of the value loss over the rollout in minibatches; the
        optimizer steps the critic's weights only (the actor's gradients are cleared: AdamW skips a
        weight without one, weight decay included)."""
        policy = self.policy
        shared = policy.critic is None
        batches = list(self.rollout_buffer.get(self.batch_size))
        states = {}
        if shared:  # the head reads the LM's states, which stay put: compute them once, without a graph
            with torch.no_grad():
                for k, batch in enumerate(batches):
                    obs: Any = batch.observations  # a dict (DictRolloutBuffer's), typed by SB3 as a tensor
                    ids, mask = obs["input_ids"].long(), obs["attention_mask"].long()
                    states[k] = grouped_forward(policy.lm, ids, mask, policy.prompt_len, logits=False,
                                                dtype=policy.compute_dtype)[1].float()
        for _ in range(self.n_critic_updates):
            for k in np.random.permutation(len(batches)):
                batch = batches[k]
                assert policy.value_head is not None, "TRPO's policy has a value head"
                if shared:
                    values = policy.value_head(states[k]).flatten()
                else:
                    values = policy.predict_values(batch.observations).flatten()
                loss = value_loss(values, batch.old_values, batch.returns, None)
                policy.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for param in actor:
                    param.grad = None
                torch.nn.utils.clip_grad_norm_(critic, self.max_grad_norm)
                policy.optimizer.step()
                self.log_update("train/value_loss", loss.item())
