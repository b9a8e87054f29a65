"""The architecture, checked: library <- agents <- pipeline, no import cycles, no hidden imports of
project modules inside functions, and an install layout that cannot clash with another ``agents``."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the installed layout (``agents/`` is ``textgym.agents``)."""
    out = {}
    for top, package in ((ROOT / "textgym", "textgym"), (ROOT / "agents", "textgym.agents")):
        for path in top.rglob("*.py"):
            parts = list(path.relative_to(top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    if module.startswith("textgym.pipeline") or module == "textgym.__main__":
        return 2
    if module.startswith("textgym.agents"):
        return 1
    return 0


LAYER_NAMES = ("library", "agents", "pipeline")


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    """The project modules an import statement loads (``from textgym import kl`` -> textgym.kl)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if is_package else module.rsplit(".", 1)[0]
            for _ in range(node.level - 1):
                package = package.rsplit(".", 1)[0]
            base = f"{package}.{base}" if base else package
        elif base == "agents" or base.startswith("agents."):
            base = "textgym." + base
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return sorted({n for n in names if n in MODULES})


def _imports(module: str) -> tuple[set[str], list[tuple[int, str]], list[tuple[int, str]]]:
    """(modules imported at module level, project imports inside functions, uncommented
    third-party imports inside functions) of ``module``."""
    path = MODULES[module]
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    top: set[str] = set()
    local_project: list[tuple[int, str]] = []
    local_uncommented: list[tuple[int, str]] = []
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        targets = _resolve(module, node, path.name == "__init__.py")
        if id(node) in inside:
            if targets:
                local_project.append((node.lineno, ", ".join(targets)))
            elif not any("#" in line for line in lines[node.lineno - 2:node.end_lineno]):  # same line(s) or above
                local_uncommented.append((node.lineno, lines[node.lineno - 1].strip()))
        else:
            top.update(targets)
    top.discard(module)
    return top, local_project, local_uncommented


GRAPH = {m: _imports(m)[0] for m in MODULES}


def test_no_upward_imports():
    upward = [f"{m} ({LAYER_NAMES[_layer(m)]}) imports {t} ({LAYER_NAMES[_layer(t)]})"
              for m, targets in GRAPH.items() for t in targets if _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    # A package's __init__ re-exporting its submodules is not a cycle when a submodule imports a
    # sibling through the package (``from textgym import kl``): those edges point to the submodule.
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


def test_function_local_imports_are_optional_dependencies_with_a_reason():
    project, uncommented = [], []
    for m in MODULES:
        _, local_project, local_uncommented = _imports(m)
        project += [f"{MODULES[m].relative_to(ROOT)}:{line} imports {t}" for line, t in local_project]
        uncommented += [f"{MODULES[m].relative_to(ROOT)}:{line}: {text}" for line, text in local_uncommented]
    assert not project, "project modules imported inside functions:\n" + "\n".join(project)
    assert not uncommented, "imports inside functions without a comment saying why:\n" + "\n".join(uncommented)


def test_packaged_modules_are_the_folders():
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert packages == folders


def _write_fake_agents(tmp_path: Path) -> Path:
    """A stand-in for the openai-agents SDK: another distribution's top-level ``agents`` package."""
    fake = tmp_path / "site" / "agents"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("OWNER = 'someone else'\n")
    return fake.parent


def test_textgym_agents_works_beside_another_agents_package(tmp_path):
    """With another ``agents`` first on the path (as after ``pip install openai-agents``), ``import
    agents`` is theirs, untouched, and textgym (its agents, its pipeline) still works."""
    site = _write_fake_agents(tmp_path)
    code = (
        "import agents\n"
        "from textgym import agents as tga\n"
        "import textgym.pipeline.cli\n"
        "assert agents.OWNER == 'someone else', agents\n"
        "assert tga.__name__ == 'textgym.agents' and {'ppo', 'grpo'} <= set(tga.names()), tga.names()\n"
        "assert tga.PPO.__module__ == 'textgym.agents.ppo.ppo'\n"
        "import sys; assert sys.modules['agents'] is agents\n"
        "print('ok')\n"
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_short_name_in_a_checkout_is_the_same_modules():
    """From a source checkout ``import agents`` works as the README shows, and is ``textgym.agents``
    itself (one copy of each class and registry), submodules included."""
    code = (
        "import agents\n"
        "from agents.ppo import PPO\n"
        "from agents import serialization\n"
        "import textgym.agents, textgym.agents.ppo\n"
        "assert agents is textgym.agents and PPO is textgym.agents.ppo.PPO\n"
        "assert serialization is textgym.agents.serialization\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.skipif(subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0,
                    reason="pip is not available")
def test_wheel_installs_no_top_level_agents(tmp_path):
    """The wheel holds textgym only (textgym.agents inside it): installing it can never overwrite
    another distribution's ``agents`` package, nor be overwritten by one."""
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    import zipfile

    (wheel,) = tmp_path.glob("textgym-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"textgym", next(t for t in tops if t.endswith(".dist-info"))}, tops
    assert "textgym/agents/ppo/ppo.py" in names and "textgym/pipeline/cli.py" in names


def test_one_sampling_path():
    """Completions are sampled in one place (``textgym.sampling`` over the env engine, and the
    agents' rollouts): no Hugging Face ``generate`` anywhere in the package, and nothing outside the
    agents touches SB3's private rollout state."""
    offenders = []
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "generate":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} calls .generate()")
            if (isinstance(node, ast.Attribute) and node.attr in ("_last_obs", "_last_episode_starts")
                    and isinstance(node.ctx, ast.Store) and not m.startswith("textgym.agents")):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} sets {node.attr}")
    assert not offenders, "\n".join(offenders)


def test_agents_use_the_engine_only_through_its_api():
    # An agent reads and asks the engine through the names textgym.envs.core.AGENT_API lists: no
    # engine arrays, decoders or flags (the engine's parts own those).
    from textgym.envs.core import AGENT_API

    used: dict[str, set[str]] = {}
    for path in (ROOT / "agents").rglob("*.py"):
        for name in re.findall(r"\bcore\.([A-Za-z_]\w*)", path.read_text()):
            used.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    outside = {name: sorted(files) for name, files in used.items() if name not in AGENT_API}
    assert not outside, f"agents use engine attributes outside its API: {outside}"
    assert {"kl", "acting", "episodes", "step"} <= set(used)  # the check sees the agents' uses
