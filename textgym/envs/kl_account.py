"""The engine's KL coefficient: one owner of the controller and of the KLs it moves on.

The controller (``textgym.kl``: fixed, or Ziegler et al.'s adaptive one) moves once per batch on the
batch's mean KL. Who says when a batch ends is the one choice, made through this API, never by
flipping an engine flag:

- on its own (the default, a plain env): every ``n`` finished episodes, ``n`` the engine's rows,
  after the step in which the n-th finished, so rows finishing together share one coefficient;
- per rollout: an agent calls :meth:`KLAccount.per_rollout` once, then :meth:`KLAccount.end_rollout`
  after each rollout (data-parallel, every rank together: the mean over every rank's episodes).

Saving and restoring the coefficient is :meth:`state_dict` / :meth:`load_state_dict`; an evaluation
engine gets :meth:`frozen`, which neither tracks nor moves.
"""

from __future__ import annotations

import numpy as np

from textgym import distributed
from textgym import kl as klmod


class KLAccount:
    """The KL coefficient of one engine and the KLs of the episodes finished since it last moved.

    :param controller: the coefficient's controller (``textgym.kl.make_controller``).
    :param tracked: whether finished episodes' KLs are kept for the controller (an evaluation
        copy's are not).
    """

    def __init__(self, controller: klmod.KLController, tracked: bool = True):
        self.controller = controller
        self.batch: list[float] | None = [] if tracked else None
        self._auto = tracked  # moves on its own every n episodes until an agent takes over

    @property
    def value(self) -> float:
        """The current coefficient."""
        return self.controller.value

    def record(self, kls) -> None:
        """Keep the KLs of episodes that just finished."""
        if self.batch is not None:
            self.batch.extend(float(k) for k in kls)

    def after_step(self, n_rows: int) -> None:
        """Move on its own once ``n_rows`` episodes have finished (unless an agent drives it)."""
        if self._auto and self.batch is not None and len(self.batch) >= n_rows:
            self.update()

    def per_rollout(self) -> None:
        """From now on the coefficient moves only at :meth:`end_rollout` (an agent's rollouts)."""
        self._auto = False

    def end_rollout(self) -> float | None:
        """The end of an agent's rollout: move once on the mean KL of its episodes, those of every
        rank under data parallelism (all ranks call together). Returns that mean, or None."""
        return self.update(across_ranks=True)

    def update(self, across_ranks: bool = False) -> float | None:
        """Move the coefficient once, on the mean KL of the episodes finished since the last move
        (Ziegler et al. 2019's rule, n = their number). Returns that mean, or None when no episode
        finished. ``across_ranks``: data-parallel (``textgym.distributed``), the mean and number of
        the episodes of every rank's engine, so every rank's coefficient moves alike."""
        if across_ranks and distributed.is_initialized():
            kls = self.batch or []
            total, count = distributed.all_reduce_sum([float(np.sum(kls)), len(kls)])
            if self.batch is not None:
                self.batch = []
            if not count:
                return None
            self.controller.update(float(total / count), n_steps=int(count))
            return float(total / count)
        if not self.batch:
            return None
        mean = float(np.mean(self.batch))
        self.controller.update(mean, n_steps=len(self.batch))
        self.batch = []
        return mean

    def frozen(self) -> KLAccount:
        """A copy at the current coefficient that never moves nor tracks (for evaluation)."""
        return KLAccount(klmod.FixedKLController(self.value), tracked=False)

    def state_dict(self) -> dict:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state)
