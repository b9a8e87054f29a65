"""Offline algorithms: learning from a fixed dataset, with no rollout (ILQL, DPO).

An offline algorithm is an SB3 ``BaseAlgorithm`` on a textgym env, as the online ones are, so
``agents.make``/``load``, ``textgym train`` (its run directory, evaluation, ``--resume``, time
breakdown) and ``textgym eval`` treat both alike. What differs:

- ``learn`` never steps the env: each *iteration* is ``gradient_steps`` optimizer steps, each on
  ``batch_size`` examples of the dataset (episodes for ILQL, prompts with their ranked completions
  for DPO), drawn from a fresh permutation of the dataset seeded by the global seed (``textgym
  train`` seeds each iteration, so a resumed run draws the batches the uninterrupted one would).
  A timestep of an offline algorithm is one example in a gradient step: ``learn(total_timesteps)``
  runs ``ceil(total_timesteps / iteration_timesteps)`` iterations.
- The env provides the model (its LoRA adapters attached here, as an online agent does), the frozen
  reference, the tokenizer and the acting distribution that evaluation plays: ILQL sets its
  perturbed decoding there, so what is evaluated and saved is the policy that acts.
- ``rollout_stats`` holds only ``episodes``, the examples of the iteration: there is no rollout to
  describe. Each algorithm logs its own ``train/`` figures, and figures on held-out data under
  ``heldout/``.

Single process only; float32 or bfloat16 (a float16 update would need loss scaling).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.logger import configure
from torch import nn

from textgym import distributed
from textgym.lora import lora_config

from . import serialization
from .common import check_learning_rate, default_learning_rate
from .update import upcast_trainable
from .vec_env import OnLMVecEnv, as_vec_env


class OfflineLMPolicy(nn.Module):
    """What an offline algorithm trains: the env's LM (its LoRA adapters, or all its weights) and
    the algorithm's own modules (``extra``: ILQL's heads), under one Adam optimizer. The LM is the
    env's own object, not a copy."""

    def __init__(self, lm: nn.Module, extra: nn.Module | None, learning_rate: float):
        super().__init__()
        self.lm = lm
        self.extra = extra if extra is not None else nn.Module()
        self.optimizer = torch.optim.Adam(self.trainable(), lr=learning_rate)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


class OfflineAlgorithm(OnLMVecEnv, BaseAlgorithm):
    """Base of textgym's offline algorithms (module docstring). A subclass implements
    ``_load_data`` (its dataset, checked against the env), ``_extra_modules`` (what it trains
    beside the LM, or None), ``_loss`` (the loss of a batch of dataset indices, with the figures to
    log) and may add ``_held_out_figures``.

    :param data: the dataset (each algorithm says what it reads).
    :param learning_rate: Adam's learning rate; None: textgym's default by model size and LoRA
        (``agents.common.default_learning_rate``).
    :param batch_size: dataset examples per gradient step.
    :param gradient_steps: gradient steps per iteration (``textgym train`` runs
        ``training.iterations`` iterations).
    :param max_grad_norm: the gradients' global norm is clipped to this.
    """

    algo_name = "offline"
    env_defaults: dict[str, Any] = {}
    offline = True
    # BaseAlgorithm's arguments that an offline algorithm fixes (no SDE, one env object, no
    # monitor): not hyperparameters (agents.accepted_hyperparameters leaves them out).
    fixed_hyperparameters = ("policy_kwargs", "stats_window_size", "support_multi_env", "monitor_wrapper",
                             "use_sde", "sde_sample_freq", "supported_action_spaces")
    # (not an SB3 BasePolicy: it never predicts an action)
    policy: OfflineLMPolicy  # type: ignore[assignment]

    def __init__(self, policy: type = OfflineLMPolicy, env: Any = None, data: Any = None,
                 learning_rate: float | None = None, batch_size: int = 16, gradient_steps: int = 16,
                 max_grad_norm: float = 1.0, lora: Any = None, seed: int | None = None, device: Any = "auto",
                 tensorboard_log: str | None = None, verbose: int = 0, _init_setup_model: bool = True,
                 **algorithm_kwargs: Any):
        if data is None:
            raise ValueError(f"{self.algo_name} learns from a dataset: pass data= ({self.data_help})")
        self.data = data
        self.batch_size = _positive_int("batch_size", batch_size)
        self.gradient_steps = _positive_int("gradient_steps", gradient_steps)
        if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be a number > 0, got {max_grad_norm!r}")
        self.max_grad_norm = float(max_grad_norm)
        self.lora = lora_config(lora)
        self.textgym_algo = self.algo_name
        check_learning_rate(learning_rate)
        self.textgym_hyperparameters = serialization.constructor_arguments(
            {**algorithm_kwargs, "data": data, "learning_rate": learning_rate, "batch_size": batch_size,
             "gradient_steps": gradient_steps, "max_grad_norm": max_grad_norm, "lora": lora, "verbose": verbose})
        self.rollout_stats: dict[str, float] = {}
        env = as_vec_env(env) if env is not None else None
        if env is None:
            raise ValueError(f"{self.algo_name} needs env= (an env id, textgym env or vector env): it holds the model")
        if learning_rate is None:
            learning_rate = default_learning_rate(env.core.model, self.lora is not None)
        super().__init__(policy, env, learning_rate, tensorboard_log=tensorboard_log, verbose=verbose, device=device,
                         support_multi_env=True, monitor_wrapper=False, seed=seed)
        if _init_setup_model:
            self._setup_model()

    data_help = "see the algorithm's documentation"

    @property
    def iteration_timesteps(self) -> int:
        """Timesteps of one iteration: its examples, ``gradient_steps * batch_size``."""
        return self.gradient_steps * self.batch_size

    # --- set-up -----------------------------------------------------------------------------------

    def _setup_model(self) -> None:
        core = self.core
        if distributed.world_size() > 1:
            raise ValueError(f"{self.algo_name} runs in one process: data parallelism is for the online algorithms")
        if core.dtype == torch.float16:
            raise ValueError(f"{self.algo_name} does not train in float16 (it has no loss scaling): use float32 or "
                             "bfloat16")
        if core.acting.ilql is not None and self.algo_name != "ilql":
            raise ValueError(f"this env acts with ILQL's decoding (a saved ILQL model), which {self.algo_name} does "
                             "not train: start it from the plain LM")
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        if self.lora and core.peft_model is None:
            core.attach_lora(self.lora)  # seeded above: the adapters' initialisation follows the seed
        upcast_trainable(core.model)
        core.match_reference_weights()
        self._load_data()
        extra = self._extra_modules()
        self.policy = OfflineLMPolicy(core.model, extra, self.lr_schedule(1.0)).to(self.device)
        self._after_setup()

    def _load_data(self) -> None:
        raise NotImplementedError

    def _extra_modules(self) -> nn.Module | None:
        return None

    def _after_setup(self) -> None:
        """What follows the policy's construction (ILQL sets its decoding on the env)."""

    def _loss(self, batch: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of the dataset examples ``batch`` (indices) and the figures to log."""
        raise NotImplementedError

    def _after_step(self) -> None:
        """After each optimizer step (ILQL's target heads follow the online ones)."""

    def _held_out_figures(self) -> dict[str, float]:
        """Figures on held-out data after each iteration, logged as ``heldout/<name>``."""
        return {}

    @property
    def n_examples(self) -> int:
        raise NotImplementedError

    # --- learning ---------------------------------------------------------------------------------

    def start_fresh_episodes(self) -> None:
        """Nothing: an offline algorithm plays no episode (``textgym train`` calls it each iteration)."""

    def learn(self, total_timesteps: int, callback: Any = None, log_interval: int = 1, tb_log_name: str = "run",
              reset_num_timesteps: bool = True, progress_bar: bool = False):
        """``ceil(total_timesteps / iteration_timesteps)`` iterations of ``gradient_steps`` steps."""
        if callback is not None:
            raise ValueError(f"{self.algo_name} takes no callback: it plays no episode to call back from")
        if reset_num_timesteps:
            self.num_timesteps = 0
        if getattr(self, "_logger", None) is None:
            self.set_logger(configure(None, [""]))
        for _ in range(max(1, math.ceil(int(total_timesteps) / self.iteration_timesteps))):
            self._iteration()
        return self

    def _iteration(self) -> None:
        n, size = self.n_examples, self.gradient_steps * self.batch_size
        # A fresh permutation (several where the iteration takes more than the dataset), drawn from
        # the global generator that textgym train seeds per iteration.
        order = np.concatenate([np.random.permutation(n) for _ in range(math.ceil(size / n))])[:size]
        logs: dict[str, list[float]] = {}
        self.policy.train()
        params = self.policy.trainable()
        for step in range(self.gradient_steps):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            loss, figures = self._loss(batch)
            self.policy.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            self.policy.optimizer.step()
            self._n_updates += 1
            self._after_step()
            for name, value in {**figures, "loss": loss.item(), "grad_norm": float(grad_norm)}.items():
                logs.setdefault(name, []).append(float(value))
        self.policy.eval()
        self.num_timesteps += size
        self.rollout_stats = {"episodes": float(size)}
        for name, values in logs.items():
            self.logger.record(f"train/{name}", float(np.mean(values)))
        self.logger.record("train/n_updates", self._n_updates)
        for name, value in self._held_out_figures().items():
            self.logger.record(f"heldout/{name}", float(value))
        self.core.policy_changed()  # the weights changed: cached logits must follow

    # --- saving -----------------------------------------------------------------------------------

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        return ["policy", "policy.optimizer"], []

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "rollout_stats", *self.dataset_attributes]

    # Attributes holding the dataset (reloaded from ``data`` on load, never saved).
    dataset_attributes: tuple[str, ...] = ()

    def save(self, path, exclude=None, include=None) -> None:
        """Save to a zip in SB3's layout without pickle (``agents.serialization``); the dataset is
        not saved, only its name (``data``)."""
        serialization.save_agent(self, path, exclude=exclude, include=include)

    @classmethod
    def load(cls, path, env=None, device="auto", custom_objects=None, print_system_info=False, force_reset=True,
             **kwargs):
        """Rebuild an agent saved with ``save`` on ``env``; nothing in the file is unpickled."""
        serialization.check_load_arguments(env, custom_objects)
        return serialization.load_agent(cls, path, as_vec_env(env), device=device, **kwargs)


def pad_rows(rows: list[list[int]], pad_id: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` ``[len(rows), longest]``: the rows padded on the left (prompts) or the right
    (completions)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            cols = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, cols] = torch.as_tensor(row, dtype=torch.long)
            mask[i, cols] = 1
    return ids.to(device), mask.to(device)
