import copy
import warnings
import zipfile

import gymnasium as gym
import numpy as np
import pytest
import stable_baselines3 as sb3
import torch
from textgym.agents import evaluate
from textgym.agents.nlpo import top_p_mask
from textgym.agents.policy import group_rows

from textgym import agents, models

ALGOS = ["ppo", "a2c", "nlpo"]
TOY = dict(model="textgym/tiny", reward="keyword", reward_kwargs={"keywords": ["the"]}, max_new_tokens=8,
           max_prompt_tokens=16, kl_coef=0.01,
           prompts=["The film", "I saw a movie and", "My friend said that", "Today"])


def make(algo="ppo", n_envs=4, env_kwargs=None, **hp):
    hp = {"seed": 0, "n_steps": 16, "learning_rate": 3e-3, **hp}
    if algo != "a2c":
        hp.setdefault("batch_size", 32)
    return agents.make(algo, "textgym/TextGen-v0", n_envs=n_envs, env_kwargs={**TOY, **(env_kwargs or {})}, **hp)


@pytest.mark.parametrize("algo", ALGOS)
def test_learning_raises_reward(algo):
    extra = {"a2c": {}, "ppo": {"batch_size": 64}, "nlpo": {"batch_size": 64, "mask_update_interval": 2}}[algo]
    model = make(algo, n_envs=8, **extra)
    before = evaluate(model, 64)
    model.learn(2048)
    after = evaluate(model, 64)
    assert after["score"] > before["score"] + 1.0, (before["score"], after["score"])
    assert np.isfinite(after["kl"])


def _collect_one_rollout(model):
    model._setup_learn(model.n_steps * model.n_envs, callback=None)
    callback = model._init_callback(None)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    return model.rollout_buffer


@pytest.mark.parametrize("algo", ALGOS)
def test_grouped_logprobs_equal_per_step_and_rollout(algo):
    model = make(algo)
    buffer = _collect_one_rollout(model)
    policy = model.policy
    for batch in buffer.get(batch_size=32):
        obs, actions = batch.observations, batch.actions
        with torch.no_grad():
            values, logp, entropy = policy.evaluate_actions(obs, actions)
            singles = [policy.evaluate_actions({k: v[i : i + 1] for k, v in obs.items()}, actions[i : i + 1])
                       for i in range(len(actions))]
        group, _, _ = group_rows(obs["input_ids"].long(), obs["attention_mask"].long(), policy.prompt_len)
        assert int(group.max()) + 1 < len(actions) / 2  # rows really were grouped into episodes
        torch.testing.assert_close(logp, torch.cat([s[1] for s in singles]), atol=1e-5, rtol=0)
        torch.testing.assert_close(values.flatten(), torch.cat([s[0].flatten() for s in singles]), atol=1e-5, rtol=0)
        torch.testing.assert_close(entropy, torch.cat([s[2] for s in singles]), atol=1e-5, rtol=0)
        # ... and equal what the KV-cached rollout recorded.
        torch.testing.assert_close(logp, batch.old_log_prob, atol=1e-5, rtol=0)
        torch.testing.assert_close(values.flatten(), batch.old_values, atol=1e-5, rtol=0)


def test_first_ppo_minibatch_has_ratio_one():
    model = make("ppo", n_epochs=1)
    first = {}
    original_get, original_eval = model.rollout_buffer.get, model.policy.evaluate_actions

    def get(batch_size=None):
        for batch in original_get(batch_size):
            first.setdefault("old", batch.old_log_prob.clone())
            yield batch

    def evaluate_actions(obs, actions):
        out = original_eval(obs, actions)
        first.setdefault("new", out[1].detach().clone())
        return out

    model.rollout_buffer.get = get
    model.policy.evaluate_actions = evaluate_actions
    model.learn(model.n_steps * model.n_envs)
    ratio = torch.exp(first["new"] - first["old"])
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


def test_save_load_round_trip_gives_identical_actions(tmp_path):
    model = make("ppo")
    model.learn(128)
    model.save(tmp_path / "agent")
    # The saved policy holds the LM and the value head, never the reference model.
    with zipfile.ZipFile(tmp_path / "agent.zip") as zf, zf.open("policy.pth") as f:
        keys = list(torch.load(f, map_location="cpu", weights_only=True))
    assert any(k.startswith("lm.") for k in keys) and any(k.startswith("value_head.") for k in keys)
    assert not any("ref" in k for k in keys)
    n_lm = len(model.policy.lm.state_dict())
    assert len(keys) == n_lm + 2

    loaded = agents.load(tmp_path / "agent", env="textgym/TextGen-v0", n_envs=4, env_kwargs=TOY)
    assert isinstance(loaded, agents.PPO)
    obs = model.env.reset()
    for _ in range(6):
        a1, _ = model.predict(obs, deterministic=True)
        a2, _ = loaded.predict(obs, deterministic=True)
        np.testing.assert_array_equal(a1, a2)
        with torch.no_grad():
            t = model.policy.obs_to_tensor(obs)[0]
            torch.testing.assert_close(model.policy.predict_values(t), loaded.policy.predict_values(t))
        obs, *_ = model.env.step(a1)
    # the loaded agent's env model is the trained one: same weights as the saved policy
    for p, q in zip(model.policy.lm.parameters(), loaded.env.core.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("lora", [None, {"r": 4}])
def test_same_seed_same_run(lora):
    runs = []
    for _ in range(2):
        model = make("ppo", lora=lora)
        model.learn(128)
        runs.append((model.policy.state_dict(), [e["r"] for e in model.ep_info_buffer]))
    (s1, r1), (s2, r2) = runs
    assert r1 == r2 and len(r1) > 0
    for key in s1:
        assert torch.equal(s1[key], s2[key]), key


def test_top_p_mask_hand_values():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert top_p_mask(logits, 0.7).tolist() == [[True, True, False, False]]
    assert top_p_mask(logits, 0.8).tolist() == [[True, True, False, False]]
    assert top_p_mask(logits, 0.81).tolist() == [[True, True, True, False]]
    assert top_p_mask(logits, 0.1, min_tokens_to_keep=3).tolist() == [[True, True, True, False]]


def test_top_p_mask_is_transformers_nucleus():
    from transformers import TopPLogitsWarper

    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(0)) * 10  # peaked: a long fp32 tail
    for top_p in (0.3, 0.9, 1.0):
        kept = TopPLogitsWarper(top_p)(None, logits) > -torch.inf
        assert torch.equal(top_p_mask(logits, top_p), kept)
    assert top_p_mask(logits, 1.0).all()  # top_p = 1 masks nothing, however small the tail's fp32 sum
    assert torch.equal(top_p_mask(logits[0], 0.9), top_p_mask(logits, 0.9)[0])  # one row works too


def test_nlpo_never_samples_a_masked_token():
    model = make("nlpo", top_p=0.5)
    policy = model.policy
    forward = policy.forward
    seen = {"steps": 0, "allowed": []}

    def checked_forward(obs, deterministic=False, engine_rows=None):
        actions, values, logp = forward(obs, deterministic, engine_rows)
        ids, mask = obs["input_ids"].long(), obs["attention_mask"].long()
        allowed = policy.allowed_tokens(ids, mask, policy.engine_outputs(engine_rows))
        assert allowed[torch.arange(len(actions)), actions].all()
        seen["steps"] += 1
        seen["allowed"].append(allowed.sum(1).float().mean().item())
        return actions, values, logp

    policy.forward = checked_forward
    model.learn(256)
    assert seen["steps"] >= 64
    assert np.mean(seen["allowed"]) < 0.5 * model.action_space.n  # the mask really restricts


def test_nlpo_mask_model_refreshes_every_interval():
    model = make("nlpo", mask_update_interval=2)
    mask_model = model.env.core.acting.nucleus_model
    model.learn(64)  # 1 rollout: masking policy is still the initial copy
    lm = model.policy.lm
    assert any(not torch.equal(p, q) for p, q in zip(mask_model.parameters(), lm.parameters()))
    model.learn(64, reset_num_timesteps=False)  # rollout 2
    model.learn(64, reset_num_timesteps=False)  # rollout 3 starts by syncing
    snapshot = copy.deepcopy(mask_model.state_dict())
    model.learn(64, reset_num_timesteps=False)  # rollout 4: no sync
    for key, value in mask_model.state_dict().items():
        assert torch.equal(value, snapshot[key])


def test_lora_trains_only_adapters_and_reference_is_the_base_model():
    pristine, _ = models.load("textgym/tiny")
    model = make("ppo", lora={"r": 4})
    core = model.env.core
    trainable = {id(p) for group in model.policy.optimizer.param_groups for p in group["params"]}
    names = [n for n, p in model.policy.named_parameters() if id(p) in trainable]
    assert names and all("lora_" in n or n.startswith("value_head") for n in names)
    assert sum(p.numel() for p in core.ref_model.parameters()) == 0  # no second copy of the LM
    model.learn(256)
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in core.model.state_dict().items() if "lora_" not in k}
    for key, value in pristine.state_dict().items():
        assert torch.equal(base[key], value), key
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(core.ref_model(input_ids=ids).logits, pristine(input_ids=ids).logits)
        assert not torch.allclose(core.model(input_ids=ids).logits, pristine(input_ids=ids).logits)


def test_reference_model_is_out_of_the_optimizer():
    model = make("a2c")
    optimized = {id(p) for group in model.policy.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in model.env.core.ref_model.parameters()}
    assert optimized == {id(p) for p in model.policy.parameters()}
    assert isinstance(model.policy.optimizer, torch.optim.AdamW)


def test_rlhf_figures_are_logged(tmp_path):
    model = make("ppo", tensorboard_log=str(tmp_path))
    model.learn(256, progress_bar=True)
    logged = model.logger.name_to_value
    for key in ("train/entropy", "train/clip_fraction", "train/value_loss"):
        assert key in logged
    assert list(tmp_path.rglob("events.out.tfevents*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents*")).parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"rollout/score_mean", "rollout/kl_mean", "rollout/kl_coef", "rollout/completion_length"} <= tags


def test_registry_and_env_forms():
    assert agents.names() == ["a2c", "dpo", "grpo", "ilql", "nlpo", "ppo", "reinforce++", "rloo", "trpo"]
    with pytest.raises(ValueError,
                       match=r"unknown algorithm 'dqn'; valid: a2c, dpo, grpo, ilql, nlpo, ppo, reinforce\+\+, rloo, "
                             r"trpo"):
        agents.make("dqn", "textgym/TextGen-v0")

    class MyPPO(sb3.PPO):
        pass

    cls = agents.register("my_ppo", MyPPO)
    try:
        assert issubclass(cls, MyPPO) and "my_ppo" in agents.names()
        model = agents.make("my_ppo", "textgym/TextGen-v0", env_kwargs=TOY, n_steps=8, batch_size=8, n_epochs=1)
        model.learn(8)
        assert isinstance(model.policy, agents.LMActorCriticPolicy)
    finally:
        agents.registry._REGISTRY.pop("my_ppo")
    with pytest.raises(ValueError, match="already registered"):
        agents.register("ppo", sb3.PPO)

    single = gym.make("textgym/TextGen-v0", **TOY)
    model = agents.make("a2c", single, n_steps=8)
    assert model.n_envs == 1 and model.env.core is single.unwrapped.core
    model.learn(16)
    vec = gym.make_vec("textgym/TextGen-v0", num_envs=3, vectorization_mode="vector_entry_point", **TOY)
    assert agents.make("ppo", vec, n_steps=8, batch_size=8).n_envs == 3
    with pytest.raises(ValueError, match="n_envs=2 does not match"):
        agents.make("ppo", vec, n_envs=2)
    with pytest.raises(ValueError, match="env must be a textgym env id"):
        agents.make("ppo", gym.make("CartPole-v1"))
    with pytest.raises(ValueError, match="unknown env id 'textgym/Nope-v0'"):
        agents.make("ppo", "textgym/Nope-v0")


def test_separate_critic_copy():
    model = make("ppo", policy_kwargs={"critic": "copy"})
    assert model.policy.critic is not None
    assert model.policy.critic is not model.policy.lm
    before = [p.clone() for p in model.policy.critic.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.learn(128)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.policy.critic.parameters()))


def test_rollout_end_does_not_encode_prompts_of_finished_episodes():
    # n_steps == max_new_tokens without EOS: every episode ends on the rollout's last step.
    model = make("ppo", env_kwargs={"stop_on_eos": False}, n_steps=TOY["max_new_tokens"])
    buffer = _collect_one_rollout(model)
    core = model.env.core
    assert core.pending.all()  # the next episodes' prompts wait for the updated weights
    last = buffer.rewards[-1]
    np.testing.assert_allclose(buffer.returns[-1], last, atol=1e-6)  # done: no bootstrap (gamma = 1)


def test_ppo_ptx_adds_the_pretraining_gradient(tmp_path):
    from textgym.agents.ptx import lm_loss, ptx_batches

    texts = tmp_path / "pretrain.txt"
    texts.write_text("\n".join(["The children played in the park after school."] * 4 + ["A cat slept on the mat."] * 4))
    model = make("ppo", ptx_coef=0.5, ptx_data=str(texts), ptx_batch_size=4)
    lm_model = model.env.core.model
    # The same batch the update will draw next:
    batch = next(ptx_batches(model.env.core.tokenizer, str(texts), 4, 128, seed=0))
    lm_model.zero_grad(set_to_none=True)
    lm_loss(lm_model, batch).backward()
    expected = {n: 0.5 * p.grad.clone() for n, p in lm_model.named_parameters() if p.grad is not None}
    lm_model.zero_grad(set_to_none=True)
    model.ptx_loss_term()[0].backward()  # the explicit term every minibatch's loss adds: 0.5 * NLL
    for name, p in lm_model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name])
    with torch.no_grad():
        initial = lm_loss(lm_model, batch).item()
    model.learn(64)
    with torch.no_grad():
        final = lm_loss(lm_model, batch).item()
    assert final < initial  # the pretraining term really trained the language model on its texts
    assert final < model.logger.name_to_value["train/ptx_loss"] < initial * 1.05
    with pytest.raises(ValueError, match="needs ptx_data"):
        make("ppo", ptx_coef=0.1)


def test_separate_critic_from_a_reward_model_directory(tmp_path):
    """A reward model sharing the policy's vocabulary (causal backbone) initialises the critic and
    its scalar head initialises the value head."""
    from textgym.pipeline.rm import load_reward_model

    rm, tok = load_reward_model("textgym/tiny", seed=3)
    rm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = make("ppo", policy_kwargs={"critic": str(tmp_path)})
    critic = model.policy.critic
    assert critic is not None and critic is not model.policy.lm
    torch.testing.assert_close(model.policy.value_head.weight, rm.score.weight)
    model.learn(64)
    assert np.isfinite(model.logger.name_to_value["train/value_loss"])
