"""LoRA through ``peft``, attached to an env's engine with ``TextGenCore.attach_lora``: only the
adapters train. Unless the user gave the env a ``ref_model`` (kept as it is), the reference is the
same weights with the adapters disabled, so one copy of the LM is in memory; trainable biases would
then move the reference too, so they are refused."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

DEFAULT_LORA: dict[str, Any] = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}


def lora_config(lora: Any) -> dict | None:
    """``None``/``False`` -> no LoRA; ``True`` -> defaults; a dict -> ``peft.LoraConfig`` keywords."""
    if lora is None or lora is False:
        return None
    if lora is True:
        return dict(DEFAULT_LORA)
    if isinstance(lora, dict):
        return {**DEFAULT_LORA, **lora}
    raise ValueError(f"lora must be None, True or a dict of peft.LoraConfig options, got {lora!r}")


class AdapterDisabledRef(nn.Module):
    """The reference policy: the LoRA model's forward with its adapters switched off. Holds no
    parameters of its own (the base weights are shared with the policy and frozen)."""

    def __init__(self, peft_model):
        super().__init__()
        self._peft = [peft_model]  # a list, so the policy's weights are not registered twice

    def forward(self, *args, **kwargs):
        # The model itself is called, not peft's wrapper: peft's forward calls the model's
        # ``forward`` method around its hooks, and a sharded model (``textgym.sharding``) is
        # gathered by hooks on its call.
        with self._peft[0].disable_adapter():
            return self._peft[0].get_base_model()(*args, **kwargs)

    def get_output_embeddings(self):
        return self._peft[0].get_output_embeddings()


def peft_wrap(model, lora: dict, *, own_reference: bool):
    """Inject LoRA adapters (``peft.LoraConfig`` options ``lora``) into ``model`` in place; returns
    the peft wrapper. Trainable biases are refused unless the reference is a model of its own."""
    from peft import LoraConfig, get_peft_model  # imported on use: only LoRA runs need peft (a slow import)

    if not own_reference and lora.get("bias", "none") != "none":
        raise ValueError(
            f"lora bias={lora['bias']!r} trains biases that the adapter-disabled reference shares, so the reference "
            "would drift with training: use bias='none', or give the env its own ref_model"
        )
    config = LoraConfig(task_type="CAUSAL_LM", **{k: v for k, v in lora.items() if k != "task_type"})
    with warnings.catch_warnings():
        # peft's PeftModel.__init__ (through peft 0.21.2, the newest) reads the model's
        # ``is_gradient_checkpointing``, which transformers 5.23 renamed ``is_activation_checkpointing``
        # (the old name warns, FutureWarning): peft's own read, which no argument of ours avoids, and
        # the same value under either name. Only that warning is silenced, only in this call.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)  # modifies model's layers in place
