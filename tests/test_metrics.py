import math

import numpy as np
import pytest

from textgym.metrics import (
    difference_ci,
    distinct_n,
    elo_bootstrap,
    elo_ratings,
    gao_rl_curve,
    gao_rl_fit,
    mean_ci,
    perplexity,
    spearman,
)


def test_distinct_n():
    texts = ["a b a", "b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 5)  # a b a b c
    assert distinct_n(texts, 2) == 1.0  # (a b) (b a) (b c): bigrams never span texts
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a b) (b a) (a b)
    assert distinct_n(["  the cat\tthe\ncat "], 1) == 0.5  # any whitespace splits
    assert distinct_n([], 1) == distinct_n(["one", ""], 2) == 0.0
    with pytest.raises(ValueError, match="n must be"):
        distinct_n(["a"], 0)


def test_perplexity_is_token_weighted():
    assert perplexity([-2.0, -4.0], [1, 3]) == pytest.approx(math.exp(1.5))
    assert perplexity([0.0], [5]) == 1.0
    with pytest.raises(ValueError):
        perplexity([-1.0], [1, 2])
    assert math.isnan(perplexity([], [])) and math.isnan(perplexity([0.0], [0]))


def test_spearman():
    # Ranks with ties: x -> 1, 2.5, 2.5, 4; y -> 1, 3, 2, 4; rho = 4.5 / sqrt(4.5 * 5).
    assert spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(3 / math.sqrt(10))
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        spearman([1, 2], [1])


def test_elo_single_match():
    assert elo_ratings(["a", "b"], [("a", "b", 1.0)], k=16) == {"a": 1008.0, "b": 992.0}
    assert elo_ratings(["a", "b"], [("a", "b", 0.0)], k=16) == {"a": 992.0, "b": 1008.0}
    assert elo_ratings(["a", "b"], [("a", "b", 0.5)], k=16) == {"a": 1000.0, "b": 1000.0}
    assert elo_ratings(["a", "b", "c"], [], initial=1500) == {"a": 1500.0, "b": 1500.0, "c": 1500.0}


def test_elo_sequential_updates_and_rounds():
    second = 16 * (1 - 1 / (1 + 10 ** (-16 / 400)))  # a (1008) beats b (992) again
    ratings = elo_ratings(["a", "b"], [("a", "b", 1.0)], k=16, rounds=2)
    assert ratings == pytest.approx({"a": 1008 + second, "b": 992 - second})
    assert ratings == elo_ratings(["a", "b"], [("a", "b", 1.0)] * 2, k=16)
    # Order matters, hence shuffling with a seed is reproducible and may differ from the given order.
    matches = [("a", "b", 1.0), ("b", "c", 1.0), ("c", "a", 0.5), ("a", "c", 1.0), ("b", "a", 1.0)] * 3
    shuffled = elo_ratings(["a", "b", "c"], matches, rounds=3, seed=1)
    assert shuffled == elo_ratings(["a", "b", "c"], matches, rounds=3, seed=1)
    assert shuffled != elo_ratings(["a", "b", "c"], matches, rounds=3)
    assert sum(shuffled.values()) == pytest.approx(3000)  # zero-sum updates
    with pytest.raises(ValueError, match="unknown player 'd'"):
        elo_ratings(["a", "b"], [("a", "d", 1.0)])
    with pytest.raises(ValueError, match="score"):
        elo_ratings(["a", "b"], [("a", "b", 2.0)])


def test_elo_bootstrap_intervals():
    players = ["a", "b", "c"]
    matches = ([("a", "b", 1.0)] * 8 + [("a", "b", 0.0)] * 2 + [("b", "c", 1.0)] * 7 + [("b", "c", 0.0)] * 3
               + [("a", "c", 1.0)] * 9 + [("c", "a", 1.0)])
    result = elo_bootstrap(players, matches, n_bootstrap=200, seed=0, rounds=3)
    point = elo_ratings(players, matches, rounds=3)
    for p in players:
        assert result[p]["rating"] == point[p]
        assert result[p]["low"] <= result[p]["rating"] <= result[p]["high"]
        assert result[p]["low"] < result[p]["high"]
    assert result["a"]["rating"] > result["b"]["rating"] > result["c"]["rating"]
    assert result == elo_bootstrap(players, matches, n_bootstrap=200, seed=0, rounds=3)
    narrow = elo_bootstrap(players, matches, n_bootstrap=200, seed=0, ci=0.5, rounds=3)
    assert narrow["a"]["high"] - narrow["a"]["low"] < result["a"]["high"] - result["a"]["low"]
    with pytest.raises(ValueError, match="ci"):
        elo_bootstrap(players, matches, ci=1.5)


def test_mean_ci_is_student_t():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    # t(0.975, 2) = 4.303; sd = 1; sem = 1/sqrt(3)
    assert mean == 2.0 and half == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    mean, half = mean_ci([5.0])
    assert mean == 5.0 and math.isnan(half)
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])


def test_gao_fit_recovers_known_parameters():
    alpha, beta, gold_0 = 0.6, 0.25, 0.1
    kl = np.array([0.0, 0.5, 1, 2, 4, 8, 16, 32, 64])
    d = np.sqrt(kl)
    gold = gold_0 + np.where(d > 0, d * (alpha - beta * np.log(np.where(d > 0, d, 1))), 0.0)
    fit = gao_rl_fit(kl, gold)
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-9) and fit["beta"] == pytest.approx(beta, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0) and fit["gold_0"] == pytest.approx(gold_0)
    d_peak = math.exp(alpha / beta - 1)
    assert fit["kl_peak"] == pytest.approx(d_peak ** 2) and fit["gold_peak"] == pytest.approx(gold_0 + beta * d_peak)
    # the peak is the curve's maximum
    grid = np.linspace(0, 200, 20001)
    assert grid[np.argmax(gao_rl_curve(fit, grid))] == pytest.approx(fit["kl_peak"], abs=0.02)
    np.testing.assert_allclose(gao_rl_curve(fit, kl), gold, atol=1e-9)

    # with noise, close; a still-rising curve has no peak; too few points, no fit
    noisy = gold + np.random.default_rng(0).normal(0, 0.005, size=gold.shape)
    fit = gao_rl_fit(kl, noisy)
    assert fit["alpha"] == pytest.approx(alpha, abs=0.05) and fit["beta"] == pytest.approx(beta, abs=0.03)
    for still_rising in (0.3 * d, d ** 1.5):  # linear in d: beta = 0; convex: beta < 0
        fit = gao_rl_fit(kl, still_rising)
        assert fit["beta"] < 1e-9 and fit["kl_peak"] is None and fit["gold_peak"] is None
    assert gao_rl_fit([0, 1], [0, 1])["alpha"] is None
    with pytest.raises(ValueError, match="kl has 2 values but gold has 3"):
        gao_rl_fit([0, 1], [0, 1, 2])


def test_proxy_up_gold_down():
    from textgym.metrics import proxy_up_gold_down

    assert proxy_up_gold_down([0.1, 0.2, 0.3], [0.5, 0.4, 0.3])
    assert proxy_up_gold_down([0.0, 9.0, 0.1, 0.2, 0.3], [0.0, 0.0, 0.5, 0.4, 0.3])  # the last three
    assert not proxy_up_gold_down([0.1, 0.2, 0.3], [0.5, 0.4, 0.4])  # gold flat once
    assert not proxy_up_gold_down([0.1, 0.1, 0.3], [0.5, 0.4, 0.3])  # proxy flat once
    assert not proxy_up_gold_down([0.1, 0.2], [0.5, 0.4])  # too few evaluations
    with pytest.raises(ValueError, match="window must be >= 2"):
        proxy_up_gold_down([1, 2], [2, 1], window=1)


def test_difference_ci_is_welchs_interval():
    from scipy.stats import ttest_ind

    rng = np.random.default_rng(0)
    after, before = rng.normal(0.4, 0.5, 96), rng.normal(0.1, 0.3, 80)
    diff, half = difference_ci((after.mean(), after.std(ddof=1), 96), (before.mean(), before.std(ddof=1), 80))
    low, high = ttest_ind(after, before, equal_var=False).confidence_interval(0.95)
    assert diff == pytest.approx(after.mean() - before.mean())
    assert (diff - half, diff + half) == pytest.approx((low, high))
    assert math.isnan(difference_ci((1.0, 0.1, 1), (0.0, 0.1, 5))[1])  # one completion: no interval


def test_bradley_terry_recovers_known_strengths_whatever_the_order_of_the_games():
    from textgym.metrics import bradley_terry, bradley_terry_bootstrap

    rng = np.random.default_rng(0)
    true = {"a": 1200.0, "b": 1000.0, "c": 900.0, "d": 900.0}  # mean 1000, as the fit is anchored
    players = list(true)
    games = []
    for _ in range(3000):
        i, j = rng.choice(4, 2, replace=False)
        a, b = players[i], players[j]
        games.append((a, b, float(rng.random() < 1 / (1 + 10 ** ((true[b] - true[a]) / 400)))))
    fitted = bradley_terry(players, games)
    for p in players:
        assert abs(fitted[p] - true[p]) < 25, (p, fitted[p])
    reordered = bradley_terry(players, games[::-1])  # unlike online Elo, the order does not matter
    assert all(abs(fitted[p] - reordered[p]) < 1e-3 for p in players)
    assert bradley_terry(["x", "y"], [("x", "y", 0.5)] * 10) == pytest.approx({"x": 1000.0, "y": 1000.0})
    unbeaten = bradley_terry(["x", "y"], [("x", "y", 1.0)] * 5)  # finite, thanks to the weak prior
    assert np.isfinite(unbeaten["x"]) and unbeaten["x"] > unbeaten["y"]
    boot = bradley_terry_bootstrap(players, games[:600], n_bootstrap=50)
    for p in players:
        assert boot[p]["low"] <= boot[p]["rating"] <= boot[p]["high"] and boot[p]["low"] < true[p] < boot[p]["high"]
    with pytest.raises(ValueError, match="unknown player 'z'"):
        bradley_terry(["x"], [("x", "z", 1.0)])
