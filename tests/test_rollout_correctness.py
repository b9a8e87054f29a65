"""Six ways a rollout or an update can measure or learn the wrong thing, each pinned by a test that
fails on the code that had it:

1. prompts repeating across iterations (SB3's row seeds ``seed + i`` with an agent reseeded
   ``seed + iteration``);
2. an adaptive KL controller whose default horizon cannot move the coefficient within a run;
3. a bfloat16 reference computing differently from the float32 master weights it is a copy of;
4. the ratio's old log-probs taken from the KV-cached sampling forward, which in bfloat16 is not
   the function the update evaluates;
5. the KL loss term not importance-weighted once the samples are off-policy;
6. ``loss_normalization="sum"`` weighing a token by what else its minibatch holds.
"""

import numpy as np
import pytest
import torch
from textgym.agents.critic_free import aggregate

from textgym import agents
from textgym import kl as klmod
from textgym.pipeline.config import ConfigError, load_config
from textgym.pipeline.train import iteration_seed
from textgym.pipeline.train_config import TrainConfig
from textgym.prompts import sentiment_prompts

PROMPTS = ["The film", "I saw a movie and", "My friend said that", "Today", "Last night", "Once upon a time", "We"]
TOY = dict(model="textgym/tiny", reward="keyword", reward_kwargs={"keywords": ["the"]}, max_new_tokens=6,
           max_prompt_tokens=16, kl_coef=0.05, prompts=PROMPTS)


# --- 1. every episode's prompt an independent draw ----------------------------------------------------


def _iteration_prompts(seed: int, iterations: int, n_envs: int = 16) -> list[np.ndarray]:
    """The prompt indices that the agent's env draws at the start of each ``textgym train``
    iteration (the run reseeds the agent with ``iteration_seed`` and starts fresh episodes)."""
    vec = agents.as_vec_env("textgym/TextGen-v0", n_envs, {"max_new_tokens": 2})
    draws = []
    for it in range(iterations):
        vec.seed(iteration_seed(seed, it))
        vec.reset()
        draws.append(vec.core.prompt_index.copy())
    return draws


def test_iterations_draw_prompts_independently():
    draws = _iteration_prompts(seed=0, iterations=8)  # the default run: 8 iterations of 16 episodes
    n_prompts, n_draws = len(sentiment_prompts("train").prompts), 16 * 8
    distinct = len(set(np.concatenate(draws).tolist()))
    expected = n_prompts * (1 - (1 - 1 / n_prompts) ** n_draws)  # independent uniform draws
    # The old seeding drew 22 distinct prompts here (each iteration its predecessor's, shifted a row).
    assert distinct >= 0.85 * expected, (distinct, expected)
    for before, after in zip(draws, draws[1:]):
        assert not np.array_equal(after[:-1], before[1:])  # no iteration replays the last one, shifted
    # Another seed draws other prompts: seed 1's first iteration is not seed 0's second.
    other = _iteration_prompts(seed=1, iterations=1)[0]
    assert not np.array_equal(other, draws[1]) and not np.array_equal(other[:-1], draws[0][1:])


def test_iteration_seeds_are_unrelated_and_reproducible():
    seeds = {iteration_seed(s, it) for s in range(4) for it in range(50)}
    assert len(seeds) == 200  # (seed, iteration) pairs never share a seed (seed + it would: 53 of 200)
    assert iteration_seed(3, 7) == iteration_seed(3, 7)


def test_group_rows_draw_independent_prompts_per_iteration():
    vec = agents.as_vec_env("textgym/TextGen-v0", 16, {"max_new_tokens": 2, "group_size": 4})
    groups_prompts = []
    for it in range(8):
        vec.seed(iteration_seed(0, it))
        vec.reset()
        prompts = vec.core.prompt_index.reshape(4, 4).copy()
        assert (prompts == prompts[:, :1]).all()  # a group shares its prompt
        groups_prompts.append(prompts[:, 0])
    assert len(set(np.concatenate(groups_prompts).tolist())) >= 26  # of 32 group draws; E ~ 29.6 of 200


# --- 2. an adaptive KL controller that can reach its target within a run ---------------------------


def test_default_horizon_reaches_the_target_within_a_default_run():
    """A KL that falls as the coefficient rises (KL = c / beta), twice the target at first: the
    default run's 8 batches of 16 episodes bring it to within 5% of the target."""
    target, controller = 1.0, klmod.make_controller(0.05, kl_target=1.0)
    c = 2.0 * target * controller.value
    for _ in range(8):
        controller.update(c / controller.value, n_steps=16)
    assert abs(c / controller.value - target) < 0.05 * target
    # And down: a KL half the target lowers the coefficient as far.
    low = klmod.make_controller(0.05, kl_target=1.0)
    c = 0.5 * target * low.value
    for _ in range(8):
        low.update(c / low.value, n_steps=16)
    assert abs(c / low.value - target) < 0.1 * target


def test_env_controller_moves_with_the_default_horizon():
    """Far from its target, the coefficient moves by the full step every rollout: 1 +- 0.2 * 4 / 32
    for 4 episodes (the KL of the first rollout, before any update, is about 0: below the target;
    after updates it is far above)."""
    env_kwargs = {**TOY, "kl_target": 1e-3}
    model = agents.make("reinforce++", "textgym/TextGen-v0", n_envs=4, env_kwargs=env_kwargs, seed=0,
                        learning_rate=3e-2)
    values = [model.core.kl_controller.value]
    for _ in range(4):
        model.learn(1, reset_num_timesteps=False)
        values.append(model.core.kl_controller.value)
    steps = [after / before - 1 for before, after in zip(values, values[1:])]
    assert all(abs(abs(step) - 0.025) < 1e-9 for step in steps), steps
    assert steps[-1] > 0


# --- 3. the bfloat16 reference computes as the float32 master weights ------------------------------


def _bf16_agent(algo: str, **env_kwargs):
    kwargs = {**TOY, "dtype": "bfloat16", "stop_on_eos": False, **env_kwargs}
    return agents.make(algo, "textgym/TextGen-v0", n_envs=4, env_kwargs=kwargs, seed=0, learning_rate=3e-3)


def _rollout(model):
    model._setup_learn(1, callback=None)
    assert model.collect_rollouts(model.env, model._init_callback(None), model.rollout_buffer, model.n_steps)
    return model.rollout_buffer


def test_bfloat16_full_fine_tuning_starts_on_the_reference():
    model = _bf16_agent("reinforce++", kl_mode="per_token")
    core = model.core
    assert next(core.model.parameters()).dtype == torch.float32  # master weights
    assert next(core.ref_model.parameters()).dtype == torch.float32  # the copy computes alike
    _rollout(model)  # before any update: the policy is the reference
    kls = [s["kl"] for s in model._episode_stats]
    assert len(kls) == 4 and all(k == 0.0 for k in kls), kls
    # Teacher-forced (kl_mode="final"), the reference's log-probs are the policy's.
    rows = np.arange(core.n)
    core.length[rows] = core.T  # the finished episodes' tokens are still in the rows
    from textgym import lm

    P = core.P
    ids, mask = torch.as_tensor(core.input_ids), torch.as_tensor(core.attention_mask)
    policy_logp = lm.completion_logprobs(core.model, ids[:, :P], mask[:, :P], ids[:, P:], mask[:, P:],
                                         dtype=core.dtype).float()
    assert torch.equal(core.scoring.ref_logprobs(rows), policy_logp)


# --- 4. the ratio's old log-probs come from the function the update evaluates ------------------------


def one_minibatch_rollout(model, algo: str):
    """A rollout whose update would be one minibatch (PPO: 6 steps of every row), ready to update."""
    if algo == "ppo":
        model.n_steps, model.batch_size = 6, 1000  # one minibatch: the whole rollout
        model.rollout_buffer.buffer_size = 6
        model.rollout_buffer.reset()
    buffer = _rollout(model)
    model.policy.set_training_mode(True)
    model.prepare_update()
    return buffer


def first_minibatch_figures(model, buffer, algo: str):
    """``(minibatch, figures)`` of the update's first minibatch loss, before any step."""
    data = next(iter(buffer.get(None)))
    with torch.no_grad():
        if algo == "ppo":
            _, parts = model.minibatch_loss(data, data.advantages, 0.2, None, slice(None))
        else:
            _, parts = model.minibatch_loss(data, 0.2, slice(None))
    return data, parts


@pytest.mark.parametrize("algo", ["ppo", "reinforce++"])
def test_first_ratio_is_one_in_bfloat16(algo):
    model = _bf16_agent(algo)
    buffer = one_minibatch_rollout(model, algo)
    assert buffer.behaviour_log_probs is not None  # the sampler's log-probs are kept
    data, parts = first_minibatch_figures(model, buffer, algo)
    if algo == "ppo":  # the sampler's log-probs differ from the training forward's by rounding
        assert (data.old_log_prob - data.behaviour_log_prob).abs().max() > 1e-4
    assert float(parts["train/approx_kl"]) < 1e-7 and float(parts["train/clip_fraction"]) == 0.0


@pytest.mark.parametrize("algo", ["ppo", "reinforce++"])
def test_float32_updates_use_the_samplers_log_probs(algo):
    model = agents.make(algo, "textgym/TextGen-v0", n_envs=4, env_kwargs=TOY, seed=0, learning_rate=3e-3)
    buffer = _rollout(model)
    model.prepare_update()
    assert buffer.behaviour_log_probs is None  # one function in float32: no second forward


# --- 5. the KL loss, importance-weighted off-policy -------------------------------------------------


def test_kl_loss_gradient_is_the_kl_gradient_under_the_behaviour_policy():
    """By enumeration over a 5-token vocabulary: with tokens drawn from mu (the rollout's policy),
    E_mu[grad kl_loss] equals grad KL(pi || pi_ref) exactly; without the weight it does not."""
    torch.manual_seed(0)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    mu_logp = torch.log_softmax(torch.randn(5, dtype=torch.float64), -1)  # sampled the tokens
    ref_logp = torch.log_softmax(torch.randn(5, dtype=torch.float64), -1)
    tokens = torch.arange(5)

    logp = torch.log_softmax(theta, -1)
    exact = torch.autograd.grad((logp.exp() * (logp - ref_logp)).sum(), theta)[0]

    def expected_grad(weighted: bool):
        logp = torch.log_softmax(theta, -1)[tokens]
        terms = klmod.kl_loss(logp, ref_logp[tokens], mu_logp[tokens] if weighted else None)
        return torch.autograd.grad((mu_logp.exp() * terms).sum(), theta)[0]

    assert torch.allclose(expected_grad(True), exact, atol=1e-12)
    assert not torch.allclose(expected_grad(False), exact, atol=1e-3)
    # On-policy (mu = pi) the weight is 1: the plain k2 term.
    logp = torch.log_softmax(theta, -1).detach()
    assert torch.equal(klmod.kl_loss(logp, ref_logp, logp), klmod.kl_loss(logp, ref_logp))


def test_agents_weight_the_kl_loss_by_the_ratio():
    model = agents.make("ppo", "textgym/TextGen-v0", n_envs=4, seed=0, learning_rate=3e-3, n_steps=6,
                        batch_size=1000, env_kwargs={**TOY, "kl_in": "loss"})
    buffer = _rollout(model)
    model.prepare_update()
    data = next(iter(buffer.get(None)))
    log_prob = data.old_log_prob + 0.3  # as if the policy had moved: ratio e^0.3 on every token
    log_prob.requires_grad_(True)
    parts: dict = {}
    loss = model.add_kl_loss(torch.zeros(()), parts, data, log_prob)
    expected = np.exp(0.3) * klmod.kl_loss(log_prob, data.ref_log_prob).mean()
    assert torch.allclose(loss, model.kl_coef_used * expected)


# --- 6. "sum" divides by a constant --------------------------------------------------------------


def test_sum_normalization_weighs_every_token_alike():
    """Two token-filled minibatches, one of two long completions, one of four short ones: under
    "sum" every token's gradient weight is 1 / capacity in both."""
    capacity = 8
    long_mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 1]])
    short_mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
    for mask in (long_mask, short_mask):
        values = torch.ones_like(mask, requires_grad=True)
        aggregate(values, mask, "sum", capacity=capacity).backward()
        assert torch.equal(values.grad, mask / capacity)
    with pytest.raises(ValueError, match="capacity"):
        aggregate(torch.ones(1, 2), torch.ones(1, 2), "sum")


def test_critic_free_sum_capacity():
    model = agents.make("rloo", "textgym/TextGen-v0", n_envs=4, seed=0, learning_rate=3e-3, batch_size=24,
                        env_kwargs={**TOY, "group_size": 2})
    assert model.loss_normalization == "sum" and model.sum_capacity == 24
    whole = agents.make("rloo", "textgym/TextGen-v0", n_envs=4, seed=0, learning_rate=3e-3, batch_size=None,
                        episodes_per_row=2, env_kwargs={**TOY, "group_size": 2})
    assert whole.sum_capacity == TOY["max_new_tokens"] * 2 * 4
    # The update's policy loss is the token sum over that constant (ratio 1, advantages known).
    buffer = _rollout(model)
    data = next(iter(buffer.get(model.batch_size)))
    with torch.no_grad():
        _, parts = model.minibatch_loss(data, 0.2, slice(None))
    expected = -(data.advantages * data.completion_mask).sum() / 24
    assert torch.allclose(parts["train/policy_gradient_loss"], expected, atol=1e-5)


# --- bad learning rates ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "0", "-0.5"])
def test_bad_learning_rate_is_refused_by_name(value):
    with pytest.raises(ConfigError, match=rf"agent\.hyperparameters\.learning_rate must be a finite number > 0.*"
                                          rf"got {value}"):
        load_config(TrainConfig, overrides=[f"agent.hyperparameters.learning_rate={value}"])
    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
        agents.make("ppo", "textgym/TextGen-v0", n_envs=2, env_kwargs=TOY, learning_rate=float(value))
