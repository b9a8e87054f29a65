"""KL penalty: per-token estimators of KL(pi || pi_ref) and the controllers of its coefficient.

One implementation shared by the environments and the agents.

Estimators follow Schulman, "Approximating KL Divergence" (2020). With tokens sampled from pi and
``log_ratio = log pi(y) - log pi_ref(y)``:

- ``k1 = log_ratio``: unbiased, high variance, can be negative per sample;
- ``k2 = log_ratio**2 / 2``: biased, low variance, always >= 0;
- ``k3 = (exp(-log_ratio) - 1) + log_ratio``: unbiased, low variance, always >= 0.

Where the KL term goes decides which estimator is right (Tang & Munos 2025, "On a few pitfalls in
KL divergence gradient estimation for RL"). What an RL algorithm follows is a *gradient*, and:

- **in the reward** (``kl_in="reward"``, the default) a policy-gradient method only sees the
  score-function gradient ``E[term(y) * grad log pi(y)]`` of the term. Only ``k1`` makes that
  ``grad KL(pi || pi_ref)``; ``k3`` gives ``grad KL + E_ref[grad log pi]`` (~0 near the
  reference), ``k2`` a second-order quantity. So the reward takes ``k1`` alone.
- **in the loss** (``kl_in="loss"``) the term is differentiated through ``log pi`` of the sampled
  tokens. ``k2`` gives ``E[(log pi - log pi_ref) grad log pi] = grad KL(pi || pi_ref)`` on-policy;
  ``k1`` gives ``E[grad log pi] = 0``; ``k3`` gives the gradient of the *forward* KL(pi_ref || pi).
  So the loss takes ``k2`` alone.

``k3`` (always >= 0, unbiased) stays a logged diagnostic next to ``k1``. ``kl_estimator=None``
picks the right estimator for the placement; a wrong pair is refused with the reason.

Coefficient control follows Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences", section 2.2: ``beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)``,
once per batch of ``n`` episodes on the batch's mean KL. ``horizon`` is in episodes, and sets how far
the coefficient can move in a run: at most a factor ``1 +- 0.2 n / horizon`` per batch. Ziegler et
al.'s (and TRL's) 10000 suits batches of hundreds of episodes over hundreds of updates; at
textgym's sizes (16 episodes a batch, 8 to 30 updates a run) it moves the coefficient by 0.03% a
batch, and ``kl_target`` would do nothing. The default, ``DEFAULT_HORIZON = 32`` episodes, lets a
batch of 16 move it by up to 10% (a factor 2.1 over 8 batches, 17 over 30): a run of the shipped
size brings a KL twice its target back to within 5% of it (``tests/test_rollout_correctness.py``).
Near the target the step is ``(KL / target - 1) * n / horizon``, a gain of ``n / horizon`` on the
relative error: keep ``horizon`` at or above the batch's episodes (a gain of at most 1), so the
coefficient does not overshoot.
"""

from __future__ import annotations

import math

import torch

ESTIMATORS = ("k1", "k2", "k3")
DEFAULT_HORIZON = 32  # episodes; see the module docstring
PLACEMENTS = ("reward", "loss")
# The one gradient-correct estimator of each placement (see the module docstring).
ESTIMATOR_FOR = {"reward": "k1", "loss": "k2"}
_WHY_NOT = {
    ("reward", "k2"): "k2's score-function gradient is second order, not the gradient of KL(pi || pi_ref)",
    ("reward", "k3"): "k3's score-function gradient is grad KL + E_ref[grad log pi], about zero near the reference",
    ("loss", "k1"): "k1 differentiated through log pi has expected gradient E[grad log pi] = 0",
    ("loss", "k3"): "k3 differentiated through log pi gives the gradient of the forward KL(pi_ref || pi)",
}


def check_estimator(estimator: str) -> str:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    return estimator


def resolve_estimator(kl_in: str, estimator: str | None = None) -> str:
    """The estimator of placement ``kl_in`` (``"reward"`` or ``"loss"``): ``estimator`` if it is the
    gradient-correct one there, the right one when ``None``; a wrong pair raises, saying why."""
    if kl_in not in PLACEMENTS:
        raise ValueError(f"unknown kl_in {kl_in!r}; valid: {', '.join(PLACEMENTS)}")
    if estimator is None:
        return ESTIMATOR_FOR[kl_in]
    check_estimator(estimator)
    if estimator != ESTIMATOR_FOR[kl_in]:
        raise ValueError(
            f"kl_estimator {estimator!r} with kl_in={kl_in!r} is refused: {_WHY_NOT[kl_in, estimator]}. "
            f"Valid: kl_in='reward' with k1, or kl_in='loss' with k2 (k3 is always logged as info['kl_k3'])"
        )
    return estimator


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, behaviour_logp: torch.Tensor | None = None) -> torch.Tensor:
    """The per-token KL *loss* term ``k2 = (log pi(y) - log pi_ref(y))**2 / 2``, differentiable
    through ``logp``, importance-weighted for tokens sampled from another policy mu.

    Its gradient is ``(log pi - log pi_ref) grad log pi``, whose expectation over ``y ~ pi`` is
    ``grad KL(pi || pi_ref)``. After an update's first step the tokens are samples of the policy
    that played the rollout (mu, ``behaviour_logp``), not of pi: the term is then multiplied by the
    detached ratio ``pi(y) / mu(y)``, so that its expected gradient under mu is again
    ``grad KL(pi || pi_ref)`` (without the weight it would be that gradient with the ratio missing
    from every token's weight). ``behaviour_logp=None``: the tokens are pi's own (weight 1)."""
    k2 = 0.5 * (logp - ref_logp.detach()).square()
    if behaviour_logp is None:
        return k2
    return torch.exp(logp.detach() - behaviour_logp.detach()) * k2


def kl_terms(log_ratio: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL terms for ``log_ratio = log pi(y_t) - log pi_ref(y_t)`` (any shape)."""
    check_estimator(estimator)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return torch.expm1(-log_ratio) + log_ratio


class KLController:
    """Holds the KL coefficient ``value``; ``update`` is called once per batch with the batch's mean
    KL (per episode) and its number of episodes ``n_steps``."""

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
    Call ``update`` once per batch with the batch's *mean* KL, as Ziegler et al. and TRL do: the
    clip then bounds the step of the mean error, not of each episode's (half the episodes at KL 0
    and half at 4x the target would otherwise cancel to no change).
    """

    def __init__(self, init: float, target: float, horizon: float = DEFAULT_HORIZON):
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


def make_controller(
    kl_coef: float | KLController = 0.05, kl_target: float | None = None, kl_horizon: float = DEFAULT_HORIZON
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
