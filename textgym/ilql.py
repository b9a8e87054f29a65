"""ILQL's value heads and the acting distribution they make (Snell et al. 2022, "Offline RL for
Natural Language Generation with Implicit Language Q-Learning").

ILQL learns, from logged episodes, token-level Q(s, a) and V(s) over the LM's last hidden state s,
and acts with the LM's log-probs perturbed by the advantage, as trlX decodes it::

    scores(a | s) = log pi(a | s) + beta * (min_i Qtarget_i(s, a) - V(s)),   top-k of scores kept

``ILQLDecoding`` is that acting distribution: an engine given one (``textgym.envs.acting``)
samples from it and takes every log-prob (the KL to the reference included) under it, so evaluation,
the KL figures and a saved model are the policy that acts. The loss that trains the heads is the
agent's (``agents.ilql``).

**Heads sized for a CPU.** trlX gives each Q head an MLP ``H -> 2H -> V`` over the vocabulary: with
SmolLM2 (H = 576, V = 49152) that is 57M weights per head, and ILQL keeps four (two Q heads and their
targets), 226M, more than the 135M of the LM itself. Here a Q head reuses the LM's own output
embedding ``E`` (``[V, H]``, frozen, not copied)::

    Q_i(s, .) = E (A_i s) + b_i          A_i: H x H,  b_i: V

so a head holds ``H^2 + V`` weights (381k for SmolLM2, 0.7% of trlX's) and costs one more
vocabulary projection per token, as the LM head does. Q lives in the span the LM's logits live in
(``A_i = rms(s) I, b_i = 0`` gives exactly the LM's logits), which is where the CQL term (a
cross-entropy over the vocabulary) pulls it. V is a linear ``H -> 1``.

The heads read the hidden state scaled to unit root-mean-square, ``s / rms(s)`` (entries of order
1 whatever the LM). SmolLM2's last hidden states have entries of several units, and Adam moves every
weight by about the learning rate whatever its gradient's size, so on the raw state one Adam step of
``A`` or of V's weights moved the values by several reward units (a first run's Q loss started at 18
for rewards in [-1, 1]).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

HEADS_FILE = "ilql_heads.safetensors"


class QHead(nn.Module):
    """``Q(s, .) = E (A s) + b`` over the LM's output embedding ``E`` (given at each call)."""

    def __init__(self, hidden_size: int, vocab_size: int, init_std: float):
        super().__init__()
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.normal_(self.proj.weight, std=init_std)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, states: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return self.proj(states) @ embedding.t() + self.bias


class ILQLHeads(nn.Module):
    """Two Q heads (or one), their Polyak-averaged targets, and a V head, over hidden size ``H``
    and a vocabulary of ``V`` logits.

    :param hidden_size: the LM's hidden size H.
    :param vocab_size: the width of its logits (rows of its output embedding).
    :param two_qs: two Q heads, the minimum of their targets taken (clipped double Q, as trlX).
    """

    def __init__(self, hidden_size: int, vocab_size: int, two_qs: bool = True):
        super().__init__()
        self.hidden_size, self.vocab_size, self.two_qs = int(hidden_size), int(vocab_size), bool(two_qs)
        # Small random A_i: two heads that start equal would stay equal, and the minimum of their
        # targets would bound nothing.
        std = 0.02 / hidden_size ** 0.5
        self.q_heads = nn.ModuleList(QHead(hidden_size, vocab_size, std) for _ in range(2 if two_qs else 1))
        self.target_q_heads = copy.deepcopy(self.q_heads).requires_grad_(False)
        self.v_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    @staticmethod
    def unit(states: torch.Tensor) -> torch.Tensor:
        """The hidden states scaled to unit root-mean-square (module docstring: why)."""
        return states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True).clamp(min=1e-12))

    def q(self, states: torch.Tensor, embedding: torch.Tensor) -> list[torch.Tensor]:
        """Each Q head's values over the vocabulary, ``[..., V]``, at the LM's hidden states."""
        states = self.unit(states)
        return [head(states, embedding) for head in self.q_heads]

    def target_q(self, states: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """The minimum over the target Q heads, ``[..., V]`` (no gradient)."""
        states = self.unit(states)
        with torch.no_grad():
            values = [head(states, embedding) for head in self.target_q_heads]
        return values[0] if len(values) == 1 else torch.minimum(*values)

    def v(self, states: torch.Tensor) -> torch.Tensor:
        """V(s), ``[...]``, at the LM's hidden states."""
        return self.v_head(self.unit(states)).squeeze(-1)

    @torch.no_grad()
    def sync_targets(self, alpha: float) -> None:
        """Polyak averaging: ``target <- alpha * online + (1 - alpha) * target``."""
        for target, online in zip(self.target_q_heads.parameters(), self.q_heads.parameters()):
            target.mul_(1.0 - alpha).add_(online, alpha=alpha)


def top_k_mask(scores: torch.Tensor, k: int | None) -> torch.Tensor:
    """Boolean ``[..., V]``: the ``k`` highest scores of each row (ties at the k-th kept); all
    with ``k`` None or at least ``V``."""
    if k is None or k >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores >= kth


class ILQLDecoding:
    """The acting distribution of an ILQL policy: ``log pi + beta * (Q - V)``, top-k kept.

    :param heads: the trained ``ILQLHeads`` (shared with the agent that trains them, not copied).
    :param beta: how far the advantage moves the LM's log-probs (0: the LM itself, top-k).
    :param top_k: tokens kept per step (None: all).
    """

    def __init__(self, heads: ILQLHeads, beta: float, top_k: int | None):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0 or beta == float("inf"):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None (every token), got {top_k!r}")
        self.heads, self.beta, self.top_k = heads, float(beta), top_k

    def logits(self, policy_logits: torch.Tensor, states: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """The acting distribution's logits ``[k, V]`` (fp32; tokens outside the top k at the
        lowest float) from the LM's logits and last hidden states of ``k`` rows."""
        with torch.no_grad():
            states = states.to(self.heads.v_head.weight.dtype)
            embedding = embedding.detach().to(states.dtype)
            advantage = self.heads.target_q(states, embedding) - self.heads.v(states).unsqueeze(-1)
            scores = F.log_softmax(policy_logits.float(), dim=-1) + self.beta * advantage.float()
        return scores.masked_fill(~top_k_mask(scores, self.top_k), torch.finfo(scores.dtype).min)

    def spec(self) -> dict:
        """What ``save`` writes beside the heads' weights."""
        return {"beta": self.beta, "top_k": self.top_k, "two_qs": self.heads.two_qs,
                "hidden_size": self.heads.hidden_size, "vocab_size": self.heads.vocab_size, "heads": HEADS_FILE}

    def save(self, directory: Path) -> dict:
        """Write the heads as safetensors in ``directory``; returns ``spec()``."""
        state = {k: v.detach().float().contiguous() for k, v in self.heads.state_dict().items()}
        save_file(state, str(Path(directory) / HEADS_FILE))
        return self.spec()

    @classmethod
    def load(cls, directory: Path, spec: dict, device: torch.device) -> ILQLDecoding:
        """The decoding saved in ``directory`` (``spec`` from its acting file); safetensors only."""
        where = f"{str(directory)!r}"
        try:
            heads = ILQLHeads(int(spec["hidden_size"]), int(spec["vocab_size"]), bool(spec["two_qs"]))
            name = str(spec["heads"])
            beta: Any = spec.get("beta")
            top_k: Any = spec.get("top_k")
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: the ILQL decoding spec {json.dumps(spec)} is malformed ({err!r})") from None
        if Path(name).name != name:
            raise ValueError(f"{where}: the ILQL heads file must be a file name in the model directory, got {name!r}")
        try:
            heads.load_state_dict(load_file(str(Path(directory) / name)))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{where}: its ILQL heads ({name}) do not load: {err}") from None
        return cls(heads.to(device).requires_grad_(False), beta, top_k)
