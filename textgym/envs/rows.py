"""Rows and stepping: the episode state machine of an engine's ``n`` rows.

Each row is an episode: a prompt (left-padded to ``max_prompt_tokens``) and the tokens generated so
far, with the per-token log-probs of the acting distribution and of the reference. A reset draws
the rows' prompts (``textgym.envs.groups`` for groups sharing one) and defers their encoding to the
first time their logits are needed (``ensure_started``: one forward for every pending row). A step
appends one token to every live row, scores the rows that finished (EOS or the length limit:
``terminated``) in one batch (``EpisodeScoring``) and feeds the others' tokens to every decoder:
one KV-cached forward of the policy and of each follower (the reference in ``kl_mode="per_token"``,
NLPO's masking model). ``version`` counts the changes, so tickets (``textgym.envs.tickets``) older
than the rows' state are stale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from textgym import lm
from textgym.envs.groups import PromptGroups


@dataclass(frozen=True)
class EpisodeBatch:
    """A copy of every row's episode as it stands (``TextGenCore.episodes``): what an agent stores
    of a round of whole episodes. ``[n, P]`` prompt ids and mask (left-padded), ``[n, T]``
    completion ids and mask, per-token log-probs under the acting distribution (at sampling time)
    and under the reference, each row's prompt group and prompt index, and tokens generated."""

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    completion_ids: np.ndarray
    completion_mask: np.ndarray
    log_probs: np.ndarray
    ref_log_probs: np.ndarray
    group_id: np.ndarray
    prompt_index: np.ndarray
    length: np.ndarray


class EpisodeRows:
    """The per-row state of ``n`` episodes of ``engine`` and the decoders that follow them."""

    def __init__(self, engine: Any, n: int):
        """Fresh per-row state and decoders for ``n`` rows of ``engine``."""
        self.e = engine
        self.groups = PromptGroups(n, self.e.group_size)  # checks that n is a multiple of group_size
        self.n = n
        self.version = 0  # bumped whenever a row's tokens change: tickets (EngineRows) older than that are stale
        self._stale_cache = False  # set when a step failed after appending tokens (see _advance)
        L = self.e.P + self.e.T
        self.input_ids = np.full((n, L), self.e.pad_id, dtype=np.int64)
        self.attention_mask = np.zeros((n, L), dtype=np.int64)
        self.length = np.zeros(n, dtype=np.int64)  # tokens generated so far
        self.live = np.zeros(n, dtype=bool)  # episode running (reset and not finished)
        self.pending = np.zeros(n, dtype=bool)  # reset, prompt not yet encoded (see ensure_started)
        self.prompt_index = np.zeros(n, dtype=np.int64)
        self.prompt_text = [""] * n
        self.group_id = np.full(n, -1, dtype=np.int64)  # shared by the episodes of one prompt (groups)
        self.logp = torch.zeros(n, self.e.T)  # log pi(y_t) under the acting distribution, at sampling time
        # log pi_ref(y_t): per_token mode at sampling time; final mode when the episode ends
        self.ref_logp = torch.zeros(n, self.e.T)
        self.mask_mass = torch.zeros(n, self.e.T)  # with a nucleus mask: policy probability the mask kept
        # ILQL's heads read the policy's last hidden states at every step
        self.policy = lm.IncrementalLM(self.e.model, n, dtype=self.e.dtype, hidden=self.e.acting.ilql is not None)
        # Models decoded in lockstep with the policy, one KV-cached forward per step each: the
        # reference in per_token mode, and whatever an agent adds (e.g. NLPO's masking policy).
        self.followers: dict[str, lm.IncrementalLM] = {}
        if self.e.cfg.kl_mode == "per_token":
            self.followers["ref"] = lm.IncrementalLM(self.e.ref_model, n, dtype=self.e.ref_dtype)

    def snapshot(self) -> EpisodeBatch:
        P = self.e.P
        return EpisodeBatch(self.input_ids[:, :P].copy(), self.attention_mask[:, :P].copy(),
                            self.input_ids[:, P:].copy(), self.attention_mask[:, P:].copy(), self.logp.numpy().copy(),
                            self.ref_logp.numpy().copy(), self.group_id.copy(), self.prompt_index.copy(),
                            self.length.copy())

    @property
    def ref(self) -> lm.IncrementalLM | None:
        return self.followers.get("ref")

    def decoders(self) -> list[lm.IncrementalLM]:
        return [self.policy, *self.followers.values()]

    def add_follower(self, name: str, model) -> lm.IncrementalLM:
        """Decode ``model`` in lockstep with the policy from now on (live rows are encoded at once),
        its forwards in the env's ``dtype``."""
        self.followers[name] = lm.IncrementalLM(model, self.n, dtype=self.e.dtype)
        self.refresh([self.followers[name]])
        return self.followers[name]

    @torch.no_grad()
    def refresh(self, decoders: list[lm.IncrementalLM] | None = None) -> None:
        """Re-encode the live rows from scratch, e.g. after the policy's weights changed, so the
        cached logits are those of the current weights. One forward per decoder."""
        rows = np.flatnonzero(self.live & ~self.pending).tolist()  # pending rows start later anyway
        decoders = self.decoders() if decoders is None else decoders
        if not rows:
            for dec in decoders:
                dec.clear()
            return
        width = self.e.P + int(self.length[rows].max())
        ids = np.full((len(rows), width), self.e.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, row in enumerate(rows):  # right-align each row's prompt + completion
            n = self.e.P + int(self.length[row])
            ids[j, width - n :], mask[j, width - n :] = self.input_ids[row, :n], self.attention_mask[row, :n]
        ids_t, mask_t = torch.as_tensor(ids, device=self.e.device), torch.as_tensor(mask, device=self.e.device)
        for dec in decoders:
            dec.clear()
            dec.start(rows, ids_t, mask_t)

    def reset(self, rows: list[int], rngs: Sequence[np.random.Generator | None],
                   options: dict | None = None) -> None:
        """Start new episodes in ``rows``: sample a prompt with the rows' RNGs (or take the one in
        ``options``: ``prompt`` text or ``prompt_index``, where the RNGs may be None). With
        ``group_size`` > 1 rows share prompts by groups, as ``textgym.envs.groups`` describes
        (seeding included). Their prompts are encoded, all in one forward, when their logits are
        first needed (``ensure_started``)."""
        options = check_reset_options(options, len(self.e.prompts))
        if not rows:
            return
        fixed = None
        if "prompt" in options:
            fixed = (-1, options["prompt"])
        elif "prompt_index" in options:
            fixed = (options["prompt_index"], self.e.prompts.prompts[options["prompt_index"]])
        picks = self.groups.pick(rows, rngs, self.e.draw_prompt, fixed)
        ids = np.full((len(rows), self.e.P), self.e.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), self.e.P), dtype=np.int64)
        for j, (row, (group, (index, text))) in enumerate(zip(rows, picks)):
            tokens = self.e.encode_prompt(text)
            ids[j, self.e.P - len(tokens) :] = tokens
            mask[j, self.e.P - len(tokens) :] = 1
            self.prompt_index[row], self.prompt_text[row], self.group_id[row] = index, text, group
        self.input_ids[rows] = self.e.pad_id
        self.attention_mask[rows] = 0
        self.input_ids[rows, : self.e.P], self.attention_mask[rows, : self.e.P] = ids, mask
        self.length[rows] = 0
        self.live[rows] = True
        self.logp[rows] = 0.0
        self.ref_logp[rows] = 0.0
        self.mask_mass[rows] = 0.0
        self.pending[rows] = True
        self.version += 1

    def stop_all(self) -> None:
        """End every episode without scoring it (e.g. before an evaluation borrows the rows)."""
        self.live[:] = False
        self.pending[:] = False
        self.version += 1
        for dec in self.decoders():
            dec.clear()

    @torch.no_grad()
    def ensure_started(self) -> None:
        """Encode the prompts of newly reset rows, in one forward per decoder. Deferred from
        ``reset_rows`` so that a reset whose logits are never used (a reset before a policy update,
        or reset after reset) costs no forward."""
        if self._stale_cache:  # a step failed while advancing the decoders: re-encode the live rows
            self.refresh()
            self._stale_cache = False
        rows = np.flatnonzero(self.pending).tolist()
        if not rows:
            return
        if not (self.live & ~self.pending).any():
            # Nothing else is running: start from an empty cache, so the computation (and its float
            # rounding) does not depend on what the cache held before: runs resume bit for bit.
            for dec in self.decoders():
                dec.clear()
        ids = torch.as_tensor(self.input_ids[rows, : self.e.P], device=self.e.device)
        mask = torch.as_tensor(self.attention_mask[rows, : self.e.P], device=self.e.device)
        for dec in self.decoders():
            with self.e.timer.phase("reference" if dec is self.ref else None):  # per_token: its own phase
                dec.start(rows, ids, mask)
        self.pending[rows] = False

    def check_actions(self, actions: np.ndarray, rows: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions)
        if actions.dtype.kind not in "iu":
            if actions.dtype.kind == "f" and np.all(np.isfinite(actions)) and np.all(actions == np.round(actions)):
                actions = actions.astype(np.int64)
            else:
                bad = actions.flat[0] if actions.size == 1 else actions
                raise ValueError(f"action must be an integer token id in [0, {self.e.vocab}), got {bad!r}")
        bad = rows & ((actions < 0) | (actions >= self.e.vocab))
        if bad.any():
            raise ValueError(f"action {actions[bad][0]!r} out of range: valid token ids are [0, {self.e.vocab})")
        return actions.astype(np.int64)

    def step(self, actions: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[int, dict]]:
        """Append ``actions[i]`` to every row ``i`` where ``rows[i]``; returns rewards, terminated
        flags and the final-step infos of the rows whose episode ended."""
        rows = np.asarray(rows, dtype=bool)
        if (rows & ~self.live).any():
            raise RuntimeError("step() called on an episode that is over: call reset() first")
        actions = self.check_actions(actions, rows)
        self.ensure_started()
        rewards_out = np.zeros(self.n, dtype=np.float64)
        idx = np.flatnonzero(rows)
        t = self.length[idx]
        acts = torch.as_tensor(actions[idx], device=self.e.device)
        idx_t = torch.as_tensor(idx, device=self.e.device)
        logits, kept = self.e.acting.logits(idx_t, kept_mass=True)
        if kept is not None:
            self.mask_mass[idx, t] = kept.cpu()
        logp = _token_logp(logits, acts)  # under the distribution that acts
        self.logp[idx, t] = logp.cpu()
        if self.ref is not None:
            ref_logp = _token_logp(self.ref.logits[idx_t], acts)
            self.ref_logp[idx, t] = ref_logp.cpu()
            if self.e.cfg.kl_in == "reward":  # k1 per token (see textgym.kl)
                rewards_out[idx] -= self.e.kl.value * (logp - ref_logp).double().cpu().numpy()

        self.input_ids[idx, self.e.P + t] = actions[idx]
        self.attention_mask[idx, self.e.P + t] = 1
        self.length[idx] += 1
        self.version += 1
        done = np.zeros(self.n, dtype=bool)
        done[idx] = self.length[idx] >= self.e.T
        if self.e.cfg.stop_on_eos:
            done[idx] |= np.isin(actions[idx], self.e.eos_ids)
        infos = self._finish_or_undo(np.flatnonzero(done), rewards_out, idx, t) if done.any() else {}
        self.e.kl.after_step(self.n)  # after the step: rows finishing together share one coefficient

        going = rows & ~done
        if going.any():
            self._advance(torch.as_tensor(actions, device=self.e.device), torch.as_tensor(going, device=self.e.device))
        return rewards_out, done, infos

    def _finish_or_undo(self, done: np.ndarray, rewards_out: np.ndarray, idx: np.ndarray, t: np.ndarray) -> dict:
        """``scoring.finish``; if it raises (a reward, the tokenizer or the reference model failed), the
        step's tokens are taken back, so the step can be retried or the episodes reset."""
        try:
            return self.e.scoring.finish(done, rewards_out)
        except BaseException:
            self.input_ids[idx, self.e.P + t] = self.e.pad_id
            self.attention_mask[idx, self.e.P + t] = 0
            self.length[idx] = t
            raise

    def _advance(self, actions: torch.Tensor, going: torch.Tensor) -> None:
        """Feed the new tokens to every decoder; if a forward fails, the caches are rebuilt from the
        tokens before the next step's logits are used."""
        try:
            for dec in self.decoders():
                with self.e.timer.phase("reference" if dec is self.ref else None):  # per_token: its own phase
                    dec.advance(actions, going)
        except BaseException:
            self._stale_cache = True
            raise


RESET_OPTIONS = ("prompt", "prompt_index")


def check_reset_options(options: Any, n_prompts: int) -> dict:
    """``reset(options=...)``: None or a dict with ``prompt`` (a string) or ``prompt_index`` (an
    integer in range); anything else is refused by name."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise TypeError(f"reset options must be a dict (keys {', '.join(RESET_OPTIONS)}) or None, "
                        f"got {type(options).__name__} {options!r}")
    unknown = sorted(set(options) - set(RESET_OPTIONS), key=str)
    if unknown:
        raise ValueError(f"unknown reset option {unknown[0]!r}; valid: {', '.join(RESET_OPTIONS)}")
    if len(options) > 1:
        raise ValueError("reset options 'prompt' and 'prompt_index' exclude each other: give one")
    if "prompt" in options and not isinstance(options["prompt"], str):
        raise TypeError(f"reset option 'prompt' must be a string, got {type(options['prompt']).__name__} "
                        f"{options['prompt']!r}")
    if "prompt_index" in options:
        index = options["prompt_index"]
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"reset option 'prompt_index' must be an integer, got {type(index).__name__} {index!r}")
        if not 0 <= index < n_prompts:
            raise ValueError(f"reset option 'prompt_index' {index} out of range [0, {n_prompts})")
        return {"prompt_index": int(index)}
    return dict(options)


def _token_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
