"""The RL maths of the agents, checked against hand computations: KL placement, the KL controller,
evaluation that changes nothing, NLPO's acting distribution, LoRA's reference, GAE."""

import json
import warnings

import numpy as np
import pytest
import stable_baselines3 as sb3
import torch
from stable_baselines3.common.utils import obs_as_tensor
from textgym.agents import evaluate

from textgym import agents, lm, models
from textgym.pipeline.evaluate import evaluate_target

TOY = dict(model="textgym/tiny", reward="keyword", reward_kwargs={"keywords": ["the"]}, max_new_tokens=6,
           max_prompt_tokens=16, kl_coef=0.1, prompts=["The film", "I saw a movie and", "My friend said that", "Today"])


def perturbed_tiny(scale=0.05, seed=0):
    model, _ = models.load("textgym/tiny")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def make(algo="ppo", n_envs=4, env_kwargs=None, **hp):
    hp = {"seed": 0, "n_steps": 12, "learning_rate": 3e-3, **hp}
    if algo != "a2c":
        hp.setdefault("batch_size", 24)
    return agents.make(algo, "textgym/TextGen-v0", n_envs=n_envs, env_kwargs={**TOY, **(env_kwargs or {})}, **hp)


def collect_one_rollout(model):
    model._setup_learn(model.n_steps * model.n_envs, callback=None)
    model.collect_rollouts(model.env, model._init_callback(None), model.rollout_buffer, model.n_steps)
    return model.rollout_buffer


# --- the KL controller ----------------------------------------------------------------------------


def test_controller_moves_once_per_rollout_on_the_mean_kl():
    model = make(env_kwargs={"ref_model": perturbed_tiny(), "kl_target": 2.0, "kl_horizon": 50})
    core = model.env.core
    start = core.kl_controller.value
    collect_one_rollout(model)
    episodes = model._episode_stats
    assert len(episodes) >= 8
    assert {e["kl_coef"] for e in episodes} == {start}  # every row of the rollout saw one coefficient
    kls = [e["kl"] for e in episodes]
    assert np.ptp(kls) > 0.05
    error = float(np.clip(np.mean(kls) / 2.0 - 1, -0.2, 0.2))
    assert core.kl_controller.value == pytest.approx(start * (1 + error * len(kls) / 50))
    assert model.logger.name_to_value["rollout/kl_k3_mean"] >= 0


def test_controller_state_is_saved_with_the_agent(tmp_path):
    model = make(env_kwargs={"ref_model": perturbed_tiny(), "kl_target": 0.5, "kl_horizon": 20})
    model.learn(96)
    value = model.env.core.kl_controller.value
    assert value != pytest.approx(0.1)
    model.save(tmp_path / "agent")
    loaded = agents.load(tmp_path / "agent", env="textgym/TextGen-v0", n_envs=4,
                         env_kwargs={**TOY, "ref_model": perturbed_tiny(), "kl_target": 0.5, "kl_horizon": 20})
    assert loaded.env.core.kl_controller.value == value


# --- evaluation changes nothing ---------------------------------------------------------------------


def _params(model):
    return [p.detach().clone() for p in model.policy.parameters()]


@pytest.mark.parametrize("algo", ["ppo", "nlpo"])
def test_evaluation_between_updates_changes_nothing(algo):
    kwargs = {"ref_model": perturbed_tiny(), "kl_target": 1.0, "kl_horizon": 20}
    plain = make(algo, env_kwargs=kwargs)  # seeds the global RNGs, which learning draws from
    for _ in range(3):
        plain.learn(48, reset_num_timesteps=False)
    probed = make(algo, env_kwargs=kwargs)
    for _ in range(3):
        probed.learn(48, reset_num_timesteps=False)
        evaluate(probed, 5)
        evaluate(probed, 3, deterministic=True)
    for a, b in zip(_params(plain), _params(probed)):
        assert torch.equal(a, b)
    assert plain.env.core.kl_controller.value == probed.env.core.kl_controller.value
    assert plain.logger.name_to_value == probed.logger.name_to_value


def test_evaluate_counts_episodes_per_env():
    model = make(n_envs=3)
    summary = evaluate(model, 8)
    assert len(summary["episodes"]) == 8
    # The same call again gives the same episodes (seeded), and the training state did not move.
    assert [e["completion"] for e in evaluate(model, 8)["episodes"]] == [e["completion"] for e in summary["episodes"]]


# --- KL in the loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["ppo", "a2c", "nlpo"])
def test_kl_in_the_loss(algo):
    # (the letter "e" as reward: some of 8 completions score, whatever tokens the seed draws)
    model = make(algo, env_kwargs={"ref_model": perturbed_tiny(), "kl_in": "loss", "stop_on_eos": False,
                                   "reward_kwargs": {"keywords": ["e"], "whole_word": False}})
    buffer = collect_one_rollout(model)
    episodes = model._episode_stats  # 6-token episodes, all rows ending together: env 0's first comes first
    assert len(episodes) == 8 and any(e["score"] for e in episodes)
    assert buffer.rewards.sum() == pytest.approx(sum(e["score"] for e in episodes))  # the score alone
    # The update's reference log-probs (buffer order: env-major) sum, over env 0's first episode,
    # to the env's own teacher-forced log pi_ref of that completion.
    model.prepare_update()
    assert buffer.ref_log_probs[:6].sum() == pytest.approx(episodes[0]["ref_logprob"], abs=1e-4)
    model.train()
    kl_loss = model.logger.name_to_value["train/kl_loss"]
    assert 0 < kl_loss < 10 and np.isfinite(model.logger.name_to_value["train/loss"])


def test_kl_loss_needs_an_algorithm_that_adds_it(monkeypatch):
    class MyPPO(sb3.PPO):
        pass

    monkeypatch.setattr(agents.registry, "_REGISTRY", dict(agents.registry._REGISTRY))  # the test's own entry
    agents.register("my_ppo_kl_test", MyPPO, overwrite=True)
    with pytest.raises(ValueError, match="does not add a KL term to its loss"):
        agents.make("my_ppo_kl_test", "textgym/TextGen-v0", n_envs=2, env_kwargs={**TOY, "kl_in": "loss"}, n_steps=8,
                    batch_size=16)
    with pytest.raises(ValueError, match="does not add a pretraining term to its loss"):
        agents.make("my_ppo_kl_test", "textgym/TextGen-v0", n_envs=2, env_kwargs=TOY, n_steps=8, batch_size=16,
                    ptx_coef=0.1, ptx_data=["Some text."])


# --- NLPO: the masked policy is what acts, is measured and is saved ---------------------------------


def test_nlpo_kl_is_the_masked_policys_kl():
    # Policy = masking model = reference at the start: under the mask renormalised to mass Z, every
    # token's log-ratio is -log Z, which is also KL(pi_masked || pi_ref) by enumeration.
    model = make("nlpo", env_kwargs={"max_new_tokens": 1, "stop_on_eos": False}, top_p=0.5)
    core = model.env.core
    episodes = evaluate(model, 24)["episodes"]
    for e in episodes:
        tokens = core.tokenizer(e["prompt"])["input_ids"][-core.P :]
        with torch.no_grad():
            logits = core.model(input_ids=torch.tensor([tokens])).logits[0, -1].float()
            ref_logp = torch.log_softmax(core.ref_model(input_ids=torch.tensor([tokens])).logits[0, -1].float(), -1)
        allowed = lm.top_p_mask(logits[None], 0.5)[0]
        masked_logp = torch.log_softmax(logits.masked_fill(~allowed, -torch.inf), -1)
        pi = masked_logp.exp()
        exact = float((pi[allowed] * (masked_logp[allowed] - ref_logp[allowed])).sum())
        assert exact > 0.2  # the mask really cuts: the unmasked log-probs would give ~0
        assert e["kl"] == pytest.approx(exact, abs=1e-4)
        assert e["mask_mass"] == pytest.approx(float(torch.softmax(logits, -1)[allowed].sum()), abs=1e-5)


def test_nlpo_final_model_acts_as_evaluated(tmp_path):
    from textgym.pipeline.config import load_config
    from textgym.pipeline.train import TrainConfig, train

    cfg = load_config(TrainConfig, overrides=[
        "model.name=textgym/tiny", "model.lora=null", "env.id=textgym/TextGen-v0", "env.n_envs=4",
        "env.kwargs.max_new_tokens=6", "env.kwargs.max_prompt_tokens=16", "reward.name=keyword",
        "reward.kwargs.keywords=[the]", "reward.eval=[]", "agent.algo=nlpo", "agent.hyperparameters.n_steps=6",
        "agent.hyperparameters.batch_size=24", "agent.hyperparameters.learning_rate=3e-3",
        "agent.hyperparameters.top_p=0.6", "training.iterations=2", "training.eval_n=12", "training.eval_every=0",
        f"training.output_dir={tmp_path}"])
    result = train(cfg, progress=False)
    saved = json.loads((tmp_path / "final_model" / "textgym_acting.json").read_text())
    assert saved["nucleus_mask"]["top_p"] == 0.6
    evaluated = evaluate_target(str(tmp_path))
    for key in ("score", "kl", "length", "distinct_2"):
        assert evaluated["metrics"][key] == pytest.approx(result["after"][key], abs=1e-6), key
    assert "mask_mass" in json.loads((tmp_path / "eval.json").read_text())["episodes"][0]


# --- LoRA's reference ---------------------------------------------------------------------------------


def test_lora_keeps_a_users_ref_model():
    ref = perturbed_tiny()
    model = make(lora=True, env_kwargs={"ref_model": ref})
    assert model.env.core.ref_model is ref
    model.learn(48)
    assert all(p.requires_grad is False for p in ref.parameters())
    with pytest.raises(ValueError, match="lora bias='all'.*reference would drift"):
        make(lora={"bias": "all"})
    biased = make(lora={"bias": "all"}, env_kwargs={"ref_model": perturbed_tiny()})  # its own reference: fine
    assert biased.env.core.ref_model is not None


# --- GAE with gamma = lambda = 1 ------------------------------------------------------------------------


def test_gae_returns_with_gamma_and_lambda_one():
    # 8-token episodes, 5-step rollouts: the first rollout ends mid-episode and must bootstrap.
    model = make(n_envs=2, n_steps=5, gamma=1.0, gae_lambda=1.0,
                 env_kwargs={"max_new_tokens": 8, "stop_on_eos": False, "kl_mode": "per_token",
                             "ref_model": perturbed_tiny()})
    buffer = collect_one_rollout(model)
    with torch.no_grad():
        bootstrap = model.policy.predict_values(obs_as_tensor(model._last_obs, model.device)).flatten().numpy()
    for env in range(2):
        expected = buffer.rewards[:, env].sum() + bootstrap[env]
        assert buffer.returns[0, env] == pytest.approx(expected, abs=1e-4)
        assert buffer.rewards[:, env].std() > 0  # per-token KL terms: real rewards to sum
    # Second rollout: the episode ends on its third step; its first return is the episode's
    # remaining reward alone (no bootstrap through the end), however the next episode goes on.
    model.train()
    model.collect_rollouts(model.env, model._init_callback(None), model.rollout_buffer, model.n_steps)
    buffer = model.rollout_buffer
    assert buffer.episode_starts[3].all()
    for env in range(2):
        assert buffer.returns[0, env] == pytest.approx(buffer.rewards[:3, env].sum(), abs=1e-4)


# --- defaults that learn ------------------------------------------------------------------------------


def test_ppo_defaults_learn_the_default_env():
    model = agents.make("ppo", "textgym/TextGen-v0", seed=0)
    assert model.learning_rate == 3e-3  # textgym/tiny, full fine-tuning (agents.common.default_learning_rate)
    before = evaluate(model, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.learn(2048)
    after = evaluate(model, 16)
    assert after["score"] > before["score"] + 3, (before["score"], after["score"])
