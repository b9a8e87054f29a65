"""Lint, import order (ruff) and types (mypy), configured in pyproject.toml, are part of the test suite, so CI
runs them."""

import hashlib
import importlib.util
import os
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

