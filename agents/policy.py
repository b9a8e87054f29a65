"""``LMActorCriticPolicy``: a stable-baselines3 actor-critic policy over the env's own causal LM.

Actor: the LM's next-token logits as a full-vocabulary categorical (no top-k, no top-p). Critic: a
scalar value head on the LM's last hidden state (shared trunk), or on a separate trunk; or none
(``value_head=False``) for the critic-free algorithms (GRPO, RLOO, REINFORCE++).

It answers SB3's per-observation calls (``forward``, ``evaluate_actions``, ``predict_values``)
without the usual cost of an LM as an SB3 policy:

- during rollouts the caller names the engine rows whose current state the observation is
  (``engine_rows``, a ``textgym.envs.tickets.EngineRows`` ticket from ``LMVecEnv.engine_rows``): the
  next-token logits and hidden states the engine's KV-cached step already computed for them are
  read, not recomputed. Without a ticket, or with a stale one, the observation is computed afresh,
  so any observation (SB3's ``predict``, an evaluation, a stored transition) gets a correct answer;
- during training, rows of one episode (consecutive observations that extend each other by one
  token, as ``EpisodeRolloutBuffer`` yields them) share one teacher-forced forward over the
  episode's longest observation, instead of one forward per transition; the critic-free
  algorithms, which store whole episodes, call ``completion_log_probs`` (one forward per episode).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from textgym import distributed, lm, models
from textgym.envs.tickets import CachedOutputs, EngineRows
from textgym.precision import autocast


class _NoFeatures(BaseFeaturesExtractor):
    """Placeholder: the LM reads token ids itself."""

    def __init__(self, observation_space: spaces.Space):
        super().__init__(observation_space, features_dim=1)

    def forward(self, observations):  # pragma: no cover - never called
        raise RuntimeError("LMActorCriticPolicy does not use a features extractor")


def group_rows(ids: torch.Tensor, mask: torch.Tensor,
               prompt_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split rows into runs where each observation is the previous one plus one token.

    Returns ``(group index per row, index of each group's last row, tokens generated per row)``.
    A group's last observation contains the context of every row in the group.
    """
    t = mask[:, prompt_len:].sum(1)
    n = ids.shape[0]
    same = torch.zeros(n, dtype=torch.bool, device=ids.device)
    if n > 1:
        diff = (ids[1:] != ids[:-1]) | (mask[1:] != mask[:-1])
        new_col = nn.functional.one_hot((prompt_len + t[:-1]).clamp(max=ids.shape[1] - 1), ids.shape[1]).bool()
        same[1:] = (t[1:] == t[:-1] + 1) & ~(diff & ~new_col).any(1)
    group = torch.cumsum(~same, 0) - 1
    last = torch.zeros(int(group[-1]) + 1, dtype=torch.long, device=ids.device)
    last.scatter_reduce_(0, group, torch.arange(n, device=ids.device), reduce="amax", include_self=False)
    return group, last, t


def grouped_forward(model, ids, mask, prompt_len: int, *, logits: bool = True, dtype: torch.dtype | None = None):
    """Next-token logits ``[N, V]`` (float32, or None) and last hidden states ``[N, H]`` (in the
    forward's precision) for every observation row, with one forward per group of rows (see
    ``group_rows``), under autocast to ``dtype`` (``textgym.precision``; None: the weights' own)."""
    group, last, t = group_rows(ids, mask, prompt_len)
    tmax = int(t[last].max())
    width = prompt_len + tmax
    seq, seq_mask, cut = lm.drop_padding_columns(ids[last, :width], mask[last, :width])
    kwargs: dict[str, Any] = {"logits_to_keep": tmax + 1 if logits else 1} if _is_causal_lm(model) else {}
    with autocast(seq.device, dtype):
        out = model(input_ids=seq, attention_mask=seq_mask, position_ids=lm.position_ids(seq_mask), use_cache=False,
                    output_hidden_states=True, **kwargs)
    # Position prompt_len - 1 + t predicts the token after an observation with t generated tokens
    # (``cut`` columns of padding alone were left out of the forward).
    hidden = out.hidden_states[-1][:, prompt_len - 1 - cut : width - cut][group, t]
    next_logits = out.logits.float()[group, t] if logits else None
    return next_logits, hidden


def _hidden_width(model: nn.Module, role: str) -> int:
    """Width of ``model``'s hidden states, read off its input embeddings (transformers'
    ``get_input_embeddings``, which a wrapper such as peft's forwards)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if get_embeddings is None:
        raise ValueError(f"the {role} must be a transformers model; {type(model).__name__} has no "
                         "get_input_embeddings()")
    return int(get_embeddings().weight.shape[1])


def _is_causal_lm(model) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None


class LMActorCriticPolicy(ActorCriticPolicy):
    """SB3 actor-critic policy whose actor is the env's causal LM.

    :param lm: the causal LM (injected by ``agents``: the env's own model, trained in place).
    :param core: the env engine whose KV-cached logits rollouts reuse (injected by ``agents``).
    :param critic: ``None`` (default): value head on the LM's own last hidden state (shared trunk).
        ``"copy"``: a separate trunk initialised as a copy of the LM. Or a model sharing the LM's
        vocabulary (e.g. a reward model with a causal-LM backbone, whose scalar head then
        initialises the value head). A separate critic costs one forward over each observation
        during rollouts (it has no KV cache in the env).
    :param value_head_std: standard deviation of the value head's initial weights.
    :param value_head: False: no critic at all (no value head in memory, trained or saved), for the
        critic-free algorithms; the values SB3's entry points return are then None and
        ``predict_values`` raises.
    :param optimizer_class: AdamW by default; it covers only trainable weights and the value head.
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Discrete,
        lr_schedule,
        lm: nn.Module | None = None,
        core: Any = None,
        critic: Any = None,
        value_head_std: float = 0.01,
        value_head: bool = True,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
        optimizer_kwargs: dict | None = None,
        **kwargs: Any,
    ):
        if lm is None:
            raise ValueError("LMActorCriticPolicy needs the env's language model: create it with agents.make()")
        if not value_head and critic is not None:
            raise ValueError(f"critic={critic!r} needs a value head: value_head=False builds no critic")
        self._init_args = (lm, critic, value_head_std, value_head)
        self._core = core
        self.prompt_len = core.P if core is not None else int(kwargs.pop("prompt_len"))
        kwargs.pop("prompt_len", None)
        super().__init__(
            observation_space, action_space, lr_schedule, ortho_init=False, features_extractor_class=_NoFeatures,
            optimizer_class=optimizer_class, optimizer_kwargs=optimizer_kwargs, **kwargs,
        )

    def _build(self, lr_schedule) -> None:
        lm_model, critic, value_head_std, with_value_head = self._init_args
        del self._init_args
        self.lm = models.disable_dropout(lm_model)
        self.critic: nn.Module | None = None
        self.value_head: nn.Linear | None = None
        if not with_value_head:
            self._build_optimizer(lr_schedule)
            return
        hidden = _hidden_width(lm_model, "lm")
        if critic == "copy":
            self.critic = models.disable_dropout(copy.deepcopy(lm_model))
        elif isinstance(critic, str):
            # imported on use: only a separate critic needs it
            from transformers import AutoModelForSequenceClassification

            self.critic = models.disable_dropout(AutoModelForSequenceClassification.from_pretrained(critic))
        elif isinstance(critic, nn.Module):
            self.critic = models.disable_dropout(critic)
        elif critic is not None:
            raise ValueError(f"critic must be None, 'copy', a model path or a model, got {critic!r}")
        if self.critic is not None:
            self.critic.requires_grad_(True)
            hidden = _hidden_width(self.critic, "critic")
        self.value_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.value_head.weight, std=value_head_std)
        nn.init.zeros_(self.value_head.bias)
        score = getattr(self.critic, "score", None)
        if isinstance(score, nn.Linear) and score.out_features == 1 and score.in_features == hidden:
            with torch.no_grad():  # a reward model's head is a good first guess of the value
                self.value_head.weight.copy_(score.weight)
                if score.bias is not None:
                    self.value_head.bias.copy_(score.bias)
        self.value_head.to(next(lm_model.parameters()).device)
        self._build_optimizer(lr_schedule)

    def _build_optimizer(self, lr_schedule) -> None:
        # The reference model is not a submodule: it is never optimised and never saved.
        trainable = [p for p in self.parameters() if p.requires_grad]
        # Optimizer's own __init__ takes no lr, every optimizer class does (SB3 has the same ignore)
        self.optimizer = self.optimizer_class(trainable, lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]

    # --- the three SB3 entry points ---------------------------------------------------------------

    def forward(self, obs, deterministic: bool = False, engine_rows: EngineRows | None = None,
                rank_rows: list[int] | None = None):
        """Actions, values and log-probs for ``obs``.

        :param engine_rows: the engine rows whose current state ``obs`` is (see ``engine_outputs``).
        :param rank_rows: data-parallel, every rank's number of rows of the global batch (gathered
            when None). The actions are sampled as rows of the global batch with counter-based noise
            (``textgym.distributed.sample_categorical``), so that N ranks draw what one process
            holding every rank's rows would; every rank must then call together, as the agents'
            rollouts do.
        """
        dist, values = self._dist_and_values(obs, engine_rows=engine_rows)
        if deterministic:
            actions = dist.get_actions(deterministic=True)
        else:
            actions = distributed.sample_categorical(dist.distribution.probs, counts=rank_rows)
        return actions, values, dist.log_prob(actions)

    def evaluate_actions(self, obs, actions):
        actions = actions.long().flatten()
        dist, values = self._dist_and_values(obs, actions=actions)
        return values, dist.log_prob(actions), dist.entropy()

    def predict_values(self, obs, engine_rows: EngineRows | None = None, bootstrap: bool = False) -> torch.Tensor:
        """Values of ``obs``.

        :param engine_rows: the engine rows whose current state ``obs`` is (see ``engine_outputs``).
        :param bootstrap: the values bootstrap the end of a rollout (``LMAlgorithm.collect_rollouts``).
            With a current ``engine_rows`` ticket and the shared value head, rows reset by the last
            step belong to finished episodes, whose bootstrap is multiplied by ``1 - done = 0``: they
            get 0 and their prompts are not encoded now, but when the next rollout needs them, with
            the updated weights (saves a forward per rollout).
        """
        if self.value_head is None:
            raise ValueError("this policy has no value head (value_head=False): a critic-free algorithm's policy "
                             "predicts no values")
        if bootstrap and engine_rows is not None and self.critic is None:
            self._check_ticket(engine_rows)
            cached = self._core.cached_states(engine_rows)
            if cached is not None:
                started, states = cached
                values = torch.zeros(len(started), 1, device=self.value_head.weight.device)
                started = torch.as_tensor(started, device=values.device)
                if started.any():
                    values[started] = self.value_head(states.float())
                return values
        return self._dist_and_values(obs, need_dist=False, engine_rows=engine_rows)[1]

    def engine_outputs(self, engine_rows: EngineRows | None) -> CachedOutputs | None:
        """The env engine's cached outputs for the rows ``engine_rows`` names (a ticket handed out
        with their observation, ``LMVecEnv.engine_rows``), or None without a ticket or when it is
        stale (the engine moved on since): then the observation is computed afresh. Cached outputs
        carry no gradient, so a ticket is only accepted under ``torch.no_grad()``."""
        if engine_rows is None:
            return None
        self._check_ticket(engine_rows)
        return self._core.cached_outputs(engine_rows)

    def _check_ticket(self, engine_rows: EngineRows) -> None:
        if self._core is None:
            raise ValueError("engine_rows given to a policy built without an env engine (core=None)")
        if torch.is_grad_enabled():
            raise ValueError("engine_rows serve cached outputs, which carry no gradient: call under torch.no_grad(), "
                             "or without engine_rows")

    @torch.no_grad()
    def reference_log_probs(self, buffer) -> np.ndarray:
        """``log pi_ref`` of every action in the (full) rollout ``buffer``, flat in the buffer's
        order: one teacher-forced forward of the reference per chunk of whole episode segments."""
        ref = self._core.ref_model
        segments = buffer.segments()  # flattens the buffer
        out = np.zeros(buffer.buffer_size * buffer.n_envs, dtype=np.float32)
        device = self.lm_device
        for start in range(0, len(segments), 8):
            idx = np.concatenate(segments[start : start + 8])
            ids = torch.as_tensor(buffer.observations["input_ids"][idx], device=device).long()
            mask = torch.as_tensor(buffer.observations["attention_mask"][idx], device=device).long()
            logits, _ = grouped_forward(ref, ids, mask, self.prompt_len, dtype=self._core.ref_dtype)
            actions = torch.as_tensor(buffer.actions[idx], device=device).long().reshape(-1, 1)
            out[idx] = torch.log_softmax(logits, -1).gather(-1, actions).squeeze(-1).cpu().numpy()
        return out

    def completion_log_probs(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
                             completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob and entropy of the policy at every completion token, ``[B, T]`` each (0 past
        each completion's end), from one teacher-forced forward per episode: what the critic-free
        algorithms train on (their buffer holds whole episodes, ``agents.completion_buffer``)."""
        ids, mask, _ = lm.drop_padding_columns(torch.cat([prompt_ids, completion_ids], dim=1).long(),
                                               torch.cat([prompt_mask, completion_mask], dim=1).long())
        T = completion_ids.shape[1]
        kwargs: dict[str, Any] = {"logits_to_keep": T + 1} if _is_causal_lm(self.lm) else {}
        with autocast(ids.device, self.compute_dtype):
            out = self.lm(input_ids=ids, attention_mask=mask, position_ids=lm.position_ids(mask), use_cache=False,
                          **kwargs)
        # The position before completion token t predicts it (the last kept position predicts none).
        logits = out.logits[:, -(T + 1) : -1].float()
        log_probs = torch.log_softmax(logits, -1)
        weight = completion_mask.to(log_probs.dtype)
        token_logp = log_probs.gather(-1, completion_ids.long().unsqueeze(-1)).squeeze(-1) * weight
        entropy = -(log_probs.exp() * log_probs).sum(-1) * weight
        return token_logp, entropy

    @property
    def lm_device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The precision of the LM's forwards: the env's ``dtype`` (its weights may be float32
        master weights, ``LMAlgorithm``), or None (the weights' own) without an env engine."""
        return None if self._core is None else self._core.dtype

    def get_distribution(self, obs):
        return self._dist_and_values(obs)[0]

    def _predict(self, observation, deterministic: bool = False) -> torch.Tensor:
        return self.get_distribution(observation).get_actions(deterministic=deterministic)

    # --- internals ----------------------------------------------------------------------------------

    def _dist_and_values(self, obs, need_dist: bool = True, actions: torch.Tensor | None = None,
                         engine_rows: EngineRows | None = None):
        ids, mask = obs["input_ids"].long(), obs["attention_mask"].long()
        cached = self.engine_outputs(engine_rows)
        if cached is not None and self.value_head is not None and self.critic is None and cached.states is None:
            cached = None  # the shared value head needs hidden states the engine does not keep
        if cached is not None:
            logits, hidden = cached.logits, cached.states
        else:
            logits, hidden = grouped_forward(self.lm, ids, mask, self.prompt_len,
                                             logits=need_dist or self.critic is None, dtype=self.compute_dtype)
        if self.critic is not None:
            hidden = grouped_forward(self.critic, ids, mask, self.prompt_len, logits=False,
                                     dtype=self.compute_dtype)[1]
        # The value head is a float32 layer on float32 states, outside any autocast.
        values = None
        if self.value_head is not None:
            assert hidden is not None, "the value head's hidden states (a cache without them was dropped above)"
            values = self.value_head(hidden.float())
        if not need_dist:
            return None, values
        logits = self.shape_logits(logits, ids, mask, cached, actions)
        return self.action_dist.proba_distribution(action_logits=logits), values

    def shape_logits(self, logits, ids, mask, cached: CachedOutputs | None,
                     actions: torch.Tensor | None) -> torch.Tensor:
        """Hook for algorithms that change the action distribution (NLPO masks it). ``cached``: the
        engine's outputs for these observations when they were read from its cache, else None."""
        return logits
