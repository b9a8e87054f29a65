"""DPO: Direct Preference Optimization (Rafailov et al. 2023), offline, from ranked completions.

DPO fits the policy to comparisons "``y_w`` is better than ``y_l`` for prompt ``x``" without a
reward model or a rollout: with the implicit reward ``r(x, y) = beta * (log pi(y|x) - log ref(y|x))``
(sums over the completion's tokens), each comparison's loss is

- ``sigmoid`` (the paper's eq. 7, Bradley-Terry): ``-log sigmoid(r_w - r_l)``;
- ``ipo`` (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", eq. 17): ``(h - 1 / (2 beta))^2`` with ``h = r_w / beta - r_l / beta``, which
  stops at a margin instead of pushing the log-ratio apart without end.

The reference is the env's frozen reference: the base model, or with LoRA the model with its
adapters off (one copy of the LM in memory). Its log-probs of every completion are computed once,
when the agent is made: they never change.

Data: the preference files ``textgym rm`` reads (``textgym.preference_data``: pairs, K-wise
rankings or scored completions; a ranking of K completions gives its C(K, 2) comparisons), or a
recording directory (``textgym record``), whose completions of each prompt are ranked by their
recorded scores, with the exact token ids that were sampled. A gradient step takes ``batch_size``
prompts with all their completions, so each completion is scored once however many comparisons it
takes part in; the loss is the mean over the batch's comparisons. ``eval_fraction`` of the prompts
are held out: after each iteration their preference accuracy (the share of comparisons whose
implicit rewards order the pair as the data does, a tie counting one half, so an untrained policy
scores 0.5) and mean implicit-reward margin ``r_w - r_l`` are logged under ``heldout/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from textgym import lm
from textgym.preference_data import comparisons_from_scores, load_preferences, split_groups
from textgym.recordings import META_FILE, load_recording

from ..offline import OfflineAlgorithm, OfflineLMPolicy, pad_rows

LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class TokenGroup:
    """One prompt's token ids, its distinct completions' and the ``(winner, loser)`` comparisons."""

    prompt_ids: list[int]
    completions: list[list[int]]
    comparisons: list[tuple[int, int]]


def dpo_loss(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float,
             loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-comparison DPO losses and margins ``r_w - r_l`` from the sequence log-probs of the
    winners and losers under the policy and the reference (module docstring)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    h = (policy_w - ref_w) - (policy_l - ref_l)
    losses = -F.logsigmoid(beta * h) if loss_type == "sigmoid" else (h - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * h.detach()


def preference_accuracy(margins: torch.Tensor) -> float:
    """The share of comparisons whose margin ``r_w - r_l`` is positive, a tie counting one half."""
    return float(((margins > 0).float() + 0.5 * (margins == 0).float()).mean())


class DPO(OfflineAlgorithm):
    """DPO (module docstring) on a textgym env.

    :param data: preference data (a file of pairs or rankings that ``textgym rm`` reads, a dataset
        spec) or a recording directory from ``textgym record`` (its completions ranked by score).
    :param batch_size: prompts per gradient step, each with all its completions.
    :param beta: the implicit reward's scale: how far from the reference the policy may move
        (TRL's default 0.1).
    :param loss_type: ``sigmoid`` (DPO) or ``ipo``.
    :param eval_fraction: share of the prompts held out for preference accuracy (0: none).
    """

    algo_name = "dpo"
    data_help = "a preference file that textgym rm reads, or a recording directory from textgym record"
    dataset_attributes = ("_groups", "_held_out", "_ref")

    def __init__(self, policy: type = OfflineLMPolicy, env: Any = None, data: str | dict | None = None,
                 learning_rate: float | None = None, batch_size: int = 8, gradient_steps: int = 8, beta: float = 0.1,
                 loss_type: str = "sigmoid", eval_fraction: float = 0.1, max_grad_norm: float = 1.0, lora: Any = None,
                 seed: int | None = None, device: Any = "auto", tensorboard_log: str | None = None, verbose: int = 0,
                 _init_setup_model: bool = True):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < float("inf"):
            raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
        if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 <= eval_fraction < 1:
            raise ValueError(f"eval_fraction must be a number in [0, 1), got {eval_fraction!r}")
        self.beta, self.loss_type, self.eval_fraction = float(beta), loss_type, float(eval_fraction)
        super().__init__(policy, env, data, learning_rate, batch_size, gradient_steps, max_grad_norm, lora, seed,
                         device, tensorboard_log, verbose, _init_setup_model, beta=beta, loss_type=loss_type,
                         eval_fraction=eval_fraction)

    # --- data -------------------------------------------------------------------------------------

    def _load_data(self) -> None:
        groups = self._read_groups()
        train, held_out = split_groups(groups, self.eval_fraction, self.seed or 0)  # type: ignore[arg-type]
        if not train:
            raise ValueError(f"no preference data left to train on in {self.data!r}")
        self._groups, self._held_out = train, held_out
        # The reference's log-probs of every completion: once, they never change.
        # (in the held-out evaluation's chunks: the same shapes give the same rounding, so an
        # untrained policy's held-out margins are exactly 0)
        self._ref = {}
        chunks = [part[i:i + self.batch_size] for part in (train, held_out)
                  for i in range(0, len(part), self.batch_size)]
        for chunk in chunks:
            ref = self._sequence_log_probs(chunk, self.core.ref_model).cpu()
            for group, part in zip(chunk, torch.split(ref, [len(g.completions) for g in chunk])):
                self._ref[id(group)] = part

    def _read_groups(self) -> list[TokenGroup]:
        core = self.core
        if isinstance(self.data, (str, Path)) and (Path(self.data) / META_FILE).exists():
            return self._groups_from_recording()
        eos = core.eos_ids[0] if core.eos_ids else None
        groups = []
        for group in load_preferences(self.data):
            completions = []
            for text in group.completions:
                ids = core.tokenizer(text, add_special_tokens=False)["input_ids"][:core.T]
                if len(ids) < core.T and eos is not None:  # the env's completions end on EOS when they end early
                    ids = [*ids, eos]
                completions.append(ids)
            groups.append(TokenGroup(core.encode_prompt(group.prompt), completions, list(group.comparisons)))
        return groups

    def _groups_from_recording(self) -> list[TokenGroup]:
        core = self.core
        recording = load_recording(self.data)
        if recording.meta["vocab_size"] != core.vocab:
            raise ValueError(f"recording {str(self.data)!r} holds token ids of a vocabulary of "
                             f"{recording.meta['vocab_size']}, not this env's model's {core.vocab}")
        columns = recording.episodes.select_columns(["prompt", "prompt_ids", "completion_ids", "score"])[:]
        by_prompt: dict[str, dict] = {}
        for prompt, prompt_ids, completion, score in zip(columns["prompt"], columns["prompt_ids"],
                                                         columns["completion_ids"], columns["score"]):
            group = by_prompt.setdefault(prompt, {"prompt_ids": prompt_ids[-core.P:], "completions": {}})
            group["completions"].setdefault(tuple(completion[:core.T]), float(score))  # equal texts merged
        groups = []
        for group in by_prompt.values():
            completions = [list(c) for c in group["completions"]]
            comparisons = comparisons_from_scores(list(group["completions"].values()))
            if comparisons:
                groups.append(TokenGroup(group["prompt_ids"], completions, comparisons))
        if not groups:
            raise ValueError(f"recording {str(self.data)!r} holds no prompt with two completions of different "
                             "scores: record several samples per prompt (textgym record --samples K)")
        return groups

    @property
    def n_examples(self) -> int:
        return len(self._groups)

    # --- the loss ---------------------------------------------------------------------------------

    def _sequence_log_probs(self, groups: list[TokenGroup], model) -> torch.Tensor:
        """``log model(y|x)`` of every completion of ``groups`` in order, ``[sum K]``; gradients
        flow when ``model`` is the trained policy (and grad is on)."""
        core = self.core
        prompts = [g.prompt_ids for g in groups for _ in g.completions]
        completions = [c for g in groups for c in g.completions]
        prompt_ids, prompt_mask = pad_rows(prompts, core.pad_id, True, core.device)
        ids, mask = pad_rows(completions, core.pad_id, False, core.device)
        grad = torch.enable_grad() if model is core.model else torch.no_grad()
        with grad:
            dtype = core.dtype if model is core.model else core.ref_dtype
            return lm.completion_logprobs(model, prompt_ids, prompt_mask, ids, mask, dtype=dtype).sum(1)

    def _margins(self, groups: list[TokenGroup]) -> tuple[torch.Tensor, torch.Tensor]:
        """The losses and margins of every comparison of ``groups``."""
        policy = self._sequence_log_probs(groups, self.core.model)
        ref = torch.cat([self._ref[id(g)] for g in groups]).to(policy.device)
        offsets = np.cumsum([0] + [len(g.completions) for g in groups])
        pairs = torch.as_tensor([(offsets[i] + w, offsets[i] + lose) for i, g in enumerate(groups)
                                 for w, lose in g.comparisons], dtype=torch.long, device=policy.device)
        return dpo_loss(policy[pairs[:, 0]], policy[pairs[:, 1]], ref[pairs[:, 0]], ref[pairs[:, 1]], self.beta,
                        self.loss_type)

    def _loss(self, batch: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        losses, margins = self._margins([self._groups[i] for i in batch])
        return losses.mean(), {"preference_accuracy": preference_accuracy(margins),
                               "reward_margin": float(margins.mean())}

    def _held_out_figures(self) -> dict[str, float]:
        if not self._held_out:
            return {}
        with torch.no_grad():
            margins = torch.cat([self._margins(self._held_out[i:i + self.batch_size])[1]
                                 for i in range(0, len(self._held_out), self.batch_size)])
        return {"preference_accuracy": preference_accuracy(margins), "reward_margin": float(margins.mean())}

    def held_out_figures(self) -> dict[str, float]:
        """Preference accuracy and mean implicit-reward margin on the held-out prompts (empty
        without any)."""
        return self._held_out_figures()
