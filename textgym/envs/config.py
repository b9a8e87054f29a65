"""``TextGenConfig``: the settings of a text-generation engine (the keyword arguments of
``textgym/TextGen-v0``; ``TextGenEnv``'s docstring gives their meaning), checked on creation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from textgym import kl as klmod
from textgym import models, precision, quantization

KL_MODES = ("final", "per_token")


@dataclass
class TextGenConfig:
    """Keyword arguments of ``textgym/TextGen-v0`` (see ``TextGenEnv`` for their meaning)."""

    model: Any = models.TINY
    tokenizer: Any = None
    reward: Any = "length"
    reward_kwargs: dict = field(default_factory=dict)
    prompts: Any = None  # None: the shipped movie-review openings (train split)
    test_prompts: Any = None  # held-out prompts; None: the shipped test openings, or prompts when given
    prompt_column: str | None = None
    max_new_tokens: int = 32
    max_prompt_tokens: int = 64
    kl_coef: Any = 0.05  # a number, or a textgym.kl.KLController
    kl_target: float | None = None
    kl_horizon: float = klmod.DEFAULT_HORIZON  # episodes (see textgym.kl)
    kl_in: str = "reward"  # where the KL term goes: "reward" (k1) or "loss" (k2, added by the agent)
    kl_estimator: str | None = None  # None: the right one for kl_in (see textgym.kl)
    kl_mode: str = "final"
    group_size: int = 1  # rows come in groups of group_size sharing each prompt (textgym.envs.groups)
    score_scale: float = 1.0  # the reward carries score_scale * score (info["score"] stays unscaled)
    ref_model: Any = None  # None: a frozen copy of model
    stop_on_eos: bool = True
    chat_template: bool = False
    render_mode: str | None = None
    device: Any = None  # None: textgym.precision.default_device() for a model loaded by name
    dtype: Any = "float32"  # the models' precision (textgym.precision.DTYPES), or the torch dtype
    ref_dtype: Any = None  # the reference's precision; None: dtype
    quantize: str | None = None  # "int8"/"nf4": the base's linear weights int8/4-bit, frozen under LoRA (quantization)

    @classmethod
    def from_kwargs(cls, env_id: str = "textgym/TextGen-v0", **kwargs) -> TextGenConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(f"unknown keyword(s) for {env_id}: {', '.join(unknown)}; valid: {', '.join(names)}")
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for key in ("max_new_tokens", "max_prompt_tokens", "group_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if self.kl_mode not in KL_MODES:
            raise ValueError(f"unknown kl_mode {self.kl_mode!r}; valid: {', '.join(KL_MODES)}")
        self.kl_estimator = klmod.resolve_estimator(self.kl_in, self.kl_estimator)
        if isinstance(self.score_scale, bool) or not isinstance(self.score_scale, (int, float)) or not (
                np.isfinite(self.score_scale) and self.score_scale > 0):
            raise ValueError(f"score_scale must be a finite number > 0, got {self.score_scale!r}")
        if self.render_mode not in (None, "ansi"):
            raise ValueError(f"unknown render_mode {self.render_mode!r}; valid: None, 'ansi'")
        for key in ("stop_on_eos", "chat_template"):  # "false" would be True
            if not isinstance(getattr(self, key), (bool, np.bool_)):
                raise ValueError(f"{key} must be True or False, got {getattr(self, key)!r}")
        precision.resolve_dtype(self.dtype, "dtype")
        quantization.check(self.quantize)
        if self.ref_dtype is not None:
            precision.resolve_dtype(self.ref_dtype, "ref_dtype")
        if not isinstance(self.reward_kwargs, dict):
            raise ValueError(
                f"reward_kwargs must be a dict of the reward's options (or {{}}), got {self.reward_kwargs!r}"
            )
