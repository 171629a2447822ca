"""Post-training throughput: SFT tokens/s and DPO pairs/s of our objectives through the real training loop
(tasks.train.loop.train: DeepSpeed engine, ZeRO stage from the config, grad clipping, LR schedule) next to a
plain PyTorch eager implementation of the same step (same model, same batches, same loss, fp32, AdamW,
clipping), measured in the same run. Each variant runs in its own process, so its peak memory
(ru_maxrss) is its own.

The loop is measured in fp32 (the apples-to-apples comparison) and with bf16 autocast (what the
profiles configure on CPU). SFT tokens are real (non-pad) input tokens.

    .venv/bin/python benchmarks/posttrain.py [--steps 12] [--warmup 3] [--layers 4] [--d-model 256]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_name  # noqa: E402


def setup(root: Path, args: argparse.Namespace, config: Any = None) -> None:
    """A tiny-data workspace (tests/helpers/workspace.py) with a random base/sft model of the benchmark's size
    (args.layers, args.d_model), or of `config` (a ModelConfig) when given (benchmarks/gpu.py)."""
    import torch

    from models.checkpoint import save_checkpoint
    from models.config import ModelConfig
    from models.llama import Transformer
    from tasks.data.chat_tokenizer import ChatTokenizer
    from tests.helpers.workspace import make_workspace

    make_workspace(root, pairs=args.pairs)
    tok = ChatTokenizer.load(root / "data/tokenizer/tokenizer.json")
    config = config or ModelConfig(
        vocab_size=-(-tok.vocab_size // 64) * 64,
        n_layer=args.layers,
        n_head=4,
        n_kv_head=2,
        d_model=args.d_model,
        max_seq_len=args.seq_len,
    )
    torch.manual_seed(0)
    save_checkpoint(
        root / "data/checkpoints/sft",
        Transformer(config),
        config,
        meta={"tokenizer_fingerprint": tok.fingerprint},
    )


def objective_for(task: str, args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, objective, train config) as the sft / dpo stages build them."""
    import dataclasses

    import torch

    from tasks.core import paths
    from tasks.core.config import DPOConfig, TrainConfig
    from tasks.data import chat_data
    from tasks.data.chat_tokenizer import ChatTokenizer
    from tasks.dpo import DirectPreference, reference_logps
    from tasks.sft import SupervisedChat
    from tasks.train.checkpoints import load_causal_lm

    tok = ChatTokenizer.load(paths.TOKENIZER_JSON)
    model, _ = load_causal_lm("sft", tok.fingerprint)
    train = TrainConfig(
        max_steps=args.steps,
        micro_batch_size=args.batch,
        lr=1e-4,
        min_lr=1e-5,
        warmup_steps=0,
        eval_every=0,
        checkpoint_every=0,
        zero_stage=args.zero_stage,
        log_every=1,
    )
    if task == "sft":
        examples = chat_data.sft_examples(tok, args.seq_len)
        return model, SupervisedChat(examples, tok.pad_id, args.batch, 1337, 0.1, 1), train
    pairs = chat_data.preference_pairs(tok, args.seq_len)
    reference, _ = load_causal_lm("sft", tok.fingerprint)
    if torch.cuda.is_available():  # the reference log-probs, computed once, on the device the loop trains on
        reference = reference.cuda()
    ref = reference_logps(reference, pairs, tok.pad_id, 16)
    cfg = dataclasses.replace(DPOConfig(), train=train)
    return model, DirectPreference(pairs, ref, cfg, tok.pad_id), train


def worker(task: str, impl: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    import torch

    os.chdir(root)
    model, objective, cfg = objective_for(task, args)
    counts: list[tuple[float, int]] = []  # (time at the end of a step, units processed in that step)
    units = 0

    def unit_count(batch: dict[str, Any]) -> int:
        return objective.tokens_in(batch) if task == "sft" else int(batch["tokens"].shape[0] // 2)

    if impl == "eager":
        # The plain PyTorch step: same batches and loss, fp32, AdamW with the loop's hyperparameters.
        from models.llama import optimizer_groups

        opt = torch.optim.AdamW(
            optimizer_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8
        )
        model.train()
        for step in range(cfg.max_steps):
            batch = objective.batch(step, 0, model)
            loss, _ = objective.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            counts.append((time.perf_counter(), unit_count(batch)))
    else:
        from tasks.train.loop import train

        cfg = dataclasses.replace(cfg, bf16=impl == "loop_bf16")
        inner_batch = objective.batch

        def counted_batch(step: int, micro: int, module: Any) -> dict[str, Any]:
            nonlocal units
            batch = inner_batch(step, micro, module)
            units += unit_count(batch)
            return batch

        objective.batch = counted_batch

        def on_step(step: int, metrics: dict[str, float]) -> None:
            nonlocal units
            counts.append((time.perf_counter(), units))
            units = 0

        train(model, objective, cfg, state_dir=root / "data/state/bench", on_step=on_step)
    warm = counts[args.warmup - 1][0]
    timed = counts[args.warmup :]
    elapsed = timed[-1][0] - warm
    total = sum(n for _, n in timed)
    return {
        "task": task,
        "impl": impl,
        "per_s": total / elapsed,
        "unit": "tokens" if task == "sft" else "pairs",
        "timed_steps": len(timed),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256, help="context of the model and the batches")
    parser.add_argument("--worker", nargs=3, metavar=("TASK", "IMPL", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        task, impl, root = args.worker
        print("RESULT " + json.dumps(worker(task, impl, Path(root), args)))
        return

    import torch

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-posttrain-") as tmp:
        root = Path(tmp)
        setup(root, args)
        passthrough = [
            f"--steps={args.steps}",
            f"--warmup={args.warmup}",
            f"--batch={args.batch}",
            f"--zero-stage={args.zero_stage}",
            f"--seq-len={args.seq_len}",
        ]
        env = dict(os.environ, PYTHONPATH=str(REPO), PIPELINE_LOG_LEVEL="WARNING")
        for task in ("sft", "dpo"):
            for impl in ("eager", "loop_fp32", "loop_bf16"):
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", task, impl, str(root), *passthrough],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=False,
                )
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    raise SystemExit(f"{task}/{impl} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
                results[f"{task}/{impl}"] = json.loads(lines[-1][len("RESULT ") :])

    def ratio(task: str, impl: str) -> float:
        return round(results[f"{task}/{impl}"]["per_s"] / results[f"{task}/eager"]["per_s"], 3)

    print(
        json.dumps(
            {
                "cpu": cpu_name(),
                "cores": os.cpu_count(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "model": {"n_layer": args.layers, "d_model": args.d_model, "batch": args.batch},
                "steps_timed": args.steps - args.warmup,
                "sft_tokens_per_s": {
                    k.split("/")[1]: round(v["per_s"], 1) for k, v in results.items() if k[:3] == "sft"
                },
                "dpo_pairs_per_s": {
                    k.split("/")[1]: round(v["per_s"], 2) for k, v in results.items() if k[:3] == "dpo"
                },
                "loop_vs_eager": {
                    f"{t}/{i}": ratio(t, i) for t in ("sft", "dpo") for i in ("loop_fp32", "loop_bf16")
                },
                "peak_rss_mb": {k: round(v["peak_rss_mb"], 1) for k, v in results.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
