"""``agents.PPO`` against the written-out PPO of ``tests/reference_ppo.py``: the same iteration run by
both, from identical agents and identical random states, must give the same parameters.

Two agents are built identically (same seed). One runs ``learn`` for one iteration; the other's
LM, value head and optimizer are handed to the reference, which drives the other agent's engine
itself. The sampled tokens are the same because both draw them with SB3's call (one
``Categorical(logits).sample()`` per step over all rows) from the same global torch RNG state,
and the prompts the same because both give row ``i`` the stream ``SeedSequence(seed, spawn_key=(i,))``.
"""

import numpy as np
import pytest
import torch
from reference_ppo import ppo_iteration

from textgym import agents, models

PROMPTS = ["The film", "I saw a movie and", "My friend said that", "Today"]
SEED, N_ENVS, N_STEPS = 3, 4, 8  # 8 steps of 6-token episodes: every row ends the rollout mid-episode
ENV = {"model": "textgym/tiny", "reward": "keyword", "reward_kwargs": {"keywords": ["the"]}, "max_new_tokens": 6,
       "max_prompt_tokens": 16, "kl_coef": 0.05, "prompts": PROMPTS, "stop_on_eos": False}
# Adam's first step moves every weight by about +-lr whatever its gradient's size (m / sqrt(v) is
# sign(g)), so with the default eps=1e-8 a weight whose gradient is float noise (~1e-9, it differs
# between two correct implementations in the last bits) moves +-lr at random. eps=1e-4 keeps the
# update proportional to such gradients: weights with real gradients (1e-4 .. 1e-1) still move by
# up to lr, and the agents' remaining disagreement is float rounding (~3e-7, against 1e-5).
HP = {"seed": SEED, "n_steps": N_STEPS, "batch_size": N_STEPS * N_ENVS, "n_epochs": 2, "learning_rate": 3e-3,
      "target_kl": None, "policy_kwargs": {"optimizer_kwargs": {"eps": 1e-4}}}

CASES = {
    "kl-in-reward": {},
    "kl-in-reward-vf-clip": {"hp": {"clip_range_vf": 0.05}},
    "kl-in-loss": {"env": {"kl_in": "loss"}},
    "kl-in-loss-vf-clip": {"env": {"kl_in": "loss"}, "hp": {"clip_range_vf": 0.05}},
    # EOS ends episodes early; several minibatches of whole episodes, drawn in a random order;
    # discounting and an entropy bonus.
    "eos-minibatches": {"env": {"stop_on_eos": True}, "hp": {"batch_size": 16, "gamma": 0.99, "ent_coef": 0.01}},
    # approx_kl is ~0 before the first step and above 1.5 * target_kl after it: one step, then stop.
    "early-stop": {"hp": {"target_kl": 0.1, "n_epochs": 3}},
    # Across iterations: the second rollout continues episodes begun in the first (its segments
    # start mid-episode), with the cache re-encoded under the new weights and the adaptive KL
    # coefficient moved once on the first rollout's mean KL.
    "two-iterations-adaptive-kl": {"iterations": 2, "env": {"kl_in": "loss", "kl_target": 1.0, "kl_horizon": 20},
                                   "hp": {"batch_size": 16}},
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and on a shared, loaded machine several threads waiting
    on each other make a case take seconds instead of a fraction of one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ref_model():
    """A perturbed copy of the tiny model as the KL reference, so the KL term is not 0 at the start
    (with the policy as its own reference, k2's gradient vanishes on the first step)."""
    model, _ = models.load("textgym/tiny")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def build(case):
    env_kwargs = {**ENV, **case.get("env", {}), "ref_model": ref_model()}
    hp = {**HP, **case.get("hp", {})}
    return agents.make("ppo", "textgym/TextGen-v0", n_envs=N_ENVS, env_kwargs=env_kwargs, **hp)


def rng_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy()


def by_step(x, n_envs=N_ENVS):
    """The agent's flattened buffer (env-major) as ``[n_steps, n_envs]``."""
    return np.asarray(x).reshape(n_envs, -1).T


@pytest.mark.parametrize("name", list(CASES))
def test_one_ppo_iteration_equals_the_reference(name):
    case = CASES[name]
    agent = build(case)
    states = rng_states()
    before = {k: p.detach().clone() for k, p in agent.policy.named_parameters()}
    iterations = case.get("iterations", 1)
    agent.learn(iterations * N_STEPS * N_ENVS)

    other = build(case)  # seeds the global RNGs and initialises the value head as for `agent`
    # Premise of the comparison: learn() starts from these RNG states (its env reset uses the
    # rows' own generators, seeded from SB3's env seeds, not the global ones).
    assert all(np.array_equal(a, b) for a, b in zip(states, rng_states()))
    policy, core = other.policy, other.env.core
    rngs = None
    for _ in range(iterations):
        out = ppo_iteration(
            core, policy.lm, policy.value_head, policy.optimizer, seed=SEED, rngs=rngs, n_steps=N_STEPS,
            batch_size=other.batch_size, n_epochs=other.n_epochs, gamma=other.gamma, gae_lambda=other.gae_lambda,
            clip_range=other.clip_range(1.0), clip_range_vf=other.clip_range_vf and other.clip_range_vf(1.0),
            normalize_advantage=other.normalize_advantage, ent_coef=other.ent_coef, vf_coef=other.vf_coef,
            max_grad_norm=other.max_grad_norm, target_kl=other.target_kl,
        )
        rngs = out["rngs"]
    roll, buf = out["rollout"], agent.rollout_buffer  # the last iteration's
    assert core.kl_controller.value == agent.env.core.kl_controller.value
    assert (core.kl_controller.value != ENV["kl_coef"]) == ("kl_target" in case.get("env", {}))

    # The case exercises what it says: episodes end inside the rollout and run past its end (the
    # bootstrap), EOS ends some early, value clipping and early stopping take effect.
    assert roll["dones"].any() and not roll["dones"][-1].all() and np.abs(roll["last_values"]).max() > 0
    lengths = roll["obs_mask"][..., ENV["max_prompt_tokens"]:].sum(-1) + 1  # tokens once the step is taken
    assert (lengths[0] > 1).any() == (iterations > 1)  # episodes carried over from the previous rollout
    assert (lengths[roll["dones"]] < ENV["max_new_tokens"]).any() == bool(case.get("env", {}).get("stop_on_eos"))
    updates = out["updates"]
    if case.get("hp", {}).get("clip_range_vf"):
        assert max(u["vf_clip_fraction"] for u in updates) > 0
    if case.get("hp", {}).get("target_kl"):
        assert [bool(u.get("stopped")) for u in updates] == [False, True]
    else:
        n_batches = len(updates) // other.n_epochs
        assert len(updates) == n_batches * other.n_epochs and (n_batches > 1) == (other.batch_size < N_STEPS * N_ENVS)

    # The same rollout, advantages and returns...
    np.testing.assert_array_equal(by_step(buf.actions), roll["actions"])
    np.testing.assert_array_equal(buf.rewards, roll["rewards"])  # left [n_steps, n_envs] by the agent's buffer
    np.testing.assert_allclose(by_step(buf.values), roll["values"], atol=1e-6)
    np.testing.assert_allclose(by_step(buf.log_probs), roll["logps"], atol=1e-5)
    np.testing.assert_allclose(by_step(buf.advantages).flatten(), out["advantages"].numpy(), atol=1e-6)
    np.testing.assert_allclose(by_step(buf.returns).flatten(), out["returns"].numpy(), atol=1e-6)
    # ...the same update statistics (the agent logs their means over the minibatches it evaluated)...
    logged = agent.logger.name_to_value
    for key, ours in (("train/approx_kl", "approx_kl"), ("train/policy_gradient_loss", "policy_loss"),
                      ("train/value_loss", "value_loss"), ("train/clip_fraction", "clip_fraction")):
        assert logged[key] == pytest.approx(np.mean([u[ours] for u in updates]), rel=1e-4, abs=1e-6), key
    # ...and the same parameters, which did move.
    ours, theirs = dict(policy.named_parameters()), dict(agent.policy.named_parameters())
    assert ours.keys() == theirs.keys() == before.keys()
    for key in before:
        torch.testing.assert_close(theirs[key], ours[key], rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    assert max((theirs[k] - before[k]).abs().max().item() for k in before) > 1e-3
