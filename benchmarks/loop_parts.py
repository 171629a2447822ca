"""Where a training step goes: the loop's parts beside the model's forward and backward, on one process.

Model and batch as benchmarks/pretrain.py (6 layers, d_model 384, micro-batch 16 x 256). Each round times,
in turn, on the same gradients:

- forward (bf16 autocast, loss in fp32) and backward of one micro-batch: the model's own time;
- DeepSpeed's stage-0 gradient all-reduce (`engine.allreduce_gradients`) on a group of one, which the loop
  now skips on one process;
- gradient clipping: DeepSpeed's `clip_grad_norm_` and torch's (default and foreach);
- torch.optim.AdamW: the CPU default (a loop over parameters), foreach=True and fused=True;
- then one forward+backward under torch.profiler: the top operators by self CPU time (share of the total).

    .venv/bin/python benchmarks/loop_parts.py [--rounds 5]

Prints one JSON object (ms per call: median, min, max over rounds; loadavg before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.pretrain import MODEL, random_batch, train_config  # noqa: E402
from models.llama import Transformer  # noqa: E402


def main() -> None:
    import deepspeed
    from deepspeed.runtime.utils import clip_grad_norm_ as ds_clip_grad_norm_

    from tasks.train.distributed import deepspeed_config, init_distributed

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    init_distributed()
    torch.manual_seed(0)
    model = Transformer(MODEL)
    cfg = train_config(argparse.Namespace(warmup=0, steps=1, batch=16))
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.configure_optimizer_groups(0.1), config=deepspeed_config(cfg)
    )
    params = list(model.parameters())
    batch = random_batch(0, 0, 16, MODEL.max_seq_len, MODEL.vocab_size)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(batch["x"])  # [B, T, V]
        F.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten()).backward()

    def adamw(**kw: bool) -> Callable[[], object]:
        return torch.optim.AdamW(model.configure_optimizer_groups(0.1), lr=1e-6, **kw).step

    parts: dict[str, Callable[[], object]] = {
        "forward_backward": forward_backward,
        "deepspeed_allreduce_gradients_world1": engine.allreduce_gradients,
        "deepspeed_clip_grad_norm": lambda: ds_clip_grad_norm_(parameters=params, max_norm=1.0, mpu=None),
        "torch_clip_grad_norm": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
        "torch_clip_grad_norm_foreach": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True),
        "adamw_cpu_default_loop": adamw(foreach=False),
        "adamw_foreach": adamw(foreach=True),
        "adamw_fused": adamw(fused=True),
    }
    ms: dict[str, list[float]] = {name: [] for name in parts}
    for r in range(args.rounds + 1):  # round 0 warms up (first-call allocations, optimizer state)
        for name, fn in parts.items():
            t0 = time.perf_counter()
            fn()
            if r > 0:
                ms[name].append(round(1000 * (time.perf_counter() - t0), 2))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward_backward()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    top_ops = {e.key: round(e.self_cpu_time_total / total, 3) for e in ops[:12]}
    result = {
        "benchmark": "loop_parts",
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default: active spin)"),
        "rounds": args.rounds,
        "loadavg_before": load_before,
        "ms": {
            k: {"median": round(statistics.median(v), 2), "min": min(v), "max": max(v)} for k, v in ms.items()
        },
        "forward_backward_top_ops_self_cpu_share": top_ops,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
