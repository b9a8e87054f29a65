"""Reference-based metrics: BLEU, chrF and ROUGE of the completion against metadata ``references``."""

from __future__ import annotations

from typing import Any

from textgym.rewards.options import _choice, _references
from textgym.rewards.registry import Reward


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
        from sacrebleu.metrics import BLEU  # imported on use: only this reward needs sacrebleu

        options.setdefault("effective_order", True)
        self.metric = BLEU(**options)


class ChrfReward(SacrebleuReward):
    """Sentence-level chrF (sacrebleu) / 100, in [0, 1].

    Needs metadata ``references``.  Keyword arguments go to
    ``sacrebleu.metrics.CHRF`` (e.g. ``word_order=2`` for chrF++).
    """

    name = "chrf"

    def __init__(self, **options: Any) -> None:
        from sacrebleu.metrics import CHRF  # imported on use: only this reward needs sacrebleu

        self.metric = CHRF(**options)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class RougeReward(Reward):
    """ROUGE F-measure (rouge-score) of the completion against ``references``.

    With several references per sample the best score is used.

    :param rouge_type: one of ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``.
    :param use_stemmer: apply the Porter stemmer before matching.
    """

    name = "rouge"

    def __init__(self, rouge_type: str = "rougeL", use_stemmer: bool = False) -> None:
        from rouge_score import rouge_scorer  # imported on use: only this reward needs rouge-score

        self.rouge_type = _choice("rouge_type", rouge_type, ROUGE_TYPES)
        self.scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=use_stemmer)

    def __call__(self, prompts: list[str], completions: list[str], **metadata: Any) -> list[float]:
        refs = _references(self.name, metadata, len(completions))
        return [
            self.scorer.score_multi(ref, hyp)[self.rouge_type].fmeasure for hyp, ref in zip(completions, refs)
        ]
