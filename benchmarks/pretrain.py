"""Pretraining throughput: our loop (tasks.train.loop.train: DeepSpeed engine, bf16) vs a plain fp32 loop.

Model: 6 layers, d_model 384, 6 heads, context 256, vocab 8192; micro-batch 16 x 256 tokens. Measured in
one run, after warm-up steps, on the same machine and thread count:

- "ours": the real `train()` path (DeepSpeed engine: ZeRO-1 in params, stage 0 on one process; bf16
  autocast on CPU / DeepSpeed bf16 on GPU; fused AdamW, grad clipping, LambdaLR) with the pretrain stage's
  loss (the head fused with the cross-entropy, models/fused_loss.py), tokens/s and MFU as the loop itself
  logs them to MLflow; "ours_plain_loss": the same with the loss computed from the logits, as the plain
  loop does;
- "plain_fp32": nanoGPT-style eager loop of the same model, torch AdamW (its default), fp32, no autocast;
- "plain_bf16": the same eager loop under bf16 autocast (so ours / plain_bf16 = what the engine adds or
  saves: benchmarks/loop_parts.py times those parts one by one);
- MFU = model FLOPs (Transformer.flops_per_token: 6N + attention) / bf16 matmul peak measured here
  (best of a few 4096 x 4096 bf16 matmuls on CPU, 8192 on GPU);
- --ranks: ZeRO-2 on 2 processes (torchrun, gloo on CPU) vs 1 process, equal global batch;
- generation tokens/s with and without the KV cache (models.generate);
- --compile: our loop with train.compile=true (DeepSpeed engine.compile(), inductor).

    .venv/bin/python benchmarks/pretrain.py [--rounds 3] [--steps 5] [--warmup 2] [--no-fp32] [--ranks]
        [--only-ranks] [--compile] [--quick]

Rounds: every variant runs once per round (a fresh model, warm-up steps, then measured steps), the order
rotated each round; each variant's figure is the median of its rounds (min and max beside it), and each ratio
is the median of the per-round ratios (both sides ran in the same round, so under about the same load).

The same script runs unchanged on a CUDA machine (device and DeepSpeed bf16 are picked automatically).
Prints one JSON object on the last line. Timings on a shared machine are noisy: loadavg is recorded.
On a CPU shared with other processes, run it with OMP_WAIT_POLICY=PASSIVE (recorded in the JSON):
OpenMP threads that spin at barriers stall whenever another process holds a core (3.3x slower here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_name  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.generate import generate  # noqa: E402
from models.llama import Transformer  # noqa: E402
from tasks.core.config import TrainConfig  # noqa: E402
from tasks.train.loop import lr_multiplier  # noqa: E402
from tasks.train.mfu import measure_matmul_tflops  # noqa: E402

MODEL = ModelConfig(vocab_size=8192, n_layer=6, n_head=6, n_kv_head=6, d_model=384, max_seq_len=256)
QUICK = ModelConfig(vocab_size=512, n_layer=2, n_head=4, n_kv_head=4, d_model=128, max_seq_len=128)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def random_batch(step: int, micro: int, batch: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 1000 + micro + 17 * int(os.environ.get("RANK", "0")))
    data = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return {"x": data[:, :-1], "y": data[:, 1:]}


class RandomTokens:
    """Objective for the loop: next-token loss on random tokens (the data does not change the speed). The
    loss is the pretrain stage's (tasks/pretrain.py: model(x, labels=y), the head fused with the
    cross-entropy, models/fused_loss.py); fused=False computes it as the plain loop does, from the logits."""

    def __init__(self, batch: int, seq: int, vocab: int, fused: bool = True) -> None:
        self.b, self.t, self.v, self.fused = batch, seq, vocab, fused

    def batch(self, step: int, micro_step: int, model: Any) -> dict[str, torch.Tensor]:
        return random_batch(step, micro_step, self.b, self.t, self.v)

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if self.fused:
            return model(batch["x"], labels=batch["y"]), {}
        logits = model(batch["x"])
        return F.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten()), {}

    def evaluate(self, model: Any) -> dict[str, float]:
        return {}

    def tokens_in(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["x"].numel())


def train_config(args: argparse.Namespace, **over: Any) -> TrainConfig:
    base = dict(
        max_steps=args.warmup + args.steps,
        micro_batch_size=args.batch,
        grad_accum=1,
        lr=6e-4,
        min_lr=6e-5,
        warmup_steps=2,
        eval_every=0,
        checkpoint_every=0,
        log_every=1,
        zero_stage=1,
        bf16=True,
    )
    base.update(over)
    return TrainConfig(**base)  # type: ignore[arg-type]


def plain_loop(cfg_model: ModelConfig, args: argparse.Namespace, autocast: bool) -> dict[str, float]:
    """nanoGPT-style: eager model, torch AdamW (same groups, betas, clipping and schedule as ours)."""
    torch.manual_seed(0)
    dev = device()
    model = Transformer(cfg_model).to(dev)
    cfg = train_config(args)
    opt = torch.optim.AdamW(model.configure_optimizer_groups(0.1), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg))
    seq = cfg_model.max_seq_len
    times = []
    for step in range(args.warmup + args.steps):
        batch = {
            k: v.to(dev) for k, v in random_batch(step, 0, args.batch, seq, cfg_model.vocab_size).items()
        }
        sync()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(batch["x"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["y"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        sync()
        times.append(time.perf_counter() - t0)
    measured = times[args.warmup :]
    tokens = args.batch * seq * len(measured)
    return {
        "tokens_per_s": round(tokens / sum(measured), 1),
        "step_s": [round(t, 3) for t in measured],
        "flops_per_token": model.flops_per_token(seq),
    }


def our_loop(
    cfg_model: ModelConfig, args: argparse.Namespace, fused_loss: bool = True, **over: Any
) -> dict[str, Any]:
    """The real tasks.train.loop.train() path; tokens/s and MFU as the loop logs them (training time only)."""
    from tasks.train.loop import train

    torch.manual_seed(0)
    model = Transformer(cfg_model)
    cfg = train_config(args, **over)
    rows: list[dict[str, float]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as state:
        train(
            model,
            RandomTokens(args.batch, cfg_model.max_seq_len, cfg_model.vocab_size, fused=fused_loss),
            cfg,
            state_dir=Path(state),
            on_step=lambda step, m: rows.append({"step": step, **m}),
        )
    total = time.perf_counter() - start
    measured = [r for r in rows if r["step"] > args.warmup]
    # log_every=1: each row's tokens_per_s covers one step; average over steps by time, not by rate.
    tokens_per_step = (
        args.batch * cfg.grad_accum * cfg_model.max_seq_len * int(os.environ.get("WORLD_SIZE", "1"))
    )
    step_s = [tokens_per_step / r["tokens_per_s"] for r in measured]
    out: dict[str, Any] = {
        "tokens_per_s": round(tokens_per_step * len(step_s) / sum(step_s), 1),
        "step_s": [round(t, 3) for t in step_s],
        "first_steps_s": [round(tokens_per_step / r["tokens_per_s"], 2) for r in rows[: args.warmup]],
        "wall_s_including_init": round(total, 1),
        "final_loss": round(rows[-1]["loss"], 4),
    }
    if "mfu" in measured[-1]:
        out["mfu"] = round(sum(r["mfu"] * s for r, s in zip(measured, step_s, strict=True)) / sum(step_s), 4)
    return out


def generation(cfg_model: ModelConfig, quick: bool) -> dict[str, float]:
    torch.manual_seed(0)
    dev = device()
    model = Transformer(cfg_model).to(dev).eval()
    prompt = torch.randint(0, cfg_model.vocab_size, (4, 32), device=dev)
    n = 32 if quick else 128
    out: dict[str, float] = {}
    for use_cache in (True, False):
        generate(model, prompt, max_new_tokens=4, use_cache=use_cache)  # warm-up
        sync()
        t0 = time.perf_counter()
        gen = generate(model, prompt, max_new_tokens=n, temperature=0.0, use_cache=use_cache)
        sync()
        new = (gen.size(1) - prompt.size(1)) * prompt.size(0)
        out["kv_cache_tokens_per_s" if use_cache else "no_cache_tokens_per_s"] = round(
            new / (time.perf_counter() - t0), 1
        )
    out["speedup"] = round(out["kv_cache_tokens_per_s"] / out["no_cache_tokens_per_s"], 2)
    out["batch"], out["prompt_len"], out["new_tokens"] = 4, 32, n
    return out


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max tokens/s over rounds (each round's full result kept under "rounds")."""
    tps = [r["tokens_per_s"] for r in rounds]
    out: dict[str, Any] = {
        "tokens_per_s": round(statistics.median(tps), 1),
        "min": min(tps),
        "max": max(tps),
        "rounds_tokens_per_s": tps,
    }
    if all("mfu" in r for r in rounds):
        out["mfu"] = round(statistics.median(r["mfu"] for r in rounds), 4)
    out["rounds"] = rounds
    return out


def ratio(rounds_a: list[dict[str, Any]], rounds_b: list[dict[str, Any]]) -> dict[str, Any]:
    """a / b round by round (both ran in the same round, so under the same load): median, min, max."""
    per_round = [
        round(a["tokens_per_s"] / b["tokens_per_s"], 3) for a, b in zip(rounds_a, rounds_b, strict=True)
    ]
    return {
        "median": round(statistics.median(per_round), 3),
        "min": min(per_round),
        "max": max(per_round),
        "per_round": per_round,
    }


def alternate(
    variants: dict[str, Callable[[], dict[str, Any]]], rounds: int
) -> dict[str, list[dict[str, Any]]]:
    """Run every variant once per round, rotating the order each round (round r starts with variant r mod n),
    so that a change of load (other users of a shared machine) hits every variant alike."""
    names = list(variants)
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            load = round(os.getloadavg()[0], 2)
            res = variants[name]()
            results[name].append({**res, "round": r, "loadavg_1min_before": load})
            print(f"round {r} {name}: {res['tokens_per_s']} tok/s (load {load})", file=sys.stderr, flush=True)
    return results


def rank_run(args: argparse.Namespace, world: int) -> dict[str, Any]:
    """One --ranks run: ZeRO-2 on `world` processes, micro-batch batch/2, accumulation 2/world, so the
    global batch is the same (16 sequences) for 1 and 2 processes. A fresh process (torchrun for 2)."""
    micro = max(1, args.batch // 2)
    accum = 2 // world
    worker = [
        "benchmarks/pretrain.py",
        "--worker",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--batch={micro}",
        f"--accum={accum}",
    ] + (["--quick"] if args.quick else [])
    if world == 1:
        cmd = [sys.executable, *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *worker]
    # This process already joined a group of one (its RANK/MASTER_PORT would leak into the children).
    dist_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env["PYTHONPATH"] = str(REPO)
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // world))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    return {**json.loads(line), "micro_batch": micro, "grad_accum": accum}


def ranks_comparison(args: argparse.Namespace) -> dict[str, Any]:
    """ZeRO-2 on 2 processes (micro 8, accum 1) vs 1 process (micro 8, accum 2), alternated round by round."""
    runs = alternate({"1_rank": lambda: rank_run(args, 1), "2_rank": lambda: rank_run(args, 2)}, args.rounds)
    return {
        "1_rank": summarize(runs["1_rank"]),
        "2_rank": summarize(runs["2_rank"]),
        "speedup_2_vs_1": ratio(runs["2_rank"], runs["1_rank"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="measured steps per loop")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; every variant runs once per round")
    ap.add_argument("--batch", type=int, default=16, help="micro-batch size (sequences of 256 tokens)")
    ap.add_argument("--accum", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    ap.add_argument("--no-fp32", action="store_true", help="skip the plain fp32 loop (saves a third)")
    ap.add_argument("--ranks", action="store_true", help="also ZeRO-2 2 processes vs 1 (equal global batch)")
    ap.add_argument("--only-ranks", action="store_true", help="only the --ranks comparison")
    ap.add_argument("--compile", action="store_true", help="also our loop with train.compile=true")
    ap.add_argument("--quick", action="store_true", help="a small model and 2+1 steps, 1 round (smoke test)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.warmup, args.rounds = min(args.steps, 2), min(args.warmup, 1), 1
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg_model = QUICK if args.quick else MODEL
    dev = device()

    peak = measure_matmul_tflops(
        dev, torch.bfloat16, n=2048 if args.quick else (8192 if dev.type == "cuda" else 4096)
    )
    os.environ["PIPELINE_PEAK_TFLOPS"] = str(peak)  # the loop's logged MFU uses this same peak

    if args.worker:  # one of the --ranks processes: only our loop, rank 0 prints
        res = our_loop(cfg_model, args, zero_stage=2, grad_accum=args.accum)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps({**res, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}))
        return

    result: dict[str, Any] = {
        "benchmark": "pretrain",
        "command": " ".join(["benchmarks/pretrain.py", *sys.argv[1:]]),
        "device": str(dev) if dev.type == "cpu" else f"cuda:{torch.cuda.get_device_name()}",
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default: active spin)"),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "model": {
            **{k: getattr(cfg_model, k) for k in ("n_layer", "d_model", "n_head", "n_kv_head", "vocab_size")},
            "seq_len": cfg_model.max_seq_len,
            "micro_batch": args.batch,
            "params_M": round(Transformer(cfg_model).num_params() / 1e6, 2),
        },
        "peak_bf16_matmul_tflops": round(peak, 4),
        "peak_fp32_matmul_tflops": round(measure_matmul_tflops(dev, torch.float32, n=2048), 4),
        "rounds": args.rounds,
        "measured_steps": args.steps,
        "warmup_steps": args.warmup,
    }
    fpt = Transformer(cfg_model).flops_per_token(cfg_model.max_seq_len)
    result["flops_per_token"] = fpt

    def plain(autocast: bool) -> dict[str, Any]:
        res = plain_loop(cfg_model, args, autocast=autocast)
        return {**res, "mfu": round(res["tokens_per_s"] * fpt / (peak * 1e12), 4)}

    if not args.only_ranks:
        variants: dict[str, Callable[[], dict[str, Any]]] = {
            "ours": lambda: our_loop(cfg_model, args),
            "ours_plain_loss": lambda: our_loop(cfg_model, args, fused_loss=False),
            "plain_bf16": lambda: plain(True),
        }
        if not args.no_fp32:
            variants["plain_fp32"] = lambda: plain(False)
        if args.compile:
            variants["ours_compiled"] = lambda: our_loop(cfg_model, args, compile=True)
        runs = alternate(variants, args.rounds)
        result.update({name: summarize(rounds) for name, rounds in runs.items()})
        result["ours_vs_plain_bf16"] = ratio(runs["ours"], runs["plain_bf16"])
        # what the engine alone does (same loss as the plain loop), and what the fused loss adds to it
        result["ours_plain_loss_vs_plain_bf16"] = ratio(runs["ours_plain_loss"], runs["plain_bf16"])
        result["ours_vs_ours_plain_loss"] = ratio(runs["ours"], runs["ours_plain_loss"])
        if "plain_fp32" in runs:
            result["ours_vs_plain_fp32"] = ratio(runs["ours"], runs["plain_fp32"])
        if "ours_compiled" in runs:
            result["compiled_vs_ours"] = ratio(runs["ours_compiled"], runs["ours"])
            result["compiled_vs_plain_bf16"] = ratio(runs["ours_compiled"], runs["plain_bf16"])
        result["generate"] = generation(cfg_model, args.quick)
    if args.ranks or args.only_ranks:
        result["zero2_ranks"] = ranks_comparison(args)
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["targets"] = {"ours_vs_plain_bf16": ">= 1.1", "zero2_2_vs_1_rank": ">= 0.85"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
