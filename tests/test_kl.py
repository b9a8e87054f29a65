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


# --- placement: which estimator's gradient is the gradient of KL(pi || pi_ref) -------------------


def _categorical():
    torch.manual_seed(1)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ref_logp = torch.log_softmax(torch.randn(5, dtype=torch.float64), 0)
    return theta, ref_logp


def _expected_gradient(kl_in: str, estimator: str) -> torch.Tensor:
    """The exact expected gradient (enumerating the 5 tokens) that an RL update follows when the KL
    term is placed in the reward (score-function gradient of the detached term) or in the loss
    (the term differentiated through log pi at the sampled token), tokens drawn from pi."""
    theta, ref_logp = _categorical()
    logp = torch.log_softmax(theta, 0)
    pi = logp.exp().detach()  # sampling probabilities: no gradient flows through the sampling
    if kl_in == "reward":
        term = kl.kl_terms(logp - ref_logp, estimator).detach()
        surrogate = (pi * term * logp).sum()  # REINFORCE: E[term(y) * log pi(y)]
    else:
        term = kl.kl_loss(logp, ref_logp) if estimator == "k2" else kl.kl_terms(logp - ref_logp, estimator)
        surrogate = (pi * term).sum()
    (grad,) = torch.autograd.grad(surrogate, theta)
    return grad


def _exact_kl_gradient() -> torch.Tensor:
    theta, ref_logp = _categorical()
    logp = torch.log_softmax(theta, 0)
    (grad,) = torch.autograd.grad((logp.exp() * (logp - ref_logp)).sum(), theta)
    return grad


@pytest.mark.parametrize("kl_in", kl.PLACEMENTS)
@pytest.mark.parametrize("estimator", kl.ESTIMATORS)
def test_only_gradient_correct_placements_are_allowed(kl_in, estimator):
    exact = _exact_kl_gradient()
    assert exact.abs().max() > 0.05
    grad = _expected_gradient(kl_in, estimator)
    correct = torch.allclose(grad, exact, atol=1e-10)
    if (kl_in, estimator) in (("reward", "k1"), ("loss", "k2")):
        assert correct, (grad, exact)
        assert kl.resolve_estimator(kl_in, estimator) == estimator
    else:
        assert not correct  # this pair would follow another gradient...
        with pytest.raises(ValueError, match="is refused"):  # ...so it is refused
            kl.resolve_estimator(kl_in, estimator)
    assert kl.resolve_estimator(kl_in) == kl.ESTIMATOR_FOR[kl_in]


def test_adaptive_controller_moves_once_on_the_batch_mean():
    # Half the episodes at KL 0, half at 4x the target: the mean is 2x the target, so the
    # coefficient rises by the clipped error 0.2 (per-episode updates would cancel out).
    c = kl.make_controller(0.1, kl_target=1.0, kl_horizon=100)
    kls = [0.0, 4.0] * 8
    c.update(sum(kls) / len(kls), n_steps=len(kls))
    assert c.value == pytest.approx(0.1 * (1 + 0.2 * 16 / 100))
