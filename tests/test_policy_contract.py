"""The engine/policy contract: the policy reads the engine's cached outputs only for rows named by a
current ticket (``EngineRows``), and those outputs are what a fresh forward would give."""

import numpy as np
import pytest
import textgym.agents.policy as policy_mod
import torch
from textgym.agents.policy import grouped_forward

from textgym import agents

TOY = dict(model="textgym/tiny", reward="keyword", reward_kwargs={"keywords": ["the"]}, max_new_tokens=8,
           max_prompt_tokens=16, kl_coef=0.01, stop_on_eos=False,
           prompts=["The film", "I saw a movie and", "My friend said that", "Today"])


def make(algo="ppo", **hp):
    hp = {"seed": 0, "n_steps": 8, "batch_size": 32, "learning_rate": 3e-3, **hp}
    return agents.make(algo, "textgym/TextGen-v0", n_envs=4, env_kwargs=TOY, **hp)


def tensors(model, obs):
    return model.policy.obs_to_tensor(obs)[0]


def mid_episode(model, steps=3):
    """The env's rows a few tokens into their episodes; returns the last observation handed out."""
    env = model.env
    obs = env.reset()
    for _ in range(steps):
        obs, *_ = env.step(np.full(env.num_envs, 11))
    return obs


class CountForwards:
    def __init__(self, monkeypatch):
        self.calls = 0
        monkeypatch.setattr(policy_mod, "grouped_forward", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return grouped_forward(*args, **kwargs)


@pytest.mark.parametrize("algo", ["ppo", "nlpo"])
def test_cached_and_fresh_paths_agree(algo, monkeypatch):
    model = make(algo, **({"top_p": 0.6} if algo == "nlpo" else {}))
    policy, env = model.policy, model.env
    obs = mid_episode(model)
    ticket = env.engine_rows(obs)
    assert ticket is not None and ticket.rows == (0, 1, 2, 3)
    t = tensors(model, obs)
    ids, mask = t["input_ids"].long(), t["attention_mask"].long()
    counter = CountForwards(monkeypatch)
    with torch.no_grad():
        cached = policy.engine_outputs(ticket)
        actions, values, logp = policy(t, deterministic=True, engine_rows=ticket)
        boot = policy.predict_values(t, engine_rows=ticket, bootstrap=True)
        assert counter.calls == 0  # all three were read from the engine's cache
        fresh_logits, fresh_hidden = grouped_forward(policy.lm, ids, mask, policy.prompt_len)
        fresh_actions, fresh_values, fresh_logp = policy(t, deterministic=True)
        fresh_boot = policy.predict_values(t)
    torch.testing.assert_close(cached.logits, fresh_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached.states, fresh_hidden, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values, fresh_values, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logp, fresh_logp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(boot, fresh_boot, atol=1e-5, rtol=1e-4)
    assert torch.equal(actions, fresh_actions)
    if algo == "nlpo":
        assert torch.equal(policy.allowed_tokens(ids, mask, cached), policy.allowed_tokens(ids, mask))
        assert cached.allowed.sum() < cached.allowed.numel() / 2  # the mask really cuts


def test_rollouts_read_the_cache(monkeypatch):
    model = make("ppo")
    model._setup_learn(model.n_steps * model.n_envs, callback=None)
    counter = CountForwards(monkeypatch)
    model.collect_rollouts(model.env, model._init_callback(None), model.rollout_buffer, model.n_steps)
    assert counter.calls == 0  # every step and the bootstrap were served by the engine


def test_stale_or_foreign_observation_is_never_served_from_the_cache():
    model = make("ppo")
    policy, env, core = model.policy, model.env, model.env.core
    old = mid_episode(model, steps=2)
    old_ticket = env.engine_rows(old)
    new, *_ = env.step(np.full(env.num_envs, 12))
    # An older observation: the vec env no longer vouches for it, and the engine refuses its ticket.
    assert env.engine_rows(old) is None
    assert core.cached_outputs(old_ticket) is None and core.cached_states(old_ticket) is None
    t_old = tensors(model, old)
    with torch.no_grad():
        fresh = policy.predict_values(t_old)
        served = policy.predict_values(t_old, engine_rows=old_ticket, bootstrap=True)
        _, values, _ = policy(t_old, engine_rows=old_ticket)
    assert torch.equal(served, fresh) and torch.equal(values, fresh)  # computed afresh, not the new rows' cache
    # A copy of the current observation, equal array for array, carries no ticket.
    assert env.engine_rows({k: v.copy() for k, v in new.items()}) is None
    # The engine moved on behind the vec env's back: the ticket of its last observation is stale.
    ticket = env.engine_rows(new)
    assert core.cached_outputs(ticket) is not None
    core.step(np.full(core.n, 13), np.ones(core.n, dtype=bool))
    assert env.engine_rows(new) is ticket and core.cached_outputs(ticket) is None
    # A reset names new rows: tickets from before it are stale, even where the tokens are equal.
    obs = env.reset()
    core.reset_rows([0], [np.random.default_rng(0)], {"prompt_index": 0})
    assert core.cached_outputs(env.engine_rows(obs)) is None


def test_tickets_are_refused_where_they_cannot_apply():
    model = make("ppo")
    other = make("ppo")
    obs = model.env.reset()
    ticket = model.env.engine_rows(obs)
    with pytest.raises(ValueError, match="another engine"):
        other.env.core.cached_outputs(ticket)
    with pytest.raises(ValueError, match="no gradient"):
        model.policy.predict_values(tensors(model, obs), engine_rows=ticket)
    model.env.core.stop_all()
    assert model.env.core.cached_outputs(ticket) is None  # rows that stopped are not running


def test_one_nucleus_mask_per_rollout_step():
    # The masking model's nucleus (a vocabulary sort) is computed once per step and shared by the
    # policy's sampling and the step's log-prob and kept mass.
    model = make("nlpo", top_p=0.6)
    core = model.env.core
    model._setup_learn(model.n_steps * model.n_envs, callback=None)
    computed = []
    allowed_tokens = core.acting.allowed_tokens
    core.acting.allowed_tokens = lambda logits: computed.append(len(logits)) or allowed_tokens(logits)
    model.collect_rollouts(model.env, model._init_callback(None), model.rollout_buffer, model.n_steps)
    assert computed == [core.n] * model.n_steps


def test_single_env_acts_under_the_nucleus_mask():
    import copy

    import gymnasium as gym

    env = gym.make("textgym/TextGen-v0", **TOY)
    core = env.unwrapped.core
    core.acting.set_nucleus_mask(copy.deepcopy(core.model), 0.5)
    env.reset(seed=0)
    logits = env.unwrapped.next_token_logits()
    assert logits.shape == (core.vocab,)
    allowed = torch.isfinite(logits) & (logits > torch.finfo(logits.dtype).min)
    assert 0 < int(allowed.sum()) < core.vocab // 2
    _, _, _, _, info = env.step(int(logits.argmax()))
    assert core.mask_mass[0, 0] > 0.5  # the step masked with the same nucleus
