"""The batched engine behind both the single and the vector text-generation environments.

``TextGenCore`` holds ``n`` rows, each an episode: a prompt and the tokens generated so far. One
``step`` is one KV-cached forward of the policy model for all live rows (and of the reference
model in ``kl_mode="per_token"``); rows that finish are scored and, with ``kl_mode="final"``,
teacher-forced through the reference model, all in one batch.

The *acting distribution* is the policy LM's next-token distribution, restricted to the top-p
tokens of a masking model when one is set (NLPO, ``set_nucleus_mask``), or perturbed by ILQL's
advantage when that is set (``set_ilql_decoding``): tokens are sampled from it and every log-prob
(the KL term included) is taken under it.

An agent's policy reads what a step already computed (next-token logits, last hidden states, the
nucleus mask) through an explicit ticket instead of recomputing it: whoever hands out an
observation names the rows it shows (``name_rows``), and ``cached_outputs`` serves those rows only
while the engine has not moved on since (``version``).

``evaluation_copy`` gives an engine over the same models, tokenizer, reward and prompts with rows,
caches and a frozen KL coefficient of its own: evaluating on it changes nothing in this one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from textgym import distributed, lm, models, precision, rewards
from textgym import kl as klmod
from textgym import lora as lora_mod
from textgym.envs.groups import PromptGroups
from textgym.ilql import ILQLDecoding, ILQLHeads
from textgym.prompts import PromptSet, load_prompts, sentiment_prompts
from textgym.prompts import encode_prompt as _encode_prompt
from textgym.timing import PhaseTimer

KL_MODES = ("final", "per_token")
NUCLEUS = "nucleus_mask"  # the follower that decodes the masking model of the acting distribution
# Written beside a saved policy whose acting distribution is masked (see set_nucleus_mask).
ACTING_FILE = "textgym_acting.json"


@dataclass
class TextGenConfig:
    """Keyword arguments of ``textgym/TextGen-v0`` (see ``TextGenEnv`` for their meaning)."""

    model: Any = models.TINY
    tokenizer: Any = None
    reward: Any = "length"
    reward_kwargs: dict = field(default_factory=dict)
    prompts: Any = None  # None: the shipped movie-review openings (train split)
    test_prompts: Any = None  # held-out prompts; None: the shipped test openings, or prompts when given
    prompt_column: str | None = None
    max_new_tokens: int = 32
    max_prompt_tokens: int = 64
    kl_coef: Any = 0.05  # a number, or a textgym.kl.KLController
    kl_target: float | None = None
    kl_horizon: float = klmod.DEFAULT_HORIZON  # episodes (see textgym.kl)
    kl_in: str = "reward"  # where the KL term goes: "reward" (k1) or "loss" (k2, added by the agent)
    kl_estimator: str | None = None  # None: the right one for kl_in (see textgym.kl)
    kl_mode: str = "final"
    group_size: int = 1  # rows come in groups of group_size sharing each prompt (textgym.envs.groups)
    score_scale: float = 1.0  # the reward carries score_scale * score (info["score"] stays unscaled)
    ref_model: Any = None  # None: a frozen copy of model
    stop_on_eos: bool = True
    chat_template: bool = False
    render_mode: str | None = None
    device: Any = None  # None: textgym.precision.default_device() for a model loaded by name
    dtype: Any = "float32"  # the models' precision (textgym.precision.DTYPES), or the torch dtype
    ref_dtype: Any = None  # the reference's precision; None: dtype

    @classmethod
    def from_kwargs(cls, env_id: str = "textgym/TextGen-v0", **kwargs) -> TextGenConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise ValueError(f"unknown keyword(s) for {env_id}: {', '.join(unknown)}; valid: {', '.join(names)}")
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for key in ("max_new_tokens", "max_prompt_tokens", "group_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if self.kl_mode not in KL_MODES:
            raise ValueError(f"unknown kl_mode {self.kl_mode!r}; valid: {', '.join(KL_MODES)}")
        self.kl_estimator = klmod.resolve_estimator(self.kl_in, self.kl_estimator)
        if isinstance(self.score_scale, bool) or not isinstance(self.score_scale, (int, float)) or not (
                np.isfinite(self.score_scale) and self.score_scale > 0):
            raise ValueError(f"score_scale must be a finite number > 0, got {self.score_scale!r}")
        if self.render_mode not in (None, "ansi"):
            raise ValueError(f"unknown render_mode {self.render_mode!r}; valid: None, 'ansi'")
        for key in ("stop_on_eos", "chat_template"):  # "false" would be True
            if not isinstance(getattr(self, key), (bool, np.bool_)):
                raise ValueError(f"{key} must be True or False, got {getattr(self, key)!r}")
        precision.resolve_dtype(self.dtype, "dtype")
        if self.ref_dtype is not None:
            precision.resolve_dtype(self.ref_dtype, "ref_dtype")
        if not isinstance(self.reward_kwargs, dict):
            raise ValueError(
                f"reward_kwargs must be a dict of the reward's options (or {{}}), got {self.reward_kwargs!r}"
            )


@dataclass(frozen=True, eq=False)
class EngineRows:
    """Rows of one engine named as they stood at one moment: the ticket with which the holder of an
    observation of them reads the engine's cached outputs for it (``TextGenCore.cached_outputs``).

    :param engine: the engine whose rows these are.
    :param rows: the row indices, in the observation's order.
    :param version: the engine's ``version`` when they were named; the ticket is stale once the
        engine has moved on (a step, a reset, a stop).
    """

    engine: TextGenCore = field(repr=False)
    rows: tuple[int, ...]
    version: int


@dataclass(frozen=True, eq=False)
class CachedOutputs:
    """What the engine's KV-cached decoding computed for the current state of some rows.

    :param logits: the policy LM's next-token logits ``[k, V]`` (fp32), unmasked.
    :param states: the policy LM's last hidden states ``[k, H]``, or None when the engine does not
        keep them (``IncrementalLM.hidden``).
    :param allowed: with a nucleus mask (``set_nucleus_mask``), the allowed tokens ``[k, V]``; else None.
    """

    logits: torch.Tensor
    states: torch.Tensor | None
    allowed: torch.Tensor | None


class TextGenCore:
    """State and logic of ``n`` independent text-generation episodes, computed in batches."""

    def __init__(self, cfg: TextGenConfig, n: int = 1):
        self.cfg = cfg
        self.P, self.T = int(cfg.max_prompt_tokens), int(cfg.max_new_tokens)
        # Every forward of a model runs under autocast to its precision (lm.forward): the policy's
        # weights may have been upcast to float32 master weights by an agent since they were loaded.
        self.dtype = precision.resolve_dtype(cfg.dtype, "dtype")
        self.ref_dtype = self.dtype if cfg.ref_dtype is None else precision.resolve_dtype(cfg.ref_dtype, "ref_dtype")
        self.model, self.tokenizer = self._load_model(cfg, self.dtype)
        check_position_limit(self.model, self.P, self.T)
        self.device = next(self.model.parameters()).device
        self.ref_model = self._load_ref(cfg)
        self.reward_fn = rewards.as_reward(cfg.reward, **cfg.reward_kwargs)
        self.prompts: PromptSet = load_prompts(
            load_prompts_default() if cfg.prompts is None else cfg.prompts, column=cfg.prompt_column
        )
        self._test_prompts: PromptSet | None = None
        self.kl_controller = klmod.make_controller(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        # KLs of the episodes finished since the controller's last update (None: not tracked, as in
        # an evaluation copy). The controller moves once per batch on the batch's mean KL: by
        # default every n finished episodes; an agent takes over (kl_batch_auto = False) and
        # updates it once per rollout.
        self.kl_batch: list[float] | None = []
        self.kl_batch_auto = True
        self.nucleus: dict | None = None  # {"top_p", "min_tokens_to_keep"} when the acting distribution is masked
        self.ilql: ILQLDecoding | None = None  # when the acting distribution is ILQL's (set_ilql_decoding)
        self.peft_model = None  # the peft wrapper of model, when LoRA adapters are attached (attach_lora)
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
            self._load_acting(Path(cfg.model))

    def _init_rows(self, n: int) -> None:
        """Fresh per-row state and decoders for ``n`` rows."""
        self.groups = PromptGroups(n, self.group_size)  # checks that n is a multiple of group_size
        self.n = n
        self.version = 0  # bumped whenever a row's tokens change: tickets (EngineRows) older than that are stale
        self._stale_cache = False  # set when a step failed after appending tokens (see _advance)
        L = self.P + self.T
        self.input_ids = np.full((n, L), self.pad_id, dtype=np.int64)
        self.attention_mask = np.zeros((n, L), dtype=np.int64)
        self.length = np.zeros(n, dtype=np.int64)  # tokens generated so far
        self.live = np.zeros(n, dtype=bool)  # episode running (reset and not finished)
        self.pending = np.zeros(n, dtype=bool)  # reset, prompt not yet encoded (see ensure_started)
        self.prompt_index = np.zeros(n, dtype=np.int64)
        self.prompt_text = [""] * n
        self.group_id = np.full(n, -1, dtype=np.int64)  # shared by the episodes of one prompt (groups)
        self.logp = torch.zeros(n, self.T)  # log pi(y_t) under the acting distribution, at sampling time
        # log pi_ref(y_t): per_token mode at sampling time; final mode when the episode ends
        self.ref_logp = torch.zeros(n, self.T)
        self.mask_mass = torch.zeros(n, self.T)  # with a nucleus mask: policy probability the mask kept
        self._allowed: tuple | None = None  # (masking decoder, its version, nucleus mask [n, V]): see nucleus_allowed
        # ILQL's heads read the policy's last hidden states at every step
        self.policy = lm.IncrementalLM(self.model, n, dtype=self.dtype, hidden=self.ilql is not None)
        # Models decoded in lockstep with the policy, one KV-cached forward per step each: the
        # reference in per_token mode, and whatever an agent adds (e.g. NLPO's masking policy).
        self.followers: dict[str, lm.IncrementalLM] = {}
        if self.cfg.kl_mode == "per_token":
            self.followers["ref"] = lm.IncrementalLM(self.ref_model, n, dtype=self.ref_dtype)

    @property
    def ref(self) -> lm.IncrementalLM | None:
        return self.followers.get("ref")

    def decoders(self) -> list[lm.IncrementalLM]:
        return [self.policy, *self.followers.values()]

    def add_follower(self, name: str, model) -> lm.IncrementalLM:
        """Decode ``model`` in lockstep with the policy from now on (live rows are encoded at once),
        its forwards in the env's ``dtype``."""
        self.followers[name] = lm.IncrementalLM(model, self.n, dtype=self.dtype)
        self.refresh([self.followers[name]])
        return self.followers[name]

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
        if self.peft_model is not None:
            raise ValueError("LoRA adapters are already attached to this env's model")
        own_reference = self.cfg.ref_model is not None
        self.peft_model = lora_mod.peft_wrap(self.model, lora, own_reference=own_reference)
        if not own_reference:
            self.ref_model = lora_mod.AdapterDisabledRef(self.peft_model)  # the env's frozen copy is dropped
            if self.ref_dtype != self.dtype:
                warnings.warn(f"ref_dtype={precision.dtype_name(self.ref_dtype)} is not used with LoRA: the reference "
                              f"is the adapter-free policy model, in dtype={precision.dtype_name(self.dtype)}",
                              stacklevel=2)
                self.ref_dtype = self.dtype
            if self.ref is not None:
                self.ref.model, self.ref.dtype = self.ref_model, self.ref_dtype
        self.refresh()

    def match_reference_weights(self) -> None:
        """Give the reference the weight dtypes of the trained policy, parameter by parameter, when
        the reference is the env's own frozen copy of the model. An agent trains float32 master
        weights under autocast to the env's ``dtype`` (``textgym.precision``); a bfloat16 copy of
        the same weights computes differently (norms, residual sums, logits in bfloat16), so the KL
        would start above 0 before any update. Upcast alike, the two compute the same function
        until the policy moves. A reference the user gave (``ref_model``) or the adapter-free model
        of LoRA is left as it is."""
        if self.cfg.ref_model is not None or self.peft_model is not None:
            return
        policy_dtypes = {name: param.dtype for name, param in self.model.named_parameters()}
        for name, param in self.ref_model.named_parameters():
            dtype = policy_dtypes.get(name)
            if dtype is not None and param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        if self.ref is not None:
            self.refresh([self.ref])  # per_token mode: cached reference logits of the new weights

    # --- the acting distribution ------------------------------------------------------------------

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
        self.add_follower(NUCLEUS, model)

    def set_ilql_decoding(self, heads: ILQLHeads, beta: float, top_k: int | None) -> None:
        """Act with ILQL's perturbed distribution ``log pi + beta * (Q - V)``, top-k kept
        (``textgym.ilql``); ``heads`` are used as they are (an agent training them shares them)."""
        if self.nucleus is not None:
            raise ValueError("this env already acts with a nucleus mask (NLPO's): ILQL's decoding replaces the "
                             "policy's distribution and cannot be combined with it")
        if heads.vocab_size != self.vocab:
            raise ValueError(f"ILQL heads over {heads.vocab_size} logits do not fit this model's {self.vocab}")
        self.ilql = ILQLDecoding(heads, beta, top_k)
        if not self.policy.hidden:
            self.policy.hidden = True
            self.refresh([self.policy])

    def output_embedding(self) -> torch.Tensor:
        """The policy LM's output embedding ``[V, H]`` (ILQL's Q heads project onto it)."""
        return self.model.get_output_embeddings().weight

    @property
    def nucleus_model(self):
        return self.followers[NUCLEUS].model if self.nucleus else None

    def allowed_tokens(self, mask_logits: torch.Tensor) -> torch.Tensor:
        """The nucleus mask ``[N, V]`` that the masking model's logits give."""
        if self.nucleus is None:
            raise RuntimeError("no nucleus mask is set: call set_nucleus_mask() first")
        return lm.top_p_mask(mask_logits, self.nucleus["top_p"], self.nucleus["min_tokens_to_keep"])

    def nucleus_allowed(self, rows=slice(None)) -> torch.Tensor:
        """The nucleus mask of the current observations of ``rows``. Computed for every row once
        per state of the masking model's logits (a vocabulary sort each), i.e. once per step: the
        policy's sampling (``cached_outputs``, ``acting_logits``) and the step's log-prob and kept
        mass share it."""
        dec = self.followers[NUCLEUS]
        if self._allowed is None or self._allowed[0] is not dec or self._allowed[1] != dec.version:
            self._allowed = (dec, dec.version, self.allowed_tokens(dec.logits))
        return self._allowed[2][rows]

    def acting_logits(self, rows=slice(None)) -> torch.Tensor:
        """Logits of the acting distribution for the current observations of ``rows`` (``[k, V]``,
        fp32): what is sampled from, and what every log-prob is taken under."""
        self.ensure_started()
        logits = self.policy.logits[rows]
        if self.ilql is not None:
            return self._ilql_logits(logits, rows)
        if self.nucleus is None:
            return logits
        return lm.mask_logits(logits, self.nucleus_allowed(rows))

    def _ilql_logits(self, logits: torch.Tensor, rows) -> torch.Tensor:
        assert self.ilql is not None and self.policy.states is not None  # hidden states kept (set_ilql_decoding)
        return self.ilql.logits(logits, self.policy.states[rows], self.output_embedding())

    # --- cached outputs of named rows -------------------------------------------------------------

    def name_rows(self, rows=None) -> EngineRows:
        """A ticket for the current state of ``rows`` (default: all), to be handed out with their
        observation (see ``cached_outputs``)."""
        rows = range(self.n) if rows is None else rows
        return EngineRows(self, tuple(int(r) for r in rows), self.version)

    def _current(self, named: EngineRows) -> bool:
        if named.engine is not self:
            raise ValueError("these EngineRows name the rows of another engine: ask the engine that named them")
        return named.version == self.version and bool(self.live[list(named.rows)].all())

    def _index(self, rows: tuple[int, ...]):
        """Index of ``rows`` into the decoders' ``[n, ...]`` tensors (all rows: no copy)."""
        return slice(None) if rows == tuple(range(self.n)) else torch.as_tensor(rows, device=self.device)

    def cached_outputs(self, named: EngineRows) -> CachedOutputs | None:
        """The outputs the KV-cached step computed for the current observations of the rows
        ``named`` names (pending prompts are encoded first), or None when the ticket is stale: the
        engine moved on since the rows were named, or one of them is not running. Nothing else is
        ever served: an observation without a current ticket must be computed afresh."""
        if not self._current(named):
            return None
        self.ensure_started()
        index = self._index(named.rows)
        states = self.policy.states[index] if self.policy.states is not None else None
        allowed = None
        if self.nucleus is not None:
            allowed = self.nucleus_allowed(index)
        return CachedOutputs(self.policy.logits[index], states, allowed)

    def cached_states(self, named: EngineRows) -> tuple[np.ndarray, torch.Tensor] | None:
        """For a bootstrap: ``(started, states)``, where ``started`` (bool ``[k]``) marks the named
        rows whose prompts are encoded and ``states`` are their cached last hidden states. Rows
        reset by the last step (pending) are left unencoded: their episodes just ended, so their
        bootstrap is multiplied by ``1 - done = 0``, and their prompts are encoded when first needed,
        with the weights of then. None when the ticket is stale or no hidden states are kept."""
        if not self._current(named) or self.policy.states is None:
            return None
        started = ~self.pending[list(named.rows)]
        rows = torch.as_tensor(np.asarray(named.rows)[started], dtype=torch.long, device=self.device)
        return started, self.policy.states[rows]

    def save_policy(self, directory: str | Path) -> None:
        """Save the acting policy as a model directory: the policy LM (LoRA adapters merged into a
        copy), its tokenizer and, with a nucleus mask, the masking model and its settings, so that
        an env made with ``model=directory`` acts exactly as this one: what is evaluated is what
        is saved. ILQL's decoding is saved as its heads (safetensors) and settings."""
        directory = Path(directory)
        self._plain_copy(self.model).save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.nucleus is not None:
            self._plain_copy(self.nucleus_model).save_pretrained(directory / NUCLEUS)
            self.tokenizer.save_pretrained(directory / NUCLEUS)  # a loadable model directory of its own
            (directory / ACTING_FILE).write_text(json.dumps({"nucleus_mask": {**self.nucleus, "model": NUCLEUS}}))
        if self.ilql is not None:
            (directory / ACTING_FILE).write_text(json.dumps({"ilql": self.ilql.save(directory)}))

    def _plain_copy(self, model):
        """``model`` as a plain Hugging Face model: with LoRA attached (``peft_model``), a merged
        copy carrying ``model``'s weights (``model`` is the policy or a copy of it)."""
        if self.peft_model is None:
            return model
        merged = copy.deepcopy(self.peft_model)
        if model is not self.model:
            merged.base_model.model.load_state_dict(model.state_dict())
        return merged.merge_and_unload()

    def _load_acting(self, directory: Path) -> None:
        acting = json.loads((directory / ACTING_FILE).read_text())
        if not isinstance(acting, dict) or len(acting) != 1 or next(iter(acting)) not in ("nucleus_mask", "ilql"):
            raise ValueError(f"{str(directory / ACTING_FILE)!r} must hold one of 'nucleus_mask', 'ilql', "
                             f"got {acting!r}")
        if "ilql" in acting:
            decoding = ILQLDecoding.load(directory, acting["ilql"], self.device)
            self.set_ilql_decoding(decoding.heads, decoding.beta, decoding.top_k)
            return
        spec = acting["nucleus_mask"]
        mask_model, _ = models.load(directory / spec["model"], device=self.device, dtype=self.dtype)
        self.set_nucleus_mask(mask_model, spec["top_p"], spec["min_tokens_to_keep"])

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
        other.kl_controller = klmod.FixedKLController(self.kl_controller.value)
        other.kl_batch, other.kl_batch_auto = None, False
        other.group_size = 1  # evaluation draws every episode's prompt on its own
        other._init_rows(self.n if n is None else n)
        other.timer = PhaseTimer()  # timing the copy's episodes must not add to this engine's figures
        if self.nucleus is not None:
            other.followers[NUCLEUS] = lm.IncrementalLM(self.nucleus_model, other.n, dtype=self.dtype)
        return other

    # --- the KL controller ------------------------------------------------------------------------

    def update_kl_controller(self, across_ranks: bool = False) -> float | None:
        """Move the KL coefficient once, on the mean KL of the episodes finished since the last
        update (Ziegler et al. 2019's rule, n = their number). Returns that mean, or None when no
        episode finished. ``across_ranks``: data-parallel (``textgym.distributed``), the mean and
        number of the episodes of every rank's engine, so every rank's coefficient moves alike;
        all ranks must then call together (an agent does, once per rollout)."""
        if across_ranks and distributed.is_initialized():
            kls = self.kl_batch or []
            total, count = distributed.all_reduce_sum([float(np.sum(kls)), len(kls)])
            if self.kl_batch is not None:
                self.kl_batch = []
            if not count:
                return None
            self.kl_controller.update(float(total / count), n_steps=int(count))
            return float(total / count)
        if not self.kl_batch:
            return None
        mean = float(np.mean(self.kl_batch))
        self.kl_controller.update(mean, n_steps=len(self.kl_batch))
        self.kl_batch = []
        return mean

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
        width = self.P + int(self.length[rows].max())
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for j, row in enumerate(rows):  # right-align each row's prompt + completion
            n = self.P + int(self.length[row])
            ids[j, width - n :], mask[j, width - n :] = self.input_ids[row, :n], self.attention_mask[row, :n]
        ids_t, mask_t = torch.as_tensor(ids, device=self.device), torch.as_tensor(mask, device=self.device)
        for dec in decoders:
            dec.clear()
            dec.start(rows, ids_t, mask_t)

    # --- construction ---------------------------------------------------------------------------

    @staticmethod
    def _load_model(cfg: TextGenConfig, dtype: torch.dtype):
        """The policy LM, in ``dtype`` (a model object is cast to it, as it is moved to ``device``)."""
        device = cfg.device
        if isinstance(cfg.model, torch.nn.Module):
            # Any: a transformers model, or a wrapper forwarding its attributes (peft's); nn.Module's
            # typing would see ``model.config`` as a tensor or a submodule
            model: Any = cfg.model
            tokenizer = cfg.tokenizer
            if tokenizer is None:
                # imported on use: a slow import, needed only for a model object given without tokenizer
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(model.config.name_or_path)
            model.to(device=device, dtype=dtype)
            models.prepare(model, tokenizer)
            return model, tokenizer
        if not isinstance(cfg.model, str):
            raise ValueError(f"model must be a name, a path or a loaded causal LM, got {type(cfg.model).__name__}")
        if device is None:
            device = precision.default_device()
        model, tokenizer = models.load(cfg.model, device=device, dtype=dtype)
        if cfg.tokenizer is not None:
            tokenizer = models.prepare(model, cfg.tokenizer)
        return model, tokenizer

    def _load_ref(self, cfg: TextGenConfig):
        ref = cfg.ref_model
        if ref is None:
            ref = copy.deepcopy(self.model)
        elif isinstance(ref, str):
            ref, _ = models.load(ref, device=self.device, dtype=self.ref_dtype)
        elif not isinstance(ref, torch.nn.Module):
            raise ValueError(f"ref_model must be None, a name, a path or a loaded model, got {type(ref).__name__}")
        if ref is self.model:
            raise ValueError(
                "ref_model is the policy model itself: the KL would be 0 whatever the policy does, and freezing "
                "the reference would freeze the policy. Pass ref_model=None (a frozen copy) or a separate model"
            )
        models.disable_dropout(ref)
        # Frozen: its weights stored in its own precision, no float32 master copy needed. Buffers keep
        # theirs (``.to(dtype)`` would cast them too: transformers keeps RoPE's inv_freq in float32,
        # and a bfloat16 one moves every position's rotation, so the copy would not compute as the model).
        for param in ref.parameters():
            if param.is_floating_point() and param.dtype != self.ref_dtype:
                param.data = param.data.to(self.ref_dtype)
        ref.eval()
        ref.requires_grad_(False)
        if models.logits_width(ref) != models.logits_width(self.model):
            raise ValueError(
                f"ref_model emits {models.logits_width(ref)} logits but model emits {models.logits_width(self.model)}: "
                "they must share a vocabulary"
            )
        return ref

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
                "(further long prompts of this env are cut silently)", stacklevel=4,  # encode_prompt's caller
            )
            self._warned_long_prompt = True

    def reset_rows(self, rows: list[int], rngs: Sequence[np.random.Generator | None],
                   options: dict | None = None) -> None:
        """Start new episodes in ``rows``: sample a prompt with the rows' RNGs (or take the one in
        ``options``: ``prompt`` text or ``prompt_index``, where the RNGs may be None). With
        ``group_size`` > 1 rows share prompts by groups, as ``textgym.envs.groups`` describes
        (seeding included). Their prompts are encoded, all in one forward, when their logits are
        first needed (``ensure_started``)."""
        options = check_reset_options(options, len(self.prompts))
        if not rows:
            return
        fixed = None
        if "prompt" in options:
            fixed = (-1, options["prompt"])
        elif "prompt_index" in options:
            fixed = (options["prompt_index"], self.prompts.prompts[options["prompt_index"]])
        picks = self.groups.pick(rows, rngs, self._draw_prompt, fixed)
        ids = np.full((len(rows), self.P), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), self.P), dtype=np.int64)
        for j, (row, (group, (index, text))) in enumerate(zip(rows, picks)):
            tokens = self.encode_prompt(text)
            ids[j, self.P - len(tokens) :] = tokens
            mask[j, self.P - len(tokens) :] = 1
            self.prompt_index[row], self.prompt_text[row], self.group_id[row] = index, text, group
        self.input_ids[rows] = self.pad_id
        self.attention_mask[rows] = 0
        self.input_ids[rows, : self.P], self.attention_mask[rows, : self.P] = ids, mask
        self.length[rows] = 0
        self.live[rows] = True
        self.logp[rows] = 0.0
        self.ref_logp[rows] = 0.0
        self.mask_mass[rows] = 0.0
        self.pending[rows] = True
        self.version += 1

    def _draw_prompt(self, rng: np.random.Generator) -> tuple[int, str]:
        index = int(rng.integers(len(self.prompts)))
        return index, self.prompts.prompts[index]

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
        ids = torch.as_tensor(self.input_ids[rows, : self.P], device=self.device)
        mask = torch.as_tensor(self.attention_mask[rows, : self.P], device=self.device)
        for dec in self.decoders():
            with self.timer.phase("reference" if dec is self.ref else None):  # per_token: its own phase
                dec.start(rows, ids, mask)
        self.pending[rows] = False

    def check_actions(self, actions: np.ndarray, rows: np.ndarray) -> np.ndarray:
        actions = np.asarray(actions)
        if actions.dtype.kind not in "iu":
            if actions.dtype.kind == "f" and np.all(np.isfinite(actions)) and np.all(actions == np.round(actions)):
                actions = actions.astype(np.int64)
            else:
                bad = actions.flat[0] if actions.size == 1 else actions
                raise ValueError(f"action must be an integer token id in [0, {self.vocab}), got {bad!r}")
        bad = rows & ((actions < 0) | (actions >= self.vocab))
        if bad.any():
            raise ValueError(f"action {actions[bad][0]!r} out of range: valid token ids are [0, {self.vocab})")
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
        acts = torch.as_tensor(actions[idx], device=self.device)
        idx_t = torch.as_tensor(idx, device=self.device)
        logits = self.policy.logits[idx_t]
        if self.nucleus is not None:  # one mask serves the log-prob and the kept mass
            allowed = self.nucleus_allowed(idx_t)
            self.mask_mass[idx, t] = (torch.softmax(logits, -1) * allowed).sum(-1).cpu()
            logits = lm.mask_logits(logits, allowed)
        if self.ilql is not None:
            logits = self._ilql_logits(logits, idx_t)
        logp = _token_logp(logits, acts)  # under the distribution that acts
        self.logp[idx, t] = logp.cpu()
        if self.ref is not None:
            ref_logp = _token_logp(self.ref.logits[idx_t], acts)
            self.ref_logp[idx, t] = ref_logp.cpu()
            if self.cfg.kl_in == "reward":  # k1 per token (see textgym.kl)
                rewards_out[idx] -= self.kl_controller.value * (logp - ref_logp).double().cpu().numpy()

        self.input_ids[idx, self.P + t] = actions[idx]
        self.attention_mask[idx, self.P + t] = 1
        self.length[idx] += 1
        self.version += 1
        done = np.zeros(self.n, dtype=bool)
        done[idx] = self.length[idx] >= self.T
        if self.cfg.stop_on_eos:
            done[idx] |= np.isin(actions[idx], self.eos_ids)
        infos = self._finish_or_undo(np.flatnonzero(done), rewards_out, idx, t) if done.any() else {}
        if self.kl_batch_auto and self.kl_batch is not None and len(self.kl_batch) >= self.n:
            self.update_kl_controller()  # after the step: rows finishing together share one coefficient

        going = rows & ~done
        if going.any():
            self._advance(torch.as_tensor(actions, device=self.device), torch.as_tensor(going, device=self.device))
        return rewards_out, done, infos

    def _finish_or_undo(self, done: np.ndarray, rewards_out: np.ndarray, idx: np.ndarray, t: np.ndarray) -> dict:
        """``_finish``; if it raises (a reward, the tokenizer or the reference model failed), the
        step's tokens are taken back, so the step can be retried or the episodes reset."""
        try:
            return self._finish(done, rewards_out)
        except BaseException:
            self.input_ids[idx, self.P + t] = self.pad_id
            self.attention_mask[idx, self.P + t] = 0
            self.length[idx] = t
            raise

    def _advance(self, actions: torch.Tensor, going: torch.Tensor) -> None:
        """Feed the new tokens to every decoder; if a forward fails, the caches are rebuilt from the
        tokens before the next step's logits are used."""
        try:
            for dec in self.decoders():
                with self.timer.phase("reference" if dec is self.ref else None):  # per_token: its own phase
                    dec.advance(actions, going)
        except BaseException:
            self._stale_cache = True
            raise

    def episode_tokens(self, row: int) -> dict:
        """The token-level record of ``row``'s finished episode (valid until the row is reset): the
        prompt's ids without padding, the completion's ids (actions), and per action its log-prob
        under the distribution that sampled it and under the reference (``textgym.recordings``)."""
        n = int(self.length[row])
        prompt = self.input_ids[row, : self.P][self.attention_mask[row, : self.P].astype(bool)]
        return {"prompt_ids": prompt.tolist(), "completion_ids": self.input_ids[row, self.P : self.P + n].tolist(),
                "logprobs": self.logp[row, :n].tolist(), "ref_logprobs": self.ref_logp[row, :n].tolist()}

    def completion_text(self, row: int) -> str:
        tokens = self.input_ids[row, self.P : self.P + self.length[row]].tolist()
        if self.cfg.stop_on_eos and tokens and tokens[-1] in self.eos_ids:
            tokens = tokens[:-1]
        tokens = [t for t in tokens if t < len(self.tokenizer)]
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _finish(self, done: np.ndarray, rewards_out: np.ndarray) -> dict[int, dict]:
        """Score the finished rows and add the end-of-episode reward, all in one batch."""
        done_list = done.tolist()
        completions = [self.completion_text(r) for r in done_list]
        prompts = [self.prompt_text[r] for r in done_list]
        # A prompt passed as text through reset options (index -1) carries no metadata.
        indices = self.prompt_index[done]
        metadata = {} if (indices < 0).any() else self.prompts.metadata_for(indices.tolist())
        with self.timer.phase("reward"):
            scores = self.reward_fn(prompts, completions, **metadata)
        if self.cfg.kl_mode == "final":
            with self.timer.phase("reference"):
                self.ref_logp[done] = self.ref_logprobs(done)  # kept for agents that train on whole episodes
        ref_logp = self.ref_logp[done]
        log_ratio = self.logp[done] - ref_logp  # 0 past each completion's end
        kls = klmod.kl_terms(log_ratio, "k1").sum(1).double().numpy()
        k3s = klmod.kl_terms(log_ratio, "k3").sum(1).double().numpy()  # diagnostic: >= 0, unbiased
        ref_sums = ref_logp.sum(1).double().numpy()
        coef = self.kl_controller.value  # one coefficient for every row finishing now
        penalise = self.cfg.kl_in == "reward" and self.cfg.kl_mode == "final"
        infos = {}
        for j, row in enumerate(done_list):
            rewards_out[row] += self.cfg.score_scale * scores[j] - (coef * kls[j] if penalise else 0.0)
            n_tokens = int(self.length[row])
            infos[row] = {
                "score": float(scores[j]), "kl": float(kls[j]), "kl_k3": float(k3s[j]), "kl_coef": coef,
                "prompt": prompts[j], "completion": completions[j], "length": n_tokens,
                "prompt_index": int(self.prompt_index[row]), "group": int(self.group_id[row]),
                "ref_logprob": float(ref_sums[j]),  # log pi_ref(completion): perplexity under the reference
            }
            if self.nucleus is not None:
                infos[row]["mask_mass"] = float(self.mask_mass[row, :n_tokens].mean())
        if self.kl_batch is not None:
            self.kl_batch.extend(float(k) for k in kls)
        self.live[done] = False
        for dec in self.decoders():
            dec.stop(done_list)
        return infos

    @torch.no_grad()
    def ref_logprobs(self, rows: np.ndarray) -> torch.Tensor:
        """Teacher-forced reference log-probs of the completions in ``rows``: ``[k, T]`` on CPU."""
        width = int(self.length[rows].max())
        P = self.P
        ids = torch.as_tensor(self.input_ids[rows], device=self.device)
        mask = torch.as_tensor(self.attention_mask[rows], device=self.device)
        logp = lm.completion_logprobs(
            self.ref_model, ids[:, :P], mask[:, :P], ids[:, P : P + width], mask[:, P : P + width], dtype=self.ref_dtype
        )
        out = torch.zeros(len(rows), self.T)
        out[:, :width] = logp.float().cpu()
        return out

    def observation(self, rows=slice(None)) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids[rows].copy(), "attention_mask": self.attention_mask[rows].copy()}

    def render_text(self, row: int) -> str:
        return f"prompt: {self.prompt_text[row]}\ncompletion: {self.completion_text(row)}"


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


def check_position_limit(model, max_prompt_tokens: int, max_new_tokens: int) -> None:
    """Prompt plus completion must fit the model's positions (``max_position_embeddings``)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and max_prompt_tokens + max_new_tokens > limit:
        raise ValueError(
            f"max_prompt_tokens + max_new_tokens = {max_prompt_tokens} + {max_new_tokens} = "
            f"{max_prompt_tokens + max_new_tokens} exceeds the model's {limit} positions (max_position_embeddings)"
        )


def load_prompts_default() -> PromptSet:
    return sentiment_prompts("train")


def _token_logp(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is not None:
        ids.update([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    return sorted(ids)
