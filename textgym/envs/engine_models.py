"""The engine's models: the policy LM (with its LoRA adapters once attached), its tokenizer and the
frozen reference; how they are loaded, in which precision, and how the policy is saved.

The reference is a frozen copy of the policy's start (or the ``ref_model`` given), its weights in
``ref_dtype``; with LoRA and no ``ref_model`` it becomes the adapter-free policy (one LM copy in
memory). Every forward runs under autocast to its model's precision (``lm.forward``): an agent may
upcast the policy's trainable weights to float32 master weights after loading.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch

from textgym import distributed, models, precision, quantization, sharding
from textgym import lora as lora_mod
from textgym.envs.config import TextGenConfig


class EngineModels:
    """Policy, tokenizer and reference of one engine, loaded as ``cfg`` says (``TextGenConfig``)."""

    def __init__(self, cfg: TextGenConfig):
        self.cfg = cfg
        self.dtype = precision.resolve_dtype(cfg.dtype, "dtype")
        self.ref_dtype = self.dtype if cfg.ref_dtype is None else precision.resolve_dtype(cfg.ref_dtype, "ref_dtype")
        self.model, self.tokenizer = load_policy(cfg, self.dtype)
        check_position_limit(self.model, int(cfg.max_prompt_tokens), int(cfg.max_new_tokens))
        self.device = next(self.model.parameters()).device
        self.ref_model = self._load_ref(cfg)
        self.peft_model = None  # the peft wrapper of model, when LoRA adapters are attached (attach_lora)
        self.lora: dict | None = None  # their peft.LoraConfig options

    def _load_ref(self, cfg: TextGenConfig):
        ref = cfg.ref_model
        if ref is None:
            ref = copy.deepcopy(self.model)
        elif isinstance(ref, str):
            ref, _ = models.load(ref, device=self.device, dtype=self.ref_dtype, quantize=cfg.quantize)
        elif not isinstance(ref, torch.nn.Module):
            raise ValueError(f"ref_model must be None, a name, a path or a loaded model, got {type(ref).__name__}")
        if ref is self.model:
            raise ValueError(
                "ref_model is the policy model itself: the KL would be 0 whatever the policy does, and freezing "
                "the reference would freeze the policy. Pass ref_model=None (a frozen copy) or a separate model"
            )
        models.disable_dropout(ref)
        # Frozen: its weights stored in its own precision, no float32 master copy needed. Buffers keep
        # theirs (``.to(dtype)`` would cast them too: transformers keeps RoPE's inv_freq in float32,
        # and a bfloat16 one moves every position's rotation, so the copy would not compute as the model).
        for param in ref.parameters():  # (quantized weights keep their own format)
            if param.is_floating_point() and param.dtype != self.ref_dtype and not quantization.is_quantized(param):
                param.data = param.data.to(self.ref_dtype)
        ref.eval()
        ref.requires_grad_(False)
        if models.logits_width(ref) != models.logits_width(self.model):
            raise ValueError(
                f"ref_model emits {models.logits_width(ref)} logits but model emits {models.logits_width(self.model)}: "
                "they must share a vocabulary"
            )
        return ref

    def attach_lora(self, lora: dict) -> None:
        """Inject LoRA adapters (``peft.LoraConfig`` options) into ``model`` in place; the reference
        becomes the adapter-free model unless the env was given its own ``ref_model``."""
        if self.peft_model is not None:
            raise ValueError("LoRA adapters are already attached to this env's model")
        own_reference = self.cfg.ref_model is not None
        self.peft_model = lora_mod.peft_wrap(self.model, lora, own_reference=own_reference)
        self.lora = dict(lora)
        if not own_reference:
            self.ref_model = lora_mod.AdapterDisabledRef(self.peft_model)  # the frozen copy is dropped
            if self.ref_dtype != self.dtype:
                warnings.warn(f"ref_dtype={precision.dtype_name(self.ref_dtype)} is not used with LoRA: the reference "
                              f"is the adapter-free policy model, in dtype={precision.dtype_name(self.dtype)}",
                              stacklevel=3)
                self.ref_dtype = self.dtype

    def match_reference_weights(self) -> bool:
        """Give the reference the weight dtypes of the trained policy, parameter by parameter, when
        the reference is the engine's own frozen copy of the model (see ``TextGenCore``'s method of
        that name). Returns whether the reference is such a copy (its weights may have changed)."""
        if self.cfg.ref_model is not None or self.peft_model is not None:
            return False
        policy_dtypes = {name: param.dtype for name, param in self.model.named_parameters()}
        for name, param in self.ref_model.named_parameters():
            dtype = policy_dtypes.get(name)
            if dtype is not None and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        return True

    def shard(self) -> None:
        """Shard the policy LM and a reference of its own (not LoRA's adapter-free policy, which
        is the policy) over the data-parallel ranks (``textgym.sharding``)."""
        sharding.shard(self.model)
        if self.peft_model is None or self.cfg.ref_model is not None:
            sharding.shard(self.ref_model)

    def plain_copy(self, model):
        """``model`` as a plain Hugging Face model: with LoRA attached (``peft_model``), a merged
        copy carrying ``model``'s weights (``model`` is the policy or a copy of it); over a
        quantized base, in float (``quantization.merged_float_copy``)."""
        if self.peft_model is None:
            return model
        merged = copy.deepcopy(self.peft_model)
        quantized = self.cfg.quantize is not None
        if model is not self.model:  # (a quantized base is frozen: the copy's is the policy's)
            state = model.state_dict()
            merged.base_model.model.load_state_dict(quantization.without_quantized(state) if quantized else state,
                                                    strict=not quantized)
        if quantized:
            return quantization.merged_float_copy(merged, self.dtype)
        return merged.merge_and_unload()

    def save_policy(self, directory: Path | None) -> None:
        """The policy LM (LoRA merged into a copy) and its tokenizer as a model directory. A sharded
        policy (``textgym.sharding``) is gathered by every rank, which must all call this; rank 0
        writes (the others pass None, as an unsharded policy's other ranks may)."""
        model = self.whole_copy() if sharding.is_sharded(self.model) else None
        if directory is None:
            return
        model = self.plain_copy(self.model) if model is None else model
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def whole_copy(self):
        """On rank 0, a plain unsharded copy of the sharded policy (LoRA merged), else None; every
        rank must call it (the weights are gathered)."""
        state = sharding.gathered(self.model.state_dict())
        if not distributed.is_main():
            return None
        if self.peft_model is None:
            return sharding.whole_model(self.model, state)
        lora, own_reference = self.lora or {}, self.cfg.ref_model is not None
        adapted = sharding.whole_model(self.model, state,
                                       adapt=lambda m: lora_mod.peft_wrap(m, lora, own_reference=own_reference))
        return adapted.merge_and_unload()

    def output_embedding(self) -> torch.Tensor:
        """The policy LM's output embedding ``[V, H]`` (ILQL's Q heads project onto it)."""
        return self.model.get_output_embeddings().weight


def load_policy(cfg: TextGenConfig, dtype: torch.dtype):
    """``(model, tokenizer)``: the policy LM, in ``dtype`` (a model object is cast to it, as it is
    moved to ``device``)."""
    device = cfg.device
    if isinstance(cfg.model, torch.nn.Module):  # (quantized in place when asked)
        # Any: a transformers model, or a wrapper forwarding its attributes (peft's); nn.Module's
        # typing would see ``model.config`` as a tensor or a submodule
        model: Any = cfg.model
        tokenizer = cfg.tokenizer
        if tokenizer is None:
            # imported on use: a slow import, needed only for a model object given without tokenizer
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.config.name_or_path)
        model.to(device=device, dtype=dtype)
        quantization.quantize_model(model, cfg.quantize)
        models.prepare(model, tokenizer)
        return model, tokenizer
    if not isinstance(cfg.model, str):
        raise ValueError(f"model must be a name, a path or a loaded causal LM, got {type(cfg.model).__name__}")
    if device is None:
        device = precision.default_device()
    model, tokenizer = models.load(cfg.model, device=device, dtype=dtype, quantize=cfg.quantize)
    if cfg.tokenizer is not None:
        tokenizer = models.prepare(model, cfg.tokenizer)
    return model, tokenizer


def check_position_limit(model, max_prompt_tokens: int, max_new_tokens: int) -> None:
    """Prompt plus completion must fit the model's positions (``max_position_embeddings``)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and max_prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"max_prompt_tokens + max_new_tokens = {max_prompt_tokens} + {max_new_tokens} = "
            f"{max_prompt_tokens + max_new_tokens} exceeds the model's {limit} positions (max_position_embeddings)"
        )
