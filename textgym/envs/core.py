"""The batched engine behind both the single and the vector text-generation environments.

``TextGenCore`` holds ``n`` rows, each an episode: a prompt and the tokens generated so far. One
``step`` is one KV-cached forward of the policy model for all live rows (and of the reference
model in ``kl_mode="per_token"``); rows that finish are scored and, with ``kl_mode="final"``,
teacher-forced through the reference model, all in one batch.

The engine is its parts, each the one owner of its state, wired together here:

- ``models`` (``engine_models.py``): the policy LM (LoRA), its tokenizer and the frozen reference:
  loading, precision, saving;
- ``rows`` (``rows.py``): the episode state machine: per-row tokens and log-probs, reset and step,
  the decoders (policy and followers) that follow the rows;
- ``acting`` (``acting.py``): the *acting distribution*, the policy LM's next-token distribution,
  restricted by NLPO's nucleus mask or perturbed by ILQL's advantage: tokens are sampled from it and
  every log-prob (the KL term included) is taken under it;
- ``scoring`` (``scoring.py``): a finished episode's score, its KL and where that KL goes;
- ``kl`` (``kl_account.py``): the KL coefficient, the one owner of its controller;
- ``tickets.py``: an agent's policy reads what a step already computed (next-token logits, last
  hidden states, the nucleus mask) through an explicit ticket (``name_rows``, ``cached_outputs``),
  served only while the engine has not moved on since.

``evaluation_copy`` gives an engine over the same models, tokenizer, reward and prompts with rows,
caches and a frozen KL coefficient of its own: evaluating on it changes nothing in this one.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from textgym import kl as klmod
from textgym import lm, models, rewards
from textgym.envs import tickets
from textgym.envs.acting import ACTING_FILE, ActingDistribution
from textgym.envs.config import KL_MODES, TextGenConfig  # noqa: F401  (the engine's config, importable from here)
from textgym.envs.engine_models import EngineModels
from textgym.envs.kl_account import KLAccount
from textgym.envs.rows import EpisodeBatch, EpisodeRows
from textgym.envs.scoring import EpisodeScoring
from textgym.envs.tickets import CachedOutputs, EngineRows
from textgym.prompts import PromptSet, load_prompts, sentiment_prompts
from textgym.prompts import encode_prompt as _encode_prompt
from textgym.timing import PhaseTimer

# What agents use of an engine, and all they use (tests/test_layers.py checks agents/ against it).
AGENT_API = frozenset({
    "cfg", "n", "P", "T", "vocab", "pad_id", "eos_ids", "group_size", "device", "dtype", "timer",
    "model", "tokenizer", "ref_model", "ref_dtype", "peft_model", "attach_lora", "match_reference_weights",
    "keep_hidden_states", "output_embedding", "policy_changed", "shard_models",
    "reset_rows", "step", "observation", "running", "generated", "all_fresh", "episodes", "reset_infos",
    "encode_prompt", "render_text", "acting_logits", "acting", "name_rows", "cached_outputs", "cached_states", "kl",
})


class _Part:
    """A read-only attribute of the engine that one of its parts owns (``engine.<part>.<name>``)."""

    def __init__(self, part: str):
        self.part = part

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, engine: Any, owner: type | None = None) -> Any:
        return self if engine is None else getattr(getattr(engine, self.part), self.name)


class TextGenCore:
    """State and logic of ``n`` independent text-generation episodes, computed in batches.

    What agents use, and all they use (``AGENT_API``; ``agents/`` touches nothing else): the settings (``cfg``,
    ``n``, ``P``, ``T``, ``vocab``, ``pad_id``, ``eos_ids``, ``group_size``, ``device``, ``dtype``),
    the models (``model``, ``tokenizer``, ``ref_model``, ``ref_dtype``, ``peft_model``,
    ``attach_lora``, ``match_reference_weights``, ``keep_hidden_states``, ``output_embedding``,
    ``policy_changed``, ``shard_models``), episodes (``reset_rows``, ``step``, ``observation``, ``running``,
    ``generated``, ``all_fresh``, ``episodes``, ``reset_infos``, ``encode_prompt``), the acting
    distribution (``acting_logits``, ``acting``), tickets (``name_rows``, ``cached_outputs``,
    ``cached_states``), the KL coefficient (``kl``) and the timer (``timer``)."""

    def __init__(self, cfg: TextGenConfig, n: int = 1):
        self.cfg = cfg
        self.P, self.T = int(cfg.max_prompt_tokens), int(cfg.max_new_tokens)
        self.models = EngineModels(cfg)  # policy (LoRA), tokenizer and reference: engine_models.py
        # The same objects for the engine's whole life (LoRA is injected in place), read everywhere.
        self.model, self.tokenizer = self.models.model, self.models.tokenizer
        self.device, self.dtype = self.models.device, self.models.dtype
        self.reward_fn = rewards.as_reward(cfg.reward, **cfg.reward_kwargs)
        self.prompts: PromptSet = load_prompts(
            load_prompts_default() if cfg.prompts is None else cfg.prompts, column=cfg.prompt_column
        )
        self._test_prompts: PromptSet | None = None
        # The KL coefficient's one owner: by default it moves every n finished episodes; an agent
        # takes it over (kl.per_rollout) and moves it once per rollout (textgym.envs.kl_account).
        self.kl = KLAccount(klmod.make_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon))
        self.acting = ActingDistribution(self)  # the policy's own, NLPO's nucleus mask or ILQL's (acting.py)
        self.scoring = EpisodeScoring(self)  # finished episodes: score, KL, its place in the reward (scoring.py)
        self.vocab = models.logits_width(self.model)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self._warned_long_prompt = False
        # Seconds of the reference model's and the reward's work (textgym.timing): the phases nested in
        # an agent's rollout, which is timed on this timer too. Host-side times on CUDA.
        self.timer = PhaseTimer()
        self.group_size = int(cfg.group_size)
        self._init_rows(n)
        if isinstance(cfg.model, (str, Path)) and (Path(cfg.model) / ACTING_FILE).exists():
            self.acting.load(Path(cfg.model))

    def _init_rows(self, n: int) -> None:
        """Fresh rows (``textgym.envs.rows``): per-row state and decoders for ``n`` rows."""
        self.rows = EpisodeRows(self, n)

    # The rows' state is the rows part's (one owner); the engine reads it out.
    groups, n, version, policy, followers, ref = (_Part("rows") for _ in range(6))
    input_ids, attention_mask, length, live, pending = (_Part("rows") for _ in range(5))
    prompt_index, prompt_text, group_id, logp, ref_logp, mask_mass = (_Part("rows") for _ in range(6))

    # --- what agents read and ask: their documented API ----------------------------------------------

    def running(self) -> np.ndarray:
        """Which rows hold a running episode (a copy, bool ``[n]``)."""
        return self.live.copy()

    def generated(self, rows=slice(None)) -> np.ndarray:
        """Tokens generated so far in ``rows`` (a copy)."""
        return self.length[rows].copy()

    def all_fresh(self) -> bool:
        """Whether every row holds an episode that has just started (nothing generated yet)."""
        return bool(self.live.all() and (self.length == 0).all())

    def episodes(self) -> EpisodeBatch:
        """A copy of every row's episode (``textgym.envs.rows.EpisodeBatch``): finished rows keep
        theirs until they are reset."""
        return self.rows.snapshot()

    def reset_infos(self) -> list[dict]:
        """Each row's reset info: its prompt and prompt group."""
        return [{"prompt": p, "group": int(g)} for p, g in zip(self.prompt_text, self.group_id)]

    def policy_changed(self) -> None:
        """The policy's weights changed (an update): re-encode the running rows, so the cached
        logits are the new weights'."""
        self.refresh([self.policy])

    def decoders(self) -> list[lm.IncrementalLM]:
        return self.rows.decoders()

    def add_follower(self, name: str, model) -> lm.IncrementalLM:
        """Decode ``model`` in lockstep with the policy from now on (live rows are encoded at once)."""
        return self.rows.add_follower(name, model)

    def refresh(self, decoders: list[lm.IncrementalLM] | None = None) -> None:
        """Re-encode the live rows, e.g. after the policy's weights changed (``EpisodeRows.refresh``)."""
        self.rows.refresh(decoders)

    @property
    def test_prompts(self) -> PromptSet:
        """The env's held-out prompts (``test_prompts``; by default the shipped test openings when
        the env uses the shipped prompts, else its own prompts), loaded when first asked for."""
        if self._test_prompts is None:
            source = self.cfg.test_prompts
            if source is None:
                source = sentiment_prompts("test") if self.cfg.prompts is None else self.prompts
            self._test_prompts = load_prompts(source, column=self.cfg.prompt_column)
        return self._test_prompts

    def attach_lora(self, lora: dict) -> None:
        """Train LoRA adapters (``peft.LoraConfig`` options) instead of the model's weights: the
        adapters are injected into ``model`` in place. The reference becomes the adapter-free model
        (one LM copy in memory), unless the env was given its own ``ref_model``, which stays. The
        cached rows are re-encoded with the adapted model."""
        self.models.attach_lora(lora)
        if self.ref is not None:
            self.ref.model, self.ref.dtype = self.ref_model, self.ref_dtype
        self.refresh()

    def shard_models(self) -> None:
        """Shard the policy LM, and a reference model of its own, over the data-parallel ranks
        (``textgym.sharding``; every rank calls this). The live rows are re-encoded: the models
        now hold rank 0's weights."""
        self.models.shard()
        self.refresh()

    def match_reference_weights(self) -> None:
        """Give the reference the weight dtypes of the trained policy, parameter by parameter, when
        the reference is the env's own frozen copy of the model. An agent trains float32 master
        weights under autocast to the env's ``dtype`` (``textgym.precision``); a bfloat16 copy of
        the same weights computes differently (norms, residual sums, logits in bfloat16), so the KL
        would start above 0 before any update. Upcast alike, the two compute the same function
        until the policy moves. A reference the user gave (``ref_model``) or the adapter-free model
        of LoRA is left as it is."""
        if self.models.match_reference_weights() and self.ref is not None:
            self.refresh([self.ref])  # per_token mode: cached reference logits of the new weights

    # The models' state is the models part's (one owner): the reference, its precision, LoRA's wrapper.
    ref_model, ref_dtype, peft_model = _Part("models"), _Part("models"), _Part("models")

    # --- the acting distribution (owned by self.acting, textgym.envs.acting) -------------------

    def acting_logits(self, rows=slice(None)) -> torch.Tensor:
        """Logits of the acting distribution for the current observations of ``rows`` (``[k, V]``,
        fp32): what is sampled from, and what every log-prob is taken under."""
        self.ensure_started()
        return self.acting.logits(rows)[0]

    def keep_hidden_states(self) -> None:
        """Keep the policy's last hidden states from now on (a shared value head and ILQL's heads
        read them); the live rows are re-encoded once to have them."""
        if not self.policy.hidden:
            self.policy.hidden = True
            self.refresh([self.policy])

    def output_embedding(self) -> torch.Tensor:
        """The policy LM's output embedding ``[V, H]`` (ILQL's Q heads project onto it)."""
        return self.models.output_embedding()

    # --- cached outputs of named rows -------------------------------------------------------------

    def name_rows(self, rows=None) -> EngineRows:
        """A ticket for the current state of ``rows`` (default: all), handed out with their
        observation (``textgym.envs.tickets``)."""
        return tickets.name_rows(self, rows)

    def cached_outputs(self, named: EngineRows) -> CachedOutputs | None:
        """What the step computed for the rows ``named`` names, or None once stale (``tickets``)."""
        return tickets.cached_outputs(self, named)

    def cached_states(self, named: EngineRows) -> tuple[np.ndarray, torch.Tensor] | None:
        """For a bootstrap: ``(started, states)`` of the named rows, or None (``tickets``)."""
        return tickets.cached_states(self, named)

    def save_policy(self, directory: str | Path | None) -> None:
        """Save the acting policy as a model directory: the policy LM (LoRA adapters merged into a
        copy), its tokenizer and its acting distribution (NLPO's masking model, ILQL's heads, with
        their settings), so that an env made with ``model=directory`` acts exactly as this one:
        what is evaluated is what is saved. A sharded policy (``textgym.sharding``) is gathered by
        every rank, which must all call this; rank 0 writes (the others may pass None)."""
        self.models.save_policy(None if directory is None else Path(directory))
        if directory is not None:
            self.acting.save(Path(directory), self.models.plain_copy)

    # --- evaluation -------------------------------------------------------------------------------

    def evaluation_copy(self, n: int | None = None) -> TextGenCore:
        """An engine of ``n`` rows (default: as many as this one) sharing this one's models,
        tokenizer, reward, prompts and acting distribution, with its own rows and KV caches and a
        frozen copy of the current KL coefficient: playing episodes on it leaves this engine (its
        running episodes, caches and KL controller) exactly as it was. Its reference log-probs come
        from one teacher-forced forward per finished episode (``kl_mode="final"``) whatever this
        engine's mode: the same KL, without a reference forward per generated token."""
        other = copy.copy(self)
        other.cfg = dataclasses.replace(self.cfg, kl_mode="final")
        other.kl = self.kl.frozen()
        other.group_size = 1  # evaluation draws every episode's prompt on its own
        other._init_rows(self.n if n is None else n)
        other.timer = PhaseTimer()  # timing the copy's episodes must not add to this engine's figures
        other.acting = self.acting.copy_for(other)
        other.scoring = EpisodeScoring(other)
        return other

    # --- the KL coefficient (owned by self.kl) ---------------------------------------------------

    @property
    def kl_controller(self) -> klmod.KLController:
        """The KL coefficient's controller (read it; ``self.kl`` moves, saves and restores it)."""
        return self.kl.controller

    # --- episodes -------------------------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt token ids (:func:`textgym.prompts.encode_prompt`), at most ``max_prompt_tokens``: a
        longer prompt is cut from the left, with a warning once per env."""
        return _encode_prompt(self.tokenizer, text, self.cfg.chat_template, self.P,
                              fallback_id=self.eos_ids[0] if self.eos_ids else None, on_cut=self._warn_long_prompt)

    def _warn_long_prompt(self, n_tokens: int) -> None:
        if not self._warned_long_prompt:  # once per env: a prompt set may hold many long prompts
            warnings.warn(
                f"prompt of {n_tokens} tokens is longer than max_prompt_tokens={self.P}: cut from the left "
                "(further long prompts of this env are cut silently)", stacklevel=5,  # at the engine's reset_rows
            )
            self._warned_long_prompt = True

    def reset_rows(self, rows: list[int], rngs: Sequence[np.random.Generator | None],
                   options: dict | None = None) -> None:
        """Start new episodes in ``rows`` (``EpisodeRows.reset``)."""
        self.rows.reset(rows, rngs, options)

    def draw_prompt(self, rng: np.random.Generator) -> tuple[int, str]:
        index = int(rng.integers(len(self.prompts)))
        return index, self.prompts.prompts[index]

    def stop_all(self) -> None:
        """End every episode without scoring it (e.g. before an evaluation borrows the rows)."""
        self.rows.stop_all()

    def ensure_started(self) -> None:
        """Encode the prompts of newly reset rows (``EpisodeRows.ensure_started``)."""
        self.rows.ensure_started()

    def step(self, actions: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[int, dict]]:
        """Append ``actions[i]`` to every row ``i`` where ``rows[i]``; returns rewards, terminated
        flags and the final-step infos of the rows whose episode ended (``EpisodeRows.step``)."""
        return self.rows.step(actions, rows)

    def completion_text(self, row: int) -> str:
        return self.scoring.completion_text(row)

    def observation(self, rows=slice(None)) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids[rows].copy(), "attention_mask": self.attention_mask[rows].copy()}

    def render_text(self, row: int) -> str:
        return f"prompt: {self.prompt_text[row]}\ncompletion: {self.completion_text(row)}"


def load_prompts_default() -> PromptSet:
    return sentiment_prompts("train")


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is not None:
        ids.update([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    return sorted(ids)
