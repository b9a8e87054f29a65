"""One run per directory: an exclusive lock on ``RUN_DIR/.lock`` held for the run's whole life.

The lock is an ``fcntl.flock`` on the file, so the kernel releases it when the holder exits or
crashes (even on ``kill -9``): a lock file left behind by a dead process is stale and is simply
taken over. The file records who holds it (PID, host, start time, command) so that a refused run
can say which process it collided with.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """The run directory is in use by another live process."""


class RunLock:
    """``with RunLock(run_dir):`` or ``acquire()``/``release()``. Creates ``run_dir`` if needed (a
    refused run writes nothing else)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise RunLockedError(
                f"run directory {str(self.dir)!r} is in use by {holder}: wait for it to finish (or stop it), "
                "or choose another training.output_dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # A stale record (its holder died without unlocking: the kernel released the lock) is overwritten.
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty lock file: nobody holds it
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:  # noqa: PYI034
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.release()


def holder(run_dir: str | os.PathLike) -> dict | None:
    """The record of the live process holding ``run_dir``'s lock, or None when it is free (or stale)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (ValueError, OSError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict) -> str:
    if not record.get("pid"):
        return "another process"
    text = f"process {record['pid']}"
    if record.get("host"):
        text += f" on {record['host']}"
    if record.get("started"):
        text += f" (started {record['started']}"
        text += f": {record['command']})" if record.get("command") else ")"
    return text
