"""Reward functions for text generation episodes.

A reward scores finished episodes: it is called once per batch with the prompts,
the generated completions and optional per-sample metadata, and returns one float
per completion::

    reward = make("vader")
    reward(["Tell me about your day."], [" It was wonderful!"])   # -> [0.6...]

Metadata is passed as keyword arguments holding one entry per sample, e.g.
``references=[["ref a", "ref b"], "ref c"]`` for the reference-based metrics.

Registry
--------
:func:`register` maps a name to one of

* a **class** (normally a :class:`Reward` subclass): ``make(name, **kw)`` returns
  ``cls(**kw)``; an option the class does not take raises :class:`UnknownOptionError`
  (a ``ValueError`` and a ``TypeError``) naming the reward, the option and the valid ones;
* a **reward function** ``fn(prompts, completions, **metadata) -> list[float]``
  (any callable that is not a class): ``make(name, **kw)`` returns
  ``functools.partial(fn, **kw)``, i.e. the keyword arguments are bound as options
  of the function.

That is the whole contract: nothing is guessed from a signature, so a function
that returns a reward is not a factory but a reward function (register the class).

Everything returned by :func:`make` and :func:`as_reward` is wrapped so that its
output is checked: it must be one finite number per completion, otherwise a
``ValueError`` naming the reward is raised.

Built-in rewards: ``vader``, ``classifier``, ``reward_model``, ``bleu``,
``chrf``, ``rouge``, ``length``, ``keyword``, ``regex`` and ``weighted``.

Modules
-------
``registry`` (:class:`Reward`, the checks and the registry), ``classifiers``
(VADER, Hugging Face classifiers and reward models), ``reference`` (BLEU, chrF,
ROUGE), ``surface`` (length, keyword, regex), ``weighted`` (weighted sums) and
``options`` (checks of the options the built-ins take).  Everything public is
importable from ``textgym.rewards`` itself.
"""

from __future__ import annotations

# Besides __all__, importable from here as from the old module: _texts (textgym.pipeline.rm scores
# texts the way the classifiers do), ROUGE_TYPES and RewardFn.
from textgym.rewards.classifiers import ClassifierReward, RewardModelReward, VaderReward
from textgym.rewards.options import _texts as _texts
from textgym.rewards.reference import ROUGE_TYPES as ROUGE_TYPES
from textgym.rewards.reference import (
    BleuReward,
    ChrfReward,
    RougeReward,
    SacrebleuReward,
)
from textgym.rewards.registry import (
    Reward,
    RewardError,
    UnknownOptionError,
    ValidatedReward,
    as_reward,
    make,
    names,
    register,
)
from textgym.rewards.registry import RewardFn as RewardFn
from textgym.rewards.surface import KeywordReward, LengthReward, RegexReward
from textgym.rewards.weighted import WeightedReward

__all__ = [
    "BleuReward",
    "ChrfReward",
    "ClassifierReward",
    "KeywordReward",
    "LengthReward",
    "RegexReward",
    "Reward",
    "RewardError",
    "RewardModelReward",
    "RougeReward",
    "SacrebleuReward",
    "UnknownOptionError",
    "VaderReward",
    "ValidatedReward",
    "WeightedReward",
    "as_reward",
    "make",
    "names",
    "register",
]

for _name, _cls in (
    ("vader", VaderReward),
    ("classifier", ClassifierReward),
    ("reward_model", RewardModelReward),
    ("bleu", BleuReward),
    ("chrf", ChrfReward),
    ("rouge", RougeReward),
    ("length", LengthReward),
    ("keyword", KeywordReward),
    ("regex", RegexReward),
    ("weighted", WeightedReward),
):
    register(_name, _cls)
del _name, _cls
