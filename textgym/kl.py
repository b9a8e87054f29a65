"""KL penalty: per-token estimators of KL(pi || pi_ref) and the controllers of its coefficient.

One implementation shared by the environments and the agents.

Estimators follow Schulman, "Approximating KL Divergence" (2020). With tokens sampled from pi and
``log_ratio = log pi(y) - log pi_ref(y)``:

- ``k1 = log_ratio``: unbiased, high variance, can be negative per sample;
- ``k2 = log_ratio**2 / 2``: biased, low variance, always >= 0;
- ``k3 = (exp(-log_ratio) - 1) + log_ratio``: unbiased, low variance, always >= 0.

Coefficient control follows Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", section 2.2: ``beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

ESTIMATORS = ("k1", "k2", "k3")


def check_estimator(estimator: str) -> str:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    return estimator


def kl_terms(log_ratio: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL terms for ``log_ratio = log pi(y_t) - log pi_ref(y_t)`` (any shape)."""
    check_estimator(estimator)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return torch.expm1(-log_ratio) + log_ratio


class KLController:
    """Holds the KL coefficient ``value``; ``update`` is called with the KL measured on ``n_steps`` samples."""

    value: float

    def update(self, kl: float, n_steps: int = 1) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class FixedKLController(KLController):
    """A constant coefficient."""

    def __init__(self, value: float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"kl_coef must be a finite number >= 0, got {value!r}")
        self.value = float(value)

    def __repr__(self) -> str:
        return f"FixedKLController(value={self.value})"


class AdaptiveKLController(KLController):
    """Ziegler et al. (2019) proportional controller steering the measured KL towards ``target``.

    ``horizon`` is in samples (episodes): the error is applied with weight ``n_steps / horizon``.
    """

    def __init__(self, init: float, target: float, horizon: float = 10000):
        if not math.isfinite(init) or init < 0:
            raise ValueError(f"initial kl_coef must be a finite number >= 0, got {init!r}")
        if not target > 0:
            raise ValueError(f"kl_target must be > 0, got {target!r}")
        if not horizon > 0:
            raise ValueError(f"kl_horizon must be > 0, got {horizon!r}")
        self.value, self.target, self.horizon = float(init), float(target), float(horizon)

    def update(self, kl: float, n_steps: int = 1) -> float:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self.value}, target={self.target}, horizon={self.horizon})"


@dataclass
class KLConfig:
    """KL settings as they appear in configs: a fixed ``coef``, or adaptive when ``target`` is set."""

    coef: float = 0.05
    target: float | None = None
    horizon: float = 10000
    estimator: str = "k1"

    def controller(self) -> KLController:
        return make_controller(self.coef, self.target, self.horizon)


def make_controller(
    kl_coef: Union[float, KLController] = 0.05, kl_target: float | None = None, kl_horizon: float = 10000
) -> KLController:
    """A controller from a number (fixed, or adaptive if ``kl_target`` is given) or an existing controller."""
    if isinstance(kl_coef, KLController):
        if kl_target is not None:
            raise ValueError("pass either a KLController as kl_coef or kl_target, not both")
        return kl_coef
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)):
        raise ValueError(f"kl_coef must be a number or a KLController, got {kl_coef!r}")
    if kl_target is None:
        return FixedKLController(float(kl_coef))
    return AdaptiveKLController(float(kl_coef), kl_target, kl_horizon)
