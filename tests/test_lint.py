"""Lint, import order (ruff) and types (mypy), configured in pyproject.toml, are part of the test suite, so CI
runs them; and one docstring style, stable-baselines3's ``:param name:``."""

import ast
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]


def _installed_layout(base: Path) -> Path:
    """``base/textgym``: a link to each entry of ``textgym/``, and ``agents`` -> ``agents/``, the layout the
    package-dir mapping installs (mypy can name a folder only by where it sits, and cannot follow setuptools'
    editable import hook). Kept in place between runs so mypy's cache stays valid."""
    tree = base / "textgym"
    tree.mkdir(parents=True, exist_ok=True)
    wanted = {p.name: p for p in (ROOT / "textgym").iterdir() if p.name not in ("agents", "__pycache__")}
    wanted["agents"] = ROOT / "agents"
    for link in tree.iterdir():
        if link.name not in wanted or not link.is_symlink() or Path(os.readlink(link)) != wanted[link.name]:
            link.unlink()
    for name, target in wanted.items():
        if not (tree / name).is_symlink():
            try:
                (tree / name).symlink_to(target, target_is_directory=target.is_dir())
            except FileExistsError:  # a concurrent run made it
                pass
    return tree


def test_types():
    """mypy with the pyproject.toml config over textgym/ and agents/ (as ``textgym.agents``)."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install -e '.[test]')")
    # One place per checkout, outside it: the link tree and mypy's cache (a cold run takes about a minute).
    base = Path(tempfile.gettempdir()) / f"textgym-mypy-{hashlib.sha1(str(ROOT).encode()).hexdigest()[:12]}"
    _installed_layout(base / "src")
    out = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                          "--cache-dir", str(base / "cache"), "textgym"],
                         capture_output=True, text=True, cwd=base / "src", timeout=900)
    report = (out.stdout + out.stderr).replace("textgym/agents/", "agents/")  # the checkout's paths
    assert out.returncode == 0, f"mypy found type errors:\n{report[-6000:]}"


# Google ("Args:") and numpy ("Parameters" over dashes) sections: the styles the code base does not use.
OTHER_DOCSTRING_SECTIONS = re.compile(
    r"^[ \t]*(?:(?:Args|Arguments|Keyword Args|Returns|Raises|Yields):[ \t]*$"
    r"|(?:Parameters|Other Parameters|Returns|Raises|Yields)[ \t]*\n[ \t]*-{3,}[ \t]*$)",
    re.MULTILINE,
)


def test_docstrings_use_param_style():
    """Parameters are documented as ``:param name: ...`` (SB3's style), never in Google or numpy sections."""
    assert OTHER_DOCSTRING_SECTIONS.search("f.\n\n    Args:\n        x: y\n")  # the pattern does match them
    assert OTHER_DOCSTRING_SECTIONS.search("f.\n\n    Parameters\n    ----------\n    x : int\n")
    found = []
    for top in ("textgym", "agents"):
        for path in sorted((ROOT / top).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node, clean=False)
                    if doc and OTHER_DOCSTRING_SECTIONS.search(doc):
                        found.append(f"{path.relative_to(ROOT)}: {getattr(node, 'name', '(module)')}")
    assert not found, "docstrings with Google/numpy sections (write ':param name: ...'):\n" + "\n".join(found)
