"""The reward registry and the checks every reward passes through.

:class:`Reward` is the base class of all rewards; :func:`register`, :func:`make`,
:func:`names` and :func:`as_reward` map names and callables to rewards wrapped in a
:class:`ValidatedReward`, which checks the batch a reward is given and the values it
returns, and names the reward in every error.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

RewardFn = Callable[..., Sequence[float]]


class Reward:
    """Base class of all rewards.

    A reward is batched: ``reward(prompts, completions, **metadata)`` returns a
    list with one float per completion.  ``metadata`` holds per-sample lists
    (e.g. ``references=list[str]`` or ``list[list[str]]``).
    """

    name: str = "reward"

    def __call__(self, prompts: list[str], completions: list[str], **metadata: Any) -> list[float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ---------------------------------------------------------------------------
# Output validation and wrapping
# ---------------------------------------------------------------------------


class RewardError(RuntimeError):
    """A reward function failed (raised an exception other than a bad-value error): names the reward."""


class ValidatedReward(Reward):
    """Wraps a reward (or a plain reward function) and checks its inputs and output.

    The wrapped reward must return a sequence (list, tuple, NumPy array, 1-D
    tensor...) of exactly ``len(completions)`` finite real numbers; the result is
    returned as a plain ``list[float]``.  Any violation raises ``ValueError``
    naming the reward.  Attributes not found on the wrapper are looked up on the
    wrapped reward.
    """

    def __init__(self, reward: Reward | RewardFn, name: str) -> None:
        self.reward = reward
        self.name = name

    def __getattr__(self, attr: str) -> Any:
        # Only called when normal lookup fails; guard against recursion during unpickling.
        if attr.startswith("__") or "reward" not in self.__dict__:
            raise AttributeError(attr)
        return getattr(self.__dict__["reward"], attr)

    def __repr__(self) -> str:
        return f"ValidatedReward({self.reward!r}, name={self.name!r})"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **metadata: Any) -> list[float]:
        prompts, completions = _check_batch(self.name, prompts, completions, metadata)
        try:
            result = self.reward(prompts, completions, **metadata)
        except (ValueError, TypeError) as exc:
            if f"reward {self.name!r}" in str(exc):
                raise
            raise _named_error(self.name, exc) from exc
        except Exception as exc:  # any failure of user code: name the reward that failed
            raise RewardError(f"reward {self.name!r} raised {type(exc).__name__}: {exc}") from exc
        return _check_output(self.name, result, len(completions))


def _check_batch(
    name: str, prompts: Sequence[str], completions: Sequence[str], metadata: Mapping[str, Any]
) -> tuple[list[str], list[str]]:
    """Validate the batch shape and return prompts and completions as lists."""
    for arg, value in (("prompts", prompts), ("completions", completions)):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"reward {name!r}: {arg} must be a list of strings, got {type(value).__name__}")
    if len(prompts) != len(completions):
        raise ValueError(f"reward {name!r}: got {len(prompts)} prompts for {len(completions)} completions")
    for key, value in metadata.items():
        if isinstance(value, (list, tuple)) and len(value) != len(completions):
            raise ValueError(
                f"reward {name!r}: metadata {key!r} has {len(value)} entries "
                f"for {len(completions)} completions"
            )
    return list(prompts), list(completions)


def _check_output(name: str, result: Any, n: int) -> list[float]:
    """Return ``result`` as ``list[float]`` or raise ``ValueError`` naming the reward."""
    if not isinstance(result, Sequence) and hasattr(result, "tolist"):
        result = result.tolist()  # NumPy arrays and torch tensors
    if isinstance(result, (str, bytes, Mapping)) or not isinstance(result, Sequence):
        raise ValueError(f"reward {name!r} returned a {type(result).__name__}, expected a list of {n} floats")
    if len(result) != n:
        raise ValueError(f"reward {name!r} returned {len(result)} values for {n} completions")
    values: list[float] = []
    for i, value in enumerate(result):
        if not isinstance(value, numbers.Real):
            raise ValueError(
                f"reward {name!r} returned non-numeric value {value!r} ({type(value).__name__}) at index {i}"
            )
        try:
            value = float(value)
        except (OverflowError, ValueError, TypeError):
            raise ValueError(f"reward {name!r} returned {_short(value)} at index {i}: not representable as a "
                             "float") from None
        if math.isnan(value):
            raise ValueError(f"reward {name!r} returned NaN at index {i}")
        if math.isinf(value):
            raise ValueError(f"reward {name!r} returned {value} at index {i}")
        values.append(value)
    return values


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} characters)"


def _callable_name(obj: Any) -> str:
    """A readable name for a reward object or function."""
    if isinstance(obj, Reward):
        return obj.name
    if isinstance(obj, functools.partial):
        return _callable_name(obj.func)
    return getattr(obj, "__name__", None) or type(obj).__name__


def _wrap(reward: Any, name: str) -> ValidatedReward:
    if isinstance(reward, ValidatedReward):
        reward = reward.reward
    if not callable(reward):
        raise TypeError(f"reward {name!r} is not callable: {reward!r}")
    return ValidatedReward(reward, name)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

# name -> (class or function, is_factory); is_factory is None for classes and for
# functions whose kind is guessed at make() time.
_REGISTRY: dict[str, tuple[Callable[..., Any], bool | None]] = {}


def register(
    name: str,
    fn_or_class: Callable[..., Any],
    *,
    overwrite: bool = False,
    factory: bool | None = None,
) -> None:
    """Register a reward under ``name``.

    ``fn_or_class`` may be

    * a class, typically a :class:`Reward` subclass: ``make(name, **kw)`` calls ``cls(**kw)``;
    * a reward function ``fn(prompts, completions, **metadata) -> list[float]``:
      ``make(name, **kw)`` binds ``kw`` with ``functools.partial(fn, **kw)``;
    * a factory ``factory(**kw)`` returning a :class:`Reward` (or a reward function):
      ``make(name, **kw)`` returns ``factory(**kw)``.

    With ``factory=None`` a function is treated as a factory when the keyword
    arguments given to :func:`make` are enough to call it, and as a reward
    function otherwise; ``factory=True``/``False`` overrides that guess.

    Raises ``ValueError`` if ``name`` is taken (unless ``overwrite=True``) and
    ``TypeError`` if ``fn_or_class`` is not callable or ``name`` is not a string.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"reward name must be a non-empty string, got {name!r}")
    if not callable(fn_or_class):
        raise TypeError(f"cannot register reward {name!r}: {fn_or_class!r} is not callable")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = (fn_or_class, None if isinstance(fn_or_class, type) else factory)


def names() -> list[str]:
    """Sorted names of all registered rewards."""
    return sorted(_REGISTRY)


def make(name: str, **kwargs: Any) -> ValidatedReward:
    """Build the reward registered as ``name`` with options ``kwargs``.

    Raises ``ValueError`` for an unknown name (listing the known ones) and
    ``TypeError``/``ValueError`` naming the reward for invalid options.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; registered rewards: {', '.join(names())}")
    obj, is_factory = _REGISTRY[name]
    try:
        if isinstance(obj, type):
            reward = obj(**kwargs)
        else:
            if is_factory is None:
                is_factory = _is_factory_call(obj, kwargs)
            reward = obj(**kwargs) if is_factory else _bind_reward_fn(obj, kwargs)
    except (TypeError, ValueError) as exc:
        raise _named_error(name, exc) from exc
    if not callable(reward):
        raise TypeError(f"reward {name!r}: factory returned {type(reward).__name__}, not a Reward")
    return _wrap(reward, name)


def _named_error(name: str, exc: Exception) -> Exception:
    """A TypeError/ValueError like ``exc`` whose message names the reward."""
    error = TypeError if isinstance(exc, TypeError) else ValueError
    return error(f"reward {name!r}: {exc}")


def _is_factory_call(fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> bool:
    """Guess whether ``fn(**kwargs)`` is a factory call (True) or ``fn`` is a reward function."""
    try:
        inspect.signature(fn).bind(**kwargs)
    except (TypeError, ValueError):  # needs (prompts, completions), bad kwargs or no signature
        return False
    return True


def _bind_reward_fn(fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> Callable[..., Any]:
    """``functools.partial(fn, **kwargs)``, after checking that ``fn`` can then be
    called as ``fn(prompts, completions, **metadata)``."""
    try:
        signature = inspect.signature(fn)
    except ValueError:  # no signature available (some builtins): trust the caller
        signature = None
    if signature is not None:
        try:
            signature.bind_partial(None, None, **kwargs)
        except TypeError as exc:
            options = "".join(f", {key}=..." for key in kwargs)
            raise TypeError(
                f"{_callable_name(fn)} cannot be called as fn(prompts, completions{options}): {exc}"
            ) from exc
    return functools.partial(fn, **kwargs) if kwargs else fn


def as_reward(obj: Any, **kwargs: Any) -> ValidatedReward:
    """Turn ``obj`` into a validated reward.

    * ``str``: ``make(obj, **kwargs)``;
    * a :class:`Reward` subclass: instantiated with ``kwargs``;
    * a :class:`Reward` instance or a plain callable ``fn(prompts, completions, **metadata)``:
      wrapped (``kwargs`` are bound to a plain function with ``functools.partial``);
    * anything else: ``TypeError``.
    """
    if isinstance(obj, str):
        return make(obj, **kwargs)
    if isinstance(obj, type) and issubclass(obj, Reward):
        try:
            reward = obj(**kwargs)
        except (TypeError, ValueError) as exc:
            raise _named_error(obj.name, exc) from exc
        return _wrap(reward, obj.name)
    if isinstance(obj, Reward):
        if kwargs:
            raise TypeError(
                f"reward {obj.name!r}: options {sorted(kwargs)} cannot be applied to a Reward instance"
            )
        return obj if isinstance(obj, ValidatedReward) else _wrap(obj, obj.name)
    if callable(obj):
        name = _callable_name(obj)
        try:
            fn = _bind_reward_fn(obj, kwargs)
        except TypeError as exc:
            raise _named_error(name, exc) from exc
        return _wrap(fn, name)
    raise TypeError(
        f"cannot make a reward from {type(obj).__name__} {obj!r}; expected a registered name, "
        "a Reward or a callable (prompts, completions, **metadata) -> list[float]"
    )
