"""One pipeline at a time in a project: an exclusive lock for a whole `pipeline run`, `pipeline params`
or deployment run.

Two flows in one directory would rewrite params.yaml under each other, and dvc.lock would then record
params that did not produce the outputs. The lock is an flock on .pipeline/pipeline.lock, so the kernel
releases it when its holder dies (kill -9 included); the file names the holder (pid, start, command) for
the message a second run gets. `wait=True` queues behind the holder instead of failing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = Path(".pipeline") / "pipeline.lock"

log = logging.getLogger(__name__)

_held: set[Path] = set()  # projects whose lock this process holds: `pipeline run` takes it, then its flow


class ProjectBusy(RuntimeError):
    """Another pipeline command holds the project's lock; the message names it."""


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096) or b"{}")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        return f"pid {int(info['pid'])}, started {started}: {str(info.get('command', '?'))[:200]}"
    except (ValueError, KeyError, TypeError, OSError):
        return "a process that has not written its name yet"


@contextlib.contextmanager
def project_lock(root: Path, command: str, wait: bool = False) -> Iterator[None]:
    """Hold the project's pipeline lock for the body; ProjectBusy at once if another holds it (unless wait).

    Re-entrant within a process: `pipeline run` takes the lock before Prefect starts, and the flow it runs
    takes it again (a deployment run, started by a worker, takes it only there).
    """
    key = Path(root).resolve()
    if key in _held:
        yield
        return
    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not wait:
                raise ProjectBusy(
                    f"another pipeline command is running in {Path(root).resolve()} ({holder}); "
                    f"it holds {path}. Wait for it to finish, or pass --wait to queue behind it"
                ) from None
            log.warning("waiting for the pipeline lock held by %s", holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "started": time.time(), "command": command}).encode())
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def command_line() -> str:
    return " ".join(["pipeline", *sys.argv[1:]])[:200]
