"""A quantized frozen base under LoRA (the QLoRA recipe, Dettmers et al. 2023): the base model's
linear layers hold int8 weights, only the LoRA adapters train (in float), and the same quantized
model acts in the rollouts, scores the update's log-probs and, adapters off, is the reference. So
the acting distribution is the trained one, and the memory of the frozen weights is a quarter of
float32's.

``quantize="int8"``: torchao's int8 weight-only quantization (one scale per output channel),
through ``transformers.TorchAoConfig`` when a model is loaded by name (``torchao.quantization.
quantize_`` on a model object), on CPU or GPU. The output embedding stays as it is (it is tied to the
input embedding in most small models). torchao is an optional dependency: ``pip install
'textgym[quantize]'``.

What it does on 2 CPU cores (README, "Scaling up"): the weights take 0.41 of float32's room, but
rollouts decode at 0.81 of float32's speed (torchao's CPU int8 kernel) and the process's peak memory
is higher (quantizing reads every float weight first), so it is not the default.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

QUANTIZATIONS = ("int8",)


def check(quantize: Any) -> str | None:
    """``quantize`` as given (None or one of ``QUANTIZATIONS``), or a ValueError naming it."""
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"unknown quantize {quantize!r}; valid: None (float weights), "
                         f"{', '.join(repr(q) for q in QUANTIZATIONS)} (a frozen base under LoRA)")
    return quantize


@contextlib.contextmanager
def quiet_import() -> Iterator[None]:
    # torchao's import logs a warning for each CUDA kernel library a CPU build of torch cannot load,
    # and torch's pytree logs one about an Enum torchao registers: messages about the libraries
    # themselves, not about the user's run, printed on every import.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _int8_config() -> Any:
    try:
        with quiet_import():
            from torchao.quantization import Int8WeightOnlyConfig  # imported on use: an optional dependency
    except ImportError as err:
        raise ValueError("quantize='int8' needs torchao: pip install 'textgym[quantize]'") from err
    return Int8WeightOnlyConfig()


def from_pretrained_kwargs(quantize: str | None) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` that load the model quantized (none for None)."""
    if check(quantize) is None:
        return {}
    from transformers import TorchAoConfig  # imported on use: a slow import

    return {"quantization_config": TorchAoConfig(_int8_config())}


def quantize_model(model: nn.Module, quantize: str | None) -> nn.Module:
    """Quantize ``model``'s linear layers in place (a model object given to an env), all but the
    output embedding, as ``from_pretrained_kwargs`` would have loaded them."""
    if check(quantize) is None:
        return model
    config = _int8_config()
    from torchao.quantization import quantize_  # imported on use (after _int8_config's quiet import)

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    quantize_(model, config, filter_fn=lambda module, _: isinstance(module, nn.Linear) and module is not head)
    return model


def is_quantized(tensor: Any) -> bool:
    """A quantized weight: a tensor subclass (torchao's), not a plain tensor or parameter."""
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    return isinstance(data, torch.Tensor) and type(data) is not torch.Tensor


def has_quantized(model: nn.Module) -> bool:
    return any(is_quantized(p) for p in model.parameters())


def without_quantized(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict without its quantized (frozen base) tensors, which are loaded again with the model."""
    return {k: v for k, v in state.items() if not is_quantized(v)}


def merged_float_copy(peft_model: Any, dtype: torch.dtype) -> nn.Module:
    """A plain model in ``dtype`` computing what ``peft_model`` (LoRA over a quantized base)
    computes: each quantized weight dequantized, plus its adapters' delta. Merging into the int8
    weight instead (peft's ``merge_and_unload``) would round the delta to the quantization step and
    could erase a small learned update: what was evaluated would not be what is saved."""
    from peft.tuners.lora import LoraLayer  # imported on use: only LoRA runs need peft

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            base: Any = module.get_base_layer()  # (a linear layer, its weight quantized or not)
            if is_quantized(base.weight):
                weight = base.weight.dequantize().to(dtype)
                delta: Any = module.get_delta_weight  # type: ignore[attr-defined]  # (on LoraLayer's layer classes)
                for adapter in module.active_adapters:
                    weight = weight + delta(adapter).to(dtype)
                base.weight = nn.Parameter(weight.detach(), requires_grad=False)
    plain = peft_model.unload()  # the adapters removed, their deltas already in the weights
    for module in plain.modules():
        if isinstance(module, nn.Linear) and is_quantized(module.weight):
            module.weight = nn.Parameter(module.weight.dequantize().to(dtype).detach(), requires_grad=False)
    config = getattr(plain, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(plain, "hf_quantizer", None) is not None:
        plain.hf_quantizer = None
    return plain
