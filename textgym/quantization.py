"""A quantized frozen base under LoRA (the QLoRA recipe, Dettmers et al. 2023): the base model's
linear layers hold int8 weights, only the LoRA adapters train (in float), and the same quantized
model acts in the rollouts, scores the update's log-probs and, adapters off, is the reference. So
the acting distribution is the trained one, and the memory of the frozen weights is a quarter of
float32's.

``quantize="int8"``: torchao's int8 weight-only quantization (one scale per output channel),
through ``transformers.TorchAoConfig`` when a model is loaded by name (``torchao.quantization.
quantize_`` on a model object), on CPU or GPU. ``quantize="nf4"``: bitsandbytes' 4-bit NormalFloat
with double quantization, QLoRA's own base, through ``transformers.BitsAndBytesConfig`` (a model
loaded by name or path), on CPU or GPU, computing in the env's dtype. The output embedding stays
as it is (it is tied to the input embedding in most small models). torchao and bitsandbytes are
optional dependencies: ``pip install 'textgym[quantize]'``.

What they do on 2 CPU cores (README, "Scaling up"): int8 weights take 0.41 of float32's room,
but rollouts decode at 0.8-0.9 of float32's speed (torchao's CPU int8 kernel) and the process's
peak memory is higher (quantizing reads every float weight first); nf4's take 0.32, decoding at
0.69 of float32's speed for a peak 0.93 of float32's. So neither is the default.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

QUANTIZATIONS = ("int8", "nf4")


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
    # bitsandbytes' logs, on a CPU with bfloat16 units, that it could not fetch a faster kernel from
    # the Hugging Face Hub (it falls back to its own).
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree", "bitsandbytes")]
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


def _nf4_config(dtype: torch.dtype) -> Any:
    try:
        with quiet_import():
            import bitsandbytes  # noqa: F401  # imported on use: an optional dependency, logs on import
    except ImportError as err:
        raise ValueError("quantize='nf4' needs bitsandbytes: pip install 'textgym[quantize]'") from err
    from transformers import BitsAndBytesConfig  # imported on use: a slow import

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def from_pretrained_kwargs(quantize: str | None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` that load the model quantized (none for None);
    ``dtype``: the precision the quantized layers compute in (nf4's)."""
    if check(quantize) is None:
        return {}
    if quantize == "nf4":
        return {"quantization_config": _nf4_config(dtype)}
    from transformers import TorchAoConfig  # imported on use: a slow import

    return {"quantization_config": TorchAoConfig(_int8_config())}


def quantize_model(model: nn.Module, quantize: str | None) -> nn.Module:
    """Quantize ``model``'s linear layers in place (a model object given to an env), all but the
    output embedding, as ``from_pretrained_kwargs`` would have loaded them."""
    if check(quantize) is None:
        return model
    if quantize == "nf4":
        raise ValueError("quantize='nf4' loads the model with bitsandbytes from its name or path: pass model= a "
                         "name or a directory, or quantize='int8' for a model object")
    config = _int8_config()
    from torchao.quantization import quantize_  # imported on use (after _int8_config's quiet import)

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    quantize_(model, config, filter_fn=lambda module, _: isinstance(module, nn.Linear) and module is not head)
    return model


def keep_differentiable(model: nn.Module) -> nn.Module:
    """Keep every 4-bit layer of ``model`` on bitsandbytes' dequantize-and-multiply path (in place).
    On a CPU with bfloat16 units, a 4-bit layer otherwise repacks its weight at its first forward
    outside training, for a fused kernel that computes in bfloat16 and has no backward; the layer
    stays so, and the gradients of LoRA adapters below it are then silently zero (seen with
    bitsandbytes 0.50). So rollouts, update and reference compute the same float function."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010  # (a plain attribute, typed loosely)
    return model


def is_quantized(tensor: Any) -> bool:
    """A quantized weight: torchao's tensor subclass, or bitsandbytes' 4-bit parameter."""
    if not isinstance(tensor, torch.Tensor):
        return False
    data = tensor.data if isinstance(tensor, nn.Parameter) and type(tensor) is nn.Parameter else tensor
    return type(data).__module__.split(".")[0] in ("torchao", "bitsandbytes")


def dequantized(weight: Any, dtype: torch.dtype) -> torch.Tensor:
    """A quantized weight as a plain ``dtype`` tensor."""
    if type(weight).__module__.split(".")[0] == "bitsandbytes":
        from bitsandbytes.functional import dequantize_4bit  # imported on use: an nf4 weight exists, so it is

        return dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    return weight.dequantize().to(dtype)


def has_quantized(model: nn.Module) -> bool:
    return any(is_quantized(p) for p in model.parameters())


def without_quantized(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict without its quantized (frozen base) tensors and what describes them
    (bitsandbytes' ``<weight>.absmax``, ``<weight>.quant_map``...), loaded again with the model."""
    # bitsandbytes' state dicts hold a 4-bit weight as plain bytes, described by "<weight>.quant_state.*"
    described = {k.split(".quant_state.")[0] for k in state if ".quant_state." in k}
    quantized = {k for k, v in state.items() if is_quantized(v)} | described
    prefixes = tuple(f"{k}." for k in quantized)
    return {k: v for k, v in state.items() if k not in quantized and not k.startswith(prefixes)}


def merged_float_copy(peft_model: Any, dtype: torch.dtype) -> nn.Module:
    """A plain model in ``dtype`` computing what ``peft_model`` (LoRA over a quantized base)
    computes: each quantized linear layer replaced by a float one holding its weight dequantized,
    plus its adapters' delta. Merging into the quantized weight instead (peft's
    ``merge_and_unload``) would round the delta to the quantization step and could erase a small
    learned update: what was evaluated would not be what is saved."""
    from peft.tuners.lora import LoraLayer  # imported on use: only LoRA runs need peft

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            base: Any = module.get_base_layer()  # (a linear layer, its weight quantized or not)
            if is_quantized(base.weight):
                weight = dequantized(base.weight, dtype)
                delta: Any = module.get_delta_weight  # type: ignore[attr-defined]  # (on LoraLayer's layer classes)
                for adapter in module.active_adapters:
                    weight = weight + delta(adapter).to(dtype)
                module.base_layer = _float_linear(base, weight)
    plain = peft_model.unload()  # the adapters removed, their deltas already in the weights
    for name, module in list(plain.named_modules()):
        if isinstance(module, nn.Linear) and is_quantized(module.weight):
            owner, _, leaf = name.rpartition(".")
            setattr(plain.get_submodule(owner), leaf, _float_linear(module, dequantized(module.weight, dtype)))
    config = getattr(plain, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(plain, "hf_quantizer", None) is not None:
        plain.hf_quantizer = None
    for flag in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(plain, flag, False) is True and not isinstance(getattr(type(plain), flag, None), property):
            setattr(plain, flag, False)
    return plain


def _float_linear(layer: Any, weight: torch.Tensor) -> nn.Linear:
    """A plain ``nn.Linear`` with ``weight`` and ``layer``'s bias (a quantized layer's float twin)."""
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight.detach().reshape(layer.out_features, layer.in_features))
        if layer.bias is not None:
            out.bias.copy_(layer.bias.detach().to(weight.dtype))
    out.requires_grad_(False)
    return out
