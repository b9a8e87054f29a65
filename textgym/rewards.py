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
  ``cls(**kw)``;
* a **reward function** ``fn(prompts, completions, **metadata) -> list[float]``:
  ``make(name, **kw)`` returns ``functools.partial(fn, **kw)``, i.e. the keyword
  arguments are bound as options of the function;
* a **factory function** ``factory(**kw) -> Reward`` (or any callable reward):
  ``make(name, **kw)`` returns ``factory(**kw)``.

Functions are told apart by their signature: a function that the ``make``
keyword arguments alone can call is a factory, one that still needs
``(prompts, completions)`` is a reward function.  Pass ``factory=True`` or
``factory=False`` to :func:`register` to decide explicitly.

Everything returned by :func:`make` and :func:`as_reward` is wrapped so that its
output is checked: it must be one finite number per completion, otherwise a
``ValueError`` naming the reward is raised.

Built-in rewards: ``vader``, ``classifier``, ``reward_model``, ``bleu``,
``chrf``, ``rouge``, ``length``, ``keyword``, ``regex`` and ``weighted``.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports are deferred until a reward needs them
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "Reward",
    "RewardError",
    "ValidatedReward",
    "register",
    "make",
    "names",
    "as_reward",
    "VaderReward",
    "ClassifierReward",
    "RewardModelReward",
    "BleuReward",
    "ChrfReward",
    "SacrebleuReward",
    "RougeReward",
    "LengthReward",
    "KeywordReward",
    "RegexReward",
    "WeightedReward",
]

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


# ---------------------------------------------------------------------------
# Argument helpers
# ---------------------------------------------------------------------------


def _choice(arg: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError``."""
    if value not in choices:
        raise ValueError(f"invalid {arg} {value!r}; valid choices: {', '.join(map(repr, choices))}")
    return value


def _finite(arg: str, value: Any) -> float:
    """Return ``value`` as float if it is a finite real number, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{arg} must be a finite number, got {value!r}")
    return float(value)


def _texts(prompts: list[str], completions: list[str], include_prompt: bool) -> list[str]:
    """The texts to score: completions, or prompt + completion."""
    return [p + c for p, c in zip(prompts, completions)] if include_prompt else completions


def _references(name: str, metadata: Mapping[str, Any], n: int) -> list[list[str]]:
    """Per-sample reference lists from ``metadata['references']``."""
    if metadata.get("references") is None:
        raise ValueError(
            f"reward {name!r} needs metadata `references` "
            "(one reference string or list of reference strings per completion)"
        )
    refs = metadata["references"]
    if isinstance(refs, str) or not isinstance(refs, Sequence) or len(refs) != n:
        raise ValueError(f"reward {name!r}: metadata `references` must be a list of {n} entries")
    out: list[list[str]] = []
    for i, ref in enumerate(refs):
        ref_list = [ref] if isinstance(ref, str) else list(ref)
        if not ref_list or not all(isinstance(r, str) for r in ref_list):
            raise ValueError(
                f"reward {name!r}: references[{i}] must be a string "
                f"or a non-empty list of strings, got {ref!r}"
            )
        out.append(ref_list)
    return out


# ---------------------------------------------------------------------------
# Sentiment
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _vader_analyzer() -> Any:
    """The shared VADER analyzer (building it parses the lexicon, so do it once)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


class VaderReward(Reward):
    """VADER compound sentiment in [-1, 1] of the completion (or prompt + completion).

    Args:
        include_prompt: score ``prompt + completion`` instead of the completion alone.
    """

    name = "vader"

    def __init__(self, include_prompt: bool = False) -> None:
        self.include_prompt = include_prompt
        self.analyzer = _vader_analyzer()

    def __call__(self, prompts: list[str], completions: list[str], **metadata: Any) -> list[float]:
        texts = _texts(prompts, completions, self.include_prompt)
        return [self.analyzer.polarity_scores(text)["compound"] for text in texts]


# ---------------------------------------------------------------------------
# Hugging Face classifiers and reward models
# ---------------------------------------------------------------------------


class ClassifierReward(Reward):
    """Score texts with a Hugging Face sequence-classification model.

    Args:
        model: a model directory or hub id (loaded with
            ``AutoModelForSequenceClassification.from_pretrained``), or an already
            loaded model, in which case ``tokenizer`` is required.
        label: the class to score, as an index or a name from ``config.id2label``.
            May be omitted for single-output models (``num_labels == 1``).
        output: ``"prob"`` (softmax probability of ``label``; sigmoid when
            ``num_labels == 1``) or ``"logit"`` (the raw logit).
        include_prompt: score ``prompt + completion`` instead of the completion alone.
        max_length: inputs are truncated to this many tokens. None: the length the model was
            trained with by ``textgym rm`` / ``train_classifier`` (saved in its config as
            ``textgym_max_length``), else 512.
        device: torch device to run the model on.
        batch_size: number of texts per forward pass.
        tokenizer: a tokenizer or tokenizer path/id; defaults to ``model``.
        model_kwargs: extra keyword arguments for ``from_pretrained`` (e.g. ``dtype``).

    Inputs are right-padded, which is correct for encoders and for causal-LM
    backbones (``LlamaForSequenceClassification`` etc.), which pool the last
    non-padding token.  If the tokenizer has no pad token, the model's
    ``pad_token_id``, the EOS or the UNK token is used, and
    ``model.config.pad_token_id`` is set to the tokenizer's pad token id so the
    model finds the last real token.  Note that both objects are modified in place.
    """

    name = "classifier"

    def __init__(
        self,
        model: str | os.PathLike[str] | PreTrainedModel,
        label: int | str | None = None,
        output: str = "prob",
        include_prompt: bool = False,
        max_length: int | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        tokenizer: str | os.PathLike[str] | PreTrainedTokenizerBase | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.output = _choice("output", output, ("prob", "logit"))
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive integer or None, got {max_length!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.include_prompt = include_prompt
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = device

        if isinstance(model, (str, os.PathLike)):
            tokenizer = model if tokenizer is None else tokenizer
            model = AutoModelForSequenceClassification.from_pretrained(model, **(model_kwargs or {}))
        elif tokenizer is None:
            raise ValueError("a loaded `model` needs `tokenizer=` as well")
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if max_length is None:
            max_length = int(getattr(model.config, "textgym_max_length", None) or 512)
        self.max_length = max_length
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self._check_model(self.model)
        self._setup_padding()
        self.label_index = self._resolve_label(label)

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    def _check_model(self, model: PreTrainedModel) -> None:
        """Hook for subclasses to reject unsuitable models."""

    def _setup_padding(self) -> None:
        """Give the tokenizer a pad token and tell the model its id."""
        tok, config = self.tokenizer, self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if tok.pad_token is None:
            if text_config.pad_token_id is not None:
                tok.pad_token = tok.convert_ids_to_tokens(text_config.pad_token_id)
            elif tok.eos_token is not None:
                tok.pad_token = tok.eos_token
            elif tok.unk_token is not None:
                tok.pad_token = tok.unk_token
            else:
                raise ValueError("the tokenizer has no pad, eos or unk token to pad batches with")
        # Causal-LM backbones pool the last token that is not config.pad_token_id.
        config.pad_token_id = tok.pad_token_id
        text_config.pad_token_id = tok.pad_token_id  # the same object except for multimodal configs

    def _resolve_label(self, label: int | str | None) -> int:
        id2label = {int(i): str(name) for i, name in (self.model.config.id2label or {}).items()}
        valid = ", ".join(f"{i}={name!r}" for i, name in sorted(id2label.items())) or "none"
        if label is None:
            if self.num_labels == 1:
                return 0
            raise ValueError(
                f"the model has {self.num_labels} labels; choose one with `label` (valid labels: {valid})"
            )
        if isinstance(label, str):
            matches = [i for i, name in id2label.items() if name == label]
            if not matches:
                raise ValueError(f"unknown label {label!r}; valid labels: {valid}")
            return matches[0]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.num_labels:
            raise ValueError(f"unknown label {label!r}; valid labels: {valid}")
        return label

    def __call__(self, prompts: list[str], completions: list[str], **metadata: Any) -> list[float]:
        import torch

        texts = _texts(prompts, completions, self.include_prompt)
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    padding_side="right",
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                logits = self.model(**batch).logits.float()
                if self.output == "logit":
                    values = logits[:, self.label_index]
                elif self.num_labels == 1:
                    values = torch.sigmoid(logits[:, 0])
                else:
                    values = torch.softmax(logits, dim=-1)[:, self.label_index]
                scores.extend(values.cpu().tolist())
        return scores


class RewardModelReward(ClassifierReward):
    """Raw score of a scalar reward model (TRL / InstructGPT convention).

    The model is an ``AutoModelForSequenceClassification`` with ``num_labels == 1``;
    the reward is its logit for ``prompt + completion`` (``include_prompt=True``).
    Other arguments are as for :class:`ClassifierReward`.
    """

    name = "reward_model"

    def __init__(
        self,
        model: str | os.PathLike[str] | PreTrainedModel,
        include_prompt: bool = True,
        max_length: int | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        tokenizer: str | os.PathLike[str] | PreTrainedTokenizerBase | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            model,
            label=0,
            output="logit",
            include_prompt=include_prompt,
            max_length=max_length,
            device=device,
            batch_size=batch_size,
            tokenizer=tokenizer,
            model_kwargs=model_kwargs,
        )

    def _check_model(self, model: PreTrainedModel) -> None:
        if model.config.num_labels != 1:
            raise ValueError(
                f"a reward model must output one scalar (num_labels == 1), but this model has "
                f"num_labels == {model.config.num_labels}; use the 'classifier' reward with "
                "`label=` to score one class of a multi-class model"
            )


# ---------------------------------------------------------------------------
# Reference-based metrics
# ---------------------------------------------------------------------------


class SacrebleuReward(Reward):
    """Base of the sacrebleu sentence metrics: ``metric.sentence_score(...) / 100``, in [0, 1].

    Subclasses set ``self.metric`` to a ``sacrebleu.metrics`` object.  Needs
    metadata ``references``: a string or list of strings per completion.
    """

    metric: Any

    def __call__(self, prompts: list[str], completions: list[str], **metadata: Any) -> list[float]:
        refs = _references(self.name, metadata, len(completions))
        # min(): identical texts give 100.00000000000004 through float rounding.
        return [
            min(1.0, self.metric.sentence_score(hyp, ref).score / 100.0)
            for hyp, ref in zip(completions, refs)
        ]


class BleuReward(SacrebleuReward):
    """Sentence-level BLEU (sacrebleu, effective n-gram order) / 100, in [0, 1].

    Needs metadata ``references``.  Keyword arguments go to
    ``sacrebleu.metrics.BLEU`` (e.g. ``lowercase``, ``tokenize``, ``smooth_method``).
    """

    name = "bleu"

    def __init__(self, **options: Any) -> None:
        from sacrebleu.metrics import BLEU

        options.setdefault("effective_order", True)
        self.metric = BLEU(**options)


class ChrfReward(SacrebleuReward):
    """Sentence-level chrF (sacrebleu) / 100, in [0, 1].

    Needs metadata ``references``.  Keyword arguments go to
    ``sacrebleu.metrics.CHRF`` (e.g. ``word_order=2`` for chrF++).
    """

    name = "chrf"

    def __init__(self, **options: Any) -> None:
        from sacrebleu.metrics import CHRF

        self.metric = CHRF(**options)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class RougeReward(Reward):
    """ROUGE F-measure (rouge-score) of the completion against ``references``.

    With several references per sample the best score is used.

    Args:
        rouge_type: one of ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``.
        use_stemmer: apply the Porter stemmer before matching.
    """

    name = "rouge"

    def __init__(self, rouge_type: str = "rougeL", use_stemmer: bool = False) -> None:
        from rouge_score import rouge_scorer

        self.rouge_type = _choice("rouge_type", rouge_type, ROUGE_TYPES)
        self.scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=use_stemmer)

    def __call__(self, prompts: list[str], completions: list[str], **metadata: Any) -> list[float]:
        refs = _references(self.name, metadata, len(completions))
        return [
            self.scorer.score_multi(ref, hyp)[self.rouge_type].fmeasure for hyp, ref in zip(completions, refs)
        ]


# ---------------------------------------------------------------------------
# Surface features
# ---------------------------------------------------------------------------


class LengthReward(Reward):
    """Length of the completion, or its distance to a target length.

    Args:
        unit: ``"words"`` (whitespace-separated) or ``"chars"``.
        target: if given, the reward is ``-abs(length - target)``.
        scale: multiplier applied to the result.
    """

    name = "length"

    def __init__(self, unit: str = "words", target: float | None = None, scale: float = 1.0) -> None:
        self.unit = _choice("unit", unit, ("words", "chars"))
        self.target = None if target is None else _finite("target", target)
        self.scale = _finite("scale", scale)

    def __call__(self, prompts: list[str], completions: list[str], **metadata: Any) -> list[float]:
        lengths = [len(c.split()) if self.unit == "words" else len(c) for c in completions]
        if self.target is None:
            return [self.scale * n for n in lengths]
        return [-self.scale * abs(n - self.target) for n in lengths]


class RegexReward(Reward):
    """Matches of a regular expression in the completion.

    Args:
        pattern: a regular expression (string or compiled pattern).
        mode: ``"count"`` (number of non-overlapping matches) or ``"any"`` (1.0 / 0.0).
        flags: ``re`` flags used when ``pattern`` is a string.
    """

    name = "regex"

    def __init__(self, pattern: str | re.Pattern[str], mode: str = "count", flags: int = 0) -> None:
        self.mode = _choice("mode", mode, ("count", "any"))
        try:
            self.pattern = re.compile(pattern, flags)
        except (re.error, TypeError) as exc:
            raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc

    def __call__(self, prompts: list[str], completions: list[str], **metadata: Any) -> list[float]:
        if self.mode == "any":
            return [float(self.pattern.search(c) is not None) for c in completions]
        return [float(sum(1 for _ in self.pattern.finditer(c))) for c in completions]


class KeywordReward(RegexReward):
    """Occurrences of any of ``keywords`` in the completion.

    Matches are non-overlapping and longer keywords win (``["new", "new york"]``
    counts ``"new york"`` once).

    Args:
        keywords: non-empty list of non-empty strings (a single string is accepted).
        case_sensitive: match case exactly (default: ignore case).
        mode: ``"count"`` or ``"any"`` (1.0 if any keyword occurs, else 0.0).
        whole_word: only match keywords not embedded in a longer word.
    """

    name = "keyword"

    def __init__(
        self,
        keywords: Sequence[str] | str,
        case_sensitive: bool = False,
        mode: str = "count",
        whole_word: bool = True,
    ) -> None:
        if isinstance(keywords, str):
            keywords = [keywords]
        if (
            not isinstance(keywords, Sequence)
            or not keywords
            or not all(isinstance(k, str) and k for k in keywords)
        ):
            raise ValueError(f"keywords must be a non-empty list of non-empty strings, got {keywords!r}")
        self.keywords = list(keywords)
        alternatives = "|".join(re.escape(k) for k in sorted(self.keywords, key=len, reverse=True))
        # Look-arounds instead of \b so that keywords like "C++" also work.
        pattern = rf"(?<!\w)(?:{alternatives})(?!\w)" if whole_word else f"(?:{alternatives})"
        super().__init__(pattern, mode=mode, flags=0 if case_sensitive else re.IGNORECASE)


# ---------------------------------------------------------------------------
# Combination
# ---------------------------------------------------------------------------


class WeightedReward(Reward):
    """Weighted sum of other rewards; metadata is passed to every component.

    ``components`` may be

    * a dict ``{name: weight}`` of registered rewards with default options;
    * a list of dicts ``{"name": str, "weight": float, "kwargs": dict}``
      (``weight`` defaults to 1, ``kwargs`` to ``{}``);
    * a list of ``(reward, weight)`` tuples, where ``reward`` is a name, a
      :class:`Reward` or a reward function.
    """

    name = "weighted"

    def __init__(
        self,
        components: Mapping[str, float] | Sequence[Mapping[str, Any] | tuple[Any, float]],
    ) -> None:
        if isinstance(components, Mapping):
            items = [(as_reward(name), weight) for name, weight in components.items()]
        elif isinstance(components, Sequence) and not isinstance(components, str):
            items = [self._component(c) for c in components]
        else:
            raise ValueError(f"components must be a dict or a list, got {components!r}")
        if not items:
            raise ValueError("components must not be empty")
        self.components: list[tuple[ValidatedReward, float]] = [
            (reward, _finite(f"weight of {reward.name!r}", weight)) for reward, weight in items
        ]

    @staticmethod
    def _component(spec: Any) -> tuple[ValidatedReward, Any]:
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"name", "weight", "kwargs"}
            if "name" not in spec or unknown:
                raise ValueError(
                    f"component {dict(spec)!r} must have a 'name' "
                    "and only the keys 'name', 'weight', 'kwargs'"
                )
            return as_reward(spec["name"], **dict(spec.get("kwargs") or {})), spec.get("weight", 1.0)
        if isinstance(spec, tuple) and len(spec) == 2:
            return as_reward(spec[0]), spec[1]
        raise ValueError(
            f"invalid component {spec!r}; expected {{'name': ..., 'weight': ..., 'kwargs': ...}} "
            "or a (reward, weight) tuple"
        )

    def __call__(self, prompts: list[str], completions: list[str], **metadata: Any) -> list[float]:
        total = [0.0] * len(completions)
        for reward, weight in self.components:
            for i, value in enumerate(reward(prompts, completions, **metadata)):
                total[i] += weight * value
        return total


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
