"""Surface features of the completion: its length, keywords and regular-expression matches."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from textgym.rewards.options import _choice, _finite
from textgym.rewards.registry import Reward


class LengthReward(Reward):
    """Length of the completion, or its distance to a target length.

    :param unit: ``"words"`` (whitespace-separated) or ``"chars"``.
    :param target: if given, the reward is ``-abs(length - target)``.
    :param scale: multiplier applied to the result.
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

    :param pattern: a regular expression (string or compiled pattern).
    :param mode: ``"count"`` (number of non-overlapping matches) or ``"any"`` (1.0 / 0.0).
    :param flags: ``re`` flags used when ``pattern`` is a string.
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

    :param keywords: non-empty list of non-empty strings (a single string is accepted).
    :param case_sensitive: match case exactly (default: ignore case).
    :param mode: ``"count"`` or ``"any"`` (1.0 if any keyword occurs, else 0.0).
    :param whole_word: only match keywords not embedded in a longer word.
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
