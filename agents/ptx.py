"""PPO-ptx (Ouyang et al. 2022, InstructGPT, eq. 2): mix a pretraining language-modelling term into
the policy update, ``loss = rl_loss + ptx_coef * NLL(pretraining batch)``, so RL fine-tuning does
not erode the model's language ability.

The term is explicit: every minibatch step of PPO's and A2C's updates adds
``LMAlgorithm.ptx_loss_term()`` (``ptx_coef * lm_loss`` of the next batch of ``ptx_batches``) to
its loss, as the step's last forward and backward (``GradientStep.accumulate``), so gradient
clipping and the step see the combined gradient.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from textgym import lm
from textgym.prompts import load_prompts


def ptx_batches(tokenizer, source, batch_size: int, max_length: int, seed: int = 0) -> Iterator[dict]:
    """Endless shuffled batches of tokenized texts from ``source`` (anything ``load_prompts`` reads)."""
    texts = load_prompts(source).prompts
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(texts), generator=gen).tolist()
        for start in range(0, len(order), batch_size):
            chunk = [texts[i] for i in order[start : start + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def lm_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token negative log-likelihood over the real tokens of ``batch``."""
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=lm.position_ids(mask), use_cache=False).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    weight = (mask[:, 1:] * mask[:, :-1]).float()
    return -(logp * weight).sum() / weight.sum().clamp(min=1)
