"""Peak memory of full fine-tuning vs LoRA on the same model: SFT through the real training loop
(tasks.train.loop.train: DeepSpeed engine, AdamW, bf16 autocast on CPU as the profiles run it).

Variants, each in its own process so that its peak RSS (ru_maxrss) is its own:
    load            imports + the model loaded, no training: the floor every variant pays
    full            every weight trained (grads + AdamW moments for all of them)
    lora            sft.lora on every linear layer, rank 16: grads and moments for the adapters only
    lora_bf16_base  the same, frozen base kept in bf16 (lora.base_bf16)

Rounds alternate the variants (load, full, lora, lora_bf16_base, load, ...); the JSON reports the median,
min and max of each over the rounds, tokens/s of the trained steps after warmup, parameter counts, the
load average and the CPU.

    .venv/bin/python benchmarks/lora.py [--rounds 3] [--steps 4] [--layers 6] [--d-model 768]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.machine import cpu_name  # noqa: E402

VARIANTS = ("load", "full", "lora", "lora_bf16_base")


def setup(root: Path, args: argparse.Namespace) -> None:
    """The tiny workspace's chat data and tokenizer, and a random sft-ready base of the benchmark's size."""
    import torch

    from models.checkpoint import save_checkpoint
    from models.config import ModelConfig
    from models.llama import Transformer
    from tasks.data.chat_tokenizer import ChatTokenizer
    from tests.helpers.workspace import make_workspace

    make_workspace(root)
    tok = ChatTokenizer.load(root / "data/tokenizer/tokenizer.json")
    config = ModelConfig(
        vocab_size=-(-tok.vocab_size // 64) * 64,
        n_layer=args.layers,
        n_head=max(1, args.d_model // 64),
        n_kv_head=max(1, args.d_model // 128),
        d_model=args.d_model,
        max_seq_len=256,
    )
    torch.manual_seed(0)
    meta = {"tokenizer_fingerprint": tok.fingerprint}
    save_checkpoint(root / "data/checkpoints/base", Transformer(config), config, meta=meta)


def worker(variant: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from tasks.core import paths
    from tasks.core.config import LoRAConfig, TrainConfig
    from tasks.data import chat_data
    from tasks.data.chat_tokenizer import ChatTokenizer
    from tasks.sft import SupervisedChat
    from tasks.train.checkpoints import load_causal_lm
    from tasks.train.loop import train
    from tasks.train.lora import add_adapters, base_of, trainable_count

    os.chdir(root)
    tok = ChatTokenizer.load(paths.TOKENIZER_JSON)
    model, _ = load_causal_lm("base", tok.fingerprint)
    cfg = TrainConfig(
        max_steps=args.steps,
        micro_batch_size=args.batch,
        lr=1e-4,
        min_lr=1e-5,
        warmup_steps=0,
        eval_every=0,
        checkpoint_every=0,
        zero_stage=1,
        log_every=1,
        bf16=True,
    )
    if variant.startswith("lora"):
        lora = LoRAConfig(enabled=True, rank=16, alpha=32.0, base_bf16=variant == "lora_bf16_base")
        add_adapters(model, lora, cfg, base_of(paths.checkpoint("base"), "checkpoint"), where="sft")
    trainable, total = trainable_count(model)
    stamps: list[tuple[float, int]] = []
    if variant != "load":
        examples = chat_data.sft_examples(tok, 256)
        objective = SupervisedChat(examples, tok.pad_id, args.batch, 1337, 0.1, 1)
        tokens = 0
        inner = objective.batch

        def counted(step: int, micro: int, module: Any) -> dict[str, Any]:
            nonlocal tokens
            batch = inner(step, micro, module)
            tokens += objective.tokens_in(batch)
            return batch

        objective.batch = counted  # type: ignore[method-assign,assignment]

        def on_step(step: int, metrics: dict[str, float]) -> None:
            nonlocal tokens
            stamps.append((time.perf_counter(), tokens))
            tokens = 0

        train(model, objective, cfg, state_dir=root / f"data/state/bench-{variant}", on_step=on_step)
    timed = stamps[args.warmup :]
    per_s = sum(n for _, n in timed) / (timed[-1][0] - stamps[args.warmup - 1][0]) if timed else 0.0
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens_per_s": per_s,
        "trainable_params": trainable,
        "params": total,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, root = args.worker
        print("RESULT " + json.dumps(worker(variant, Path(root), args)))
        return

    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        root = Path(tmp)
        setup(root, args)
        passthrough = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--batch={args.batch}"]
        env = dict(os.environ, PYTHONPATH=str(REPO), PIPELINE_LOG_LEVEL="WARNING")
        for _ in range(args.rounds):
            for variant in VARIANTS:
                cmd = [sys.executable, __file__, "--worker", variant, str(root), *passthrough]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    raise SystemExit(f"{variant} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
                runs[variant].append(json.loads(lines[-1][len("RESULT ") :]))

    def spread(variant: str, key: str, digits: int = 1) -> dict[str, float]:
        values = [r[key] for r in runs[variant]]
        return {
            "median": round(statistics.median(values), digits),
            "min": round(min(values), digits),
            "max": round(max(values), digits),
        }

    peak = {v: spread(v, "peak_rss_mb") for v in VARIANTS}
    floor = peak["load"]["median"]
    print(
        json.dumps(
            {
                "cpu": cpu_name(),
                "cores": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "model": {"n_layer": args.layers, "d_model": args.d_model, "batch": args.batch},
                "rounds": args.rounds,
                "steps": args.steps,
                "params": runs["full"][0]["params"],
                "trainable_params": {v: runs[v][0]["trainable_params"] for v in VARIANTS if v != "load"},
                "peak_rss_mb": peak,
                "training_overhead_mb": {  # peak minus the load-only floor, medians
                    v: round(peak[v]["median"] - floor, 1) for v in VARIANTS if v != "load"
                },
                "tokens_per_s": {v: spread(v, "tokens_per_s") for v in VARIANTS if v != "load"},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
