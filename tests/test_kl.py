import math

import pytest
import torch

from textgym import kl


def test_estimators_against_hand_values():
    r = torch.tensor([0.5, -0.2, 0.0])
    assert kl.kl_terms(r, "k1").tolist() == pytest.approx([0.5, -0.2, 0.0])
    assert kl.kl_terms(r, "k2").tolist() == pytest.approx([0.125, 0.02, 0.0])
    expected = [math.exp(-0.5) - 1 + 0.5, math.exp(0.2) - 1 - 0.2, 0.0]
    assert kl.kl_terms(r, "k3").tolist() == pytest.approx(expected, rel=1e-6)
    assert (kl.kl_terms(torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError, match="unknown kl_estimator 'k9'; valid: k1, k2, k3"):
        kl.kl_terms(r, "k9")


def test_estimators_are_unbiased_or_close_on_samples():
    # Exact KL between two categoricals versus the sample means of k1 and k3.
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(8), 0)
    q = torch.softmax(torch.randn(8), 0)
    exact = (p * (p / q).log()).sum().item()
    y = torch.multinomial(p, 200_000, replacement=True)
    r = p.log()[y] - q.log()[y]
    assert kl.kl_terms(r, "k1").mean().item() == pytest.approx(exact, abs=0.01)
    assert kl.kl_terms(r, "k3").mean().item() == pytest.approx(exact, abs=0.01)


def test_fixed_controller():
    c = kl.make_controller(0.1)
    assert isinstance(c, kl.FixedKLController)
    assert c.update(5.0, 100) == 0.1
    with pytest.raises(ValueError, match="kl_coef must be a finite number >= 0, got -1"):
        kl.make_controller(-1)
    with pytest.raises(ValueError, match="kl_coef must be a number or a KLController, got 'big'"):
        kl.make_controller("big")


def test_adaptive_controller_follows_ziegler():
    c = kl.make_controller(0.2, kl_target=6.0, kl_horizon=100)
    assert isinstance(c, kl.AdaptiveKLController)
    # KL 9 vs target 6: error 0.5 clipped to 0.2; 10 samples over horizon 100.
    assert c.update(9.0, n_steps=10) == pytest.approx(0.2 * (1 + 0.2 * 10 / 100))
    # KL 5.4: error -0.1, not clipped.
    before = c.value
    assert c.update(5.4, n_steps=50) == pytest.approx(before * (1 - 0.1 * 50 / 100))
    state = c.state_dict()
    d = kl.make_controller(0.2, kl_target=6.0, kl_horizon=100)
    d.load_state_dict(state)
    assert d.value == c.value
    with pytest.raises(ValueError, match="kl_target must be > 0"):
        kl.make_controller(0.2, kl_target=0)
    assert kl.make_controller(c) is c
    assert kl.KLConfig(coef=0.3, target=1.0).controller().target == 1.0
