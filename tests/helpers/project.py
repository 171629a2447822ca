"""The project copied into a temp git + DVC repo with tiny params, committed: what the end-to-end and
operations tests run the pipeline in (lineage tags point at that commit)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def make_project(root: Path, profile: str = "tiny") -> Path:
    root.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for item in ("flows", "tasks", "models", "conf", "data/mmlu"):
        shutil.copytree(REPO / item, root / item, ignore=ignore)
    (root / "init").mkdir()  # sft's dep (open models); only its README, not models a user put there
    for item in (
        "dvc.yaml",
        "pyproject.toml",
        ".gitignore",
        ".dvcignore",
        "init/README.md",
        "init/.gitignore",
    ):
        shutil.copy(REPO / item, root / item)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        [sys.executable, "-m", "flows.cli", "params", "--profile", profile],
        ["git", "add", "-A"],
        [
            "git",
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@localhost",
            "commit",
            "-qm",
            f"{profile} project",
        ],
    ):
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return root
