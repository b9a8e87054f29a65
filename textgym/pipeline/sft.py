"""Supervised fine-tuning (SFT) of a causal LM on (prompt, completion) demonstrations.

The usual first stage of RLHF: teach the policy the task's format before RL. A row is
``prompt tokens + completion tokens + EOS``, right-padded; the loss is the token-weighted
cross-entropy of the completion tokens and EOS only (labels are -100 on the prompt and padding).
Prompts are encoded exactly as the environments encode them (``textgym.prompts.encode_prompt``,
optionally through the chat template), so a model trained here is conditioned like the RL policy
it becomes.

``train_sft(SFTConfig(data="pairs.jsonl", model="textgym/tiny"))`` trains, then saves the model,
tokenizer and ``metrics.json`` atomically into ``output_dir``; ``textgym.models.load(output_dir)``
loads the result.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from textgym import models
from textgym.assets import atomic_dir
from textgym.lm import position_ids
from textgym.pipeline.config import option, save_config, validated
from textgym.prompts import encode_prompt, load_prompts

logger = logging.getLogger(__name__)

IGNORE = -100  # label of the tokens that get no loss (prompt and padding)


@dataclass
class SFTConfig:
    """Settings of :func:`train_sft` (``textgym.pipeline.config.load_config(SFTConfig, path, overrides)``)."""

    model: str = option(models.SMOLLM2, "the model to fine-tune: anything textgym.models.load accepts",
                        nonempty=True, what="a model name or path")
    data: str | dict = option("", "(prompt, completion) demonstrations: a file, a dataset name or directory, or a "
                              "spec {dataset:, split:, column:}, as textgym.prompts.load_prompts reads them",
                              nonempty=True,
                       what="a file or dataset of (prompt, completion) pairs that textgym.prompts.load_prompts reads")
    prompt_column: str | None = option(None, "the prompt column; null: the first of prompt, text, query, question")
    completion_column: str = option("completion", "the completion column", nonempty=True, what="a column name")
    split: str | None = option(None, "the dataset split of data")
    eval_data: str | dict | None = option(None, "held-out pairs, same columns as data; null: no evaluation")
    eval_split: str | None = option(None, "the dataset split of eval_data")
    chat_template: bool = option(False, "prompt as a user turn, completion as the assistant reply")
    epochs: int = option(1, "passes over the data", min=1)
    batch_size: int = option(8, "pairs per optimizer step", min=1)
    learning_rate: float = option(5e-5, "AdamW's learning rate", gt=0)
    weight_decay: float = option(0.0, "AdamW's weight decay", min=0)
    max_length: int = option(256, "tokens of prompt + completion + EOS; longer prompts lose tokens on the left",
                             min=2)
    seed: int = option(0, "seed of the shuffling")
    output_dir: str = option("runs/sft", "where the model is saved", nonempty=True, what="a directory path")


def load_pairs(source: Any, *, prompt_column: str | None = None, completion_column: str = "completion",
               split: str | None = None) -> tuple[list[str], list[str]]:
    """``(prompts, completions)`` of a source :func:`textgym.prompts.load_prompts` accepts."""
    rows = load_prompts(source, split=split, column=prompt_column)
    if completion_column not in rows.metadata:
        raise ValueError(
            f"completion column {completion_column!r} not found in {source!r}; available columns: "
            f"{list(rows.metadata)} (besides the prompt column)"
        )
    completions = rows.metadata[completion_column]
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise ValueError(f"completion {i} of {source!r} is not a string: {c!r}")
    return rows.prompts, list(completions)


def build_batch(tokenizer, prompts: list[str], completions: list[str], max_length: int,
                chat_template: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (``[B, L]``, L <= max_length).

    Labels are the completion tokens and EOS; -100 on prompt and padding. A row longer than
    ``max_length`` loses prompt tokens from the left; a completion that alone does not fit (with
    one prompt token) is cut on the right.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    rows = []
    for prompt, completion in zip(prompts, completions):
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        c = c[: max_length - 1]
        p = encode_prompt(tokenizer, prompt, chat_template, max_tokens=max_length - len(c))
        rows.append((p, c))
    width = max(len(p) + len(c) for p, c in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(p + c)
        labels[i, len(p):n] = torch.tensor(c)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def completion_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the labelled tokens and their number."""
    device = next(model.parameters()).device
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum")
    return loss, int((targets != IGNORE).sum())


@torch.no_grad()
def evaluate(model, tokenizer, prompts: list[str], completions: list[str], *, batch_size: int = 8,
             max_length: int = 256, chat_template: bool = False) -> float:
    """Token-weighted mean completion loss (nats per token) of the pairs."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        batch = build_batch(tokenizer, prompts[start:start + batch_size], completions[start:start + batch_size],
                            max_length, chat_template)
        loss, n = completion_loss(model, batch)
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


def train_sft(cfg: SFTConfig) -> dict:
    """Fine-tune ``cfg.model`` on ``cfg.data``; save model, tokenizer, ``sft_config.yaml`` and
    ``metrics.json`` into ``cfg.output_dir`` (only once training succeeded). Returns the metrics:
    ``train_loss`` and ``eval_loss`` (one value per epoch; ``eval_loss`` is None without eval data)."""
    cfg = validated(cfg)  # a config built in Python gets the loader's checks too
    prompts, completions = load_pairs(cfg.data, prompt_column=cfg.prompt_column,
                                      completion_column=cfg.completion_column, split=cfg.split)
    held_out = None
    if cfg.eval_data is not None:
        held_out = load_pairs(cfg.eval_data, prompt_column=cfg.prompt_column,
                              completion_column=cfg.completion_column, split=cfg.eval_split)
    torch.manual_seed(cfg.seed)
    model, tokenizer = models.load(cfg.model)  # dropout disabled
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    n_batches = math.ceil(len(prompts) / cfg.batch_size)
    metrics: dict[str, Any] = {"train_loss": [], "eval_loss": [] if held_out else None, "steps": 0,
                               "train_examples": len(prompts), "eval_examples": len(held_out[0]) if held_out else 0}
    with tqdm(total=cfg.epochs * n_batches, desc="sft", disable=None) as bar:
        for epoch in range(cfg.epochs):
            model.train()
            order = torch.randperm(len(prompts), generator=generator).tolist()
            losses = []
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                batch = build_batch(tokenizer, [prompts[i] for i in idx], [completions[i] for i in idx],
                                    cfg.max_length, cfg.chat_template)
                total, count = completion_loss(model, batch)
                loss = total / max(count, 1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                metrics["steps"] += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
            metrics["train_loss"].append(sum(losses) / len(losses))
            line = f"epoch {epoch + 1}/{cfg.epochs}: train loss {metrics['train_loss'][-1]:.4f}"
            if held_out:
                metrics["eval_loss"].append(evaluate(model, tokenizer, *held_out, batch_size=cfg.batch_size,
                                                     max_length=cfg.max_length, chat_template=cfg.chat_template))
                line += f", eval loss {metrics['eval_loss'][-1]:.4f}"
            logger.info(line)
    model.eval()
    with atomic_dir(Path(cfg.output_dir)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_config(cfg, tmp / "sft_config.yaml")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
