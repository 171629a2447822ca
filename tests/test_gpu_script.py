"""benchmarks/gpu.sh, the one script to run when a GPU is available: its --dry-run (tiny shapes, the same
code paths) gives a positive figure for every part and no error; without CUDA the full run refuses (exit 2)
before any work; a failing or overlong part is recorded as an error string."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIGURES = {
    "pretrain": "tokens_per_s",
    "dpo": "pairs_per_s",
    "mmlu": "items_per_s",
    "generation": "tokens_per_s",
}


def run_script(
    *args: str, env: dict[str, str] | None = None, timeout: int = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "benchmarks/gpu.sh"), *args],
        cwd=REPO,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict, float]:
    out = tmp_path_factory.mktemp("gpu") / "result.json"
    start = time.monotonic()
    proc = run_script("--dry-run", "--out", str(out))
    wall = time.monotonic() - start
    failed = proc.stdout and json.loads(proc.stdout.splitlines()[-1]).get("parts")
    assert proc.returncode == 0, (failed, proc.stderr[-4000:])
    result = json.loads(proc.stdout)  # stdout is the JSON object and nothing else
    assert json.loads(out.read_text()) == result
    return proc, result, wall


def test_dry_run_reports_a_positive_figure_for_every_part(dry_run):
    proc, result, wall = dry_run
    assert result["dry_run"] is True and result["profile"] == "gpu"
    assert result["failed_parts"] == [], result["parts"]
    assert result["peak_bf16_matmul_tflops"] > 0
    assert result["device"] and result["torch"] and result["deepspeed"]
    assert result["model"]["params_M"] > 0 and result["model"]["n_kv_head"] < result["model"]["n_head"]
    parts = result["parts"]
    assert set(parts) == {*FIGURES, "pretrain_compiled"}
    for name, key in FIGURES.items():
        part = parts[name]
        assert part["error"] is None, (name, part["error"])
        assert part[key] > 0, (name, part)
        assert part["wall_s"] > 0 and part["time_box_s"] > 0
        assert result["steps"][name]["measured"] >= 1
    assert parts["pretrain"]["mfu"] > 0
    assert parts["pretrain"]["compile"] is False and "flash" in parts["pretrain"]["sdpa"]
    compiled = parts["pretrain_compiled"]
    assert compiled["error"] is None
    if result["device"] == "cpu":  # compile may be skipped on CPU, with the reason
        assert "skipped" in compiled and "CPU" in compiled["skipped"]
    else:
        assert compiled["tokens_per_s"] > 0 and compiled["mfu"] > 0 and compiled["compile"] is True
    print(f"dry run: {wall:.1f} s (the script's own wall_s {result['wall_s']})")


def test_without_cuda_the_full_run_refuses_before_any_work(tmp_path):
    out = tmp_path / "result.json"
    start = time.monotonic()
    proc = run_script("--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""}, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
    assert proc.stdout == "" and not out.exists()
    assert "start (time box" not in proc.stderr  # no part started
    assert time.monotonic() - start < 30


def test_a_failing_or_overlong_part_is_recorded_and_the_run_goes_on():
    from benchmarks import gpu

    deadline = time.monotonic() + 60

    def boom() -> dict:
        raise RuntimeError("CUDA out of memory (simulated)")

    def slow() -> dict:
        time.sleep(5)
        return {"tokens_per_s": 1.0}

    failed = gpu.run_part("boom", boom, 10, deadline)
    assert failed["error"] == "RuntimeError: CUDA out of memory (simulated)"
    start = time.monotonic()
    late = gpu.run_part("slow", slow, 0.3, deadline)
    assert late["error"].startswith("PartTimeout") and "tokens_per_s" not in late
    assert time.monotonic() - start < 2
    assert gpu.run_part("ok", lambda: {"items_per_s": 2.0}, 10, deadline)["error"] is None
    past = gpu.run_part("late", lambda: {"items_per_s": 2.0}, 10, time.monotonic())
    assert "deadline" in past["error"]


def test_a_part_stuck_where_the_alarm_cannot_reach_it_is_reported_by_the_watchdog():
    from benchmarks import gpu

    hangs: list[tuple[str, float]] = []

    def stuck() -> dict:  # the alarm held off, as inside one long C call
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        try:
            time.sleep(1.0)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
        return {"tokens_per_s": 1.0}

    out = gpu.run_part("stuck", stuck, 0.2, time.monotonic() + 60, lambda *a: hangs.append(a), grace=0.3)
    assert hangs == [("stuck", 0.2)]
    assert out["error"].startswith("PartTimeout")
    # and a part that ends in time never calls it
    gpu.run_part(
        "ok", lambda: {"items_per_s": 2.0}, 5, time.monotonic() + 60, lambda *a: hangs.append(a), 0.1
    )
    time.sleep(0.3)
    assert len(hangs) == 1
