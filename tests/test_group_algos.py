"""Group sampling in the env, and the critic-free algorithms GRPO, RLOO and REINFORCE++."""

import zipfile

import numpy as np
import pytest
import torch
from stable_baselines3.common.logger import configure
from textgym.agents import evaluate
from textgym.agents.completion_buffer import rewards_to_go
from textgym.agents.grpo import grpo_advantages
from textgym.agents.reinforce_pp import reinforce_pp_advantages
from textgym.agents.rloo import rloo_advantages

from textgym import agents, lm

ALGOS = ["grpo", "rloo", "reinforce++"]
PROMPTS = ["The film", "I saw a movie and", "My friend said that", "Today", "Last night", "Once upon a time", "We"]
TOY = dict(model="textgym/tiny", reward="keyword", reward_kwargs={"keywords": ["the"]}, max_new_tokens=8,
           max_prompt_tokens=16, kl_coef=0.01, prompts=PROMPTS)


def make(algo, n_envs=8, env_kwargs=None, **hp):
    hp = {"seed": 0, "learning_rate": 3e-3, **hp}
    return agents.make(algo, "textgym/TextGen-v0", n_envs=n_envs, env_kwargs={**TOY, **(env_kwargs or {})}, **hp)


def collect_one_rollout(model):
    model._setup_learn(1, callback=None)
    assert model.collect_rollouts(model.env, model._init_callback(None), model.rollout_buffer, model.n_steps)
    return model.rollout_buffer


# --- group sampling in the env ----------------------------------------------------------------------


def play(group_size, seed=0, steps=40):
    """Finished episodes ``(row, group, prompt_index)`` of an LMVecEnv stepped with random tokens;
    row r ends its episode with EOS every r + 2 steps, so the rows of a group finish apart."""
    vec = agents.as_vec_env("textgym/TextGen-v0", 8, {**TOY, "group_size": group_size})
    vec.seed(seed)
    vec.reset()
    core, rng, eos = vec.core, np.random.default_rng(seed), vec.core.eos_ids[0]
    first = core.prompt_index.copy(), core.group_id.copy()
    finished = []
    for step in range(1, steps + 1):
        actions = rng.integers(3, 100, size=8)  # ordinary tokens of the tiny model's vocabulary
        actions[[r for r in range(8) if step % (r + 2) == 0]] = eos
        _, _, dones, infos = vec.step(actions)
        finished += [(int(r), infos[r]["group"], infos[r]["prompt_index"]) for r in np.flatnonzero(dones)]
    return first, finished


def test_groups_share_a_prompt_with_the_documented_seeding():
    (prompts, groups), finished = play(group_size=4)
    # After a reset the rows of each group start together on one prompt...
    assert (prompts[:4] == prompts[0]).all() and (prompts[4:] == prompts[4]).all()
    assert (groups[:4] == groups[0]).all() and (groups[4:] == groups[4]).all() and groups[0] != groups[4]
    # ... drawn by the RNG of the group's first row: rows 0 and 4 of the ungrouped env seeded alike.
    (ungrouped, _), _ = play(group_size=1, steps=0)
    assert prompts[0] == ungrouped[0] and prompts[4] == ungrouped[4]
    # Rows reset apart (autoreset) keep sharing: every group id is one prompt, played by the rows
    # of one group, at most G times, and complete groups exist.
    by_group: dict[int, list[tuple[int, int]]] = {}
    for row, group, prompt in finished:
        by_group.setdefault(group, []).append((row, prompt))
    assert len(by_group) > 4
    for members in by_group.values():
        assert len({prompt for _, prompt in members}) == 1
        assert len({row // 4 for row, _ in members}) == 1 and len(members) <= 4
    assert sum(len(m) == 4 and len({r for r, _ in m}) == 4 for m in by_group.values()) >= 2
    assert len({p for _, _, p in finished}) > 1  # groups draw fresh prompts
    # Reproducible from the seed.
    assert play(group_size=4)[1] == finished


def test_n_envs_not_a_multiple_of_the_group_errors():
    with pytest.raises(ValueError, match="num_envs=6 is not a multiple of group_size=4"):
        make("grpo", n_envs=6)
    with pytest.raises(ValueError, match="num_envs=6 is not a multiple of group_size=4"):
        agents.as_vec_env("textgym/TextGen-v0", 6, {**TOY, "group_size": 4})
    with pytest.raises(ValueError, match="group_size must be an integer >= 1, got 0"):
        agents.as_vec_env("textgym/TextGen-v0", 4, {**TOY, "group_size": 0})


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_group_algorithms_refuse_an_ungrouped_env(algo):
    ungrouped = agents.as_vec_env("textgym/TextGen-v0", 4, TOY)
    with pytest.raises(ValueError, match=f"{algo} compares the episodes of one prompt: it needs an env with "
                                         "group_size >= 2, got group_size=1"):
        agents.make(algo, ungrouped)


def test_one_word_is_enough_and_fixed_arguments_are_refused():
    model = agents.make("grpo", "textgym/TextGen-v0", n_envs=8)  # the default env: tiny model, length reward
    core = model.env.core
    assert core.group_size == 4 and core.cfg.kl_in == "loss"  # GRPO's env defaults
    model.learn(1)
    assert model.rollout_buffer.pos == 8 and "train/kl_loss" in model.logger.name_to_value
    assert make("reinforce++").env.core.cfg.kl_mode == "final"  # its per-token KL is spread after the round
    with pytest.raises(ValueError, match="gamma: not hyperparameter"):
        make("rloo", gamma=0.9)


# --- rollouts of whole groups ------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGOS)
def test_rollout_holds_whole_groups_sampled_by_the_current_policy(algo):
    group_size = 1 if algo == "reinforce++" else 4
    model = make(algo, episodes_per_row=2)
    buffer = collect_one_rollout(model)
    assert buffer.pos == buffer.capacity == 16
    n = buffer.pos
    _, counts = np.unique(buffer.groups[:n], return_counts=True)
    assert (counts == group_size).all()
    for group in np.unique(buffer.groups[:n]):
        members = np.flatnonzero(buffer.groups[:n] == group)
        assert len(set(buffer.prompt_index[members])) == 1
        assert len(set(members // 8)) == 1  # one round: the group's episodes started together
    # Episode returns are what the env paid (the KL in the reward for RLOO and REINFORCE++).
    paid = sorted(e["r"] for e in list(model.ep_info_buffer)[-n:])
    np.testing.assert_allclose(sorted(buffer.episode_returns), paid, atol=1e-5)
    # The stored log-probs are the current policy's (ratio 1 on the first minibatch), and the
    # reference log-probs the reference model's.
    data = buffer._get_samples(np.arange(n))
    with torch.no_grad():
        logp, _ = model.policy.completion_log_probs(data.prompt_ids, data.prompt_mask, data.completion_ids,
                                                    data.completion_mask)
        ref = lm.completion_logprobs(model.env.core.ref_model, data.prompt_ids, data.prompt_mask,
                                     data.completion_ids, data.completion_mask)
    torch.testing.assert_close(logp, data.old_log_prob, atol=1e-5, rtol=0)
    torch.testing.assert_close(ref, data.ref_log_prob, atol=1e-5, rtol=0)
    # Same seed, same rollout.
    again = collect_one_rollout(make(algo, episodes_per_row=2))
    np.testing.assert_array_equal(again.completion_ids, buffer.completion_ids)
    np.testing.assert_array_equal(again.prompt_index, buffer.prompt_index)


def test_reinforce_pp_pays_the_kl_per_token_whichever_the_kl_mode():
    """A final-mode env (one teacher-forced reference forward per episode, REINFORCE++'s default)
    and a per_token-mode env (a KV-cached reference forward per step) give the same episodes the
    same per-token rewards: -beta * k1_t on each token, the score on the last."""
    def rollout(**env_kwargs):
        model = make("reinforce++", env_kwargs={"kl_coef": 0.3, **env_kwargs})
        model.env.core.eos_ids = list(range(0, 600, 7))  # many end tokens: episodes of several lengths
        return collect_one_rollout(model)

    final, per_token = rollout(), rollout(kl_mode="per_token")
    np.testing.assert_array_equal(final.completion_ids, per_token.completion_ids)
    mask = final.completion_mask[: final.pos]
    k1 = (final.log_probs - final.ref_log_probs)[: final.pos] * mask
    lengths = mask.sum(1).astype(int)
    expected = -0.3 * k1
    expected[np.arange(final.pos), lengths - 1] += final.scores[: final.pos]
    assert np.abs(k1).max() > 0  # a KL term to spread
    assert len(set(lengths)) > 2
    np.testing.assert_allclose(final.rewards[: final.pos], expected, atol=1e-5)
    np.testing.assert_allclose(per_token.rewards[: per_token.pos], expected, atol=1e-5)
    np.testing.assert_allclose(final.advantages[: final.pos], per_token.advantages[: per_token.pos], atol=1e-4)


# --- advantages on a fixed batch ------------------------------------------------------------------------


def fixed_buffer(model, rewards, groups):
    """The model's buffer holding one episode per list of per-token ``rewards`` (its length that
    list's), with group ids ``groups``."""
    buffer = model.rollout_buffer
    buffer.reset()
    n, T = len(groups), buffer.T
    mask = np.zeros((n, T), dtype=np.float32)
    padded = np.zeros((n, T), dtype=np.float32)
    for i, r in enumerate(rewards):
        mask[i, : len(r)] = 1
        padded[i, : len(r)] = r
    buffer.completion_mask[:n], buffer.rewards[:n] = mask, padded
    buffer.returns[:n] = rewards_to_go(padded, mask)
    buffer.groups[:n], buffer.pos = groups, n
    return buffer


def test_rewards_to_go_by_hand():
    out = rewards_to_go(np.array([[-0.1, -0.2, 0.7, 0.0], [0.5, -1.5, 0.0, 0.0]]),
                        np.array([[1, 1, 1, 0], [1, 1, 0, 0]]))
    np.testing.assert_allclose(out, [[0.4, 0.5, 0.7, 0.0], [-1.0, -1.5, 0.0, 0.0]], atol=1e-7)


def test_grpo_advantages_by_hand():
    # Group 7: returns 1, 2, 3, 6 (mean 3, sample std sqrt(14/3) = 2.1602469); group 9: all 0.
    returns, groups = [1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 0.0], [7, 7, 7, 7, 9, 9, 9, 9]
    expected = [-2 / 2.1603469, -1 / 2.1603469, 0.0, 3 / 2.1603469, 0.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(grpo_advantages(returns, groups), expected, rtol=1e-6)
    np.testing.assert_allclose(grpo_advantages(returns, groups, scale=False), [-2, -1, 0, 3, 0, 0, 0, 0])
    # Through the agent: a completion's advantage on every one of its tokens (returns of 2-token episodes).
    model = make("grpo")
    rewards = [[0.0, r] for r in returns]
    buffer = fixed_buffer(model, rewards, groups)
    model.compute_advantages(buffer)
    np.testing.assert_allclose(buffer.advantages[:8, :2], np.repeat(np.array(expected)[:, None], 2, 1), rtol=1e-5)
    assert not buffer.advantages[:8, 2:].any()
    with pytest.raises(RuntimeError, match="every group must hold 4 episodes"):
        model.compute_advantages(fixed_buffer(model, rewards[:6], groups[:6]))


def test_rloo_advantages_by_hand():
    # Return minus the mean of the other three: 1 - 11/3, 2 - 10/3, 3 - 9/3, 6 - 6/3.
    returns, groups = [1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 1.0], [0, 0, 0, 0, 1, 1, 1, 1]
    expected = [-8 / 3, -4 / 3, 0.0, 4.0, 4 / 3, 4 / 3, 4 / 3, -4.0]
    np.testing.assert_allclose(rloo_advantages(returns, groups), expected, rtol=1e-12)
    model = make("rloo")
    buffer = fixed_buffer(model, [[r] for r in returns], groups)
    model.compute_advantages(buffer)
    np.testing.assert_allclose(buffer.advantages[:8, 0], expected, rtol=1e-6)


def test_reinforce_pp_advantages_by_hand():
    # Rewards-to-go 0.4, 0.5, 0.7 | -1.0, -1.5: mean -0.18, population std 0.8930845.
    rewards = [[-0.1, -0.2, 0.7], [0.5, -1.5]]
    expected = np.array([[0.58, 0.68, 0.88], [-0.82, -1.32, 0.0]]) / 0.8930845
    expected[1, 2] = 0.0
    togo = np.array([[0.4, 0.5, 0.7], [-1.0, -1.5, 0.0]])
    np.testing.assert_allclose(reinforce_pp_advantages(togo, np.array([[1, 1, 1], [1, 1, 0]])), expected, rtol=1e-6)
    model = make("reinforce++")
    buffer = fixed_buffer(model, rewards, [0, 1])
    model.compute_advantages(buffer)
    np.testing.assert_allclose(buffer.advantages[:2, :3], expected, rtol=1e-5, atol=1e-6)


# --- learning, saving, no critic --------------------------------------------------------------------------


@pytest.mark.parametrize("algo", ALGOS)
def test_learning_raises_reward_and_logs_the_rlhf_figures(algo, tmp_path):
    model = make(algo)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    before = evaluate(model, 32)
    model.learn(768)
    after = evaluate(model, 32)
    assert after["score"] > before["score"] + 1.0, (before["score"], after["score"])
    assert np.isfinite(after["kl"])
    logged = (tmp_path / "progress.csv").read_text().splitlines()[0].split(",")
    for key in ("rollout/score_mean", "rollout/kl_mean", "rollout/kl_coef", "rollout/completion_length",
                "rollout/ep_rew_mean", "train/entropy", "train/clip_fraction", "train/approx_kl"):
        assert key in logged, key
    assert "train/value_loss" not in logged


@pytest.mark.parametrize("algo", ALGOS)
def test_no_value_head_exists(algo):
    model = make(algo)
    policy = model.policy
    assert policy.value_head is None and policy.critic is None
    assert not any("value" in name for name in policy.state_dict())
    optimized = {id(p) for group in policy.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in policy.lm.parameters()}
    assert not model.env.core.policy.hidden  # the engine keeps no hidden states for a value head
    with pytest.raises(ValueError, match="no value head"):
        policy.predict_values(policy.obs_to_tensor(model.env.reset())[0])
    with pytest.raises(ValueError, match="critic-free"):
        make(algo, policy_kwargs={"critic": "copy"})


@pytest.mark.parametrize("algo", ALGOS)
def test_save_load_resume(algo, tmp_path):
    hp = {"grpo": {"scale_rewards": False, "loss_normalization": "token"}, "rloo": {"n_epochs": 2},
          "reinforce++": {"batch_size": 32}}[algo]
    model = make(algo, **hp)
    model.learn(64)
    model.save(tmp_path / "agent")
    with zipfile.ZipFile(tmp_path / "agent.zip") as zf, zf.open("policy.pth") as f:
        keys = list(torch.load(f, map_location="cpu", weights_only=True))
    assert len(keys) == len(model.policy.lm.state_dict()) and all(k.startswith("lm.") for k in keys)

    loaded = agents.load(tmp_path / "agent", env="textgym/TextGen-v0", n_envs=8, env_kwargs=TOY)
    assert type(loaded) is type(model) and loaded.num_timesteps == model.num_timesteps
    for key, value in hp.items():
        assert getattr(loaded, key) == value
    # The env made for the loaded agent gets the algorithm's env defaults, like agents.make.
    for key in ("group_size", "kl_in", "kl_mode"):
        assert getattr(loaded.env.core.cfg, key) == getattr(model.env.core.cfg, key)
    for p, q in zip(model.policy.parameters(), loaded.policy.parameters()):
        assert torch.equal(p, q)
    loaded.learn(64, reset_num_timesteps=False)  # resume
    assert loaded.num_timesteps > model.num_timesteps and loaded._n_updates > model._n_updates


def test_lora_and_ptx(tmp_path):
    texts = tmp_path / "pretrain.txt"
    texts.write_text("\n".join(["The children played in the park after school."] * 4))
    model = make("grpo", lora={"r": 4}, ptx_coef=0.5, ptx_data=str(texts), ptx_batch_size=4)
    names = [n for n, p in model.policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    before = {n: p.detach().clone() for n, p in model.policy.named_parameters() if p.requires_grad}
    model.learn(64)
    logged = model.logger.name_to_value
    assert "train/ptx_loss" in logged and "train/kl_loss" in logged
    assert any(not torch.equal(p, before[n]) for n, p in model.policy.named_parameters() if n in before)


def test_critic_free_defaults_are_declared_once_and_read_by_every_consumer():
    # GRPO, RLOO and REINFORCE++ change the base's defaults by declaring them, not by repeating its
    # constructor; the one reader of constructor parameters gives them to --help, the registry and
    # saving alike, and a built agent carries them.
    from textgym.pipeline import hyperparameters

    expected = {"grpo": (4, "sequence"), "rloo": (1, "sum"), "reinforce++": (1, "token")}
    for algo, (n_epochs, normalization) in expected.items():
        params = agents.constructor_parameters(agents.get_class(algo))
        assert (params["n_epochs"].default, params["loss_normalization"].default) == (n_epochs, normalization)
        shown = hyperparameters.of(algo)
        assert (shown["n_epochs"].default, shown["loss_normalization"].default) == (n_epochs, normalization)
        assert {"n_epochs", "loss_normalization", "clip_range"} <= agents.accepted_hyperparameters(algo)
        model = make(algo)
        assert (model.n_epochs, model.loss_normalization) == (n_epochs, normalization)
        assert make(algo, n_epochs=2).n_epochs == 2  # what the caller gives wins
    assert agents.constructor_parameters(agents.get_class("grpo"))["scale_rewards"].default is True

    class Misdeclared(agents.get_class("rloo")):
        hyperparameter_defaults = {"n_epoch": 3}

    with pytest.raises(TypeError, match="names 'n_epoch', which no constructor takes"):
        agents.constructor_parameters(Misdeclared)
