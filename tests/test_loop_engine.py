"""The loop's engine on one process: no gradient all-reduce over a group of one, torch's fused AdamW.

Speed is measured in benchmarks/loop_parts.py and benchmarks/pretrain.py, not here; these tests check the
engine does what those figures assume. Each runs train() in a subprocess (a process group of its own),
a tiny model, 3 steps, OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# train() under torch.profiler: which collectives ran; then the optimizer of an engine built from its config.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile
    from models.config import ModelConfig
    from models.llama import Transformer
    from tasks.core.config import TrainConfig
    from tasks.train import loop

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, d_model=32, max_seq_len=16))
    data = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))

    class OneBatch:
        def batch(self, step, micro, model):
            return {"x": data[:, :-1], "y": data[:, 1:]}
        def loss(self, model, batch):
            return F.cross_entropy(model(batch["x"]).float().flatten(0, 1), batch["y"].flatten()), {}
        def evaluate(self, model):
            return {}
        def tokens_in(self, batch):
            return int(batch["x"].numel())

    cfg = TrainConfig(max_steps=3, micro_batch_size=4, grad_accum=2, lr=1e-3, min_lr=1e-4, warmup_steps=1,
                      eval_every=0, checkpoint_every=0, log_every=1, zero_stage=1, bf16=True)
    curve = []
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loop.train(model, OneBatch(), cfg, state_dir=sys.argv[1], on_step=lambda s, m: curve.append(m["loss"]))
    # all-reduces run: DeepSpeed's clipping reduces the gradient norm (one number) once a step
    reduces = sum(e.count for e in prof.key_averages() if e.key == "c10d::allreduce_")
    # the engine the loop builds from the same config (tasks/train/distributed.py)
    import deepspeed
    from tasks.train.distributed import deepspeed_config
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=deepspeed_config(cfg))
    groups = engine.optimizer.param_groups
    print(json.dumps({"all_reduces": reduces, "fused": [g.get("fused") for g in groups], "curve": curve}))
    """
)


def run_script(tmp_path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "state")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_one_process_trains_without_collectives_and_with_fused_adamw(tmp_path):
    """One process: no all-reduce of gradients (DeepSpeed's stage 0 would all-reduce them over a group of
    one at every optimizer step: 6 all-reduces instead of 3), and torch's fused AdamW (not its per-parameter loop); the loss still goes down."""
    out = run_script(tmp_path)
    assert out["all_reduces"] == 3, (
        "only the clipping's grad norm, once per step (3 steps of 2 micro-batches)"
    )
    assert out["fused"] and all(f is True for f in out["fused"]), out["fused"]
    assert len(out["curve"]) == 3 and out["curve"][-1] < out["curve"][0], out["curve"]
