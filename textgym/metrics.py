"""Evaluation metrics of generated text and of rankings: diversity, perplexity, rank correlation,
Elo and Bradley-Terry ratings with bootstrap confidence intervals, confidence intervals over seeds, and Gao et al.'s
over-optimisation fit. Plain Python and numpy; Spearman's rho and Student's t from scipy."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["distinct_n", "perplexity", "spearman", "elo_ratings", "elo_bootstrap", "bradley_terry",
           "bradley_terry_bootstrap", "mean_ci", "gao_rl_fit", "gao_rl_curve", "proxy_up_gold_down"]

Match = tuple[str, str, float]  # (player a, player b, score of a: 1 win, 0.5 draw, 0 loss)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over ``texts`` (whitespace tokens; n-grams never span texts).
    0.0 when there is no n-gram."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        tokens = text.split()
        grams = list(zip(*(tokens[i:] for i in range(n))))
        seen.update(grams)
        total += len(grams)
    return len(seen) / total if total else 0.0


def perplexity(ref_logprobs_sum: Sequence[float], n_tokens: Sequence[int]) -> float:
    """``exp(-sum(log-probs) / sum(tokens))``: token-weighted, so long texts count more. NaN
    without tokens (so that an evaluation of empty completions still reports)."""
    if len(ref_logprobs_sum) != len(n_tokens):
        raise ValueError(f"{len(ref_logprobs_sum)} log-prob sums but {len(n_tokens)} token counts")
    count = sum(n_tokens)
    if count <= 0:
        return float("nan")
    return math.exp(-sum(ref_logprobs_sum) / count)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either input is constant."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} values but y has {len(y)}")
    if len(x) < 2:
        return float("nan")
    from scipy.stats import spearmanr  # imported here: scipy's import is slow and only this needs it

    return float(spearmanr(x, y)[0])


def elo_ratings(players: Sequence[str], matches: Sequence[Match], k: float = 16, initial: float = 1000,
                rounds: int = 1, seed: int | None = None) -> dict[str, float]:
    """Sequential Elo updates over ``matches`` (``(a, b, score_of_a)``), ``rounds`` passes.

    Each match moves ``a`` by ``k * (score - expected)`` and ``b`` by the opposite, with
    ``expected = 1 / (1 + 10 ** ((r_b - r_a) / 400))``. Elo depends on the order of matches:
    without ``seed`` they are played in the given order; with it, shuffled each round.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    _check_matches(players, matches)
    ratings = {p: float(initial) for p in players}
    rng = random.Random(seed) if seed is not None else None
    order = list(matches)
    for _ in range(rounds):
        if rng is not None:
            rng.shuffle(order)
        for a, b, score in order:
            expected = 1 / (1 + 10 ** ((ratings[b] - ratings[a]) / 400))
            delta = k * (score - expected)
            ratings[a] += delta
            ratings[b] -= delta
    return ratings


def _check_matches(players: Sequence[str], matches: Sequence[Match]) -> None:
    """Every match between known players, with a score in [0, 1]."""
    known = set(players)
    for a, b, score in matches:
        for p in (a, b):
            if p not in known:
                raise ValueError(f"match ({a!r}, {b!r}, {score!r}) has unknown player {p!r}; players: {list(players)}")
        if not 0 <= score <= 1:
            raise ValueError(f"match ({a!r}, {b!r}, {score!r}): the score must be in [0, 1]")


def _bootstrap(rate: Callable[[Sequence[Match]], dict[str, float]], players: Sequence[str],
               matches: Sequence[Match], n_bootstrap: int, seed: int, ci: float) -> dict[str, dict[str, float]]:
    """``rate(matches)`` of every player, with a percentile ``low``/``high`` interval from
    ``n_bootstrap`` resamples of the matches (with replacement)."""
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    point = rate(matches)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {p: [] for p in players}
    for _ in range(n_bootstrap):
        idx: np.ndarray | list[int] = rng.integers(0, len(matches), len(matches)) if matches else []
        for p, r in rate([matches[i] for i in idx]).items():
            samples[p].append(r)
    tail = (1 - ci) / 2 * 100
    return {
        p: {"rating": point[p], "low": float(np.percentile(samples[p], tail)),
            "high": float(np.percentile(samples[p], 100 - tail))}
        for p in players
    }


def elo_bootstrap(players: Sequence[str], matches: Sequence[Match], n_bootstrap: int = 200, seed: int = 0,
                  ci: float = 0.95, **elo_kwargs) -> dict[str, dict[str, float]]:
    """Elo ``rating`` of every player on all matches, with a percentile ``low``/``high`` confidence
    interval from ``n_bootstrap`` resamples of the matches (with replacement). ``elo_kwargs`` go to
    :func:`elo_ratings`. The interval need not contain the rating (Elo is order-dependent)."""
    return _bootstrap(lambda m: elo_ratings(players, m, **elo_kwargs), players, matches, n_bootstrap, seed, ci)


# Bradley-Terry's weak Gaussian prior on the log-strengths (in nats): it keeps a player that won (or
# lost) every match at a finite rating, and moves the others by far less than their intervals.
BT_PRIOR = 1e-4


def bradley_terry(players: Sequence[str], matches: Sequence[Match], initial: float = 1000) -> dict[str, float]:
    """Bradley-Terry maximum-likelihood ratings on the Elo scale: ``P(a beats b) = 1 / (1 + 10 **
    ((r_b - r_a) / 400))`` fitted to all ``matches`` (``(a, b, score_of_a)``, a draw scoring 0.5 to
    each) at once, so, unlike online Elo, the order of the matches does not matter (Chatbot Arena
    moved to it for that reason). Ratings average ``initial``; a weak prior (``BT_PRIOR``) keeps an
    unbeaten player finite."""
    from scipy.optimize import minimize  # imported here: scipy's import is slow and only this needs it

    _check_matches(players, matches)
    index = {p: i for i, p in enumerate(players)}
    wins = np.zeros((len(players), len(players)))
    for a, b, score in matches:
        wins[index[a], index[b]] += score
        wins[index[b], index[a]] += 1 - score

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        diff = theta[:, None] - theta[None, :]
        log_p = -np.logaddexp(0.0, -diff)  # log sigmoid(theta_a - theta_b)
        nll = -float((wins * log_p).sum()) + BT_PRIOR * float(theta @ theta)
        p = np.exp(log_p)
        grad = -((wins * (1 - p)).sum(1) - (wins.T * (1 - p.T)).sum(1)) + 2 * BT_PRIOR * theta
        return nll, grad

    theta = minimize(loss, np.zeros(len(players)), jac=True, method="L-BFGS-B").x
    theta -= theta.mean()
    return {p: float(initial + 400 / math.log(10) * theta[i]) for p, i in index.items()}


def bradley_terry_bootstrap(players: Sequence[str], matches: Sequence[Match], n_bootstrap: int = 200, seed: int = 0,
                            ci: float = 0.95) -> dict[str, dict[str, float]]:
    """Bradley-Terry ``rating`` of every player on all matches with a percentile ``low``/``high``
    interval from ``n_bootstrap`` resamples of the matches (with replacement)."""
    return _bootstrap(lambda m: bradley_terry(players, m), players, matches, n_bootstrap, seed, ci)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """The mean of ``values`` and the half-width of its Student-t confidence interval (over seeds,
    say); the half-width is NaN with fewer than two values (one seed says nothing about noise)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_ci needs at least one value")
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, float("nan")
    from scipy.stats import t  # imported here: scipy's import is slow and only this needs it

    sem = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return mean, float(t.ppf(0.5 + confidence / 2, len(values) - 1) * sem)


def difference_ci(after: tuple[float, float, int], before: tuple[float, float, int],
                  confidence: float = 0.95) -> tuple[float, float]:
    """``after - before`` of two sample means, each given as ``(mean, standard deviation, n)``, and
    the half-width of its Welch-t confidence interval (unequal variances, Welch-Satterthwaite
    degrees of freedom); NaN half-width when either sample has fewer than two values."""
    (m_a, s_a, n_a), (m_b, s_b, n_b) = after, before
    diff = float(m_a - m_b)
    if n_a < 2 or n_b < 2 or not (math.isfinite(s_a) and math.isfinite(s_b)):
        return diff, float("nan")
    from scipy.stats import t  # imported here: scipy's import is slow and only this needs it

    va, vb = s_a**2 / n_a, s_b**2 / n_b
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, 0.0
    dof = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
    return diff, float(t.ppf(0.5 + confidence / 2, dof) * se)


def noise_verdict(difference: float, half: float, null: str = "not distinguishable") -> str:
    """Whether ``difference`` is beyond its interval's half-width ``half``: "beyond the noise", ``null``
    when the interval includes 0, "one seed: no interval" when there is no interval (NaN)."""
    if not math.isfinite(half):
        return "one seed: no interval"
    return "beyond the noise" if abs(difference) > half else null


def plus_minus(mean: float, half: float, digits: int = 3) -> str:
    """``mean ± half`` for a table, or ``mean`` alone when there is no interval (NaN)."""
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if math.isfinite(half) else f"{mean:.{digits}f}"


def compare_to_best(samples: dict[str, Sequence[float]], confidence: float = 0.95) -> list[dict]:
    """Each sample's mean against the largest mean (one value per seed, say): the difference
    ``best - other``, the half-width of its Welch-t interval (``difference_ci``) and a verdict,
    "beyond the noise" when the interval excludes 0, "not distinguishable" when it does not, and
    "one seed: no interval" when a sample has a single value. One entry per sample but the best."""
    if len(samples) < 2:
        return []

    def summary(values: Sequence[float]) -> tuple[float, float, int]:
        v = np.asarray(values, dtype=float)
        return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), int(v.size)

    stats = {label: summary(values) for label, values in samples.items()}
    best = max(stats, key=lambda label: stats[label][0])
    out = []
    for label, stat in stats.items():
        if label == best:
            continue
        diff, half = difference_ci(stats[best], stat, confidence)
        out.append({"best": best, "other": label, "difference": diff, "ci": half,
                    "verdict": noise_verdict(diff, half)})
    return out


def gao_rl_fit(kl: Sequence[float], gold: Sequence[float]) -> dict:
    """Fit Gao et al. 2022's RL over-optimisation form to a gold-score curve.

    With ``d = sqrt(KL)`` to the initial policy, "Scaling Laws for Reward Model Overoptimization"
    (eq. 2) models the gold score gained under RL as ``R(d) = d (alpha - beta log d)``. The form is
    linear in ``(alpha, beta)``, so it is fitted by least squares on the gains over the point with
    the smallest KL (the initial policy). With ``beta > 0`` the gold score peaks at
    ``d* = exp(alpha / beta - 1)``, i.e. KL* = d*^2, where the gain is ``beta d*``.

    :param kl: KL to the reference (nats) at each point of the curve, the initial policy included.
    :param gold: gold score at each point.
    :return: ``{"alpha", "beta", "r2", "gold_0", "kl_peak", "gold_peak", "n"}``; ``kl_peak`` and
        ``gold_peak`` are None when the fit has no maximum (``beta <= 0``: the gold score keeps rising),
        all fit values None with fewer than 3 points.
    """
    if len(kl) != len(gold):
        raise ValueError(f"kl has {len(kl)} values but gold has {len(gold)}")
    kl_arr, gold_arr = np.asarray(kl, dtype=float), np.asarray(gold, dtype=float)
    keep = np.isfinite(kl_arr) & np.isfinite(gold_arr)
    kl_arr, gold_arr = np.maximum(kl_arr[keep], 0.0), gold_arr[keep]
    out: dict = {"alpha": None, "beta": None, "r2": None, "gold_0": None, "kl_peak": None, "gold_peak": None,
                 "n": int(kl_arr.size)}
    if kl_arr.size < 3:
        return out
    start = int(np.argmin(kl_arr))
    gold_0 = float(gold_arr[start])
    d = np.sqrt(kl_arr)
    d_log_d = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)  # d log d -> 0 as d -> 0
    design = np.stack([d, -d_log_d], axis=1)
    gain = gold_arr - gold_0
    (alpha, beta), *_ = np.linalg.lstsq(design, gain, rcond=None)
    residual = gain - design @ np.array([alpha, beta])
    total = float(np.sum((gain - gain.mean()) ** 2))
    out.update(alpha=float(alpha), beta=float(beta), gold_0=gold_0,
               r2=1.0 - float(np.sum(residual ** 2)) / total if total > 0 else float("nan"))
    if beta > 0 and alpha / beta - 1.0 < 50:  # a peak beyond d = e^50 is no peak at any reachable KL
        d_peak = math.exp(alpha / beta - 1.0)
        out.update(kl_peak=d_peak ** 2, gold_peak=gold_0 + beta * d_peak)
    return out


def gao_rl_curve(fit: dict, kl: Sequence[float] | np.ndarray) -> np.ndarray:
    """The fitted gold score ``gold_0 + d (alpha - beta log d)`` at each ``kl`` (see ``gao_rl_fit``)."""
    d = np.sqrt(np.maximum(np.asarray(kl, dtype=float), 0.0))
    d_log_d = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    return fit["gold_0"] + fit["alpha"] * d - fit["beta"] * d_log_d


def proxy_up_gold_down(proxy: Sequence[float], gold: Sequence[float], window: int = 3) -> bool:
    """Reward hacking, as the evaluations show it: over the last ``window`` evaluations the proxy
    score rose at every step while the gold score fell at every step."""
    if len(proxy) != len(gold):
        raise ValueError(f"proxy has {len(proxy)} values but gold has {len(gold)}")
    if window < 2:
        raise ValueError(f"window must be >= 2 evaluations, got {window}")
    if len(proxy) < window:
        return False
    p, g = np.asarray(proxy[-window:], dtype=float), np.asarray(gold[-window:], dtype=float)
    return bool(np.all(np.diff(p) > 0) and np.all(np.diff(g) < 0))
