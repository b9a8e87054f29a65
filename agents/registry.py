"""The algorithm registry: ``register`` a class under a name, ``make`` an agent by name, ``load`` a saved one."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

from . import serialization
from .a2c import A2C
from .common import LMAlgorithm
from .constructor import constructor_parameters
from .critic_free import CriticFreeAlgorithm
from .dpo import DPO
from .grpo import GRPO
from .ilql import ILQL
from .nlpo import NLPO
from .offline import OfflineAlgorithm
from .policy import LMActorCriticPolicy
from .ppo import PPO
from .reinforce_pp import ReinforcePP
from .rloo import RLOO
from .trpo import TRPO
from .vec_env import LMVecEnv, as_vec_env

_REGISTRY: dict[str, type[LMAlgorithm] | type[OfflineAlgorithm]] = {}


def register(name: str, algo_class: type, *, overwrite: bool = False) -> type[LMAlgorithm] | type[OfflineAlgorithm]:
    """Register an SB3 on-policy algorithm class under ``name``, or an offline one (a subclass
    of ``agents.offline.OfflineAlgorithm``). A plain SB3 class (say a PPO variant of yours) is
    combined with textgym's ``LMAlgorithm`` mixin; returns the class used."""
    if isinstance(algo_class, type) and issubclass(algo_class, OfflineAlgorithm):
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"algorithm {name!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[name] = algo_class
        return algo_class
    if not isinstance(algo_class, type) or not issubclass(algo_class, OnPolicyAlgorithm):
        raise ValueError(
            f"algorithm {name!r} must be a stable-baselines3 OnPolicyAlgorithm subclass or a textgym "
            f"OfflineAlgorithm subclass, got {algo_class!r}"
        )
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"algorithm {name!r} is already registered; pass overwrite=True to replace it")
    if issubclass(algo_class, LMAlgorithm):
        cls = algo_class
    else:  # type() cannot say that the class it makes has LMAlgorithm among its bases
        cls = cast(type[LMAlgorithm], type(algo_class.__name__, (LMAlgorithm, algo_class), {"algo_name": name}))
    _REGISTRY[name] = cls
    return cls


def names() -> list[str]:
    return sorted(_REGISTRY)


def get_class(name: str) -> type[LMAlgorithm] | type[OfflineAlgorithm]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(names())}")
    return _REGISTRY[name]


def accepted_hyperparameters(algo: str) -> set[str]:
    """Keyword arguments the algorithm's constructor chain accepts (its class and its bases), less
    those it fixes itself (``fixed_hyperparameters``: e.g. GRPO's gamma)."""
    cls = get_class(algo)
    return set(constructor_parameters(cls)) - set(getattr(cls, "fixed_hyperparameters", ()))


def make(algo: str, env: Any, *, n_envs: int | None = None, env_kwargs: dict | None = None, **hyperparameters: Any):
    """An SB3 algorithm object for ``algo`` (``names()``) on ``env``: an env id (made as a batched
    vector env of ``n_envs`` rows with ``env_kwargs``, on top of the algorithm's ``env_defaults``:
    GRPO's and RLOO's env comes in groups of 4 rows per prompt), a textgym env, or a textgym vector
    env. ``hyperparameters`` go to the algorithm's constructor (``lora=``, ``policy_kwargs=``, ``seed=``...)."""
    cls = get_class(algo)
    unknown = sorted(set(hyperparameters) - accepted_hyperparameters(algo))
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not hyperparameter(s) of {algo}; valid: "
                         f"{', '.join(sorted(accepted_hyperparameters(algo) - {'env'}))}")
    vec = _vec_env_for(cls, env, n_envs, env_kwargs)
    hyperparameters.setdefault("device", vec.core.device)
    # a user's class: its defaults, our policy
    if not issubclass(cls, (PPO, A2C, CriticFreeAlgorithm, TRPO, OfflineAlgorithm)):
        hyperparameters.setdefault("policy", LMActorCriticPolicy)
    return cls(env=vec, **hyperparameters)


def load(path: str | Path, env: Any, *, n_envs: int | None = None, env_kwargs: dict | None = None, **kwargs: Any):
    """Restore an agent saved with ``.save(path)``. ``env`` provides the LM that the saved weights
    are loaded into (and the reference model, which is never saved). An env made here from an id
    gets ``env_kwargs`` on top of the algorithm's ``env_defaults``, as in ``make``: pass the
    ``env_kwargs`` the agent was trained with (``group_size`` included)."""
    path = Path(path)
    if not path.exists() and path.with_suffix(".zip").exists():
        path = path.with_suffix(".zip")
    if not path.exists():
        raise FileNotFoundError(f"no saved agent at {str(path)!r}")
    data = serialization.read_data(path)  # JSON only: refuses a file holding pickles before anything else
    algo = data.get("textgym_algo")
    if not isinstance(algo, str):
        raise ValueError(f"{str(path)!r} was not saved by a textgym agent (no 'textgym_algo' entry)")
    cls = get_class(algo)
    vec = _vec_env_for(cls, env, n_envs, env_kwargs)
    kwargs.setdefault("device", vec.core.device)
    return cls.load(path, env=vec, **kwargs)


def _vec_env_for(cls: type, env: Any, n_envs: int | None, env_kwargs: dict | None) -> LMVecEnv:
    """``as_vec_env``; an env made here from an id gets the algorithm's ``env_defaults`` for the
    keyword arguments ``env_kwargs`` leaves out."""
    if isinstance(env, str) and (env_kwargs is None or isinstance(env_kwargs, dict)):
        env_kwargs = {**getattr(cls, "env_defaults", {}), **(env_kwargs or {})}
    return as_vec_env(env, n_envs, env_kwargs)


for _name, _cls in (("ppo", PPO), ("a2c", A2C), ("nlpo", NLPO), ("grpo", GRPO), ("rloo", RLOO),
                    ("reinforce++", ReinforcePP), ("trpo", TRPO), ("ilql", ILQL), ("dpo", DPO)):
    register(_name, _cls)
