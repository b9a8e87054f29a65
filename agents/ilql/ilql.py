"""ILQL: Implicit Language Q-Learning (Snell et al. 2022), offline, from recorded episodes.

ILQL is offline RL on exactly textgym's MDP: a state is the text so far, an action a token, and the
reward the env's score on the episode's last token. From episodes someone else played (a
``textgym.recordings`` recording: the untrained model's, a run's) it learns, over the LM's last
hidden state ``s_t`` (heads: ``textgym.ilql``, sized for a CPU):

- two Q heads by regression on ``r_t + gamma * V(s_{t+1})`` (0 after the last token), whose
  Polyak-averaged targets give ``Qhat = min_i Qtarget_i(s_t, a_t)`` (clipped double Q);
- V by expectile regression on ``Qhat``: ``|tau - 1[Qhat < V]| * (Qhat - V)^2``. With tau > 0.5 V
  approaches the best in-data action's value without ever querying an action the data lacks, which
  is the "implicit" in IQL/ILQL (Kostrikov et al. 2021);
- CQL (Kumar et al. 2020): the cross-entropy of each Q head's values over the vocabulary against
  the data's token, which pushes Q down on tokens the data never took;
- AWAC (Nair et al. 2020): the LM's cross-entropy on the data's tokens weighted by
  ``exp(awac_beta * (Qhat - V))``, capped at 20 as AWR does (Peng et al. 2019) so one overrated token
  cannot dominate a batch; ``awac_beta=0`` is behaviour cloning.

``loss = loss_q + loss_v + cql_scale * loss_cql + awac_scale * loss_awac`` (trlX's sum), every
term a mean over the batch's real tokens, from one teacher-forced forward of the LM per episode; the
Q and V losses reach the LM (its LoRA adapters) through the hidden states, as in the paper.

The policy that acts is ``log pi + beta * (Qhat - V)``, top-k kept (trlX's decoding), set as the env's
acting distribution (``textgym.envs.acting``): evaluation samples it, every log-prob and
the KL to the reference are taken under it, and ``textgym train`` saves it (the LM with the heads
and beta). The return is the score alone (scaled by the env's ``score_scale``): the recorded
episodes' KL belongs to the policy that played them, not to the one learned.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from textgym import lm
from textgym.ilql import ILQLDecoding, ILQLHeads
from textgym.recordings import load_recording

from ..offline import OfflineAlgorithm, OfflineLMPolicy, pad_rows

# The AWAC weight's cap (AWR, Peng et al. 2019, clip their exp-advantage weights at 20).
AWAC_WEIGHT_CAP = 20.0


def ilql_losses(q_values: list[torch.Tensor], target_q: torch.Tensor, v: torch.Tensor, log_probs: torch.Tensor,
                actions: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float, tau: float,
                awac_beta: float) -> dict[str, torch.Tensor]:
    """ILQL's four terms on a batch of episodes, each a mean over the real tokens (``mask``).

    :param q_values: each Q head's values over the vocabulary at every state, ``[B, T, V]``.
    :param target_q: ``min_i Qtarget_i`` over the vocabulary, ``[B, T, V]`` (no gradient).
    :param v: V at every state, ``[B, T]``; ``s_t`` is the state before action ``t``.
    :param log_probs: the LM's log-prob of each action, ``[B, T]``.
    :param actions: the episodes' tokens, ``[B, T]``.
    :param rewards: the reward of each action, ``[B, T]`` (the score on the last real one).
    :param mask: 1 on real actions, 0 on padding, ``[B, T]``; each episode ends on its last real action.
    """
    mask = mask.to(v.dtype)
    n = mask.sum().clamp(min=1.0)
    # V(s_{t+1}), 0 after each episode's last action (every episode ends terminated).
    v_next = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1) * torch.cat(
        [mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    q_target = rewards + gamma * v_next.detach()
    index = actions.unsqueeze(-1)
    q_taken = [q.gather(-1, index).squeeze(-1) for q in q_values]
    loss_q = torch.stack([(((q - q_target) ** 2) * mask).sum() / n for q in q_taken]).sum()
    q_hat = target_q.gather(-1, index).squeeze(-1).detach()
    diff = q_hat - v
    loss_v = ((tau - (diff < 0).to(v.dtype)).abs() * diff ** 2 * mask).sum() / n
    loss_cql = torch.stack([(F.cross_entropy(q.flatten(0, 1), actions.flatten(), reduction="none").view_as(mask)
                             * mask).sum() / n for q in q_values]).sum()
    weight = torch.exp(awac_beta * diff.detach()).clamp(max=AWAC_WEIGHT_CAP)
    loss_awac = (-log_probs * weight * mask).sum() / n
    return {"loss_q": loss_q, "loss_v": loss_v, "loss_cql": loss_cql, "loss_awac": loss_awac,
            "awac_weight": (weight * mask).sum() / n, "q": (q_taken[0] * mask).sum() / n, "v": (v * mask).sum() / n}


class ILQL(OfflineAlgorithm):
    """ILQL (module docstring) on a textgym env, from recorded episodes.

    :param data: a recording directory (``textgym record``, ``textgym.recordings``) of episodes of
        this env's task, tokenized by this env's tokenizer.
    :param batch_size: episodes per gradient step.
    :param gamma: discount of the Q target (1: the env's undiscounted return).
    :param tau: the expectile of V's regression, in (0, 1); 0.5 is the mean (SARSA), higher
        approaches the best action in the data (trlX's 0.7).
    :param cql_scale: weight of the CQL term.
    :param awac_scale: weight of the advantage-weighted LM loss.
    :param awac_beta: inverse temperature of the AWAC weight ``exp(awac_beta * (Q - V))`` (0: behaviour
        cloning).
    :param alpha: Polyak rate of the target Q heads after every gradient step. trlX moves them by
        0.001 every 5 steps, which over a CPU-sized run of a few hundred steps leaves them near their
        random start, and decoding reads them: 0.05 per step follows the online heads within about
        20 steps.
    :param two_qs: two Q heads, the minimum of their targets taken.
    :param beta: how far the advantage moves the acting distribution, ``log pi + beta * (Q - V)``.
    :param top_k: tokens kept by the acting distribution at each step (trlX's 20); None: all.
    """

    algo_name = "ilql"
    data_help = "a recording directory from textgym record"
    dataset_attributes = ("_episodes",)

    def __init__(self, policy: type = OfflineLMPolicy, env: Any = None, data: str | None = None,
                 learning_rate: float | None = None, batch_size: int = 16, gradient_steps: int = 16,
                 gamma: float = 1.0, tau: float = 0.7, cql_scale: float = 0.1, awac_scale: float = 1.0,
                 awac_beta: float = 1.0, alpha: float = 0.05, two_qs: bool = True, beta: float = 1.0,
                 top_k: int | None = 20, max_grad_norm: float = 1.0, lora: Any = None, seed: int | None = None,
                 device: Any = "auto", tensorboard_log: str | None = None, verbose: int = 0,
                 _init_setup_model: bool = True):
        for name, value, low, high in (("gamma", gamma, 0.0, 1.0), ("tau", tau, 0.0, 1.0), ("alpha", alpha, 0.0, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high or (
                    name == "tau" and value in (0.0, 1.0)) or (name == "alpha" and value == 0.0):
                valid = {"gamma": "[0, 1]", "tau": "(0, 1)", "alpha": "(0, 1]"}[name]
                raise ValueError(f"{name} must be a number in {valid}, got {value!r}")
        for name, value in (("cql_scale", cql_scale), ("awac_scale", awac_scale), ("awac_beta", awac_beta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.gamma, self.tau, self.alpha = float(gamma), float(tau), float(alpha)
        self.cql_scale, self.awac_scale, self.awac_beta = float(cql_scale), float(awac_scale), float(awac_beta)
        self.two_qs = bool(two_qs)
        ILQLDecoding(ILQLHeads(1, 1), beta, top_k)  # checks beta and top_k before anything is loaded
        self.beta, self.top_k = float(beta), top_k
        super().__init__(policy, env, data, learning_rate, batch_size, gradient_steps, max_grad_norm, lora, seed,
                         device, tensorboard_log, verbose, _init_setup_model, gamma=gamma, tau=tau,
                         cql_scale=cql_scale, awac_scale=awac_scale, awac_beta=awac_beta, alpha=alpha,
                         two_qs=two_qs, beta=beta, top_k=top_k)

    @property
    def heads(self) -> ILQLHeads:
        heads = self.policy.extra
        assert isinstance(heads, ILQLHeads)
        return heads

    def _load_data(self) -> None:
        core = self.core
        recording = load_recording(self.data)
        if recording.meta["vocab_size"] != core.vocab:
            raise ValueError(f"recording {str(self.data)!r} holds token ids of a vocabulary of "
                             f"{recording.meta['vocab_size']}, not this env's model's {core.vocab}: record the "
                             "episodes with this model's tokenizer")
        columns = recording.episodes.select_columns(["prompt_ids", "completion_ids", "score"])[:]
        keep = [i for i, c in enumerate(columns["completion_ids"]) if c]
        if not keep:
            raise ValueError(f"recording {str(self.data)!r} holds no episode with a completion token")
        self._episodes = {"prompt_ids": [columns["prompt_ids"][i][-core.P:] for i in keep],
                          "completion_ids": [columns["completion_ids"][i][:core.T] for i in keep],
                          "reward": [core.cfg.score_scale * float(columns["score"][i]) for i in keep]}

    @property
    def n_examples(self) -> int:
        return len(self._episodes["reward"])

    def _extra_modules(self) -> nn.Module:
        hidden = self.core.output_embedding().shape[1]
        return ILQLHeads(hidden, self.core.vocab, self.two_qs).to(self.device)

    def _after_setup(self) -> None:
        self.core.acting.set_ilql_decoding(self.heads, self.beta, self.top_k)

    def _after_step(self) -> None:
        self.heads.sync_targets(self.alpha)

    def _loss(self, batch: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        core, data = self.core, self._episodes
        prompt_ids, prompt_mask = pad_rows([data["prompt_ids"][i] for i in batch], core.pad_id, True, core.device)
        actions, mask = pad_rows([data["completion_ids"][i] for i in batch], core.pad_id, False, core.device)
        log_probs, states, _ = lm.completion_logprobs(core.model, prompt_ids, prompt_mask, actions, mask, hidden=True,
                                                      dtype=core.dtype)
        states = states.float()  # the heads compute in float32 (their master weights) under any dtype
        lengths = mask.sum(1)
        rewards = torch.zeros(mask.shape, dtype=states.dtype, device=core.device)
        rewards[torch.arange(len(batch)), lengths - 1] = torch.as_tensor([data["reward"][i] for i in batch],
                                                                         dtype=states.dtype, device=core.device)
        embedding = core.output_embedding().detach().float()
        heads = self.heads
        terms = ilql_losses(heads.q(states, embedding), heads.target_q(states, embedding), heads.v(states), log_probs,
                            actions, rewards, mask, gamma=self.gamma, tau=self.tau, awac_beta=self.awac_beta)
        loss = terms["loss_q"] + terms["loss_v"] + self.cql_scale * terms["loss_cql"] + self.awac_scale * terms[
            "loss_awac"]
        return loss, {name: float(value.detach()) for name, value in terms.items()}
