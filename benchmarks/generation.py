"""Rollout generation throughput: models.generate.generate_batch (prompts of different lengths, left-padded,
one batch) vs one prompt at a time with models.generate.generate (how the RL rollouts sample today).

Same model (cpu profile: 4 layers, d_model 256, 4 heads / 2 kv heads, vocab 4096, context 256; random
weights), same prompts (--batch prompts of random lengths in [--min-len, --max-len]), same sampling
(temperature 1, top-k 50, one seeded generator per prompt, so both variants draw the same tokens: the script
asserts it). The variants alternate round by round (which one goes first too), after one warm-up each.
tokens/s counts generated tokens. Prints one JSON object: median, min and max per variant, the median of the
per-round speedups, load average before and after, CPU model, torch threads.

    .venv/bin/python benchmarks/generation.py [--batch 16] [--new-tokens 32] [--rounds 5]

On a CPU shared with other processes, OpenMP threads spinning at barriers stall whenever another process
holds a core, and one-op-at-a-time decoding pays that per op: OMP_NUM_THREADS and OMP_WAIT_POLICY are
recorded in the JSON next to the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_name  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.generate import generate, generate_batch  # noqa: E402
from models.llama import Transformer  # noqa: E402

MODEL = ModelConfig(vocab_size=4096, n_layer=4, n_head=4, n_kv_head=2, d_model=256, max_seq_len=256)
TEMPERATURE, TOP_K = 1.0, 50
EOS = 2


def gens(n: int, seed: int, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One seeded generator per prompt, on the model's device (sampling draws there)."""
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(n)]


def one_at_a_time(model: Transformer, prompts: list[list[int]], n: int, seed: int) -> list[list[int]]:
    rows = []
    device = model.embed.weight.device
    for p, g in zip(prompts, gens(len(prompts), seed, device), strict=True):
        out = generate(
            model,
            torch.tensor([p], device=device),
            max_new_tokens=n,
            stop_tokens=[EOS],
            pad_id=-1,
            generator=g,
            temperature=TEMPERATURE,
            top_k=TOP_K,
        )[0, len(p) :].tolist()
        rows.append(out[: out.index(-1)] if -1 in out else out)
    return rows


def batched(model: Transformer, prompts: list[list[int]], n: int, seed: int) -> list[list[int]]:
    out = generate_batch(
        model,
        prompts,
        max_new_tokens=n,
        stop_tokens=[EOS],
        generator=gens(len(prompts), seed, model.embed.weight.device),
        temperature=TEMPERATURE,
        top_k=TOP_K,
    )
    return out.rows()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be >= 3 (median and spread)")

    load_before = [round(x, 2) for x in os.getloadavg()]
    torch.manual_seed(0)
    model = Transformer(MODEL).eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.batch,), generator=g).tolist()
    prompts = [torch.randint(3, MODEL.vocab_size, (n,), generator=g).tolist() for n in lengths]
    variants = {"one_at_a_time": one_at_a_time, "batched": batched}

    for fn in variants.values():  # warm-up (allocator, first-call kernels)
        fn(model, prompts[:2], 4, seed=0)
    tps: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        rows = {}
        for name in order:
            t0 = time.perf_counter()
            rows[name] = variants[name](model, prompts, args.new_tokens, seed=100 * r)
            dt = time.perf_counter() - t0
            tps[name].append(sum(len(x) for x in rows[name]) / dt)
        if rows["batched"] != rows["one_at_a_time"]:
            raise SystemExit(f"round {r}: batched rows differ from one-at-a-time rows (same seeds)")

    def summary(xs: list[float]) -> dict[str, float]:
        return {"median": round(statistics.median(xs), 1), "min": round(min(xs), 1), "max": round(max(xs), 1)}

    ratios = [b / a for a, b in zip(tps["one_at_a_time"], tps["batched"], strict=True)]
    print(
        json.dumps(
            {
                "benchmark": "generation",
                "model": {"n_layer": MODEL.n_layer, "d_model": MODEL.d_model, "vocab_size": MODEL.vocab_size},
                "batch": args.batch,
                "prompt_lengths": lengths,
                "new_tokens": args.new_tokens,
                "rounds": args.rounds,
                "tokens_per_s": {k: summary(v) for k, v in tps.items()},
                "speedup": {**summary(ratios), "goal": 4.0, "goal_met": statistics.median(ratios) >= 4.0},
                "same_tokens": True,
                "cpu": cpu_name(),
                "torch_threads": torch.get_num_threads(),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "load_average_before": load_before,
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )


if __name__ == "__main__":
    main()
