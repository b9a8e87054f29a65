"""``textgym/TextGen-v0``: text generation by a causal LM as a Gymnasium environment."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from textgym.envs.config import TextGenConfig
from textgym.envs.core import TextGenCore


def make_spaces(core: TextGenCore) -> tuple[spaces.Dict, spaces.Discrete]:
    L = core.P + core.T
    high = max(core.vocab - 1, core.pad_id)
    observation = spaces.Dict({
        "input_ids": spaces.Box(0, high, shape=(L,), dtype=np.int64),
        "attention_mask": spaces.Box(0, 1, shape=(L,), dtype=np.int64),
    })
    return observation, spaces.Discrete(core.vocab)


class _CoreViews:
    """Handy views of the engine for agents and users: the policy LM, reference, tokenizer, KL controller."""

    core: TextGenCore

    @property
    def model(self):
        return self.core.model

    @property
    def ref_model(self):
        return self.core.ref_model

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def kl_controller(self):
        return self.core.kl_controller


class TextGenEnv(_CoreViews, gym.Env):
    """Generate a completion of a prompt, one token per step, rewarded by a reward function minus a
    KL penalty against a frozen reference model.

    ## Description
    Each episode samples a prompt from ``prompts`` with the env's seeded RNG. The agent appends one
    token per step; at the end the reward function scores (prompt, completion). ``env.unwrapped.model``
    is the policy LM whose log-probabilities define the KL term: agents in ``agents/`` train this very
    module; an outside agent passes its own LM as ``model``. Each step runs one KV-cached forward of
    the model, so ``env.unwrapped.next_token_logits()`` gives the policy's distribution for free.

    ## Action Space
    ``Discrete(V)``: a token id, with ``V`` the model's logits width (``model.config.vocab_size``,
    not ``tokenizer.vocab_size``).

    ## Observation Space
    ``Dict(input_ids, attention_mask)``: int64 ``Box``es of length ``max_prompt_tokens +
    max_new_tokens``. The prompt is left-padded into the first ``max_prompt_tokens`` entries; the
    generated tokens follow, right-padded with the pad token (mask 0).

    ## Rewards
    0 on intermediate steps; on the last step ``score - kl_coef * KL``, where ``KL`` sums
    ``k1 = log pi(y_t) - log pi_ref(y_t)`` over the generated tokens, ``pi`` being the distribution
    that sampled them. With ``kl_mode="per_token"`` each step instead gets ``-kl_coef * k1_t`` and the
    last step adds ``score``. With ``kl_in="loss"`` the reward is the score alone and the agent adds
    ``kl_coef * k2`` to its loss (only these two placements have the gradient of KL(pi || pi_ref):
    see ``textgym.kl``). ``score_scale`` multiplies the score in the reward. The last step's
    ``info`` holds ``score`` (unscaled), ``kl`` (k1 sum), ``kl_k3`` (a diagnostic, >= 0),
    ``kl_coef``, ``prompt``, ``completion``, ``length``, ``ref_logprob``, ``prompt_index`` (-1 for a
    prompt given as text), ``group`` (an id shared by the episodes of one prompt with
    ``group_size`` > 1, new for every episode otherwise) and, with a nucleus mask, ``mask_mass``
    (mean policy probability the mask kept).

    ## Starting State
    A prompt drawn from ``prompts`` with the env's RNG, encoded (left-padded) into the observation;
    no token generated yet.

    ## Episode End
    ``terminated=True`` when the token is EOS (with ``stop_on_eos``) or ``max_new_tokens`` tokens have
    been generated. ``truncated`` is always False: the episode really ends there, so no bootstrapping.

    ## Arguments
    - ``model``: name (``"textgym/tiny"``, ``"textgym/smollm2-135m"``, hub id), local directory, or a
      loaded causal LM (then pass ``tokenizer`` too). Default ``"textgym/tiny"``.
    - ``tokenizer``: a tokenizer overriding the model's.
    - ``reward``: registered reward name (``textgym.rewards.names()``), callable or ``Reward``;
      ``reward_kwargs`` are passed to it. Default ``"length"``.
    - ``prompts``: list of strings, a ``.txt``/``.jsonl``/``.json``/``.csv``/``.parquet`` file, a
      ``datasets`` dataset or spec ``{"dataset": ..., "split": ..., "column": ...}``; default: the
      shipped movie-review openings. ``prompt_column`` picks the column of tabular prompts.
    - ``test_prompts``: the held-out prompts that evaluations complete (``env.unwrapped.core.test_prompts``);
      default: the shipped test openings with the shipped prompts, else ``prompts`` themselves.
    - ``max_new_tokens`` (32), ``max_prompt_tokens`` (64): longer prompts are cut from the left, with a warning.
    - ``kl_coef`` (0.05, or a ``textgym.kl.KLController``); ``kl_target`` makes it adaptive
      (Ziegler et al. 2019) with ``kl_horizon`` episodes (32: up to 10% a batch of 16, see
      ``textgym.kl``), moved once per batch of ``num_envs``
      episodes (once per rollout under an agent) on their mean KL; ``kl_in`` in reward (default),
      loss; ``kl_estimator`` (None: k1 in the reward, k2 in the loss; other pairs are refused);
      ``kl_mode`` in final, per_token; ``score_scale`` (1.0).
    - ``group_size`` (1): with the vector env, rows come in groups of ``group_size`` consecutive rows
      whose episodes share one prompt, each group drawing a fresh prompt (for GRPO, RLOO; seeding
      in ``textgym.envs.groups``); ``num_envs`` must be a multiple of it.
    - ``ref_model``: the reference (default: a frozen copy of ``model``; never ``model`` itself).
    - ``stop_on_eos`` (True), ``chat_template`` (False: wrap prompts with the tokenizer's chat
      template as a user turn), ``render_mode`` (None or "ansi"), ``device`` (default: the model's,
      else ``textgym.precision.default_device()``: ``cuda:LOCAL_RANK`` under torchrun, else CUDA when
      available, else CPU).
    - ``dtype`` ("float32", or "bfloat16", "float16"): the precision the models are loaded in (a
      model object is cast to it) and their forwards run in (autocast); log-probs and the KL are
      float32 maths whatever it is. ``ref_dtype`` (None: ``dtype``): the reference's own, e.g.
      "bfloat16" to halve its memory beside a float32 policy.
    - ``quantize`` (None, "int8" or "nf4"): the model's linear weights in int8 (torchao's
      weight-only quantization) or 4-bit NormalFloat (bitsandbytes', QLoRA's base; a model given by
      name or path), ``textgym.quantization``, as are a ``ref_model`` named by string; an agent then
      trains LoRA adapters over that frozen base (``lora``; refused without), and the same quantized
      model acts, scores the update and, adapters off, is the reference.

    ``reset(options={"prompt": text})`` or ``options={"prompt_index": i}`` picks the prompt.

    ## Version History
    - v0: initial version; KL placement (``kl_in``), batch-level KL controller, acting
      distribution with a nucleus mask, group sampling (``group_size``). Since 0.1: ``kl_horizon``
      defaults to 32 episodes (was 10000, under which ``kl_target`` could not move the coefficient
      at textgym's batch sizes). Since 0.2: ``quantize`` ("int8", and "nf4").
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, **kwargs: Any):
        cfg = TextGenConfig.from_kwargs(self.env_id, **kwargs)
        self.core = TextGenCore(cfg, n=1)
        self.render_mode = cfg.render_mode
        self.observation_space, self.action_space = make_spaces(self.core)

    env_id = "textgym/TextGen-v0"

    def next_token_logits(self):
        """The acting distribution's next-token logits for the current observation, ``[V]`` (fp32):
        the policy LM's, masked when a nucleus mask is set (NLPO)."""
        return self.core.acting_logits(0)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.core.reset_rows([0], [self.np_random], options)
        return self.core.observation(0), {"prompt": self.core.prompt_text[0]}

    def step(self, action):
        if not self.core.live[0]:
            raise RuntimeError("step() called after the episode ended: call reset() first")
        rewards, done, infos = self.core.step(np.asarray(action).reshape(1), np.array([True]))
        return self.core.observation(0), float(rewards[0]), bool(done[0]), False, infos.get(0, {})

    def render(self):
        if self.render_mode == "ansi":
            return self.core.render_text(0)
        return None


class TextGenVectorEnv(_CoreViews, gym.vector.VectorEnv):
    """``num_envs`` TextGen episodes computed in batches: one model forward per step for all of
    them, the KV cache reused across steps, rewards and reference log-probs of the episodes that
    end computed together. Same spaces and results as ``num_envs`` single envs seeded
    ``seed, seed + 1, ...``; autoreset mode ``NEXT_STEP`` like Gymnasium's ``SyncVectorEnv``. With
    ``group_size=G`` rows come in groups of G sharing each prompt (``textgym.envs.groups``)."""

    metadata = {"render_modes": ["ansi"], "autoreset_mode": AutoresetMode.NEXT_STEP}
    env_id = "textgym/TextGen-v0"

    def __init__(self, num_envs: int = 1, **kwargs: Any):
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        cfg = TextGenConfig.from_kwargs(self.env_id, **kwargs)
        self.num_envs = int(num_envs)
        self.core = TextGenCore(cfg, n=self.num_envs)
        self.render_mode = cfg.render_mode
        self.single_observation_space, self.single_action_space = make_spaces(self.core)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._rngs = [np.random.default_rng() for _ in range(self.num_envs)]
        self._autoreset = np.zeros(self.num_envs, dtype=bool)

    def next_token_logits(self):
        """The acting distribution's next-token logits for the current observations, ``[num_envs, V]`` (fp32)."""
        return self.core.acting_logits()

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        if seed is not None:
            seeds: list[int | None] = [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"got {len(seeds)} seeds for {self.num_envs} envs")
            for i, s in enumerate(seeds):
                if s is not None:
                    self._rngs[i], _ = gym.utils.seeding.np_random(s)
        rows = list(range(self.num_envs))
        self.core.reset_rows(rows, self._rngs, options)
        self._autoreset[:] = False
        return self.core.observation(), {}

    def step(self, actions):
        actions = np.asarray(actions).reshape(self.num_envs)
        stepping = ~self._autoreset
        rewards, done, finals = self.core.step(actions, stepping)
        restart = np.flatnonzero(self._autoreset).tolist()
        self.core.reset_rows(restart, [self._rngs[i] for i in restart])
        self._autoreset = done
        infos: dict = {}
        for i, info in finals.items():
            infos = self._add_info(infos, info, i)
        truncated = np.zeros(self.num_envs, dtype=bool)
        return self.core.observation(), rewards, done, truncated, infos

    def render(self):
        if self.render_mode == "ansi":
            return tuple(self.core.render_text(i) for i in range(self.num_envs))
        return None
