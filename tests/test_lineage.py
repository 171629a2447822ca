"""Local sources are DVC deps: editing a source file, a file in a source directory or a file a glob
matches makes `dvc status` report ingest changed, and `dvc repro` re-runs it; the same holds for a
local MMLU directory and evaluate. A real DVC repo (tests/helpers/project.py) runs ingest and validate only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.project import make_project

pytestmark = pytest.mark.e2e


def dvc(project: Path, *args: str) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["dvc", *args], cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def pipeline_params(project: Path, *sets: str) -> None:
    args = [arg for s in sets for arg in ("--set", s)]
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "params", "--profile", "tiny", *args],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def conversation(i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"How do I parse record number {i} of the ledger file?"},
            {"role": "assistant", "content": f"Open the ledger, seek to record {i}, then decode its fields."},
        ]
    }


def pair(i: int) -> dict:
    return {
        "prompt": f"Which module reads configuration file number {i}?",
        "chosen": f"The configparser module reads file {i} into sections and options.",
        "rejected": f"Nothing reads it; file {i} is ignored by every module ever written.",
    }


def document(i: int) -> str:
    return f"Document {i}: " + " ".join(f"word{i}x{j} follows the previous one" for j in range(12)) + "\n"


def changed(project: Path) -> str:
    """`dvc status` of ingest: '' when up to date, else its report."""
    out = dvc(project, "status", "ingest")
    return "" if "up to date" in out else out


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny project reading every dataset from local files, after `dvc repro validate`: pretrain from a
    directory of .txt files, preference from a glob, sft from a jsonl file outside the project given
    as an absolute path."""
    root = tmp_path_factory.mktemp("lineage")
    project = make_project(root / "project")
    for i in range(14):
        (project / "corpus/docs").mkdir(parents=True, exist_ok=True)
        (project / f"corpus/docs/doc{i:02d}.txt").write_text(document(i))
    write_jsonl(project / "corpus/pairs/part-0.jsonl", [pair(i) for i in range(12)])
    sft = write_jsonl(root / "outside/sft.jsonl", [conversation(i) for i in range(12)])
    pipeline_params(
        project,
        "ingest.pretrain.kind=files",
        "ingest.pretrain.path=corpus/docs",
        "ingest.preference.kind=files",
        "ingest.preference.path=corpus/pairs/part-*.jsonl",
        "ingest.sft.kind=files",
        f"ingest.sft.path={sft}",
    )
    out = dvc(project, "repro", "validate")
    assert "Running stage 'ingest'" in out and "Running stage 'validate'" in out, out
    assert changed(project) == ""
    return project, sft


def summary(project: Path) -> dict:
    return json.loads((project / "data/raw/summary.json").read_text())


def test_any_local_source_edit_makes_ingest_changed(project):
    project, sft = project
    edits = [
        (sft, "a line added to a source file outside the project (absolute path)"),
        (project / "corpus/docs/doc03.txt", "a file inside a source directory edited"),
        (project / "corpus/docs/doc99.txt", "a new file in a source directory"),
        (project / "corpus/pairs/part-1.jsonl", "a new file matching a source glob"),
    ]
    for path, what in edits:
        original = path.read_bytes() if path.exists() else None
        if path.suffix == ".jsonl" and original is None:
            write_jsonl(path, [pair(100 + i) for i in range(3)])
        elif path.suffix == ".jsonl":
            path.write_bytes(original + (json.dumps(conversation(100)) + "\n").encode())
        else:
            path.write_text((original or b"").decode() + document(100))
        report = changed(project)
        assert "modified" in report and ("corpus/" in report or str(path.parent) in report), (what, report)
        if original is None:
            path.unlink()
        else:
            path.write_bytes(original)
        assert changed(project) == "", f"after undoing: {what}"


def test_dvc_repro_reruns_ingest_and_validate_after_a_source_edit(project):
    project, sft = project
    before = summary(project)["sft"]["rows_in"]
    with open(sft, "a") as fh:
        fh.write(json.dumps(conversation(200)) + "\n")
    assert "modified" in changed(project)
    out = dvc(project, "repro", "validate")
    assert "Running stage 'ingest'" in out and "Running stage 'validate'" in out, out
    assert summary(project)["sft"]["rows_in"] == before + 1
    assert changed(project) == ""


def test_a_local_mmlu_dir_is_an_evaluate_dep(project):
    """evaluate reads its MMLU CSVs from evaluate.mmlu_dir: that directory is what DVC hashes."""
    project, _ = project
    params = (project / "params.yaml").read_text()
    pipeline_params(project, "evaluate.mmlu_dir=corpus/mmlu")
    resolve = "from dvc.repo import Repo; print(*Repo().stage.collect('evaluate')[0].deps, sep='\\n')"
    try:
        # DVC resolves the stage as `dvc repro` would, in the project
        proc = subprocess.run([sys.executable, "-c", resolve], cwd=project, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        deps = set(proc.stdout.split())
        assert "corpus/mmlu" in deps and "data/mmlu" not in deps, sorted(deps)
    finally:
        (project / "params.yaml").write_text(params)
