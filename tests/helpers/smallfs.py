"""A real small file system for disk-full tests: a tmpfs mounted over a directory, holding a copy of what
was there, filled so that only a few KiB are left."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

FILLER = ".filler"  # the file that takes the space; it lies in the mounted directory


@contextlib.contextmanager
def small_disk(directory: Path, free: int) -> Iterator[Path]:
    """Mount a tmpfs over `directory` with a copy of its files and `free` bytes left (FILLER takes the rest).
    On exit it is unmounted: what was written there is gone and the files from before show again, so make
    the checks inside. Skips the test where this process cannot mount a tmpfs (not root, no
    CAP_SYS_ADMIN, not Linux)."""
    directory = Path(directory)
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("disk-full tests mount a tmpfs: Linux with mount(8) only")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as copy:
        shutil.copytree(directory, copy, dirs_exist_ok=True, symlinks=True)
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m,mode=0755", "tmpfs", str(directory)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
        try:
            shutil.copytree(copy, directory, dirs_exist_ok=True, symlinks=True)
            stat = os.statvfs(directory)
            with open(directory / FILLER, "wb") as fh:
                fh.write(b"\0" * (stat.f_bavail * stat.f_frsize - free))
            left = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
            assert left <= free + 4096, f"{left} bytes left on the small disk, meant {free}"
            yield directory
        finally:
            if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(directory)], check=True)
