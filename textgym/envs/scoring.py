"""The end of an episode: its completion's text, its score under the reward, its KL to the reference
(teacher-forced through the reference in ``kl_mode="final"``, accumulated per token in
``"per_token"``), where that KL goes (subtracted from the reward as ``kl_coef * k1`` with
``kl_in="reward"``; left to the agent's loss with ``kl_in="loss"``), and the final-step info.

Every finished row of a step is scored in one batch: one reward call, one reference forward.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from textgym import kl as klmod
from textgym import lm


class EpisodeScoring:
    """Scores the finished episodes of one engine (module docstring); reads the engine's rows."""

    def __init__(self, engine: Any):
        self.engine = engine

    def completion_text(self, row: int) -> str:
        """The text of ``row``'s completion (its EOS, when it ended on one, and ids past the
        tokenizer's vocabulary left out)."""
        e = self.engine
        tokens = e.input_ids[row, e.P : e.P + e.length[row]].tolist()
        if e.cfg.stop_on_eos and tokens and tokens[-1] in e.eos_ids:
            tokens = tokens[:-1]
        tokens = [t for t in tokens if t < len(e.tokenizer)]
        return e.tokenizer.decode(tokens, skip_special_tokens=True)

    def episode_tokens(self, row: int) -> dict:
        """The token-level record of ``row``'s finished episode (valid until the row is reset): the
        prompt's ids without padding, the completion's ids (actions), and per action its log-prob
        under the distribution that sampled it and under the reference (``textgym.recordings``)."""
        e = self.engine
        n = int(e.length[row])
        prompt = e.input_ids[row, : e.P][e.attention_mask[row, : e.P].astype(bool)]
        return {"prompt_ids": prompt.tolist(), "completion_ids": e.input_ids[row, e.P : e.P + n].tolist(),
                "logprobs": e.logp[row, :n].tolist(), "ref_logprobs": e.ref_logp[row, :n].tolist()}

    def finish(self, done: np.ndarray, rewards_out: np.ndarray) -> dict[int, dict]:
        """Score the finished rows ``done`` and add the end-of-episode reward to ``rewards_out``,
        all in one batch; the rows stop. Returns their final-step infos."""
        e = self.engine
        done_list = done.tolist()
        completions = [self.completion_text(r) for r in done_list]
        prompts = [e.prompt_text[r] for r in done_list]
        # A prompt passed as text through reset options (index -1) carries no metadata.
        indices = e.prompt_index[done]
        metadata = {} if (indices < 0).any() else e.prompts.metadata_for(indices.tolist())
        with e.timer.phase("reward"):
            scores = e.reward_fn(prompts, completions, **metadata)
        if e.cfg.kl_mode == "final":
            with e.timer.phase("reference"):
                e.ref_logp[done] = self.ref_logprobs(done)  # kept for agents that train on whole episodes
        ref_logp = e.ref_logp[done]
        log_ratio = e.logp[done] - ref_logp  # 0 past each completion's end
        kls = klmod.kl_terms(log_ratio, "k1").sum(1).double().numpy()
        k3s = klmod.kl_terms(log_ratio, "k3").sum(1).double().numpy()  # diagnostic: >= 0, unbiased
        ref_sums = ref_logp.sum(1).double().numpy()
        coef = e.kl.value  # one coefficient for every row finishing now
        penalise = e.cfg.kl_in == "reward" and e.cfg.kl_mode == "final"
        infos = {}
        for j, row in enumerate(done_list):
            rewards_out[row] += e.cfg.score_scale * scores[j] - (coef * kls[j] if penalise else 0.0)
            n_tokens = int(e.length[row])
            infos[row] = {
                "score": float(scores[j]), "kl": float(kls[j]), "kl_k3": float(k3s[j]), "kl_coef": coef,
                "prompt": prompts[j], "completion": completions[j], "length": n_tokens,
                "prompt_index": int(e.prompt_index[row]), "group": int(e.group_id[row]),
                "ref_logprob": float(ref_sums[j]),  # log pi_ref(completion): perplexity under the reference
            }
            if e.acting.nucleus is not None:
                infos[row]["mask_mass"] = float(e.mask_mass[row, :n_tokens].mean())
        e.kl.record(kls)
        e.live[done] = False
        for dec in e.decoders():
            dec.stop(done_list)
        return infos

    @torch.no_grad()
    def ref_logprobs(self, rows: np.ndarray) -> torch.Tensor:
        """Teacher-forced reference log-probs of the completions in ``rows``: ``[k, T]`` on CPU."""
        e = self.engine
        width = int(e.length[rows].max())
        P = e.P
        ids = torch.as_tensor(e.input_ids[rows], device=e.device)
        mask = torch.as_tensor(e.attention_mask[rows], device=e.device)
        logp = lm.completion_logprobs(
            e.ref_model, ids[:, :P], mask[:, :P], ids[:, P : P + width], mask[:, P : P + width], dtype=e.ref_dtype
        )
        out = torch.zeros(len(rows), e.T)
        out[:, :width] = logp.float().cpu()
        return out
