"""Precision (model dtype, float32 log-prob maths, loss scaling), the per-process device, and the
memory controls (micro-batches, gradient checkpointing), which must leave an update unchanged."""

import numpy as np
import pytest
import torch
from textgym.agents.update import micro_batches

from textgym import agents, precision
from textgym.envs.core import TextGenConfig, TextGenCore
from textgym.pipeline.config import ConfigError, load_config
from textgym.pipeline.train_config import TrainConfig

PROMPTS = ["The film", "I saw a movie and", "My friend said that", "Today", "Last night", "Once upon a time"]
TOY = dict(model="textgym/tiny", reward="keyword", reward_kwargs={"keywords": ["the"]}, max_new_tokens=8,
           max_prompt_tokens=16, kl_coef=0.01, prompts=PROMPTS)
# SGD makes the parameters after an update linear in its gradients, so "same gradient" shows as "same
# parameters" without Adam's first step (g / |g|) magnifying float noise in near-zero coordinates.
SGD = {"optimizer_class": torch.optim.SGD}


def make(algo, n_envs=4, env_kwargs=None, **hp):
    hp = {"seed": 0, "learning_rate": 3e-3, **hp}
    return agents.make(algo, "textgym/TextGen-v0", n_envs=n_envs, env_kwargs={**TOY, **(env_kwargs or {})}, **hp)


def one_iteration(model):
    model.learn(1)  # one rollout and one update, whatever the rollout's size
    return model.logger.name_to_value


def trained_parameters(model):
    return {name: p.detach().clone() for name, p in model.policy.named_parameters() if p.requires_grad}


# --- bad values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["dtype", "ref_dtype"])
def test_an_unknown_dtype_is_refused_by_name(key):
    with pytest.raises(ValueError, match=rf"{key} must be one of float32, bfloat16, float16.*'float8'"):
        TextGenConfig.from_kwargs(**{key: "float8"})
    with pytest.raises(ValueError, match=r"float32, bfloat16, float16.*torch.float64"):
        precision.resolve_dtype(torch.float64)


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "4"])
def test_a_bad_micro_batch_size_is_refused_by_name(value):
    with pytest.raises(ValueError, match=rf"micro_batch_size must be None .* or an integer >= 1 .*got {value!r}"):
        make("ppo", n_steps=8, batch_size=16, micro_batch_size=value)


def test_train_config_model_dtype_is_the_envs():
    cfg = load_config(TrainConfig, overrides=["model.dtype=bfloat16"])
    assert cfg.env_kwargs()["dtype"] == "bfloat16"
    assert load_config(TrainConfig).env_kwargs()["dtype"] == "float32"
    valid = "float32, bfloat16, float16"
    with pytest.raises(ConfigError, match=rf"model.dtype 'float8' is not a precision; valid: {valid}"):
        load_config(TrainConfig, overrides=["model.dtype=float8"])
    with pytest.raises(ConfigError, match=r"env.kwargs.dtype is set by the model section"):
        load_config(TrainConfig, overrides=["env.kwargs.dtype=bfloat16"])


def test_gradient_checkpointing_must_be_a_bool():
    with pytest.raises(ValueError, match=r"gradient_checkpointing must be True or False, got 'yes'"):
        make("grpo", gradient_checkpointing="yes")


# --- devices ------------------------------------------------------------------------------------------


def test_default_device_per_process(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert precision.default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert precision.default_device() == torch.device("cuda:1")  # torchrun: one GPU per process
    monkeypatch.delenv("LOCAL_RANK")
    assert precision.default_device() == torch.device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=2 names no CUDA device: 2 visible"):
        precision.default_device()
    monkeypatch.setenv("LOCAL_RANK", "first")
    with pytest.raises(ValueError, match=r"LOCAL_RANK must be an integer.*'first'"):
        precision.default_device()


# --- lower precision on CPU ---------------------------------------------------------------------------


def test_bfloat16_env_runs_and_keeps_log_prob_maths_in_float32():
    def play(**kwargs):
        core = TextGenCore(TextGenConfig.from_kwargs(**{**TOY, "kl_mode": "per_token", **kwargs}), n=3)
        core.reset_rows([0, 1, 2], [np.random.default_rng(i) for i in range(3)], {"prompt": "The film"})
        for token in (40, 41, 42):
            core.step(np.full(3, token), np.ones(3, dtype=bool))
        return core

    core = play(dtype="bfloat16")
    assert {p.dtype for p in core.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in core.ref_model.parameters()} == {torch.bfloat16}
    assert core.policy.logits.dtype == torch.float32 and core.logp.dtype == torch.float32
    reference = play()
    # The same log-probs as in float32, within bfloat16's precision (8 bits of mantissa).
    torch.testing.assert_close(core.logp[:, :3], reference.logp[:, :3], atol=0.1, rtol=0.02)
    assert core.logp[:, :3].ne(reference.logp[:, :3]).any()  # it really computed in bfloat16

    mixed = play(ref_dtype="bfloat16")  # a float32 policy beside a bfloat16 reference
    assert {p.dtype for p in mixed.model.parameters()} == {torch.float32}
    assert {p.dtype for p in mixed.ref_model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(mixed.logp, reference.logp)
    torch.testing.assert_close(mixed.ref_logp[:, :3], reference.ref_logp[:, :3], atol=0.1, rtol=0.02)


def test_bfloat16_ppo_update_on_cpu():
    model = make("ppo", env_kwargs={"dtype": "bfloat16", "kl_in": "loss"}, n_steps=8, batch_size=16, n_epochs=2,
                 target_kl=None)
    core = model.core
    before = trained_parameters(model)
    # What the agent trains is float32 master weights; the env's frozen copy of the model is upcast
    # alike, so that it computes the policy's function until the policy moves (a bfloat16 copy
    # started the KL above 0: tests/test_rollout_correctness.py). Both forwards run in bfloat16.
    assert {p.dtype for p in model.policy.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in core.ref_model.parameters()} == {torch.float32}
    assert core.dtype == core.ref_dtype == torch.bfloat16
    logged = one_iteration(model)
    for key in ("train/loss", "train/policy_gradient_loss", "train/value_loss", "train/kl_loss", "train/approx_kl"):
        assert np.isfinite(logged[key]), key
    buffer = model.rollout_buffer
    assert buffer.log_probs.dtype == np.float32 and np.isfinite(buffer.log_probs).all()
    assert np.isfinite(buffer.values).all()
    after = trained_parameters(model)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not model.gradient_step.scaler.is_enabled()  # bfloat16 needs no loss scaling


def test_float16_update_scales_the_loss():
    model = make("grpo", env_kwargs={"dtype": "float16"}, batch_size=32, n_epochs=1)
    assert model.gradient_step.scaler.is_enabled()
    logged = one_iteration(model)
    assert np.isfinite(logged["train/loss"])
    assert all(torch.isfinite(p).all() for p in trained_parameters(model).values())


# --- memory controls: the same update -----------------------------------------------------------------


def trained_once(algo, env_kwargs, hp):
    """An agent after one iteration; its parameters before it; its training forwards; its logs.
    Built and run one after the other: an agent is seeded when built, and its rollout draws from
    torch's global RNG, so two agents built first and run after would not sample alike."""
    model = make(algo, env_kwargs=env_kwargs, policy_kwargs=SGD, learning_rate=0.1, **hp)
    before = trained_parameters(model)
    calls = []
    # A pre-hook of a module inside the layer, so a recomputation counts too (one that stops early
    # once it has rebuilt what backward needs, before the module's end).
    layer = model.policy.lm.model.layers[0].mlp
    layer.register_forward_pre_hook(lambda *_: calls.append(1) if torch.is_grad_enabled() else None)
    logs = dict(one_iteration(model))
    return model, before, calls, logs


def assert_same_update(plain, other, before):
    np.testing.assert_array_equal(other.rollout_buffer.log_probs, plain.rollout_buffer.log_probs)  # same rollout
    theirs, ours = trained_parameters(plain), trained_parameters(other)
    moved = max(float((theirs[k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-3  # the update did move the weights, far beyond the tolerance below
    for key in before:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


# PPO with the KL in the loss (its reduction is split too) and GRPO with each loss normalisation.
# The critic-free algorithms' first update moves only if a group's scores differ: they count the
# letter "e", which differs between almost any two completions of the tiny model (the word "the"
# may not occur in any of four).
LETTERS = {"reward_kwargs": {"keywords": ["e"], "whole_word": False}}
CASES = [
    ("ppo", {"kl_in": "loss"}, {"n_steps": 12, "batch_size": 24, "n_epochs": 2, "target_kl": None}),
    ("grpo", LETTERS, {"batch_size": 40, "n_epochs": 2, "loss_normalization": "sequence"}),
    ("grpo", LETTERS, {"batch_size": 40, "n_epochs": 2, "loss_normalization": "token"}),
    ("rloo", {"kl_in": "loss", **LETTERS}, {"batch_size": 40, "n_epochs": 1, "loss_normalization": "sum"}),
]


@pytest.mark.parametrize("algo, env_kwargs, hp", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_micro_batches_give_the_same_update(algo, env_kwargs, hp):
    plain, before, plain_calls, plain_logs = trained_once(algo, env_kwargs, hp)
    micro, _, micro_calls, micro_logs = trained_once(algo, env_kwargs, {**hp, "micro_batch_size": 1})
    assert len(micro_calls) > len(plain_calls)  # it did split the minibatches: one forward per episode
    assert_same_update(plain, micro, before)
    for key in ("train/loss", "train/approx_kl", "train/clip_fraction", "train/entropy_loss"):
        assert micro_logs[key] == pytest.approx(plain_logs[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("algo, env_kwargs, hp", CASES[:2], ids=["ppo", "grpo"])
def test_gradient_checkpointing_gives_the_same_update_and_only_in_training(algo, env_kwargs, hp):
    plain, before, plain_calls, _ = trained_once(algo, env_kwargs, hp)
    checkpointed, _, checkpointed_calls, _ = trained_once(algo, env_kwargs, {**hp, "gradient_checkpointing": True})
    # Each checkpointed layer ran again in backward: twice the forwards of the plain update.
    assert len(checkpointed_calls) == 2 * len(plain_calls) > 0
    assert_same_update(plain, checkpointed, before)
    lm = checkpointed.policy.lm
    assert not any(getattr(m, "gradient_checkpointing", False) for m in lm.modules())  # off for rollouts
    assert not getattr(lm, "_require_grads_hooks", None)
    checkpointed.learn(1, reset_num_timesteps=False)  # the KV-cached rollout after an update still runs


def test_micro_batches_follow_episode_segments():
    groups = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    assert micro_batches(7, None, groups) == [slice(0, 7)]
    assert micro_batches(7, 2, groups) == [slice(0, 4), slice(4, 7)]  # groups 0-1, then 2-3
    assert micro_batches(3, 1) == [slice(0, 1), slice(1, 2), slice(2, 3)]
