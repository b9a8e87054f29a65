"""Every bad input refused by name, and an env that survives a failing reward."""

import dataclasses
import re
import typing

import gymnasium as gym
import numpy as np
import pytest

from textgym import agents, rewards
from textgym.pipeline.bench import BenchRewardsConfig
from textgym.pipeline.cli import main, parse_args
from textgym.pipeline.config import ConfigError, load_config
from textgym.pipeline.evaluate import evaluate_target
from textgym.pipeline.rm import RMConfig, train_reward_model
from textgym.pipeline.sft import SFTConfig, train_sft
from textgym.pipeline.train import TrainConfig
from textgym.rewards import RewardError

PROMPTS = ["The film", "I loved the music in this", "Bad"]


def make(**kwargs):
    return gym.make("textgym/TextGen-v0", **{"model": "textgym/tiny", "prompts": PROMPTS, **kwargs})


# --- the env survives a failing reward -----------------------------------------------------------


class Flaky:
    """A reward that raises on the calls listed in ``fail_on``."""

    name = "flaky"

    def __init__(self, fail_on):
        self.fail_on, self.calls = set(fail_on), 0

    def __call__(self, prompts, completions, **metadata):
        self.calls += 1
        if self.calls in self.fail_on:
            raise ZeroDivisionError("flaky reward failed")
        return [float(len(c)) for c in completions]


def test_reward_raising_mid_rollout_then_reset_and_normal_episodes():
    reward = Flaky(fail_on={1})
    env = make(reward=reward, max_new_tokens=3, stop_on_eos=False)
    env.reset(seed=0)
    env.step(5)
    env.step(6)
    with pytest.raises(RewardError, match=r"reward 'Flaky' raised ZeroDivisionError: flaky reward failed"):
        env.step(7)
    core = env.unwrapped.core
    assert core.live[0] and core.length[0] == 2  # the failed step's token was taken back
    # the step can be retried ...
    _, _, term, _, info = env.step(7)
    assert term and info["length"] == 3
    # ... and after a reset, normal episodes follow
    for seed in (1, 2):
        env.reset(seed=seed)
        for _ in range(3):
            _, _, term, _, info = env.step(5)
        assert term and info["length"] == 3 and info["score"] == float(len(info["completion"]))


def test_failing_reward_then_reset_gives_the_same_episode_as_a_fresh_env():
    failing = make(reward=Flaky(fail_on={1}), max_new_tokens=2, stop_on_eos=False)
    fresh = make(reward=Flaky(fail_on=set()), max_new_tokens=2, stop_on_eos=False)
    failing.reset(seed=0)
    failing.step(5)
    with pytest.raises(RewardError):
        failing.step(5)
    results = []
    for env in (failing, fresh):
        env.reset(seed=3)
        env.step(9)
        results.append(env.step(11))
    assert results[0][1] == results[1][1] and results[0][4]["completion"] == results[1][4]["completion"]
    np.testing.assert_array_equal(results[0][0]["input_ids"], results[1][0]["input_ids"])
    np.testing.assert_allclose(failing.unwrapped.next_token_logits().numpy(),
                               fresh.unwrapped.next_token_logits().numpy(), atol=1e-5)


def test_vector_env_survives_a_failing_reward():
    vec = gym.make_vec("textgym/TextGen-v0", num_envs=3, vectorization_mode="vector_entry_point", model="textgym/tiny",
                       prompts=PROMPTS, reward=Flaky(fail_on={1}), max_new_tokens=2, stop_on_eos=False)
    vec.reset(seed=0)
    vec.step(np.array([5, 6, 7]))
    with pytest.raises(RewardError, match="Flaky"):
        vec.step(np.array([5, 6, 7]))
    _, _, done, _, infos = vec.step(np.array([5, 6, 7]))
    assert done.all() and len(infos["completion"]) == 3
    vec.reset(seed=1)
    vec.step(np.array([1, 2, 3]))
    assert vec.step(np.array([1, 2, 3]))[2].all()


def test_model_failure_while_advancing_rebuilds_the_cache():
    env = make(max_new_tokens=4, stop_on_eos=False)
    reference = make(max_new_tokens=4, stop_on_eos=False)
    core = env.unwrapped.core
    for e in (env, reference):
        e.reset(seed=0)
        e.step(5)
    original = core.policy.advance

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    core.policy.advance = broken
    with pytest.raises(RuntimeError, match="out of memory"):
        env.step(6)
    core.policy.advance = original
    reference.step(6)
    np.testing.assert_allclose(env.unwrapped.next_token_logits().numpy(),
                               reference.unwrapped.next_token_logits().numpy(), atol=1e-4)


def test_reward_output_overflow_names_the_reward():
    reward = rewards.as_reward(lambda p, c: [10**400] * len(c))
    with pytest.raises(ValueError, match=r"reward '<lambda>' returned 1000.* at index 0: not representable"):
        reward(["a"], ["b"])


def test_reward_exceptions_name_the_reward():
    def picky(prompts, completions):
        raise KeyError("label")

    with pytest.raises(RewardError, match=r"reward 'picky' raised KeyError: 'label'"):
        rewards.as_reward(picky)(["a"], ["b"])

    def wrong(prompts, completions):
        raise ValueError("bad input")

    with pytest.raises(ValueError, match=r"reward 'wrong': bad input"):
        rewards.as_reward(wrong)(["a"], ["b"])


# --- env arguments and reset options ---------------------------------------------------------------


@pytest.mark.parametrize("options, error, match", [
    ({"prompt_index": 1.7}, TypeError, r"'prompt_index' must be an integer, got float 1.7"),
    ({"prompt_index": True}, TypeError, r"'prompt_index' must be an integer, got bool True"),
    ({"prompt_index": 3}, ValueError, r"'prompt_index' 3 out of range \[0, 3\)"),
    ({"prompt_index": -1}, ValueError, r"'prompt_index' -1 out of range"),
    ({"prompt": None}, TypeError, r"'prompt' must be a string, got NoneType None"),
    ({"prompt": 3}, TypeError, r"'prompt' must be a string"),
    ({"promt": "x"}, ValueError, r"unknown reset option 'promt'; valid: prompt, prompt_index"),
    ({"prompt": "x", "prompt_index": 0}, ValueError, r"exclude each other"),
    (["prompt"], TypeError, r"reset options must be a dict .* got list"),
    ("prompt", TypeError, r"reset options must be a dict"),
])
def test_bad_reset_options_are_refused_by_name(options, error, match):
    env = make(max_new_tokens=2)
    with pytest.raises(error, match=match):
        env.reset(options=options)
    vec = gym.make_vec("textgym/TextGen-v0", num_envs=2, vectorization_mode="vector_entry_point", model="textgym/tiny",
                       prompts=PROMPTS, max_new_tokens=2)
    with pytest.raises(error, match=match):
        vec.reset(options=options)


def test_good_reset_options_still_work():
    env = make(max_new_tokens=2)
    assert env.reset(options={"prompt_index": np.int64(2)})[1]["prompt"] == "Bad"
    assert env.reset(options={"prompt": ""})[1]["prompt"] == ""
    assert env.reset(options={})[1]["prompt"] in PROMPTS


@pytest.mark.parametrize("kwargs, match", [
    ({"stop_on_eos": "false"}, r"stop_on_eos must be True or False, got 'false'"),
    ({"chat_template": 1}, r"chat_template must be True or False, got 1"),
    ({"reward_kwargs": None}, r"reward_kwargs must be a dict .* got None"),
    ({"max_new_tokens": 500, "max_prompt_tokens": 64},
     r"max_prompt_tokens \+ max_new_tokens = 64 \+ 500 = 564 exceeds the model's 512 positions"),
])
def test_bad_env_arguments_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


@pytest.mark.parametrize("n_envs", [0, -2, 1.5, True])
def test_bad_n_envs_is_refused(n_envs):
    with pytest.raises(ValueError, match=rf"n_envs must be an integer >= 1 .*got {n_envs!r}"):
        agents.make("ppo", "textgym/TextGen-v0", n_envs=n_envs, env_kwargs={"model": "textgym/tiny"})


def test_misspelt_hyperparameter_is_refused_by_agents_make():
    with pytest.raises(ValueError, match=r"lernrate: not hyperparameter\(s\) of ppo; valid: .*learning_rate"):
        agents.make("ppo", "textgym/TextGen-v0", n_envs=1, env_kwargs={"model": "textgym/tiny"}, lernrate=1e-3)


# --- files ------------------------------------------------------------------------------------------


def test_non_utf8_prompt_file_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"hello\nw\xe9rld\n")
    with pytest.raises(ValueError, match=rf"file '{path}' is not UTF-8 text: line 2 \(byte 7\)"):
        make(prompts=str(path))


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=rf"file '{path}', line 4: not valid JSON"):
        make(prompts=str(path))
    bad_json = tmp_path / "prompts.json"
    bad_json.write_text('[\n"a",\n"b"\n"c"]')
    with pytest.raises(ValueError, match=rf"file '{bad_json}', line 4: not valid JSON"):
        make(prompts=str(bad_json))


def test_yaml_error_names_the_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("training:\n  iterations: [1\n")
    with pytest.raises(ConfigError, match=rf"(?s)config file '{path}' is not valid YAML: .*in \"{path}\", line"):
        load_config(TrainConfig, path)
    path.write_bytes(b"training:\n  output_dir: \xff\n")
    with pytest.raises(ConfigError, match=rf"config file '{path}' is not UTF-8"):
        load_config(TrainConfig, path)


# --- configs and the command line --------------------------------------------------------------------


def test_misspelt_hyperparameter_is_an_error_listing_valid_names():
    with pytest.raises(ConfigError, match=r"agent.hyperparameters.lernrate is not a hyperparameter of any algorithm; "
                                          r"valid for ppo: batch_size, clip_range, .*learning_rate"):
        load_config(TrainConfig, overrides=["agent.algo=ppo", "agent.hyperparameters.lernrate=1e-3"])
    # Issue 10 changed this: a hyperparameter that only another algorithm takes used to be set aside
    # with a warning; now it is an error naming who takes it. agent.<algo> keeps it for that one.
    with pytest.raises(ConfigError, match=r"agent.hyperparameters.batch_size is not a hyperparameter of a2c, only of "
                                          r"dpo, grpo, ilql, nlpo, ppo, reinforce\+\+, rloo, trpo .*; valid for a2c: "
                                          r"ent_coef, "):
        load_config(TrainConfig, overrides=["agent.algo=a2c", "agent.hyperparameters.batch_size=8"])
    cfg = load_config(TrainConfig, overrides=["agent.algo=a2c", "agent.ppo.batch_size=8"])
    assert "batch_size" not in cfg.agent.hyperparameters and cfg.agent.algorithms["ppo"]["batch_size"] == 8
    with pytest.raises(ConfigError, match=r"agent.hyperparameters.seed is set by textgym train \(training.seed\)"):
        load_config(TrainConfig, overrides=["agent.hyperparameters.seed=3"])


@pytest.mark.parametrize("value", ["0", "-1"])
def test_n_envs_zero_is_refused_in_configs(value):
    with pytest.raises(ConfigError, match=rf"env.n_envs must be an integer >= 1, got {value}"):
        load_config(TrainConfig, overrides=[f"env.n_envs={value}"])


def _bounded(cls, prefix=""):
    """(key, metadata, type) of every field of config ``cls``, sections included, that declares bounds."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _bounded(hints[f.name], f"{prefix}{f.name}.")
        elif any(f.metadata.get(k) is not None for k in ("min", "max", "gt", "lt")):
            # an optional number (float | None) is bounded as the number
            hint = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
            yield prefix + f.name, f.metadata, hint


REQUIRED = {TrainConfig: [], SFTConfig: ["data=pairs.jsonl"], RMConfig: ["data=prefs.jsonl"], BenchRewardsConfig: []}
BOUNDED = [(cls, key, meta, hint) for cls in REQUIRED for key, meta, hint in _bounded(cls)]


@pytest.mark.parametrize("cls, key, meta, hint", BOUNDED, ids=[f"{c.__name__}.{k}" for c, k, _, _ in BOUNDED])
def test_every_declared_bound_is_enforced_naming_key_and_range(cls, key, meta, hint):
    step = 1 if hint is int else 0.5
    kind = "an integer" if hint is int else "a number"
    cases = [(meta["min"] - step, ">=", meta["min"]) if meta["min"] is not None else None,
             (meta["gt"], ">", meta["gt"]) if meta["gt"] is not None else None,
             (meta["max"] + step, "<=", meta["max"]) if meta["max"] is not None else None,
             (meta["lt"], "<", meta["lt"]) if meta["lt"] is not None else None]
    assert any(cases)
    for bad, op, bound in filter(None, cases):
        bad = hint(bad)
        # "x >= 1" alone, or "x in [0, 1)" when bounded on both sides
        shown = rf"{op} {bound:g}" if sum(c is not None for c in cases) == 1 else rf"in [\[(].*{bound:g}.*[\])]"
        with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{re.escape(key)} must be {kind} {shown}, "
                                              rf"got {re.escape(repr(bad))}"):
            load_config(cls, overrides=[*REQUIRED[cls], f"{key}={bad}"])
    for edge in (meta["min"], meta["max"]):  # inclusive bounds are valid values
        if edge is not None:
            assert _get(load_config(cls, overrides=[*REQUIRED[cls], f"{key}={edge}"]), key) == edge


def _nonempty(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _nonempty(hints[f.name], f"{prefix}{f.name}.")
        elif f.metadata.get("nonempty"):
            yield prefix + f.name, f.metadata


NONEMPTY = [(cls, key, meta) for cls in REQUIRED for key, meta in _nonempty(cls)]


@pytest.mark.parametrize("cls, key, meta", NONEMPTY, ids=[f"{c.__name__}.{k}" for c, k, _ in NONEMPTY])
def test_every_required_or_nonempty_key_refuses_blank_naming_what_is_valid(cls, key, meta):
    messages = []
    for blank in ('""', "[]", "null"):  # whichever the field's type allows is refused as blank, the others by type
        with pytest.raises(ConfigError) as info:
            load_config(cls, overrides=[*REQUIRED[cls], f"{key}={blank}"])
        messages.append(str(info.value))
        assert key in messages[-1]
    assert any(m.startswith(f"{cls.__name__}.{key} must be {meta['what']}, got") for m in messages), messages


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_eval_every_zero_means_before_and_after_only():
    """Issue 10: eval_every said ">= 1" and allowed 0; 0 is valid (evaluate only before and after)."""
    assert load_config(TrainConfig, overrides=["training.eval_every=0"]).training.eval_every == 0
    with pytest.raises(ConfigError, match=r"TrainConfig.training.eval_every must be an integer >= 0, got -1"):
        load_config(TrainConfig, overrides=["training.eval_every=-1"])


def test_floats_must_be_finite():
    for value in (".nan", ".inf"):
        with pytest.raises(ConfigError, match=r"SFTConfig.learning_rate must be a finite number > 0, got (nan|inf)"):
            load_config(SFTConfig, overrides=["data=pairs.jsonl", f"learning_rate={value}"])


def test_sft_and_rm_config_errors_are_config_errors_also_from_python(tmp_path):
    """SFT raised ValueError where the others raised ConfigError; a config built in Python gets the
    loader's checks before any data is read."""
    with pytest.raises(ConfigError, match=r"SFTConfig.data must be a file or dataset of \(prompt, completion\) pairs"):
        load_config(SFTConfig, overrides=["epochs=3"])
    missing = str(tmp_path / "nowhere.jsonl")
    with pytest.raises(ConfigError, match=r"SFTConfig.epochs must be an integer >= 1, got 0"):
        train_sft(SFTConfig(data=missing, epochs=0))
    with pytest.raises(ConfigError, match=r"config key 'batch_size' must be an integer, got '8'"):
        train_sft(SFTConfig(data=missing, batch_size="8"))
    with pytest.raises(ConfigError, match=r"RMConfig.learning_rate must be a number > 0, got -1.0"):
        train_reward_model(RMConfig(data=missing, learning_rate=-1.0))
    assert issubclass(ConfigError, ValueError)  # callers catching ValueError still do


def test_hyperparameters_are_checked_against_the_chosen_algorithm():
    # misspelt, in the running algorithm's section: the valid ones are that algorithm's
    with pytest.raises(ConfigError, match=r"agent.grpo.n_step is not a hyperparameter of any algorithm; "
                                          r"valid for grpo: batch_size, clip_range, ent_coef, episodes_per_row, "):
        load_config(TrainConfig, overrides=["agent.algo=grpo", "agent.grpo.n_step=3"])
    # a section of an algorithm that is not running is checked too: found now, not when you switch
    with pytest.raises(ConfigError, match=r"agent.a2c.batch_size is not a hyperparameter of a2c, only of dpo, grpo"):
        load_config(TrainConfig, overrides=["agent.a2c.batch_size=8"])
    with pytest.raises(ConfigError, match=r"agent.hyperparameters.top_p is not a hyperparameter of ppo, only of nlpo "):
        load_config(TrainConfig, overrides=["agent.algo=ppo", "agent.hyperparameters.top_p=0.5"])
    with pytest.raises(ConfigError, match=r"agent.nlpo.seed is set by textgym train \(training.seed\)"):
        load_config(TrainConfig, overrides=["agent.nlpo.seed=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'agent.dqn'; valid keys of agent: algo, "
                                          r"hyperparameters, a2c, dpo, grpo, ilql, nlpo, ppo, reinforce\+\+, rloo, "
                                          r"trpo"):
        load_config(TrainConfig, overrides=["agent.dqn.n_steps=3"])
    # types come from the constructors' annotations
    for override, message in [
            ("agent.hyperparameters.n_steps=many", "'agent.hyperparameters.n_steps' must be an integer, got 'many'"),
            ("agent.ppo.n_epochs=true", "'agent.ppo.n_epochs' must be an integer, got True"),
            ("agent.ppo.normalize_advantage=maybe", "'agent.ppo.normalize_advantage' must be true or false"),
            ("agent.hyperparameters.target_kl=[1]", "'agent.hyperparameters.target_kl' must be float or null, got"),
            ("agent.nlpo.top_p=high", "'agent.nlpo.top_p' must be a number, got 'high'"),
            ("agent.rloo.loss_normalization=3", "'agent.rloo.loss_normalization' must be a string, got 3")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(TrainConfig, overrides=["agent.algo=ppo", override])
    cfg = load_config(TrainConfig, overrides=["agent.algo=ppo", "agent.hyperparameters.learning_rate=1",
                                              "agent.ppo.target_kl=null"])
    assert cfg.agent.hyperparameters["learning_rate"] == 1.0 and isinstance(cfg.agent.hyperparameters["learning_rate"],
                                                                            float)
    assert cfg.agent.hyperparameters["target_kl"] is None


def test_a_registered_algorithm_is_checked_against_its_own_constructor():
    class Knobbed(agents.PPO):
        def __init__(self, *args, knob: int = 3, **kwargs):
            self.knob = knob
            super().__init__(*args, **kwargs)

    agents.register("knobbed", Knobbed)
    try:
        cfg = load_config(TrainConfig, overrides=["agent.algo=knobbed", "agent.knobbed.knob=5"])
        assert cfg.agent.hyperparameters == {"knob": 5}  # textgym's presets are for the built-in algorithms
        with pytest.raises(ConfigError, match=r"'agent.hyperparameters.knob' must be an integer, got 'x'"):
            load_config(TrainConfig, overrides=["agent.algo=knobbed", "agent.hyperparameters.knob=x"])
        with pytest.raises(ConfigError, match=r"agent.hyperparameters.knob is not a hyperparameter of ppo, only of "
                                              r"knobbed"):
            load_config(TrainConfig, overrides=["agent.algo=ppo", "agent.hyperparameters.knob=5"])
    finally:
        agents.registry._REGISTRY.pop("knobbed")


@pytest.mark.parametrize("value", ["-3", "0", "two"])
def test_eval_n_must_be_positive(value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "textgym/tiny", "--n", value])
    assert info.value.code == 2
    assert f"argument --n: must be an integer >= 1, got '{value}'" in capsys.readouterr().err


def test_evaluate_target_refuses_bad_n():
    with pytest.raises(ValueError, match=r"n must be an integer >= 1, got 0"):
        evaluate_target("textgym/tiny", n=0)


def test_options_and_overrides_in_any_order(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("training:\n  iterations: 3\n")
    args = parse_args(["train", str(cfg), "--algo", "a2c", "training.seed=4", "--resume", "env.n_envs=2"])
    assert (args.config, args.algo, args.resume) == (str(cfg), "a2c", True)
    assert args.overrides == ["training.seed=4", "env.n_envs=2"]
    args = parse_args(["train", "--algo", "a2c", "training.seed=4"])
    assert args.config == "training.seed=4" and args.overrides == []  # moved to the overrides by cmd_train
    with pytest.raises(SystemExit):
        parse_args(["train", str(cfg), "--algo", "a2c", "--nonsense"])


def test_cli_user_error_is_one_line_and_debug_gives_the_traceback(capsys):
    assert main(["train", "agent.hyperparameters.lernrate=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("textgym train: error: agent.hyperparameters.lernrate is not a hyperparameter")
    with pytest.raises(ConfigError, match="lernrate"):
        main(["--debug", "train", "agent.hyperparameters.lernrate=1"])
    with pytest.raises(ConfigError, match="lernrate"):
        main(["train", "agent.hyperparameters.lernrate=1", "--debug"])
    assert main(["eval", "no/such-model-dir", "--n", "2"]) == 2
    assert "could not load model 'no/such-model-dir'" in capsys.readouterr().err


def test_cli_override_yaml_error_names_the_override(capsys):
    assert main(["train", "training.iterations=[1"]) == 2
    assert "override 'training.iterations=[1': the value is not valid YAML" in capsys.readouterr().err


def test_resume_overrides_apply_or_are_refused(tmp_path):
    """--resume with overrides: training.iterations is applied, anything else is refused with the reason."""
    from textgym.pipeline.train import resume_config

    saved = load_config(TrainConfig, overrides=["training.iterations=4", f"training.output_dir={tmp_path}"])
    more = load_config(TrainConfig, overrides=["training.iterations=6", f"training.output_dir={tmp_path}"])
    assert resume_config(saved, more, done=2).training.iterations == 6
    changed = load_config(TrainConfig, overrides=["training.iterations=4", f"training.output_dir={tmp_path}",
                                                  "agent.hyperparameters.learning_rate=0.1", "env.n_envs=2"])
    with pytest.raises(ConfigError, match=r"cannot change agent.hyperparameters.learning_rate, env.n_envs "
                                          r"\(agent.hyperparameters.learning_rate: 0.002 -> 0.1; "
                                          r"env.n_envs: 32 -> 2\)"):
        resume_config(saved, changed, done=2)
    fewer = load_config(TrainConfig, overrides=["training.iterations=1", f"training.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"training.iterations=1 is fewer than the 2 iterations"):
        resume_config(saved, fewer, done=2)


def test_tokenizer_failure_at_the_end_of_an_episode_leaves_the_step_retryable():
    env = make(max_new_tokens=2, stop_on_eos=False)
    core = env.unwrapped.core
    env.reset(seed=0)
    env.step(5)
    original = core.tokenizer.decode
    core.tokenizer.decode = lambda *a, **k: (_ for _ in ()).throw(UnicodeError("cannot decode"))
    with pytest.raises(UnicodeError, match="cannot decode"):
        env.step(6)
    assert core.live[0] and core.length[0] == 1
    core.tokenizer.decode = original
    _, _, term, _, info = env.step(6)
    assert term and info["length"] == 2
