"""The engine's acting distribution: from the policy LM's logits to what is sampled and scored.

One place for what changes the distribution an episode acts with, so that sampling, every
log-prob (for a ratio or a KL), evaluation and the saved model agree on it:

- the policy's own distribution (the default);
- NLPO's nucleus mask: the policy restricted to the ``top_p`` most likely tokens of a masking
  model decoded in lockstep with it, renormalised (Ramamurthy et al. 2023);
- ILQL's perturbation ``log pi + beta * (Q - V)``, top-k kept (Snell et al. 2023; ``textgym.ilql``).

The two are exclusive. A saved policy carries its acting distribution (``ACTING_FILE``), so a model
directory acts as the engine that saved it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from textgym import lm, models
from textgym.ilql import ILQLDecoding, ILQLHeads

NUCLEUS = "nucleus_mask"  # the follower that decodes the masking model of the acting distribution
# A saved policy's acting distribution, beside its weights: {"nucleus_mask": ...} or {"ilql": ...}.
ACTING_FILE = "textgym_acting.json"


class ActingDistribution:
    """The acting distribution of one engine (module docstring).

    :param engine: the engine whose policy decoder (logits, hidden states) and followers it reads.
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self.nucleus: dict | None = None  # {"top_p", "min_tokens_to_keep"} when masked
        self.ilql: ILQLDecoding | None = None  # when ILQL's decoding acts
        self._allowed: tuple | None = None  # (masking decoder, its version, nucleus mask [n, V])

    def copy_for(self, engine: Any) -> ActingDistribution:
        """The same distribution on ``engine`` (an evaluation copy with rows of its own): its own
        decoder of the masking model."""
        other = ActingDistribution(engine)
        other.nucleus, other.ilql = self.nucleus, self.ilql
        if self.nucleus is not None:
            engine.followers[NUCLEUS] = lm.IncrementalLM(self.nucleus_model, engine.n, dtype=engine.dtype)
        return other

    # --- setting it -------------------------------------------------------------------------------

    def set_nucleus_mask(self, model, top_p: float, min_tokens_to_keep: int = 1) -> None:
        """Act with the policy restricted to the ``top_p`` most likely tokens of ``model`` (NLPO's
        masking policy), renormalised; ``model`` is decoded in lockstep with the policy."""
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if isinstance(min_tokens_to_keep, bool) or not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be an integer >= 1, got {min_tokens_to_keep!r}")
        if self.ilql is not None:
            raise ValueError("this env acts with ILQL's decoding, which a nucleus mask cannot be combined with")
        self.nucleus = {"top_p": float(top_p), "min_tokens_to_keep": int(min_tokens_to_keep)}
        self._allowed = None
        self.engine.add_follower(NUCLEUS, model)

    def set_ilql_decoding(self, heads: ILQLHeads, beta: float, top_k: int | None) -> None:
        """Act with ILQL's perturbed distribution ``log pi + beta * (Q - V)``, top-k kept
        (``textgym.ilql``); ``heads`` are used as they are (an agent training them shares them)."""
        if self.nucleus is not None:
            raise ValueError("this env already acts with a nucleus mask (NLPO's): ILQL's decoding replaces the "
                             "policy's distribution and cannot be combined with it")
        if heads.vocab_size != self.engine.vocab:
            raise ValueError(f"ILQL heads over {heads.vocab_size} logits do not fit this model's {self.engine.vocab}")
        self.ilql = ILQLDecoding(heads, beta, top_k)
        self.engine.keep_hidden_states()

    def mask_model_changed(self) -> None:
        """The masking model's weights changed (NLPO copies the policy into it): re-encode the
        running rows with it."""
        self.engine.refresh([self.engine.followers[NUCLEUS]])

    @property
    def nucleus_model(self):
        return self.engine.followers[NUCLEUS].model if self.nucleus else None

    # --- using it ---------------------------------------------------------------------------------

    def allowed_tokens(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """The nucleus mask ``[N, V]`` that the masking model's logits give."""
        if self.nucleus is None:
            raise RuntimeError("no nucleus mask is set: call set_nucleus_mask() first")
        return lm.top_p_mask(mask_logits, self.nucleus["top_p"], self.nucleus["min_tokens_to_keep"])

    def nucleus_allowed(self, rows=slice(None)) -> torch.Tensor:
        """The nucleus mask of the current observations of ``rows``. Computed for every row once
        per state of the masking model's logits (a vocabulary sort each), i.e. once per step: the
        policy's sampling, the step's log-prob and the kept mass share it."""
        dec = self.engine.followers[NUCLEUS]
        if self._allowed is None or self._allowed[0] is not dec or self._allowed[1] != dec.version:
            self._allowed = (dec, dec.version, self.allowed_tokens(dec.logits))
        return self._allowed[2][rows]

    def logits(self, rows=slice(None), kept_mass: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits, kept)`` of the acting distribution for the current decoder state of ``rows``:
        ``logits`` ``[k, V]`` (fp32) are what is sampled from and what every log-prob is taken
        under; with ``kept_mass`` and a nucleus mask, ``kept`` ``[k]`` is the policy probability the
        mask keeps (NLPO's diagnostic), else None."""
        policy = self.engine.policy
        logits = policy.logits[rows]
        kept = None
        if self.nucleus is not None:
            allowed = self.nucleus_allowed(rows)  # one mask serves the log-prob and the kept mass
            if kept_mass:
                kept = (torch.softmax(logits, -1) * allowed).sum(-1)
            logits = lm.mask_logits(logits, allowed)
        if self.ilql is not None:
            assert policy.states is not None  # hidden states kept (set_ilql_decoding)
            logits = self.ilql.logits(logits, policy.states[rows], self.engine.output_embedding())
        return logits, kept

    # --- saving it --------------------------------------------------------------------------------

    def save(self, directory: Path, plain_copy) -> None:
        """Write the acting distribution beside a saved policy in ``directory``; ``plain_copy``
        turns a model into the plain Hugging Face model to save (LoRA merged)."""
        if self.nucleus is not None:
            plain_copy(self.nucleus_model).save_pretrained(directory / NUCLEUS)
            self.engine.tokenizer.save_pretrained(directory / NUCLEUS)  # a loadable model directory of its own
            (directory / ACTING_FILE).write_text(json.dumps({"nucleus_mask": {**self.nucleus, "model": NUCLEUS}}))
        if self.ilql is not None:
            (directory / ACTING_FILE).write_text(json.dumps({"ilql": self.ilql.save(directory)}))

    def load(self, directory: Path) -> None:
        """Act as the policy saved in ``directory`` did (its ``ACTING_FILE``)."""
        acting = json.loads((directory / ACTING_FILE).read_text())
        if not isinstance(acting, dict) or len(acting) != 1 or next(iter(acting)) not in ("nucleus_mask", "ilql"):
            raise ValueError(f"{str(directory / ACTING_FILE)!r} must hold one of 'nucleus_mask', 'ilql', "
                             f"got {acting!r}")
        if "ilql" in acting:
            decoding = ILQLDecoding.load(directory, acting["ilql"], self.engine.device)
            self.set_ilql_decoding(decoding.heads, decoding.beta, decoding.top_k)
            return
        spec = acting["nucleus_mask"]
        mask_model, _ = models.load(directory / spec["model"], device=self.engine.device, dtype=self.engine.dtype)
        self.set_nucleus_mask(mask_model, spec["top_p"], spec["min_tokens_to_keep"])
