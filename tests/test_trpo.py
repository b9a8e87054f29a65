"""TRPO: the conjugate-gradient solve, the natural direction against an explicit Fisher matrix, and
steps that stay inside the trust region on the tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from textgym.agents.trpo.trpo import TRPO, conjugate_gradient
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from textgym import agents

TOY = dict(model="textgym/tiny", reward="keyword", reward_kwargs={"keywords": ["the"]}, max_new_tokens=8,
           max_prompt_tokens=16, kl_coef=0.01,
           prompts=["The film", "I saw a movie and", "My friend said that", "Today"])


def make(**hp):
    hp = {"seed": 0, "n_steps": 16, "batch_size": 32, "learning_rate": 3e-3, **hp}
    return agents.make("trpo", "textgym/TextGen-v0", n_envs=4, env_kwargs=TOY, **hp)


def test_conjugate_gradient_solves_a_positive_definite_system():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(12, dtype=torch.float64)
    b = torch.randn(12, generator=gen, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, max_steps=12)
    torch.testing.assert_close(x, torch.linalg.solve(a, b))
    assert torch.equal(conjugate_gradient(lambda v: a @ v, torch.zeros(12, dtype=torch.float64), 5),
                       torch.zeros(12, dtype=torch.float64))


def test_the_natural_direction_solves_the_damped_fisher_system():
    """On a linear softmax policy, the Fisher-vector products (derivative of the KL's gradient) and
    CG give (F + damping I)^-1 g, with F the Hessian of the mean KL(old || new) at the old weights,
    here computed in full."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 5).double()
    states = torch.randn(7, 3, dtype=torch.float64)
    actions = torch.randint(5, (7,))
    advantages = torch.randn(7, dtype=torch.float64)
    params = list(layer.parameters())
    start = parameters_to_vector(params).detach().clone()
    with torch.no_grad():
        old = torch.log_softmax(layer(states), -1)

    def objective_and_kl(log_probs):
        taken = log_probs.gather(-1, actions[:, None]).squeeze(-1) - old.gather(-1, actions[:, None]).squeeze(-1)
        return (advantages * torch.exp(taken)).mean(), (old.exp() * (old - log_probs)).sum(-1).mean()

    def at(vector):  # the layer's log-probs as a function of its flat weights
        weight, bias = vector[:15].view(5, 3), vector[15:]
        return torch.log_softmax(states @ weight.T + bias, -1)

    fisher = torch.autograd.functional.hessian(lambda v: objective_and_kl(at(v))[1], start)
    gradient = torch.autograd.functional.jacobian(lambda v: objective_and_kl(at(v))[0], start)
    damping = 0.1
    expected = torch.linalg.solve(fisher + damping * torch.eye(len(start), dtype=torch.float64), gradient)

    objective, kl = objective_and_kl(torch.log_softmax(layer(states), -1))
    fake = SimpleNamespace(cg_damping=damping, cg_max_steps=4 * len(start))
    direction, curvature = TRPO._natural_direction(fake, objective, kl, params)  # type: ignore[arg-type]
    torch.testing.assert_close(direction, expected, rtol=1e-4, atol=1e-5)  # CG stops at a residual of 1e-5
    torch.testing.assert_close(curvature, expected @ (fisher + damping * torch.eye(len(start), dtype=torch.float64))
                               @ expected)


def _log_probs_at(model, obs, vector):
    actor, _ = model._parameters()
    keep = parameters_to_vector(actor).detach().clone()
    with torch.no_grad():
        vector_to_parameters(vector, actor)
        out = model._log_probs(obs)
        vector_to_parameters(keep, actor)
    return out


@pytest.mark.parametrize("target_kl", [0.01, 1e-4])
def test_every_step_stays_inside_the_trust_region_and_the_critic_leaves_the_policy_alone(target_kl):
    model = make(target_kl=target_kl)
    actor, critic = model._parameters()
    assert critic and all(not any(p is q for q in critic) for p in actor)
    for _ in range(2):
        before = parameters_to_vector(actor).detach().clone()
        head_before = parameters_to_vector(critic).detach().clone()
        model.learn(model.n_steps * model.n_envs, reset_num_timesteps=False)
        logs = model.logger.name_to_value
        obs = next(model.rollout_buffer.get(None)).observations
        old, new = _log_probs_at(model, obs, before), _log_probs_at(model, obs, parameters_to_vector(actor).detach())
        kl = float((old.exp() * (old - new)).sum(-1).mean())
        assert kl <= target_kl * (1 + 1e-5)
        # The KL the line search accepted is the KL of the final weights: the critic's fit moved no policy weight.
        assert kl == pytest.approx(logs["train/approx_kl"], rel=1e-3, abs=1e-9)  # (float32 rounding)
        if logs["train/line_search_success"]:
            assert logs["train/policy_objective_after"] > logs["train/policy_objective"]
            assert not torch.equal(parameters_to_vector(actor).detach(), before)
        else:
            assert torch.equal(parameters_to_vector(actor).detach(), before)
        assert not torch.equal(parameters_to_vector(critic).detach(), head_before)  # the critic did learn
    assert logs["train/line_search_success"] == 1.0


def test_trpo_refuses_what_it_does_not_do():
    with pytest.raises(ValueError, match=r"clip_range: not hyperparameter\(s\) of trpo; valid: .*cg_damping"):
        make(clip_range=0.1)
    with pytest.raises(ValueError, match=r"clip_range: not hyperparameter\(s\) of TRPO \(clip_range: no ratio "
                                         r"clipping: the trust region bounds the step\)"):
        TRPO(env=make().env, clip_range=0.1)
    with pytest.raises(ValueError, match=r"target_kl must be a number in \(0, inf\), got 0"):
        make(target_kl=0)
    with pytest.raises(ValueError, match="trpo takes one natural-gradient step .* micro_batch_size not supported"):
        make(micro_batch_size=2)
    with pytest.raises(ValueError, match="does not add a KL term to its loss"):
        agents.make("trpo", "textgym/TextGen-v0", n_envs=4, env_kwargs={**TOY, "kl_in": "loss"}, n_steps=16,
                    batch_size=32)


def test_a_saved_trpo_agent_loads_with_its_weights_and_hyperparameters(tmp_path):
    model = make(target_kl=0.02, cg_max_steps=7)
    model.learn(model.n_steps * model.n_envs)
    model.save(tmp_path / "trpo")
    loaded = agents.load(tmp_path / "trpo", "textgym/TextGen-v0", n_envs=4, env_kwargs=TOY)
    assert isinstance(loaded, TRPO) and loaded.target_kl == 0.02 and loaded.cg_max_steps == 7
    for a, b in zip(model.policy.state_dict().values(), loaded.policy.state_dict().values()):
        torch.testing.assert_close(a, b)
