"""A stable-baselines3 ``VecEnv`` over textgym's batched engine.

SB3 steps a ``VecEnv`` and resets finished envs at once (putting the last observation in
``info["terminal_observation"]``). ``LMVecEnv`` does exactly that on a ``TextGenCore``, so the
rows stay in the engine's KV cache: one batched forward per step for all envs. Each observation it
returns is handed out with a ticket naming the engine rows it shows (``engine_rows``), with which
the policy reads the engine's cached outputs for it instead of recomputing them.

Data-parallel (``textgym.distributed``), an ``LMVecEnv`` holds this rank's share of the global
batch of rows: an env id with ``n_envs`` rows is made with ``n_envs / N`` rows per rank, and row i
of rank k is row ``k * n_envs / N + i`` of the global batch, seeded as that row would be in one
process (``seed``), so the ranks together draw the prompts one process would.

Seeding: ``seed(s)`` gives global row r the stream of ``numpy.random.SeedSequence(s, spawn_key=(r,))``
(what ``SeedSequence(s).spawn`` hands its r-th child): statistically independent streams for every
(seed, row) pair. SB3's own convention (row r seeded ``s + r``) makes seed s+1's row r replay seed
s's row r+1, so an agent reseeded ``s + k`` at iteration k would draw, shifted by a row, the prompts
it drew before (the default ``textgym train`` run drew 22 distinct prompts in 128 episodes).
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv

from textgym import distributed
from textgym.envs import TextGenCore, TextGenEnv, TextGenVectorEnv
from textgym.envs.textgen import make_spaces
from textgym.envs.tickets import EngineRows


class LMVecEnv(VecEnv):
    """SB3 vector env over the ``n`` rows of a ``TextGenCore``. Adds SB3's Monitor fields
    (``info["episode"]``) so ``ep_rew_mean`` is logged.

    :param row_offset: the global index of this env's first row (data-parallel, rank k holds rows
        ``k * n`` to ``k * n + n - 1``: the default); row i is seeded ``seed + row_offset + i``.
    """

    def __init__(self, core: TextGenCore, row_offset: int | None = None):
        self.core = core
        self.row_offset = distributed.rank() * core.n if row_offset is None else int(row_offset)
        self.render_mode = core.cfg.render_mode
        observation_space, action_space = make_spaces(core)
        super().__init__(core.n, observation_space, action_space)
        self._rngs = [np.random.default_rng() for _ in range(core.n)]
        self._actions: np.ndarray | None = None
        self._returns = np.zeros(core.n)
        self._start = time.time()
        self._handed_out: tuple[dict, EngineRows] | None = None  # the last observation returned, with its ticket

    def engine_rows(self, obs: Any) -> EngineRows | None:
        """The ticket naming the engine rows whose current state ``obs`` is, when ``obs`` is the very
        observation this vec env last returned (from ``reset`` or ``step``), else None: a copy, an
        edited or an older observation is computed afresh. The engine itself refuses the ticket
        once it has moved on (``TextGenCore.cached_outputs``), e.g. when a gym env over the same
        engine was stepped."""
        if self._handed_out is not None and obs is self._handed_out[0]:
            return self._handed_out[1]
        return None

    def seed(self, seed: int | None = None) -> list[int | None]:
        """Seed every row at the next reset: row i gets the stream of
        ``SeedSequence(seed, spawn_key=(row_offset + i,))`` (module docstring). Returns SB3's
        per-row seeds (``seed + row``), counted in rows of the global batch."""
        seeds = super().seed(seed)  # SB3 draws a seed when None is given
        self._seed_entropy = seeds[0]  # = seed
        self._seeds = [None if s is None else s + self.row_offset for s in seeds]
        return self._seeds

    def _hand_out(self, obs: dict) -> dict:
        self._handed_out = (obs, self.core.name_rows())
        return obs

    def reset(self):
        for i, seed in enumerate(self._seeds):
            if seed is not None:
                stream = np.random.SeedSequence(self._seed_entropy, spawn_key=(self.row_offset + i,))
                self._rngs[i] = np.random.default_rng(stream)
        self.core.reset_rows(list(range(self.num_envs)), self._rngs)
        self._returns[:] = 0.0
        self.reset_infos = self.core.reset_infos()
        self._reset_seeds()
        self._reset_options()
        return self._hand_out(self.core.observation())

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs)

    def step_wait(self):
        if self._actions is None:
            raise RuntimeError("step_wait() without step_async(): call step(actions)")
        rewards, done, infos = self.step_rows(self._actions, np.ones(self.num_envs, dtype=bool))
        rows = np.flatnonzero(done).tolist()
        self.core.reset_rows(rows, [self._rngs[i] for i in rows])
        return self._hand_out(self.core.observation()), rewards, done, infos

    def step_rows(self, actions: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """Step only the rows where ``rows`` is True (the other actions are ignored) and leave the
        rows that finish as they are, not reset: for agents that play whole rounds of episodes
        (``agents.critic_free``). Returns rewards, dones and infos as ``step`` does."""
        rewards, done, finals = self.core.step(actions, rows)
        self._returns += rewards
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        finished = np.flatnonzero(done).tolist()
        if finished:
            terminal = self.core.observation(finished)
            for j, i in enumerate(finished):
                infos[i] = {
                    **finals[i],
                    "terminal_observation": {k: v[j] for k, v in terminal.items()},
                    "episode": {"r": float(self._returns[i]), "l": finals[i]["length"],
                                "t": round(time.time() - self._start, 6)},
                }
                self._returns[i] = 0.0
        return rewards.astype(np.float32), done, infos

    def close(self) -> None:
        pass

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        value = getattr(self, attr_name) if hasattr(self, attr_name) else getattr(self.core, attr_name)
        return [value for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        method = getattr(self.core, method_name)
        return [method(*method_args, **method_kwargs) for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False for _ in self._indices(indices)]

    def render(self, mode: str | None = None):
        return [self.core.render_text(i) for i in range(self.num_envs)]

    def _indices(self, indices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        return [indices] if isinstance(indices, int) else list(indices)


def as_vec_env(env: Any, n_envs: int | None = None, env_kwargs: dict | None = None) -> LMVecEnv:
    """``env`` as an ``LMVecEnv``: an env id (made with ``n_envs`` batched rows and ``env_kwargs``),
    a textgym env from ``gym.make``, a textgym vector env, or an ``LMVecEnv``.

    Data-parallel, ``n_envs`` counts the rows of the global batch: an env id is made with this
    rank's share, ``n_envs / N`` rows (whole groups of ``group_size``); an env object holds this
    rank's rows, so a given ``n_envs`` must be N times its rows."""
    if n_envs is not None and (isinstance(n_envs, bool) or not isinstance(n_envs, (int, np.integer)) or n_envs < 1):
        raise ValueError(f"n_envs must be an integer >= 1 (or None for the env's own), got {n_envs!r}")
    if env_kwargs is not None and not isinstance(env_kwargs, dict):
        raise ValueError(f"env_kwargs must be a dict of the env's keyword arguments, got {env_kwargs!r}")
    env_kwargs = env_kwargs or {}
    if isinstance(env, str):
        if env not in gym.registry:
            raise ValueError(f"unknown env id {env!r}; textgym envs: {', '.join(_textgym_ids())}")
        first, rows = _rank_rows(n_envs or 1, env_kwargs.get("group_size", 1))
        vec = gym.make_vec(env, num_envs=rows, vectorization_mode="vector_entry_point", **env_kwargs)
        if not isinstance(vec.unwrapped, TextGenVectorEnv):
            raise ValueError(f"env {env!r} is not a textgym text-generation env")
        return LMVecEnv(vec.unwrapped.core, row_offset=first)
    if env_kwargs:
        raise ValueError("env_kwargs only apply when env is an env id")
    if isinstance(env, LMVecEnv):
        core = env.core
    elif isinstance(getattr(env, "unwrapped", None), (TextGenEnv, TextGenVectorEnv)):
        core = env.unwrapped.core
    else:
        raise ValueError(
            f"env must be a textgym env id, a textgym env or vector env, got {type(env).__name__}; "
            f"textgym envs: {', '.join(_textgym_ids())}"
        )
    ranks = distributed.world_size()
    if n_envs is not None and n_envs != core.n * ranks:
        where = f" on each of {ranks} ranks (n_envs counts the rows of all ranks)" if ranks > 1 else ""
        raise ValueError(f"n_envs={n_envs} does not match the env's {core.n} rows{where}; make the env with "
                         f"num_envs={n_envs // ranks}")
    return env if isinstance(env, LMVecEnv) else LMVecEnv(core)


def _rank_rows(n_envs: int, group_size: Any) -> tuple[int, int]:
    """(first global row, rows) of this rank's share of ``n_envs`` rows; data-parallel, a share
    must hold whole groups of ``group_size`` rows (the episodes of one prompt stay together)."""
    first, rows = distributed.local_rows(n_envs, "n_envs")
    ranks = distributed.world_size()
    if ranks > 1 and isinstance(group_size, int) and group_size > 0 and rows % group_size:
        raise ValueError(f"n_envs={n_envs} over {ranks} ranks gives {rows} rows per rank, not a multiple of "
                         f"group_size={group_size}: each rank holds whole groups; use an n_envs that is a multiple "
                         f"of {ranks * group_size}")
    return first, rows


def _textgym_ids() -> list[str]:
    return sorted(k for k in gym.registry if k.startswith("textgym/"))


class OnLMVecEnv:
    """What every textgym agent, online (``agents.common.LMAlgorithm``) or offline
    (``agents.offline.OfflineAlgorithm``), reads of its env: the ``LMVecEnv`` and its engine."""

    @property
    def vec_env(self) -> LMVecEnv:
        """The agent's env, which must be textgym's ``LMVecEnv``."""
        env = getattr(self, "env", None)
        if not isinstance(env, LMVecEnv):
            raise ValueError("textgym agents need a textgym env: pass env= (an env id, textgym env or vector env)")
        return env

    @property
    def core(self):
        return self.vec_env.core
