"""Where the time goes: seconds per named phase of the work (``PhaseTimer``), and the figures and
table that ``textgym train`` reports from them.

Every phase is credited with its *own* time: while a phase nested inside it runs, the outer
phase's clock stands still. So the phases of a timed span add up to the span's wall time, and an
outer phase's figure is what remains of it once the nested ones are taken out; e.g. an
iteration's rollout is timed as ``generation`` with ``reference`` and ``reward`` nested inside it,
so ``generation`` is the rollout less the reference model's and the reward's time.

The clock is ``time.perf_counter`` and nothing is synchronised: on CPU the figures are exact; on
CUDA they are host-side times (a kernel launched in one phase may still be running when the host
enters the next, so part of its time can land in a later phase that waits for its result).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

# The phases of a ``textgym train`` iteration, in the order they are reported.
PHASES = ("generation", "reference", "reward", "update", "evaluation", "other")
# The phases of a rollout: what its tokens per second are measured over.
ROLLOUT_PHASES = ("generation", "reference", "reward")


class PhaseTimer:
    """Seconds per named phase, each phase credited with its own time (nested phases excluded).

    ``with timer.phase("reward"): ...`` times a phase; phases nest. ``totals()`` reads the seconds
    so far, ``take()`` reads them and starts from zero (a phase still running keeps running, its
    time so far taken). Cheap: two ``time.perf_counter`` calls per phase.
    """

    def __init__(self) -> None:
        self._totals: dict[str, float] = {}
        self._running: list[str] = []  # the phases entered and not yet left, innermost last
        self._since = 0.0  # when the innermost running phase was last (re)started

    @staticmethod
    def _now() -> float:
        return time.perf_counter()  # looked up on each call: a test may replace the clock

    def _credit(self, now: float) -> None:
        """Give the innermost running phase its time since it was last (re)started."""
        if self._running:
            name = self._running[-1]
            self._totals[name] = self._totals.get(name, 0.0) + (now - self._since)
        self._since = now

    @contextmanager
    def phase(self, name: str | None) -> Iterator[None]:
        """Time the ``with`` block as the phase ``name`` (the phase it is nested in stops meanwhile).
        ``None``: no phase of its own, the block's time stays with the phase it runs in."""
        if name is None:
            yield
            return
        self._credit(self._now())
        self._running.append(name)
        try:
            yield
        finally:
            self._credit(self._now())
            self._running.pop()

    @property
    def running(self) -> tuple[str, ...]:
        """The phases entered and not yet left, outermost first."""
        return tuple(self._running)

    def totals(self) -> dict[str, float]:
        """Seconds per phase so far (a running phase's up to its last change of phase)."""
        return dict(self._totals)

    def take(self) -> dict[str, float]:
        """Seconds per phase so far, the running phase's up to now; the timer starts again from zero."""
        self._credit(self._now())
        out, self._totals = self._totals, {}
        return out


def tokens_per_second(tokens: float, seconds: Mapping[str, float]) -> float:
    """Generated tokens per second of rollout: ``tokens / (generation + reference + reward)``
    seconds (0.0 when no rollout time was measured)."""
    rollout = sum(seconds.get(name, 0.0) for name in ROLLOUT_PHASES)
    return float(tokens) / rollout if rollout > 0 else 0.0


def iteration_figures(seconds: Mapping[str, float], tokens: int) -> dict[str, float]:
    """An iteration's figures from its phases' seconds (``PhaseTimer.take``) and its generated
    tokens: the seconds of every phase of ``PHASES`` (0.0 where it did not run) and
    ``tokens_per_second``. A phase outside ``PHASES`` is counted in ``other``."""
    out = {name: float(seconds.get(name, 0.0)) for name in PHASES}
    out["other"] += sum(float(v) for k, v in seconds.items() if k not in PHASES)
    out["tokens_per_second"] = tokens_per_second(tokens, out)
    return out


def run_totals(history: list[Mapping], prefix: str = "time/") -> dict[str, float]:
    """Seconds per phase over a run's iteration records (``metrics.jsonl``'s lines, whose figures
    are ``{prefix}{phase}``), and ``tokens_per_second`` over the run: its generated tokens (the
    change of ``timesteps`` over the records) per second of rollout."""
    totals = {name: float(sum(r.get(f"{prefix}{name}", 0.0) for r in history)) for name in PHASES}
    rates = [(r[f"{prefix}tokens_per_second"], sum(r.get(f"{prefix}{n}", 0.0) for n in ROLLOUT_PHASES))
             for r in history if f"{prefix}tokens_per_second" in r]
    tokens = sum(rate * seconds for rate, seconds in rates)
    totals["tokens_per_second"] = tokens_per_second(tokens, totals)
    return totals


def breakdown_rows(totals: Mapping[str, float]) -> list[tuple[str, float, float]]:
    """``(phase, seconds, share of the total)`` for every phase of ``PHASES``, then ``total``."""
    total = sum(totals.get(name, 0.0) for name in PHASES)
    rows = [(name, totals.get(name, 0.0), totals.get(name, 0.0) / total if total > 0 else 0.0) for name in PHASES]
    return [*rows, ("total", total, 1.0 if total > 0 else 0.0)]


def markdown(totals: Mapping[str, float], title: str = "") -> str:
    """The breakdown as a Markdown table (a ``title`` line above it, the tokens per second below)."""
    lines = [title, ""] if title else []
    lines += ["| phase | seconds | share |", "|---|---:|---:|"]
    lines += [f"| {name} | {seconds:.2f} | {share:.1%} |" for name, seconds, share in breakdown_rows(totals)]
    rollout = sum(totals.get(name, 0.0) for name in ROLLOUT_PHASES)
    if "tokens_per_second" in totals and rollout > 0:  # (an offline run generates nothing)
        lines += ["", f"generated tokens per second of rollout (generation + reference + reward): "
                      f"{totals['tokens_per_second']:.1f}"]
    return "\n".join(lines) + "\n"
