"""What every textgym agent adds to a stable-baselines3 on-policy algorithm (a mixin).

- The policy is built over the env's own LM (injected at construction, never pickled into the
  saved data: ``agents.load`` takes it from the env again), with LoRA applied first if asked.
- After each update the env's KV cache is re-encoded, so rollouts keep sampling from the current
  policy (one forward per live episode per update).
- The RLHF figures are logged: mean score, KL, KL coefficient, completion length, entropy.
- Optional PPO-ptx: ``ptx_coef`` > 0 mixes a language-modelling loss on ``ptx_data`` into every
  update (see ``agents.ptx``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agents import serialization
from agents.lora import apply_lora, lora_config
from agents.ptx import PtxOptimizer, ptx_batches
from agents.vec_env import LMVecEnv, as_vec_env


class LMAlgorithm:
    """Mixin placed before an SB3 ``OnPolicyAlgorithm`` subclass in the bases."""

    algo_name = "custom"

    def __init__(self, policy, env, *args, lora: Any = None, ptx_coef: float = 0.0, ptx_data: Any = None,
                 ptx_batch_size: int = 8, ptx_max_length: int = 128, **kwargs):
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
             "ptx_max_length": ptx_max_length})
        self._episode_stats: list[dict] = []
        super().__init__(policy, as_vec_env(env) if env is not None else None, *args, **kwargs)

    @property
    def core(self):
        if not isinstance(self.env, LMVecEnv):
            raise ValueError("textgym agents need a textgym env: pass env= (an env id, textgym env or vector env)")
        return self.env.core

    def _setup_model(self) -> None:
        core = self.core
        if self.lora and getattr(core, "peft_model", None) is None:
            self.set_random_seed(self.seed)  # the adapters' initialisation must follow the seed too
            apply_lora(core, self.lora)
        if self.policy_kwargs.get("critic") is None and not core.policy.hidden:
            core.policy.hidden = True  # the shared value head reads the cached hidden states
            core.refresh([core.policy])
        saved = dict(self.policy_kwargs)
        self.policy_kwargs = {**saved, "lm": core.model, "core": core}
        try:
            super()._setup_model()
        finally:
            self.policy_kwargs = saved
        if self.ptx_coef > 0:
            batches = ptx_batches(core.tokenizer, self.ptx_data, self.ptx_batch_size, self.ptx_max_length,
                                  seed=self.seed or 0)
            self.policy.optimizer = PtxOptimizer(self.policy.optimizer, core.model, batches, self.ptx_coef)

    def save(self, path, exclude=None, include=None) -> None:
        """Save to a zip in SB3's layout, without pickle: JSON data and tensors (``agents.serialization``)."""
        serialization.save_agent(self, path, exclude=exclude, include=include)

    @classmethod
    def load(cls, path, env=None, device="auto", custom_objects=None, print_system_info=False, force_reset=True,
             **kwargs):
        """Rebuild an agent saved with ``save`` on ``env``; nothing in the file is unpickled."""
        if env is None:
            raise ValueError("textgym agents are loaded onto an env (it holds the LM): pass env=")
        if custom_objects:
            raise ValueError("custom_objects is not supported: textgym agent files hold no pickled objects")
        return serialization.load_agent(cls, path, as_vec_env(env), device=device, **kwargs)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_episode_stats"]

    def collect_rollouts(self, env, callback, rollout_buffer, n_rollout_steps: int) -> bool:
        self._episode_stats = []
        self.policy.rollout_bootstrap = True
        try:
            result = super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        finally:
            self.policy.rollout_bootstrap = False
        if self._episode_stats:
            for key, name in (("score", "score_mean"), ("kl", "kl_mean"), ("length", "completion_length")):
                self.logger.record(f"rollout/{name}", float(np.mean([s[key] for s in self._episode_stats])))
        self.logger.record("rollout/kl_coef", float(self.core.kl_controller.value))
        return result

    def _update_info_buffer(self, infos: list[dict[str, Any]], dones=None) -> None:
        super()._update_info_buffer(infos, dones)
        self._episode_stats.extend(info for info in infos if "score" in info)

    def train(self) -> None:
        super().train()
        entropy_loss = self.logger.name_to_value.get("train/entropy_loss")
        if entropy_loss is not None:
            self.logger.record("train/entropy", -float(entropy_loss))
        if isinstance(self.policy.optimizer, PtxOptimizer) and self.policy.optimizer.losses:
            self.logger.record("train/ptx_loss", float(np.mean(self.policy.optimizer.losses)))
            self.policy.optimizer.losses.clear()
        self.core.refresh([self.core.policy])  # the weights changed: cached logits must follow
