"""PPO-ptx (Ouyang et al. 2022, InstructGPT, eq. 2): mix a pretraining language-modelling term into
the policy update, ``loss = rl_loss + ptx_coef * NLL(pretraining batch)``, so RL fine-tuning does
not erode the model's language ability.

SB3's trainers call ``optimizer.zero_grad(); loss.backward(); clip_grad_norm_; optimizer.step()``
per minibatch. ``PtxOptimizer`` wraps the optimizer: its ``zero_grad`` also back-propagates
``ptx_coef * NLL`` of the next pretraining batch, so the RL gradient accumulates on top, gradient
clipping sees the sum, and the step follows the gradient of the combined loss.
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


class PtxOptimizer:
    """Wraps an optimizer so every ``zero_grad`` also adds ``coef * grad NLL`` of a pretraining batch."""

    def __init__(self, optimizer: torch.optim.Optimizer, model, batches: Iterator[dict], coef: float):
        self.optimizer, self.model, self.batches, self.coef = optimizer, model, batches, coef
        self.losses: list[float] = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        loss = lm_loss(self.model, next(self.batches))
        (self.coef * loss).backward()
        self.losses.append(loss.item())

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def __getattr__(self, name: str):  # param_groups, state, state_dict, load_state_dict, ...
        return getattr(self.optimizer, name)
