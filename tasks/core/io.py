"""Atomic file output and hashing.

Every stage writes through these helpers: a temp file (or directory) beside the target, then an
atomic rename, so a killed stage leaves either the previous output or the new one, never half. A write
that fails (a full disk) raises an OSError naming the file and leaves the previous output as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs are as readable as any other file
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename is None:
            # a failed write or flush (ENOSPC, EDQUOT, EIO) names no file: name the output
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def kill_at(point: str) -> None:
    """Fault injection for the tests: die like `kill -9` would, with no cleanup, at a named point
    (PIPELINE_KILL_AT=<point>)."""
    if os.environ.get("PIPELINE_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE): at every instant each name
    holds one of the two. False where the platform or the file system cannot, and nothing was done."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # a libc without renameat2 (glibc before 2.28)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def recover(path: Path) -> None:
    """Clear what a process killed inside `atomic_path(path)` left beside it: a directory it had moved
    aside (`.<name>.old-<pid>`, only without RENAME_EXCHANGE) goes back when `path` is missing, and its
    temps are removed. Leftovers of a process still alive are left alone."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(old|tmp)-(\d+)")
    found = sorted(
        (m.group(1), int(m.group(2)), p)
        for p in path.parent.iterdir()
        if (m := pattern.fullmatch(p.name)) is not None
    )
    for kind, pid, leftover in found:  # "old" sorts first: restore before removing any temp
        if pid == os.getpid() or _alive(pid):
            continue
        if kind == "old" and not os.path.lexists(path):
            os.replace(leftover, path)
        elif leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path` (a file or a directory); on success rename it into place.

    A directory replaces the old one in one step (`exchange`), then the old one is removed; where the
    file system cannot exchange, the old one is moved aside first, and a kill between the two renames is
    undone by the next call (`recover`). On failure the temp is removed and the old output is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {path}")
        if tmp.is_dir() and path.is_dir():
            if exchange(tmp, path):  # tmp now holds the old directory
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                old = path.parent / f".{path.name}.old-{os.getpid()}"
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def stream_parquet(path: Path) -> Any:
    """A pyarrow ParquetFile to read batch by batch in bounded memory. pre_buffer (pyarrow's default) keeps
    the buffers of every row group read so far until the reader ends: on a 1 GB file arrow's live memory
    grew 100 -> 254 MB over the file; off, it stays flat. Same rows, same bytes."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path, pre_buffer=False)
