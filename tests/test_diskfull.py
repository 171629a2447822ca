"""Running out of disk space while outputs are written, on a real small file system (a tmpfs mounted over
the directory, tests/helpers/smallfs.py; skipped where this process cannot mount one), and the atomic
output helpers of tasks/core/io.py that keep the previous outputs. The evaluate stage's disk-full case is
in tests/test_evaluate.py, beside its other all-or-nothing cases."""

from __future__ import annotations

import errno
import subprocess

import pytest

from tasks.core import io
from tests.helpers.datahelpers import tree_hashes
from tests.helpers.smallfs import FILLER, small_disk


def test_a_write_on_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path):
    out = tmp_path / "disk" / "out.json"
    out.parent.mkdir()
    out.write_bytes(b'{"previous": true}\n')
    with small_disk(tmp_path / "disk", free=8 * 1024):
        with pytest.raises(OSError) as caught:
            io.atomic_write_bytes(out, b"x" * (64 * 1024))
        assert caught.value.errno == errno.ENOSPC
        assert caught.value.filename == str(out), "the error names the output, not a temp file or nothing"
        assert str(out) in str(caught.value)
        assert out.read_bytes() == b'{"previous": true}\n'
        assert sorted(p.name for p in out.parent.iterdir()) == [FILLER, "out.json"]  # no temp left


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_directory_swap_are_undone_by_the_next_write(tmp_path, monkeypatch):
    """A process killed inside atomic_path leaves `.<name>.tmp-<pid>` (and, on a file system without
    RENAME_EXCHANGE, `.<name>.old-<pid>` with `<name>` missing). The next atomic_path of that output puts
    the previous directory back, removes the temps of dead processes, and leaves a live one's alone."""
    out = tmp_path / "eval"
    pid = dead_pid()
    old = tmp_path / f".eval.old-{pid}"
    old.mkdir()
    (old / "summary.json").write_text("previous")
    (tmp_path / f".eval.tmp-{pid}").mkdir()
    (tmp_path / f".eval.tmp-{pid}" / "half.json").write_text("{")
    live = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / f".eval.tmp-{live.pid}").mkdir()
        io.recover(out)
        assert (out / "summary.json").read_text() == "previous"
        assert sorted(p.name for p in tmp_path.iterdir()) == [f".eval.tmp-{live.pid}", "eval"]
        monkeypatch.setattr(io, "exchange", lambda a, b: False)  # the two-rename fallback
        with io.atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "summary.json").write_text("new")
        assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
        assert (out / "summary.json").read_text() == "new"
        assert sorted(p.name for p in tmp_path.iterdir()) == [f".eval.tmp-{live.pid}", "eval"]
    finally:
        live.kill()
        live.wait()


def test_a_directory_is_exchanged_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not io.exchange(a, b):
        pytest.skip("no renameat2 RENAME_EXCHANGE here: atomic_path uses two renames and recover()")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_a_full_disk_while_pretrain_writes_its_outputs_keeps_the_previous_ones(tmp_path):
    """pretrain on the tiny profile with data/ on a tmpfs with 64 KiB left (its checkpoint is ~500 KB):
    the stage fails saying the disk is full, the previous checkpoint, metrics and curve are byte for byte
    what they were and no new file lies beside them (the outputs are staged in data/state/pretrain/final).
    The error is one line naming the file it could not write."""
    from tests.helpers.workspace import make_workspace
    from tests.test_pretrain import SMALL, make_outputs, run_pretrain

    make_workspace(tmp_path, [*SMALL, "pretrain.train.checkpoint_every=0"])  # no resume state: outputs only
    make_outputs(tmp_path)
    outputs = ("data/checkpoints", "data/metrics", "data/plots")
    with small_disk(tmp_path / "data", free=64 * 1024):
        before = {d: tree_hashes(tmp_path / d) for d in outputs}
        proc = run_pretrain(tmp_path, tmp_path.parent / f"{tmp_path.name}-mlflow.db")
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out[-3000:]
        assert "No space left on device" in out, out[-3000:]
        assert {d: tree_hashes(tmp_path / d) for d in outputs} == before
        assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".") and p.name != FILLER]
    # the file the stage could not write, named (the checkpoint is staged under data/state/pretrain/final)
    assert "data/state/pretrain/final/checkpoint/model.safetensors" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]  # a full disk is not a bug: one line, no traceback
