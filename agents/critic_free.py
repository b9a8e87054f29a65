"""What GRPO, RLOO and REINFORCE++ share: whole-episode rollouts and a critic-free clipped update.

None of the three learns a value function: the baseline of an episode's return comes from the
other episodes of the rollout (its group's, for GRPO and RLOO; the whole batch's, for
REINFORCE++). That shapes the rollout:

- **Rollouts are whole rounds of episodes.** SB3's ``collect_rollouts`` steps every row ``n_steps``
  times and cuts episodes at the rollout's edge, leaving the cut part to a critic's bootstrap. With
  no critic a cut episode has no return, and a group advantage needs all G episodes of a prompt.
  So a rollout here is ``episodes_per_row`` rounds; in a round every row of the env is reset at
  once (so each group of G rows starts together on one fresh prompt, ``textgym.envs.groups``),
  the running rows are stepped (``LMVecEnv.step_rows``; a row that finished waits, unstepped)
  until every episode has ended, and the round's episodes go into a ``CompletionRolloutBuffer``.
  Every episode of a rollout was sampled by the same weights, and every group is complete. Rows
  that finish early idle until the round ends (they still ride in the engine's batched forward):
  the cost of whole groups, as in TRL's and OpenRLHF's generate-then-train loops. After the last
  round the rows are reset again (prompts encoded lazily, by the updated weights), like SB3's
  autoreset.
  ``num_timesteps`` counts the tokens generated, as it does for PPO (where every row steps).
- **The KL**: the env's ``kl_in`` placement. In the reward, the returns carry ``-kl_coef * k1``
  (summed at the end with ``kl_mode="final"``, per token with ``"per_token"``); in the loss, the
  update adds ``kl_coef * k2`` through ``LMAlgorithm.add_kl_loss``, on reference log-probs the
  env already computed for its KL figures (no extra reference forward).
- **The update** is PPO's clipped surrogate (Schulman et al. 2017) on the per-token ratio, over
  ``n_epochs`` passes in minibatches of whole episodes, with no value loss; the token losses are
  averaged per ``loss_normalization``:

  - ``"sequence"``: mean over each completion's tokens, then over completions (GRPO's paper);
  - ``"token"``: mean over all completion tokens of the minibatch (DAPO, Yu et al. 2025; TRL's
    and OpenRLHF's RLOO and REINFORCE++): long completions weigh by their length;
  - ``"sum"``: the minibatch's token terms summed and divided by a constant, the minibatch's
    capacity in tokens (``batch_size``; with ``batch_size=None``, ``max_new_tokens`` times the
    rollout's episodes): each completion weighs by its summed tokens (REINFORCE on the whole
    sequence as one action, as in RLOO's paper), and no token's weight depends on what else its
    minibatch holds. This is Dr. GRPO's constant normaliser (Liu et al. 2025, "Understanding R1-Zero-
    Like Training": a sequence's sum over ``max_new_tokens``, averaged over a fixed number of
    sequences): a minibatch of full-length completions weighs each token as ``"token"`` does.
    (Dividing by the minibatch's number of completions instead would weigh a token by the mean
    length of the completions it happens to share a token-filled minibatch with.)

An algorithm provides ``compute_advantages(buffer)``, called when the rollout is complete (where
SB3 calls ``compute_returns_and_advantage``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.utils import FloatSchedule

from textgym import distributed

from .common import LMAlgorithm, behaviour_weight
from .completion_buffer import CompletionRolloutBuffer
from .data_parallel import share_of
from .policy import LMActorCriticPolicy
from .update import take_rows
from .vec_env import LMVecEnv

LOSS_NORMALIZATIONS = ("sequence", "token", "sum")
# OnPolicyAlgorithm arguments that whole-episode, critic-free rollouts fix.
_FIXED = {"n_steps": "episodes_per_row sets the rollout size (whole rounds of episodes)",
          "gamma": "returns are undiscounted (gamma = 1)", "gae_lambda": "there is no critic for GAE",
          "vf_coef": "there is no value loss", "use_sde": "the actions are tokens", "sde_sample_freq": "idem"}


def aggregate(values: torch.Tensor, mask: torch.Tensor, how: str, of: torch.Tensor | None = None,
              totals: tuple[int, int] | None = None, capacity: int | None = None) -> torch.Tensor:
    """Reduce per-token ``values`` ``[B, T]`` over the real tokens (``mask``) as ``how`` says (one
    of ``LOSS_NORMALIZATIONS``, see the module docstring). ``of``: the mask of the whole minibatch
    when ``values`` and ``mask`` are a micro-batch of it: the result is then the micro-batch's
    share of the minibatch's figure (its counts of completions and tokens divide). ``totals``:
    ``(completions, tokens)`` of the whole minibatch, in place of ``of``'s counts (data-parallel,
    the minibatch spans the ranks: ``agents.data_parallel``). ``capacity``: the constant that
    ``"sum"`` divides by (the minibatch's capacity in tokens), required there."""
    of = mask if of is None else of
    if how == "token":
        return (values * mask).sum() / (of.sum().clamp(min=1) if totals is None else max(totals[1], 1))
    if how == "sum":
        if capacity is None or capacity < 1:
            raise ValueError(f"loss_normalization 'sum' divides by a constant capacity in tokens >= 1, "
                             f"got {capacity!r}")
        return (values * mask).sum() / capacity
    per_sequence = (values * mask).sum(1) / mask.sum(1).clamp(min=1)
    return per_sequence.sum() / (len(of) if totals is None else totals[0])


def group_members(groups: np.ndarray, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(index of each episode's group, size of each group)`` from the episodes' group ids; with
    ``size``, every group must hold exactly that many episodes."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    if size is not None and (counts != size).any():
        raise RuntimeError(f"every group must hold {size} episodes of its prompt; got group sizes "
                           f"{sorted(set(counts.tolist()))}")
    return inverse, counts


class WholeEpisodeOnPolicy(OnPolicyAlgorithm):
    """The stable-baselines3 layer (as ``sb3.PPO`` is for ``agents.PPO``): hyperparameters, and
    rollouts of whole rounds of episodes on an ``LMVecEnv``.

    :param episodes_per_row: rounds per rollout: a rollout holds ``episodes_per_row * n_envs``
        whole episodes (1).
    :param batch_size: completion tokens per minibatch, filled with whole episodes (64).
    :param n_epochs: passes over each rollout.
    :param clip_range: the PPO ratio clip (0.2), a number or a schedule.
    :param ent_coef: entropy bonus (0.0).
    :param max_grad_norm: gradient clipping (1.0).
    :param target_kl: stop an update's epochs early when the approximate KL between the old and new
        policy exceeds 1.5 x this (SB3's rule); None (default): never.
    :param loss_normalization: "sequence", "token" or "sum" (module docstring).
    """

    # With the KL in the reward of a final-mode env, charge it to the tokens that incurred it
    # (``spread_kl``) rather than as one sum on the last token: for per-token credit (REINFORCE++).
    kl_per_token = False

    # OnPolicyAlgorithm's arguments that this class sets itself (not hyperparameters of it).
    fixed_hyperparameters = tuple(_FIXED)
    # Whole episodes, not SB3's transitions: the buffer is no RolloutBuffer, which SB3 declares
    rollout_buffer: CompletionRolloutBuffer  # type: ignore[assignment]
    clip_range: Any  # the constructor's number, made a schedule by _setup_model

    def __init__(self, policy, env, learning_rate, episodes_per_row: int = 1, batch_size: int | None = 64,
                 n_epochs: int = 1, clip_range: float = 0.2, ent_coef: float = 0.0, max_grad_norm: float = 1.0,
                 target_kl: float | None = None, loss_normalization: str = "token",
                 rollout_buffer_class: type = CompletionRolloutBuffer, rollout_buffer_kwargs: dict | None = None,
                 _init_setup_model: bool = True, **kwargs: Any):
        fixed = sorted(set(kwargs) & set(_FIXED))
        if fixed:
            raise ValueError(f"{', '.join(fixed)}: not hyperparameter(s) of {type(self).__name__} ("
                             + "; ".join(f"{k}: {_FIXED[k]}" for k in fixed) + ")")
        for key, value, low in (("episodes_per_row", episodes_per_row, 1), ("n_epochs", n_epochs, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be an integer >= 1 (completion tokens per minibatch) or None (the "
                             f"whole rollout), got {batch_size!r}")
        if loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"unknown loss_normalization {loss_normalization!r}; valid: "
                             f"{', '.join(LOSS_NORMALIZATIONS)}")
        super().__init__(
            policy, env, learning_rate=learning_rate, n_steps=episodes_per_row, gamma=1.0, gae_lambda=1.0,
            ent_coef=ent_coef, vf_coef=0.0, max_grad_norm=max_grad_norm, use_sde=False, sde_sample_freq=-1,
            rollout_buffer_class=rollout_buffer_class, rollout_buffer_kwargs=rollout_buffer_kwargs,
            _init_setup_model=False, supported_action_spaces=(spaces.Discrete,), **kwargs,
        )
        self.episodes_per_row, self.batch_size, self.n_epochs = int(episodes_per_row), batch_size, int(n_epochs)
        self.clip_range, self.target_kl, self.loss_normalization = clip_range, target_kl, loss_normalization
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        if not isinstance(self.env, LMVecEnv):
            raise ValueError("textgym agents need a textgym env: pass env= (an env id, textgym env or vector env)")
        self.rollout_buffer_kwargs = {"prompt_len": self.env.core.P, **self.rollout_buffer_kwargs}
        super()._setup_model()
        self.clip_range = FloatSchedule(self.clip_range)

    def compute_advantages(self, buffer: CompletionRolloutBuffer) -> None:
        """Fill ``buffer.advantages`` once the rollout is complete (each algorithm's own)."""
        raise NotImplementedError

    def _play_rollout(self, env, callback, rollout_buffer: CompletionRolloutBuffer, n_rollout_steps: int) -> bool:
        """Play ``n_rollout_steps`` (``episodes_per_row``) whole rounds of episodes into the buffer."""
        core = env.core
        self.policy.set_training_mode(False)
        rollout_buffer.reset()
        callback.on_rollout_start()
        for _ in range(n_rollout_steps):
            if not core.all_fresh():  # start every row's episode together
                self._last_obs = env.reset()
            rewards_per_token = np.zeros((env.num_envs, core.T), dtype=np.float32)
            scores = np.zeros(env.num_envs, dtype=np.float32)
            kl_coefs = np.zeros(env.num_envs, dtype=np.float64)
            while True:
                rows = core.running()
                idx = np.flatnonzero(rows)
                # Data-parallel, the ranks step together until the round has ended on all of them.
                counts = distributed.all_gather_int(len(idx))
                if not sum(counts):
                    break
                with torch.no_grad():  # sampled from the acting distribution, whose log-prob the env records
                    sampled = self._sample_tokens(core, idx, counts)
                if not len(idx):  # this rank's round is over: it only drew the step's key with the others
                    continue
                actions = np.zeros(env.num_envs, dtype=np.int64)
                actions[idx] = sampled.cpu().numpy()
                t = core.generated(idx)
                rewards, dones, infos = env.step_rows(actions, rows)
                rewards_per_token[idx, t] = rewards[idx]
                for i in np.flatnonzero(dones):
                    scores[i], kl_coefs[i] = infos[i]["score"], infos[i]["kl_coef"]
                self.num_timesteps += len(idx)
                callback.update_locals(locals())
                if not callback.on_step():
                    return False
                self._update_info_buffer(infos, dones)
            episodes = core.episodes()
            if self.kl_per_token and core.cfg.kl_in == "reward" and core.cfg.kl_mode == "final":
                rewards_per_token = spread_kl(rewards_per_token, episodes.log_probs - episodes.ref_log_probs,
                                              kl_coefs, episodes.length)
            rollout_buffer.add_round(episodes, rewards_per_token, scores)
        self._last_obs = env.reset()  # the next episodes wait, unencoded, for the updated weights
        self._last_episode_starts = np.ones(env.num_envs, dtype=bool)
        self.compute_advantages(rollout_buffer)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def _sample_tokens(self, core, idx: np.ndarray, counts: list[int]) -> torch.Tensor:
        """A token for each of the engine rows ``idx`` from the acting distribution, as rows of the
        global batch (``counts``: each rank's number of rows), so N ranks sample what one process
        holding all their rows would (``textgym.distributed.sample_categorical``)."""
        if len(idx):
            logits = core.acting_logits(torch.as_tensor(idx, device=core.device))
            categorical = self.policy.action_dist.proba_distribution(action_logits=logits).distribution
            assert isinstance(categorical, torch.distributions.Categorical)  # the vocabulary's categorical
            probs = categorical.probs
        else:
            probs = torch.zeros((0, core.vocab), device=core.device)
        return distributed.sample_categorical(probs, counts=counts)


def spread_kl(rewards: np.ndarray, log_ratio: np.ndarray, kl_coefs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Per-token rewards ``[n, T]`` of a final-mode round (each episode's whole reward on its last
    token) with the KL penalty moved onto the tokens that incurred it: token t gets
    ``-kl_coef * k1_t`` (``log_ratio`` = log pi - log pi_ref, 0 past the end) and the last token the
    rest, so each episode's return is unchanged. These are exactly the rewards a per_token-mode
    env pays step by step, from one teacher-forced reference forward per episode instead of a
    KV-cached reference forward per step."""
    out = (-kl_coefs[:, None] * log_ratio).astype(np.float32)
    rows = np.flatnonzero(lengths > 0)
    last = lengths[rows] - 1
    out[rows, last] += rewards[rows, last] - out[rows].sum(1)
    return out


class CriticFreeAlgorithm(LMAlgorithm, WholeEpisodeOnPolicy):
    """The textgym layer: a policy with no value head, the env checks, and the clipped update.

    Subclasses set ``algo_name``, ``min_group_size``, ``env_defaults`` and ``compute_advantages``.
    """

    # LMAlgorithm.collect_rollouts (logging, the KL controller) plays the rollout with this: whole rounds
    # of episodes instead of stable-baselines3's fixed number of steps.
    _play_rollout = WholeEpisodeOnPolicy._play_rollout
    adds_loss_terms = True
    kl_from_env = True  # the buffer holds the env's reference log-probs
    min_group_size = 1  # episodes per prompt the advantage needs

    # What a critic-free algorithm changes of the base's defaults (WholeEpisodeOnPolicy's), declared
    # instead of a constructor that repeats the base's (agents.constructor reads them for --help).
    hyperparameter_defaults: dict[str, Any] = {}

    def __init__(self, policy: type[LMActorCriticPolicy] | str = LMActorCriticPolicy, env: Any = None,
                 policy_kwargs: dict | None = None, learning_rate: float | None = None, **kwargs: Any):
        kwargs = {**self.hyperparameter_defaults, **kwargs}  # what the caller gives wins
        kwargs["learning_rate"] = learning_rate
        policy_kwargs = dict(policy_kwargs or {})
        if policy_kwargs.get("critic") is not None or policy_kwargs.get("value_head", False):
            raise ValueError(f"{self.algo_name} is critic-free: policy_kwargs must not ask for a critic or value "
                             f"head, got {policy_kwargs!r}")
        policy_kwargs["value_head"] = False
        super().__init__(policy, env, policy_kwargs=policy_kwargs, **kwargs)

    def _setup_model(self) -> None:
        core = self.core
        if core.group_size < self.min_group_size:
            default = self.env_defaults.get("group_size", self.min_group_size)
            raise ValueError(
                f"{self.algo_name} compares the episodes of one prompt: it needs an env with group_size >= "
                f"{self.min_group_size}, got group_size={core.group_size}. Make the env with group_size={default} "
                f"(agents.make does so from an env id), e.g. env_kwargs={{'group_size': {default}}}"
            )
        if core.acting.nucleus is not None:
            raise ValueError(f"{self.algo_name} trains the LM's own distribution, but this env acts through a nucleus "
                             "mask (an NLPO policy): make the env from the plain model")
        super()._setup_model()

    def learn(self, total_timesteps: int, callback=None, log_interval: int = 1, tb_log_name: str | None = None,
              reset_num_timesteps: bool = True, progress_bar: bool = False):
        return super().learn(total_timesteps, callback=callback, log_interval=log_interval,
                             tb_log_name=tb_log_name or type(self).__name__, reset_num_timesteps=reset_num_timesteps,
                             progress_bar=progress_bar)

    def train(self) -> None:
        """``n_epochs`` passes of the clipped surrogate over the rollout, in minibatches of whole
        episodes; no value loss."""
        clip_range = self.clip_range(self._current_progress_remaining)

        def minibatch(data):
            return partial(self.minibatch_loss, data, clip_range), len(data.completion_mask), None

        self.run_update(minibatch, n_epochs=self.n_epochs, batch_size=self.batch_size, target_kl=self.target_kl)
        self.logger.record("train/clip_range", clip_range)
        self.after_train()

    def training_log_probs(self, *batch) -> torch.Tensor:
        """The training forward's log-probs of a batch of whole episodes (``prompt_ids, prompt_mask,
        completion_ids, completion_mask``), as ``minibatch_loss`` evaluates them."""
        return self.policy.completion_log_probs(*batch)[0]

    @property
    def sum_capacity(self) -> int:
        """What ``loss_normalization="sum"`` divides a minibatch's summed token terms by: its
        capacity in tokens, ``batch_size``, or without one (the whole rollout is the minibatch)
        ``max_new_tokens`` times the rollout's episodes (of every rank)."""
        if self.batch_size is not None:
            return int(self.batch_size)
        return self.core.T * self.episodes_per_row * self.n_envs * distributed.world_size()

    def minibatch_loss(self, data, clip_range: float, rows: slice) -> tuple[torch.Tensor, dict]:
        """The share of the episodes ``rows`` in the loss of the minibatch ``data`` and in its
        logged figures (reduced over all of its completions and tokens, of every rank: ``aggregate``)."""
        part = take_rows(data, rows)
        mask, full_mask = part.completion_mask, data.completion_mask
        log_prob, entropy = self.policy.completion_log_probs(part.prompt_ids, part.prompt_mask, part.completion_ids,
                                                             mask)

        def reduce(values: torch.Tensor, how: str = self.loss_normalization) -> torch.Tensor:
            return aggregate(values, mask, how, of=full_mask, totals=share_of(data).totals(),
                             capacity=self.sum_capacity)

        # Clipped surrogate (Schulman et al. 2017, eq. 7) on each token's ratio.
        log_ratio = log_prob - part.old_log_prob  # 0 past each completion's end
        ratio = torch.exp(log_ratio)
        advantages = part.advantages
        clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
        surrogate = torch.min(advantages * ratio, advantages * clipped)
        policy_loss = -reduce(behaviour_weight(part) * surrogate)  # weight 1 in float32
        entropy_loss = -reduce(entropy)
        parts: dict[str, Any] = {}
        loss = self.add_kl_loss(policy_loss + self.ent_coef * entropy_loss, parts, part, log_prob, reduce)
        with torch.no_grad():  # per token of the minibatch
            parts.update({"train/policy_gradient_loss": policy_loss.detach(),
                          "train/entropy_loss": entropy_loss.detach(), "train/loss": loss.detach(),
                          "train/approx_kl": reduce(torch.expm1(log_ratio) - log_ratio, "token"),
                          "train/clip_fraction": reduce(((ratio - 1).abs() > clip_range).float(), "token")})
        return loss, parts
