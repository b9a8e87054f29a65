"""What every textgym agent adds to a stable-baselines3 on-policy algorithm (a mixin).

- The policy is built over the env's own LM (injected at construction, never pickled into the
  saved data: ``agents.load`` takes it from the env again), with LoRA applied first if asked.
- Rollouts are SB3's loop written out (``collect_rollouts``) so that each call to the policy names
  the engine rows its observation shows (the vec env's ticket, ``LMVecEnv.engine_rows``), and the
  bootstrap at the rollout's end says it is one: the policy reads what the engine's KV-cached step
  computed instead of recomputing it.
- After each update the env's KV cache is re-encoded, so rollouts keep sampling from the current
  policy (one forward per live episode per update).
- The KL coefficient moves once per rollout, on the rollout's mean KL (the env's controller is
  handed over to the agent); its state is saved with the agent.
- The KL placement is the env's ``kl_in``: in the reward the env already subtracts ``kl_coef * k1``;
  in the loss (``kl_in="loss"``) every update adds ``kl_coef * k2`` differentiated through
  ``log pi`` (see ``textgym.kl`` for why only these two pairs are gradient-correct).
- The RLHF figures are logged: mean score, KL (k1, and k3 as a diagnostic), KL coefficient,
  completion length, entropy, and NLPO's kept mask mass.
- Data parallelism (``textgym.distributed``): inside a process group each rank plays its share of
  the env's rows, samples its tokens as rows of the global batch, moves the KL coefficient on the
  global mean KL and logs global figures; its update takes its part of every global minibatch and
  sums gradients with the other ranks (``agents.data_parallel``, ``agents.update``), so N ranks
  take the step one process would take on the global batch.
- Optional PPO-ptx: ``ptx_coef`` > 0 adds a language-modelling loss on ``ptx_data`` to every
  minibatch's loss, as an explicit term (``ptx_loss_term``, see ``agents.ptx``).
- ``learning_rate=None`` picks a default by model size and LoRA (``default_learning_rate``).
- Precision: the env's ``dtype`` is the precision of every forward (the policy autocasts to it);
  the weights the agent trains are made float32 master weights, and a float16 update scales its
  loss. ``micro_batch_size`` and ``gradient_checkpointing`` bound the update's memory. All three
  live in the update's ``GradientStep`` (``agents.update``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from stable_baselines3.common.utils import explained_variance, obs_as_tensor

from textgym import distributed, sharding
from textgym import kl as klmod
from textgym.lora import lora_config
from textgym.precision import autocast

from . import serialization
from .buffer import EpisodeRolloutBuffer
from .completion_buffer import CompletionRolloutBuffer
from .policy import group_rows
from .ptx import lm_loss, ptx_batches
from .update import GradientStep, check_micro_batch_size, upcast_trainable
from .vec_env import LMVecEnv, OnLMVecEnv, as_vec_env

if TYPE_CHECKING:  # what the mixin is mixed into, so its uses of the algorithm's attributes are checked
    from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm as _MixedInto

    from .policy import LMActorCriticPolicy
else:
    _MixedInto = object


def default_learning_rate(model, lora: bool) -> float:
    """The learning rate used when none is given, in the spirit of TRL's recommendations: LoRA
    adapters train at 3e-4 (they start at zero and have few weights); full fine-tuning of a real LM
    at 1e-5 (TRL's PPO default 1.41e-5); a toy model under 10M parameters (``textgym/tiny``) at 3e-3,
    which it needs to move within a few thousand steps."""
    if lora:
        return 3e-4
    n_params = sum(p.numel() for p in model.parameters())
    return 3e-3 if n_params < 10_000_000 else 1e-5


def check_learning_rate(value: Any) -> None:
    """A learning rate is a finite number > 0, a schedule (a callable, SB3's), or None (the default
    by model size); 0 would train nothing without a word, and a negative one fails inside torch."""
    if value is None or callable(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (np.isfinite(value) and value > 0):
        raise ValueError(f"learning_rate must be a finite number > 0, a schedule, or None (the default by model "
                         f"size and LoRA), got {value!r}")


# Truncated importance sampling of the sampler/trainer mismatch (Yao et al. 2025, "Your Efficient RL
# Framework Secretly Brings You Off-Policy RL Training"): the weight pi_old/mu is capped here.
BEHAVIOUR_WEIGHT_CAP = 2.0


def behaviour_weight(data) -> torch.Tensor | float:
    """The detached weight ``min(pi_old(y) / mu(y), 2)`` of each sampled token in a clipped update:
    mu is the sampler (the KV-cached forward that drew the token), pi_old the training forward at
    the rollout's weights, which the ratio's denominator now is (``recomputes_old_log_probs``). The
    two are one function in float32, and the weight is then 1 (no tensor is made); in bfloat16/
    float16 they differ by rounding, and the weight corrects the policy gradient for it, truncated
    as Yao et al. (2025) do."""
    if data.behaviour_log_prob is None:
        return 1.0
    return torch.exp(data.old_log_prob - data.behaviour_log_prob).clamp(max=BEHAVIOUR_WEIGHT_CAP)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip_range_vf: float | None, reduce=torch.mean) -> torch.Tensor:
    """Mean squared error of the values; with ``clip_range_vf``, PPO2's pessimistic form
    ``max((V - R)^2, (V_clipped - R)^2)`` with ``V_clipped`` within ``clip_range_vf`` of the
    rollout's value. (stable-baselines3 keeps only the clipped term, which stops the critic at
    ``clip_range_vf`` per rollout whatever the reward scale, and gives it no gradient beyond.)
    ``reduce`` replaces the mean (a micro-batch's share of the minibatch's mean)."""
    unclipped = (returns - values).square()
    if clip_range_vf is None:
        return reduce(unclipped)
    clipped = old_values + (values - old_values).clamp(-clip_range_vf, clip_range_vf)
    return reduce(torch.max(unclipped, (returns - clipped).square()))


class LMAlgorithm(OnLMVecEnv, _MixedInto):
    """Mixin placed before an SB3 ``OnPolicyAlgorithm`` subclass in the bases. Its own keyword
    arguments (``lora`` and PPO-ptx's are described with the algorithms):

    :param micro_batch_size: episodes per forward of an update (None: a minibatch at once). The
        micro-batches' gradients accumulate to the minibatch's, so the update is unchanged while
        only k episodes' activations are held at once (``agents.update``).
    :param gradient_checkpointing: during updates, recompute each layer of the trained LM in
        backward instead of keeping its activations: less memory for about one more forward of time;
        the update is unchanged (False).
    :param fsdp: shard the trained LM (and a reference of its own) over the data-parallel ranks
        with FSDP2 (``textgym.sharding``): each rank holds 1/N of the weights, gradients and optimizer
        state, and every forward gathers one layer at a time. Needs a process group (``torchrun``);
        the update is the unsharded one's (False).
    """

    algo_name = "custom"
    # Env keyword arguments that ``agents.make``/``agents.load`` use when they make the env from an
    # id and the caller did not set them (e.g. GRPO's group_size).
    env_defaults: dict[str, Any] = {}
    # True where the algorithm's own ``train`` adds textgym's loss terms (``add_kl_loss`` for
    # kl_in="loss", ``ptx_loss_term`` for PPO-ptx); a plain SB3 class registered through
    # ``agents.register`` keeps SB3's update, so neither is available to it.
    adds_loss_terms = False
    # False where the update has no ratio of new to old policy (A2C's single on-policy step): its old
    # log-probs are then never recomputed (``recomputes_old_log_probs``).
    uses_ratio = True
    # True where the reference log-probs of the KL loss come from the env's own (the critic-free
    # buffers store them), so ``prepare_update`` takes no reference forward.
    kl_from_env = False
    # False where FSDP cannot shard the algorithm's models (NLPO copies the policy for its mask).
    shards = True
    policy: LMActorCriticPolicy  # (or a subclass): agents.make gives a plain SB3 class this policy too

    def __init__(self, policy, env, *args, lora: Any = None, ptx_coef: float = 0.0, ptx_data: Any = None,
                 ptx_batch_size: int = 8, ptx_max_length: int = 128, micro_batch_size: int | None = None,
                 gradient_checkpointing: bool = False, fsdp: bool = False, **kwargs):
        self.micro_batch_size = check_micro_batch_size(micro_batch_size)
        if not isinstance(gradient_checkpointing, (bool, np.bool_)):
            raise ValueError(f"gradient_checkpointing must be True or False, got {gradient_checkpointing!r}")
        self.gradient_checkpointing = bool(gradient_checkpointing)
        if not isinstance(fsdp, (bool, np.bool_)):
            raise ValueError(f"fsdp must be True or False, got {fsdp!r}")
        self.fsdp = bool(fsdp)
        if ptx_coef < 0 or (ptx_coef > 0 and ptx_data is None):
            raise ValueError(f"ptx_coef must be >= 0 and needs ptx_data (texts) when > 0; got ptx_coef={ptx_coef!r}, "
                             f"ptx_data={ptx_data!r}")
        self.ptx_coef, self.ptx_data = float(ptx_coef), ptx_data
        self.ptx_batch_size, self.ptx_max_length = ptx_batch_size, ptx_max_length
        self.lora = lora_config(lora)
        self.textgym_algo = self.algo_name
        # Saved instead of pickled objects: load() rebuilds the agent from these (agents.serialization).
        self.textgym_hyperparameters = serialization.constructor_arguments(
            {**kwargs, "lora": lora, "ptx_coef": ptx_coef, "ptx_data": ptx_data, "ptx_batch_size": ptx_batch_size,
             "ptx_max_length": ptx_max_length, "micro_batch_size": self.micro_batch_size,
             "gradient_checkpointing": self.gradient_checkpointing, "fsdp": self.fsdp})
        self._episode_stats: list[dict] = []
        self.rollout_stats: dict[str, float] = {}
        self._update_logs: dict[str, list[float]] = {}
        env = as_vec_env(env) if env is not None else None
        check_learning_rate(kwargs.get("learning_rate"))
        if kwargs.get("learning_rate", 0.0) is None:
            if env is None:
                raise ValueError("learning_rate=None picks a default from the env's model: pass env= too")
            kwargs["learning_rate"] = default_learning_rate(env.core.model, self.lora is not None)
        super().__init__(policy, env, *args, **kwargs)

    @property
    def iteration_timesteps(self) -> int:
        """Timesteps of one rollout, ``n_steps * n_envs`` (what ``textgym train`` learns per iteration)."""
        return self.n_steps * self.n_envs

    def _setup_model(self) -> None:
        core = self.core
        if core.acting.ilql is not None:
            raise ValueError(f"this env acts with ILQL's decoding (a saved ILQL model), which {self.algo_name!r}'s "
                             "policy does not sample from: train it further with --algo ilql, or start an online "
                             "algorithm from the plain LM")
        if core.cfg.kl_in == "loss" and not self.adds_loss_terms:
            raise ValueError(f"algorithm {self.algo_name!r} does not add a KL term to its loss: make the env with "
                             "kl_in='reward' (the default), or use one of ppo, a2c, nlpo")
        own_update = {"micro_batch_size": self.micro_batch_size is not None,
                      "gradient_checkpointing": self.gradient_checkpointing,
                      "dtype float16": core.dtype == torch.float16,
                      f"{distributed.world_size()} data-parallel ranks": distributed.world_size() > 1}
        if not self.adds_loss_terms and any(own_update.values()):
            asked = ", ".join(name for name, on in own_update.items() if on)
            raise ValueError(f"algorithm {self.algo_name!r} keeps stable-baselines3's update, which has no "
                             f"micro-batches, checkpointing, loss scaling or data parallelism ({asked} asked): use "
                             "one of ppo, a2c, nlpo, grpo, rloo, reinforce++")
        core.kl.per_rollout()  # the coefficient moves once per rollout (collect_rollouts)
        if core.cfg.quantize is not None and not self.lora and core.peft_model is None:
            raise ValueError(f"the env's model is quantized (quantize={core.cfg.quantize!r}): its weights are frozen, "
                             "so the agent needs LoRA adapters to train (lora=True or a dict of peft.LoraConfig "
                             "options), or an env with quantize=None")
        if self.lora and core.peft_model is None:
            self.set_random_seed(self.seed)  # the adapters' initialisation must follow the seed too
            core.attach_lora(self.lora)
        upcast_trainable(core.model)  # float32 master weights (textgym.precision); a no-op in float32
        core.match_reference_weights()  # the frozen copy computes as the policy does until it moves
        if self.fsdp:
            self._shard_models()
        shared_value_head = self.policy_kwargs.get("value_head", True) and self.policy_kwargs.get("critic") is None
        if shared_value_head:
            core.keep_hidden_states()  # the shared value head reads the cached hidden states
        saved = dict(self.policy_kwargs)
        self.policy_kwargs = {**saved, "lm": core.model, "core": core}
        try:
            super()._setup_model()
        finally:
            self.policy_kwargs = saved
        if self.fsdp:  # the value head (and a separate critic) stay whole on every rank: rank 0's
            sharding.broadcast_from_main(self.policy)
        self.gradient_step = GradientStep(self.policy, micro_batch_size=self.micro_batch_size,
                                          gradient_checkpointing=self.gradient_checkpointing,
                                          loss_scaling=core.dtype == torch.float16, extra_loss=self.ptx_coef > 0)
        self._ptx_batches = None
        if self.ptx_coef > 0:
            if not self.adds_loss_terms:
                raise ValueError(f"algorithm {self.algo_name!r} does not add a pretraining term to its loss: "
                                 "use ptx_coef with one of ppo, a2c, nlpo")
            self._ptx_batches = ptx_batches(core.tokenizer, self.ptx_data, self.ptx_batch_size, self.ptx_max_length,
                                            seed=self.seed or 0)

    def _shard_models(self) -> None:
        """``fsdp=True``: shard the policy LM and a reference model of its own (``textgym.sharding``)."""
        core = self.core
        if not distributed.is_initialized():
            raise ValueError("fsdp=True shards the model over data-parallel ranks, which needs a process group: "
                             "launch with torchrun --nproc-per-node N, or pass fsdp=False (also to agents.load, to "
                             "open a sharded run's agent file in one process)")
        refused = {f"algorithm {self.algo_name!r}": not self.shards,
                   f"quantize={core.cfg.quantize!r}": core.cfg.quantize is not None,
                   "critic='copy' (a copy of the policy LM, which a sharded model cannot give)":
                       self.policy_kwargs.get("critic") == "copy",
                   "dtype float16 (its loss scaling does not see the other ranks' overflows)":
                       core.dtype == torch.float16}
        if any(refused.values()):
            raise ValueError(f"fsdp=True cannot shard with {', '.join(k for k, on in refused.items() if on)}: use "
                             "fsdp=False (data parallelism with DDP), or ppo, a2c, grpo, rloo, reinforce++ on an "
                             "unquantized float32 or bfloat16 model")
        core.shard_models()

    def save(self, path, exclude=None, include=None) -> None:
        """Save to a zip in SB3's layout, without pickle: JSON data and tensors (``agents.serialization``),
        the KL controller's state included. Under data parallelism only rank 0 writes (every rank
        holds the same agent); the others return at once, but for a sharded agent (``fsdp=True``),
        whose weights and optimizer state every rank must take part in gathering (they may pass
        ``path=None``). The file is the unsharded agent's: it loads with or without sharding."""
        params = {name: sharding.gathered(state) for name, state in self.get_parameters().items()} \
            if self.fsdp else None
        if not distributed.is_main():
            return
        self.kl_controller_state = self.core.kl.state_dict()  # a dict of floats, saved as JSON
        serialization.save_agent(self, path, exclude=exclude, include=include, params=params)

    def set_parameters(self, load_path_or_dict, exact_match: bool = True, device="auto") -> None:
        """SB3's, taking whole (saved) weights and optimizer state into a sharded agent too."""
        if self.fsdp and isinstance(load_path_or_dict, dict):
            load_path_or_dict = dict(load_path_or_dict)
            if "policy" in load_path_or_dict:
                load_path_or_dict["policy"] = sharding.sharded_state(self.policy, load_path_or_dict["policy"])
            if "policy.optimizer" in load_path_or_dict:
                load_path_or_dict["policy.optimizer"] = sharding.sharded_optimizer_state(
                    self.policy.optimizer, load_path_or_dict["policy.optimizer"])
        super().set_parameters(load_path_or_dict, exact_match=exact_match, device=device)

    @classmethod
    def load(cls, path, env=None, device="auto", custom_objects=None, print_system_info=False, force_reset=True,
             **kwargs):
        """Rebuild an agent saved with ``save`` on ``env``; nothing in the file is unpickled."""
        serialization.check_load_arguments(env, custom_objects)
        model = serialization.load_agent(cls, path, as_vec_env(env), device=device, **kwargs)
        if getattr(model, "kl_controller_state", None):  # the coefficient carries on where it was saved
            model.core.kl.load_state_dict(model.kl_controller_state)
        return model

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_episode_stats", "rollout_stats", "_update_logs", "kl_coef_used",
                "_ptx_batches", "gradient_step"]

    def start_fresh_episodes(self) -> None:
        """Reset every env row, so the next rollout starts from new episodes (prompts drawn with the
        env's seeded RNGs) instead of continuing the running ones: ``textgym train`` starts each
        iteration this way, which is what makes a resumed run repeat the uninterrupted one."""
        self._last_obs = self.vec_env.reset()
        self._last_episode_starts = np.ones((self.n_envs,), dtype=bool)

    def collect_rollouts(self, env, callback, rollout_buffer, n_rollout_steps: int) -> bool:
        # Timed on the engine's timer (textgym.timing): the reference model's and the reward's work
        # are phases of their own nested in it, so "generation" is the rest of the rollout.
        with self.core.timer.phase("generation"):
            return self._collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)

    def _collect_rollouts(self, env, callback, rollout_buffer, n_rollout_steps: int) -> bool:
        self._episode_stats = []
        self.kl_coef_used = float(self.core.kl.value)  # the coefficient of this whole rollout
        start = self.num_timesteps
        result = self._play_rollout(env, callback, rollout_buffer, n_rollout_steps)
        if distributed.is_initialized():  # the global batch's timesteps, alike on every rank
            self.num_timesteps = start + int(distributed.all_reduce_sum(self.num_timesteps - start))
        self.rollout_stats = self._rollout_stats()
        for key, name in (("score", "score_mean"), ("kl", "kl_mean"), ("kl_k3", "kl_k3_mean"),
                          ("length", "completion_length"), ("mask_mass", "mask_mass")):
            if key in self.rollout_stats:
                self.logger.record(f"rollout/{name}", self.rollout_stats[key])
        self.logger.record("rollout/kl_coef", self.kl_coef_used)
        # One controller update per rollout, on the mean KL of the episodes that ended in it (on every rank).
        self.core.kl.end_rollout()
        return result

    def _rollout_stats(self) -> dict[str, float]:
        """Means over the episodes that ended in the rollout (on every rank): ``score``, ``kl``,
        ``kl_k3``, ``length``, ``mask_mass`` (where the episodes report them) and ``reward`` (the
        return), and their number, ``episodes``."""
        stats = self._episode_stats  # the final infos: every one has a score
        values = {key: [s[key] for s in stats if key in s] for key in ("score", "kl", "kl_k3", "length", "mask_mass")}
        values["reward"] = [s["episode"]["r"] for s in stats if "episode" in s]
        pooled = distributed.mean_over_ranks(values)
        out = {key: mean for key, (mean, _) in pooled.items() if mean is not None}
        out["episodes"] = pooled["score"][1]
        return out

    def _play_rollout(self, env: LMVecEnv, callback, rollout_buffer, n_rollout_steps: int) -> bool:
        """stable-baselines3's ``OnPolicyAlgorithm.collect_rollouts`` (v2.x), step for step, with two
        arguments it cannot pass: the ticket of the engine rows each observation shows, so the policy
        reads the engine's cached outputs for them, and ``bootstrap=True`` on the final value call.
        Left out: continuous actions (the action space is the vocabulary) and the timeout
        bootstrap (``LMVecEnv`` never truncates: EOS and ``max_new_tokens`` both end an episode)."""
        assert self._last_obs is not None, "No previous observation was provided"
        self.policy.set_training_mode(False)
        # Data-parallel, the tokens are drawn as rows of the global batch (a single process calls
        # the policy exactly as SB3 does).
        sampling = {"rank_rows": distributed.all_gather_int(env.num_envs)} if distributed.is_initialized() else {}
        n_steps = 0
        rollout_buffer.reset()
        callback.on_rollout_start()
        while n_steps < n_rollout_steps:
            with torch.no_grad():
                obs_tensor = obs_as_tensor(self._last_obs, self.device)
                actions, values, log_probs = self.policy(obs_tensor, engine_rows=env.engine_rows(self._last_obs),
                                                         **sampling)
            actions = actions.cpu().numpy()
            new_obs, rewards, dones, infos = env.step(actions)
            if not isinstance(new_obs, dict):  # VecEnv's type admits arrays and tuples: not from an LMVecEnv
                raise TypeError(f"textgym agents step an LMVecEnv, whose observations are dicts; got {type(new_obs)}")
            self.num_timesteps += env.num_envs
            callback.update_locals(locals())  # callbacks read the loop's locals, as in SB3
            if not callback.on_step():
                return False
            self._update_info_buffer(infos, dones)
            n_steps += 1
            actions = actions.reshape(-1, 1)
            rollout_buffer.add(self._last_obs, actions, rewards, self._last_episode_starts, values, log_probs)
            self._last_obs = new_obs
            self._last_episode_starts = dones
        with torch.no_grad():  # the value of the last observations (new_obs), for unfinished episodes
            values = self.policy.predict_values(obs_as_tensor(self._last_obs, self.device),
                                                engine_rows=env.engine_rows(self._last_obs), bootstrap=True)
        rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    # --- pieces shared by the algorithms' updates -------------------------------------------------

    @property
    def kl_in_loss(self) -> bool:
        return self.core.cfg.kl_in == "loss"

    @property
    def recomputes_old_log_probs(self) -> bool:
        """Whether an update first recomputes the rollout's log-probs with the training forward.
        The ratio of a clipped update must be 1 before its first step, so its old log-probs must come
        from the very function the update evaluates: a teacher-forced forward. The rollout's are
        those of the KV-cached sampling forward, the same function in float32 (to about 1e-6, so the
        extra forward is skipped there), but not in bfloat16/float16, where the two computations
        round differently (log-prob gaps of a few hundredths). Algorithms without a ratio (A2C)
        never need it."""
        return self.uses_ratio and self.core.dtype != torch.float32

    def prepare_update(self) -> None:
        """Work done once per rollout before its epochs: with the KL in the loss, the reference
        log-prob of every sampled token (one teacher-forced forward per episode segment); in
        bfloat16/float16, the old log-probs by the training forward (``recomputes_old_log_probs``;
        the sampler's are kept as the behaviour log-probs, ``behaviour_weight``)."""
        if self.kl_in_loss and not self.kl_from_env:
            if not isinstance(self.rollout_buffer, EpisodeRolloutBuffer):
                raise ValueError(f"kl_in='loss' needs an EpisodeRolloutBuffer (it carries the reference log-probs), "
                                 f"got rollout_buffer_class={type(self.rollout_buffer).__name__}")
            self.rollout_buffer.ref_log_probs = self.policy.reference_log_probs(self.rollout_buffer)
        if self.recomputes_old_log_probs:
            buffer: Any = self.rollout_buffer
            if not isinstance(buffer, (EpisodeRolloutBuffer, CompletionRolloutBuffer)):
                raise ValueError(f"a {self.core.cfg.dtype} update recomputes the rollout's log-probs, which needs "
                                 "textgym's rollout buffer (EpisodeRolloutBuffer or CompletionRolloutBuffer), got "
                                 f"rollout_buffer_class={type(buffer).__name__}")
            with torch.no_grad():
                buffer.recompute_log_probs(self.training_log_probs)

    def training_log_probs(self, *batch) -> torch.Tensor:
        """The training forward's log-probs of a batch of the rollout buffer (each algorithm's
        buffer says what a batch is); see ``recomputes_old_log_probs``."""
        obs, actions = batch
        return self.policy.evaluate_actions(obs, actions)[1]

    def add_kl_loss(self, loss: torch.Tensor, parts: dict, data, log_prob: torch.Tensor, reduce=None) -> torch.Tensor:
        """``loss + kl_coef * mean k2`` over the minibatch's tokens, differentiable through
        ``log_prob`` (the acting distribution's), with the k2 mean put in ``parts`` (logged as
        ``train/kl_loss``); ``loss`` unchanged when the KL sits in the reward. Each token's term is
        importance-weighted by ``pi / mu``, mu the policy that sampled it (``textgym.kl.kl_loss``):
        after the update's first step the samples are no longer pi's. ``reduce`` replaces the mean
        (a micro-batch's share of it; the critic-free algorithms average it as their policy loss,
        padding excluded)."""
        if not self.kl_in_loss:
            return loss
        behaviour = data.behaviour_log_prob if data.behaviour_log_prob is not None else data.old_log_prob
        kl = klmod.kl_loss(log_prob, data.ref_log_prob, behaviour)
        kl = kl.mean() if reduce is None else reduce(kl)
        parts["train/kl_loss"] = kl.detach()
        return loss + self.kl_coef_used * kl

    def ptx_loss_term(self) -> tuple[torch.Tensor, dict[str, float]]:
        """PPO-ptx (InstructGPT eq. 2): ``ptx_coef`` times the language-modelling loss of the next
        pretraining batch, an extra loss of every minibatch's step (``GradientStep.accumulate``) so
        that gradient clipping and the step see the combined gradient, with its figure for
        ``train/loss``. Every rank draws the same pretraining batch (seeded alike) and the ranks'
        gradients and figures are summed: data-parallel, each rank's term is 1/N of it."""
        if self._ptx_batches is None:
            raise ValueError("ptx_loss_term needs ptx_coef > 0 and ptx_data")
        with autocast(self.core.device, self.core.dtype):  # the policy's precision, as its other forwards
            loss = lm_loss(self.core.model, next(self._ptx_batches))
        self._update_logs.setdefault("train/ptx_loss", []).append(loss.item())
        term = self.ptx_coef * loss
        if distributed.is_initialized():
            term = term / distributed.world_size()
        return term, {"train/loss": term.item()}

    def episode_groups(self, data) -> torch.Tensor | None:
        """With micro-batches, the episode segment of each transition of the minibatch ``data``
        (``policy.group_rows``: the rows one forward covers), so a micro-batch holds whole ones."""
        if self.micro_batch_size is None:
            return None
        obs = data.observations
        return group_rows(obs["input_ids"].long(), obs["attention_mask"].long(), self.policy.prompt_len)[0]

    def run_update(self, minibatch: Callable[[Any], tuple[Callable, int, torch.Tensor | None]], *,
                   n_epochs: int = 1, batch_size: int | None = None, target_kl: float | None = None) -> None:
        """The one update loop of textgym's algorithms: ``n_epochs`` passes over the rollout in
        minibatches of ``batch_size`` (the algorithm's buffer fills them with whole episodes; None:
        the whole rollout), one gradient step each. ``minibatch(data)`` is what an algorithm
        supplies: ``(loss_fn, n_rows, groups)``, its loss term on that minibatch (advantages
        included) for ``GradientStep.accumulate``. With ``target_kl``, the epochs stop at the first
        minibatch whose approximate KL to the rollout's policy exceeds ``1.5 * target_kl``, and its
        step is not taken (SB3's PPO rule). Logs the mean of every figure over the minibatches."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        self.prepare_update()
        self.start_update_logs()
        stop = False
        extra = self.ptx_loss_term if self._ptx_batches is not None else None  # PPO-ptx's term, every step
        with self.gradient_step.training():
            for _ in range(n_epochs):
                for data in self.rollout_buffer.get(batch_size):  # (this rank's part of) a minibatch
                    loss_fn, n_rows, groups = minibatch(data)
                    parts = self.gradient_step.accumulate(loss_fn, n_rows, groups=groups, extra=extra)
                    for name, value in parts.items():
                        self.log_update(name, value)
                    if target_kl is not None and parts["train/approx_kl"] > 1.5 * target_kl:
                        self.gradient_step.discard()  # the step this minibatch would take is not taken
                        stop = True
                        break
                    self.gradient_step.step(self.max_grad_norm)
                self._n_updates += 1
                if stop:
                    break
        self.record_update_logs()
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")

    def log_update(self, name: str, value: float) -> None:
        self._update_logs.setdefault(name, []).append(float(value))

    def start_update_logs(self) -> None:
        self._update_logs = {}

    def record_update_logs(self) -> None:
        """Log the mean of each figure over the update's minibatches (data-parallel, the figures
        already are the global minibatches', ``GradientStep.accumulate``)."""
        for name, values in self._update_logs.items():
            self.logger.record(name, float(np.mean(values)))

    def explained_variance(self) -> float:
        """SB3's explained variance of the rollout's values against its returns (over every rank's rows)."""
        values, returns = self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten()
        if distributed.is_initialized():
            parts = distributed.all_gather_object((values, returns))
            values, returns = np.concatenate([v for v, _ in parts]), np.concatenate([r for _, r in parts])
        return float(explained_variance(values, returns))

    def _update_info_buffer(self, infos: list[dict[str, Any]], dones=None) -> None:
        super()._update_info_buffer(infos, dones)
        self._episode_stats.extend(info for info in infos if "score" in info)

    def train(self) -> None:
        """SB3's own update (for a plain SB3 class registered with ``agents.register``); textgym's
        algorithms write theirs out in full."""
        super().train()
        self.after_train()

    def after_train(self) -> None:
        """Logging and the cache refresh that follow every update."""
        entropy_loss = self.logger.name_to_value.get("train/entropy_loss")
        if entropy_loss is not None:
            self.logger.record("train/entropy", -float(entropy_loss))
        self.core.policy_changed()  # the weights changed: cached logits must follow
