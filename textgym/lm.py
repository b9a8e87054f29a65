"""Batched forward passes of a causal LM: KV-cached incremental decoding and teacher forcing.

Layout used everywhere in textgym: a row is ``[prompt left-padded to P | completion right-padded
to T]``. Positions come from the attention mask (``cumsum - 1``), so left padding never shifts a
token's position (a bug class in several RLHF codebases).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import TopPLogitsWarper

from textgym.precision import autocast


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position of each token counted over real (mask == 1) tokens; 0 on padding."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def drop_padding_columns(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``ids`` and ``mask`` (``[B, L]``) without their leading columns that are padding in every
    row, and how many were dropped. Prompts are left-padded to ``max_prompt_tokens``, which a batch
    seldom needs in full (the shipped prompts take 10 to 16 of the default 40); positions come from
    the mask, so a forward without those columns computes the same for every real token, for less."""
    real = mask.any(0)
    cut = int(real.to(torch.int8).argmax()) if bool(real.any()) else 0  # the first column real in some row
    if cut == 0:
        return ids, mask, 0
    return ids[:, cut:], mask[:, cut:], cut


def forward(model, input_ids: torch.Tensor, mask: torch.Tensor, past: Any = None, *, keep: int | None = None,
            hidden: bool = False, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """One forward, under autocast to ``dtype`` (``textgym.precision``; None: the weights' own).
    ``mask`` covers the cached columns plus ``input_ids``. Returns (fp32 logits, last hidden states
    or None, cache) for the last ``keep`` positions (all when None). The cache is the model's
    transformers ``Cache`` (typed ``Any``: ``IncrementalLM`` edits its layers' key/value tensors in
    place, which transformers types as optional, or absent on linear-attention layers)."""
    new = input_ids.shape[1]
    positions = position_ids(mask)[:, -new:]
    with autocast(input_ids.device, dtype):
        out = model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=past,
            use_cache=past is not None or keep is not None, output_hidden_states=hidden,
            logits_to_keep=keep or 0,
        )
    states: torch.Tensor | None = out.hidden_states[-1] if hidden else None
    if states is not None and keep:
        states = states[:, -keep:]
    return out.logits.float(), states, out.cache


def completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *, hidden: bool = False,
                        dtype: torch.dtype | None = None):
    """Teacher-forced log-probs of the completion tokens: ``[B, T]`` (0 where ``completion_mask`` is 0),
    float32 whatever the forward's ``dtype`` (autocast, as in ``forward``).

    With ``hidden``, also the last hidden states at the positions that predict each completion
    token, ``[B, T, H]``, and the full logits ``[B, T, V]`` (for entropies and values)."""
    prompt_ids, prompt_mask, _ = drop_padding_columns(prompt_ids, prompt_mask)
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    P, T = prompt_ids.shape[1], completion_ids.shape[1]
    with autocast(ids.device, dtype):
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                    output_hidden_states=hidden, logits_to_keep=T + 1)
    # logits_to_keep=T+1 keeps positions P-1 .. P+T-1; the one at P-1 predicts completion token 0.
    logits = out.logits[:, :T].float()
    logp = torch.gather(F.log_softmax(logits, dim=-1), -1, completion_ids.unsqueeze(-1)).squeeze(-1)
    logp = logp * completion_mask
    if not hidden:
        return logp
    return logp, out.hidden_states[-1][:, P - 1 : P + T - 1], logits


class IncrementalLM:
    """KV-cached decoding of one model over ``n`` rows whose episodes start and end independently.

    Each row's content is right-aligned in the cache: a row (re)started while others are mid-episode
    gets its padded prompt in the last P columns, with the older columns masked out. The cache is
    trimmed to the longest live row, so it never exceeds P + T columns.
    """

    def __init__(self, model, n: int, *, hidden: bool = False, dtype: torch.dtype | None = None):
        self.model, self.n, self.hidden, self.dtype = model, n, hidden, dtype  # dtype: the forwards' autocast
        self.cache: Any = None  # the model's Cache (see ``forward``), None while no row is live
        self.mask: torch.Tensor | None = None  # [n, L]
        self.width = torch.zeros(n, dtype=torch.long)  # columns of live content per row
        self._logits: torch.Tensor | None = None  # [n, V] next-token logits (fp32), from the first start on
        self.states: torch.Tensor | None = None  # [n, H] last hidden state, with hidden=True
        self.version = 0  # bumped whenever logits/states change, so what is derived from them can be cached

    @property
    def logits(self) -> torch.Tensor:
        """Next-token logits ``[n, V]`` (fp32) of every row (zeros for rows never started)."""
        if self._logits is None:
            raise RuntimeError("no row was started yet: start() some first")
        return self._logits

    @torch.no_grad()
    def start(self, rows: list[int], ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Encode prompts (``[k, P]``, left-padded) for ``rows``, replacing whatever those rows held."""
        ids, mask, _ = drop_padding_columns(ids, mask)  # no column of padding alone is encoded or cached
        logits, states, cache = forward(self.model, ids, mask, keep=1, hidden=self.hidden, dtype=self.dtype)
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=ids.device)
        P = ids.shape[1]
        new_kv = [(layer.keys, layer.values) for layer in cache.layers]
        if self.cache is None or self.mask is None or self._logits is None:  # first start, or all rows ended
            # Every row starts empty: zero-filled columns with a zero mask.
            for layer in cache.layers:
                layer.keys = layer.keys.new_zeros((self.n, *layer.keys.shape[1:]))
                layer.values = layer.values.new_zeros((self.n, *layer.values.shape[1:]))
            self.cache, self.mask = cache, torch.zeros(self.n, P, dtype=torch.long, device=ids.device)
            self._logits = logits.new_zeros(self.n, logits.shape[-1])
            if states is not None:  # hidden=True
                self.states = states.new_zeros(self.n, states.shape[-1])
        L = self.mask.shape[1]
        if P > L:  # the new prompts are wider than the cache's live columns: widen it on the left, masked
            for layer in self.cache.layers:
                layer.keys = torch.cat([layer.keys.new_zeros((*layer.keys.shape[:2], P - L, layer.keys.shape[3])),
                                        layer.keys], dim=2)
                layer.values = torch.cat([layer.values.new_zeros((*layer.values.shape[:2], P - L,
                                                                  layer.values.shape[3])), layer.values], dim=2)
            self.mask = torch.cat([self.mask.new_zeros((self.n, P - L)), self.mask], dim=1)
            L = P
        for layer, new in zip(self.cache.layers, new_kv):
            layer.keys[rows_t, :, L - P :] = new[0]
            layer.values[rows_t, :, L - P :] = new[1]
        self.mask[rows_t] = 0
        self.mask[rows_t, L - P :] = mask
        self.width[rows_t] = P
        self._logits[rows_t] = logits[:, -1]
        if self.states is not None and states is not None:  # hidden=True
            self.states[rows_t] = states[:, -1]
        self.version += 1

    @torch.no_grad()
    def advance(self, tokens: torch.Tensor, live: torch.Tensor) -> None:
        """Append one token per row. Rows where ``live`` is False must have been stopped: they get a
        placeholder token (attended, so no row is ever fully masked, which makes SDPA return NaN)
        and keep their logits unchanged."""
        if self.cache is None or self.mask is None or self._logits is None:
            raise RuntimeError("advance() needs live rows: start() some first")
        live = live.to(self.mask.device)
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        ids = torch.where(live, tokens.to(self.mask.device), 0).unsqueeze(1)
        logits, states, self.cache = forward(self.model, ids, mask, self.cache, keep=1, hidden=self.hidden,
                                             dtype=self.dtype)
        self.mask = mask
        self.width[live.cpu()] += 1  # rows that are not live were stopped and stay empty
        live_rows = live.nonzero().squeeze(1)
        self._logits[live_rows] = logits[live_rows, -1]
        if self.states is not None and states is not None:  # hidden=True
            self.states[live_rows] = states[live_rows, -1]
        self.version += 1

    def clear(self) -> None:
        """Forget every row (a following ``start`` must then cover the rows it needs)."""
        self.cache, self.mask = None, None
        self.width[:] = 0
        self.version += 1

    def stop(self, rows: list[int]) -> None:
        """Mark rows as finished so their columns may be trimmed away."""
        self.width[torch.as_tensor(rows, dtype=torch.long)] = 0
        self._trim()

    def _trim(self) -> None:
        if self.cache is None or self.mask is None:
            return  # nothing cached (every row stopped already, or cleared)
        keep = int(self.width.max())
        L = self.mask.shape[1]
        if keep == 0:
            self.cache, self.mask = None, None
        elif keep < L:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, L - keep :]
                layer.values = layer.values[:, :, L - keep :]
            self.mask = self.mask[:, L - keep :]


def top_p_mask(logits: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Boolean ``[..., V]``: the nucleus (Holtzman et al. 2020) that transformers'
    ``TopPLogitsWarper`` keeps: the most likely tokens while the probability mass strictly above
    them is below ``top_p`` (so the token that crosses ``top_p`` is kept, one whose mass above is
    exactly ``top_p`` is not), and at least ``min_tokens_to_keep`` tokens. Probabilities in fp32."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    # NaN marks the removed tokens: unlike -inf, no logit the model gives is NaN.
    warper = TopPLogitsWarper(top_p, filter_value=float("nan"), min_tokens_to_keep=min_tokens_to_keep)
    return ~warper(None, flat).isnan().reshape(logits.shape)


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``logits`` with the tokens outside ``allowed`` removed: a softmax of the result is the
    renormalised distribution over ``allowed``."""
    return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
