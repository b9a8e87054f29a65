"""Where the models compute, and in what precision.

- ``DTYPES``: the precisions a model may compute in: ``"float32"`` (the default), ``"bfloat16"``,
  ``"float16"``; ``resolve_dtype`` turns a name (or a torch dtype) into a ``torch.dtype`` and
  refuses anything else by name.
- ``autocast``: the context in which a model's forward runs in a lower precision
  (``torch.autocast``, on CUDA and on CPU alike), or a null context in float32.
- ``default_device``: the device of this process: ``cuda:LOCAL_RANK`` under ``torchrun`` on a CUDA
  machine, else ``cuda``, else ``cpu``.

What stays float32 whatever the models' precision (mixed precision, Micikevicius et al. 2018):
logits are cast to float32 before any ``log_softmax``, so every log-prob, KL and advantage is
float32 maths; the value head is a float32 layer fed float32 hidden states; and the weights an agent
trains are float32 master weights with a float32 optimizer (``agents`` upcasts them), because a
bfloat16 weight cannot take an update smaller than about 1/256 of itself (AdamW steps of a small
learning rate would vanish) and float16 gradients cannot be unscaled by a loss scaler.
"""

from __future__ import annotations

import contextlib
import os

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(value, key: str = "dtype") -> torch.dtype:
    """The ``torch.dtype`` that ``value`` names: one of ``DTYPES`` by name, or that torch dtype.

    :param key: the option's name, for the error message."""
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ValueError(f"{key} must be one of {', '.join(DTYPES)} (a name or the torch dtype), got {value!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """The name of one of ``DTYPES`` (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """The context for a forward in ``dtype`` on ``device``: ``torch.autocast`` for bfloat16 and
    float16 (matrix products in ``dtype``, reductions kept in float32 by autocast's own op lists);
    a null context for float32 or None, or where the device type has no autocast."""
    device_type = torch.device(device).type
    if dtype is None or dtype == torch.float32 or not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def default_device() -> torch.device:
    """The device this process computes on: ``cuda:LOCAL_RANK`` when CUDA is available and
    ``LOCAL_RANK`` is set (``torchrun`` sets it: one GPU per process on a machine), ``cuda`` when
    CUDA is available, else ``cpu``."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None:
        return torch.device("cuda")
    try:
        index = int(local_rank)
    except ValueError:
        raise ValueError(f"LOCAL_RANK must be an integer (the process's rank on its machine), got {local_rank!r}") \
            from None
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ValueError(f"LOCAL_RANK={index} names no CUDA device: {count} visible (cuda:0 .. cuda:{count - 1}); "
                         "start at most as many processes per machine as it has GPUs")
    return torch.device(f"cuda:{index}")
