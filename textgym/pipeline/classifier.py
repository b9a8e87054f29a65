"""Classifier training: fine-tune a sequence classifier on labelled texts for the ``classifier`` reward.

A pointwise alternative to a reward model learnt from comparisons (``textgym.pipeline.rm``): each text has a
label, the model learns them by cross-entropy, and the ``classifier`` reward scores a completion by
the probability (or logit) of one label. ::

    from textgym.pipeline.classifier import train_classifier
    metrics = train_classifier(texts, labels, label_names=("other", "positive"), output_dir="runs/clf")
    reward = textgym.rewards.make("classifier", model="runs/clf", label="positive")

The backbone is named as for reward models (``textgym.pipeline.rm.backbone_path``): ``"minilm"``,
``"textgym/tiny"``, ``"textgym/smollm2-135m"``, a model directory or a hub id.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from textgym import models
from textgym.assets import atomic_dir
from textgym.pipeline.rm import backbone_path
from textgym.rewards import ClassifierReward

__all__ = ["train_classifier"]


def train_classifier(texts: list[str], labels: list[int], *, label_names: Sequence[str] = ("negative", "positive"),
                     backbone: str = "minilm", output_dir: str | Path = "runs/classifier", epochs: int = 2,
                     batch_size: int = 16, learning_rate: float = 5e-5, max_length: int = 128,
                     eval_fraction: float = 0.1, seed: int = 0, progress: bool = True) -> dict:
    """Fine-tune a sequence classifier on labelled texts (cross-entropy) and save it atomically for
    the ``classifier`` reward (``label=`` one of ``label_names``). Returns held-out accuracy before
    and after training."""
    if len(texts) != len(labels) or len(texts) < 2:
        raise ValueError(f"need as many labels as texts (at least 2), got {len(texts)} texts and {len(labels)} labels")
    if not all(0 <= y < len(label_names) for y in labels):
        raise ValueError(f"labels must be indices into label_names {list(label_names)}")
    path = backbone_path(backbone)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)}, ignore_mismatched_sizes=True)
    models.disable_dropout(model)
    ClassifierReward(model, tokenizer=tokenizer, label=0)  # the reward's pad-token set-up, as at scoring time
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(texts)))
    held, train = order[:n_eval], order[n_eval:]

    def encode(idx):
        return tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                         return_tensors="pt")

    @torch.no_grad()
    def accuracy() -> float:
        model.eval()
        predictions = model(**encode(held)).logits.argmax(-1)
        return float((predictions == torch.tensor([labels[i] for i in held])).float().mean())

    metrics: dict[str, Any] = {"train_texts": len(train), "eval_texts": len(held), "eval_accuracy_before": accuracy()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    rng = random.Random(seed)
    model.train()
    steps = epochs * math.ceil(len(train) / batch_size)
    with tqdm(total=steps, desc="classifier", unit="step", disable=not progress) as bar:
        for _ in range(epochs):
            rng.shuffle(train)
            for start in range(0, len(train), batch_size):
                idx = train[start : start + batch_size]
                loss = model(**encode(idx), labels=torch.tensor([labels[i] for i in idx])).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.update()
    metrics["eval_accuracy"] = accuracy()
    model.config.textgym_max_length = max_length  # the classifier reward scores with this length
    with atomic_dir(Path(output_dir)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics
