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
#
# The contract, with no guessing from signatures: a registered class is built with
# the options given to make(), anything else registered is a reward function and
# the options are bound to it.

_REGISTRY: dict[str, Callable[..., Any]] = {}


class UnknownOptionError(ValueError, TypeError):
    """An option that a reward class does not take: names the reward, the option and the valid ones.

    A ``ValueError`` (a bad option value for the reward) and a ``TypeError`` (what
    Python raises for an unexpected keyword argument, so existing handlers keep working).
    """


def register(name: str, fn_or_class: Callable[..., Any], *, overwrite: bool = False) -> None:
    """Register a reward under ``name``.

    What :func:`make` does with its options depends only on what ``fn_or_class`` is:

    * a **class** (normally a :class:`Reward` subclass) is built with them:
      ``make(name, **kw)`` returns ``cls(**kw)``;
    * any other callable is a **reward function**
      ``fn(prompts, completions, **metadata) -> list[float]`` and they are bound to it:
      ``make(name, **kw)`` returns ``functools.partial(fn, **kw)``.

    A function that *returns* a reward (a factory) is not called to build one: it is
    a reward function like any other, and fails as one.  Register the class instead.

    Raises ``ValueError`` if ``name`` is taken (unless ``overwrite=True``) and
    ``TypeError`` if ``fn_or_class`` is not callable or ``name`` is not a string.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"reward name must be a non-empty string, got {name!r}")
    if not callable(fn_or_class):
        raise TypeError(f"cannot register reward {name!r}: {fn_or_class!r} is not callable")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = fn_or_class


def names() -> list[str]:
    """Sorted names of all registered rewards."""
    return sorted(_REGISTRY)


def make(name: str, **kwargs: Any) -> ValidatedReward:
    """Build the reward registered as ``name`` with options ``kwargs`` (see :func:`register`).

    Raises ``ValueError`` for an unknown name (listing the known ones),
    :class:`UnknownOptionError` for an option a registered class does not take, and
    ``TypeError``/``ValueError`` naming the reward for other invalid options.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; registered rewards: {', '.join(names())}")
    obj = _REGISTRY[name]
    if isinstance(obj, type):
        return _wrap(_build(name, obj, kwargs), name)
    try:
        fn = _bind_reward_fn(obj, kwargs)
    except TypeError as exc:
        raise _named_error(name, exc) from exc
    return _wrap(fn, name)


def _named_error(name: str, exc: Exception) -> Exception:
    """A TypeError/ValueError like ``exc`` (an UnknownOptionError stays one) whose message names the reward."""
    error: type[Exception]
    if isinstance(exc, UnknownOptionError):
        error = UnknownOptionError
    else:
        error = TypeError if isinstance(exc, TypeError) else ValueError
    return error(f"reward {name!r}: {exc}")


def _build(name: str, cls: type, kwargs: Mapping[str, Any]) -> Any:
    """``cls(**kwargs)``, with errors naming the reward.

    If it fails, the signature of ``cls`` is read only to tell which options it
    does not take, and to list the ones it does.
    """
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        unknown, valid = _unknown_options(cls, kwargs) if isinstance(exc, TypeError) else ([], [])
        if unknown:
            raise UnknownOptionError(
                f"reward {name!r} ({cls.__name__}) has no option {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(valid) or 'none'}"
            ) from exc
        raise _named_error(name, exc) from exc


def _unknown_options(cls: type, kwargs: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The keys of ``kwargs`` that ``cls(...)`` does not take, and the ones it does."""
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins)
        return [], []
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return [], []
    valid = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [key for key in kwargs if key not in valid], valid


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
    if kwargs:
        return functools.partial(fn, **kwargs)
    return fn


def as_reward(obj: Any, **kwargs: Any) -> ValidatedReward:
    """Turn ``obj`` into a validated reward, by the same contract as :func:`make`.

    * ``str``: ``make(obj, **kwargs)``;
    * a class (normally a :class:`Reward` subclass): built with ``kwargs``;
    * a :class:`Reward` instance: wrapped (``kwargs`` must be empty);
    * any other callable: a reward function ``fn(prompts, completions, **metadata)``,
      ``kwargs`` bound to it with ``functools.partial``;
    * anything else: ``TypeError``.
    """
    if isinstance(obj, str):
        return make(obj, **kwargs)
    if isinstance(obj, type):
        name = obj.name if issubclass(obj, Reward) else obj.__name__
        return _wrap(_build(name, obj, kwargs), name)
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
