"""Model FLOPs utilisation: the dense matmul peak of this process, measured once (or given by env)."""

from __future__ import annotations

import os
import time

import torch

_PEAK_TFLOPS: dict[str, float] = {}


def peak_tflops(device: torch.device, bf16: bool = True) -> float:
    """Dense matmul peak of one process in TFLOP/s: PIPELINE_PEAK_TFLOPS if set, else measured once
    (a square bf16 matmul, fp32 when bf16 is off)."""
    if os.environ.get("PIPELINE_PEAK_TFLOPS"):
        return float(os.environ["PIPELINE_PEAK_TFLOPS"])
    key = f"{device.type}:{bf16}"
    if key not in _PEAK_TFLOPS:
        _PEAK_TFLOPS[key] = measure_matmul_tflops(device, torch.bfloat16 if bf16 else torch.float32)
    return _PEAK_TFLOPS[key]


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 0, reps: int = 0) -> float:
    """Best-of-reps TFLOP/s of an n x n @ n x n matmul (n=2048 on CPU, 8192 on GPU by default)."""
    on_gpu = device.type == "cuda"
    n = n or (8192 if on_gpu else 2048)
    reps = reps or (10 if on_gpu else 4)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if on_gpu:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12
