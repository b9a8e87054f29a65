import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_opens_with_two_setup_commands_and_ci_runs_the_test_one():
    commands = [b.strip() for b in blocks("bash")[:2]]
    assert all(c.startswith("python3 -m venv .venv") and "pip install torch==2.13.0" in c for c in commands)
    assert commands[0].endswith("textgym train")
    assert commands[1].endswith("python -m pytest")
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert commands[1] in ci_lines


def test_readme_python_example_runs():
    code = blocks("python")[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["rewards"].shape == (8,)
    assert "exclaims" in namespace["textgym"].rewards.names()


def test_readme_agents_example_runs(tmp_path):
    code = blocks("python")[1].replace("/tmp/reinforce_pp_agent", str(tmp_path / "agent"))
    assert str(tmp_path) in code
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["model"].textgym_algo == "reinforce++"


def test_readme_recording_example_runs(tmp_path):
    code = next(b for b in blocks("python") if "load_recording" in b).replace("/tmp/textgym_recording",
                                                                              str(tmp_path / "rec"))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert len(namespace["episodes"]) == 8


def test_readme_offline_example_runs(tmp_path):
    code = next(b for b in blocks("python") if 'agents.make(algo' in b and "record(" in b)
    code = code.replace("/tmp/textgym_offline", str(tmp_path / "rec"))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["model"].textgym_algo == "dpo" and "preference_accuracy" in namespace["model"].held_out_figures()
