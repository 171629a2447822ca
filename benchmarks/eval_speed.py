"""MMLU scoring speed: tasks.eval.mmlu at a baseline commit against the working tree, same items, same
weights, alternated round by round; asserts equal predictions and log-likelihoods within 1e-5.

The workload is the cpu profile's (conf/profiles/cpu.yaml): 4 layers, d_model 256, context 256, vocab 4096,
5-shot with fewshot_policy "reduce", batch 16 (tasks/evaluate.py's MMLU_BATCH), random weights (speed does
not depend on them) and a byte-level BPE trained on the MMLU dev/val text. Three variants per round:
- old: the baseline's score_items (it encodes the prompts itself);
- new: encode_items + score_items, as evaluate does for the first model of a tokenizer;
- new_shared: score_items on requests already encoded, as evaluate does for every further model.

    .venv/bin/python benchmarks/eval_speed.py [--baseline 67c5a4e] [--subjects 8] [--items 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.eval import MMLU_DIR, train_tokenizer  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.llama import Transformer  # noqa: E402
from tasks.eval import mmlu, mmlu_data  # noqa: E402


def baseline_module(rev: str, tmp: Path):
    """tasks/eval/mmlu.py as it was at `rev`, imported under another name (its imports are unchanged)."""
    source = subprocess.run(
        ["git", "show", f"{rev}:tasks/eval/mmlu.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    path = tmp / "mmlu_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("mmlu_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="67c5a4e", help="git revision of the old tasks/eval/mmlu.py")
    ap.add_argument("--subjects", type=int, default=8, help="the first N subjects (0: all 57)")
    ap.add_argument("--items", type=int, default=20, help="items per subject (the cpu profile's 20)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default); 1 makes CPU seconds steady",
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    subjects = mmlu_data.list_subjects(str(MMLU_DIR), "val")
    subjects = subjects[: args.subjects] if args.subjects else subjects
    data = mmlu_data.load_mmlu(str(MMLU_DIR), "val", subjects, 5, args.items)
    with tempfile.TemporaryDirectory() as tmp:
        old = baseline_module(args.baseline, Path(tmp))
        tok = train_tokenizer(Path(tmp) / "tokenizer.json", 4096)
    config = ModelConfig(vocab_size=4096, n_layer=4, n_head=4, n_kv_head=2, d_model=256, max_seq_len=256)
    model = Transformer(config).eval()
    kw = {"shots": data.shots, "fewshot_policy": "reduce"}
    b = args.batch_size

    def run_new_shared(requests):
        return mmlu.score_items(model, tok, data.items, 5, b, requests=requests, **kw)

    shared = mmlu.encode_items(tok, data.items, 5, data.shots, max_len=256, fewshot_policy="reduce")
    runs = {
        "old": lambda: old.score_items(model, tok, data.items, 5, b, **kw),
        "new": lambda: mmlu.score_items(model, tok, data.items, 5, b, **kw),
        "new_shared": lambda: run_new_shared(shared),
    }
    old.score_items(model, tok, data.items[:8], 5, b, **kw)  # warm-up
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}  # CPU seconds: less swayed by other processes
    out = {}
    for r in range(args.rounds):  # alternated, the order rotated each round: drift hits every variant
        order = list(runs)[r % 3 :] + list(runs)[: r % 3]
        for key in order:
            t, c = time.perf_counter(), time.process_time()
            out[key] = runs[key]()
            seconds[key].append(time.perf_counter() - t)
            cpu[key].append(time.process_time() - c)
    for key in ("new", "new_shared"):
        assert out[key]["predictions"] == out["old"]["predictions"], key
        assert (out[key]["k_used"], out[key]["truncated_tokens"]) == (
            out["old"]["k_used"],
            out["old"]["truncated_tokens"],
        )
    diff = max(
        abs(x - y)
        for key in ("new", "new_shared")
        for a, c in zip(out[key]["loglikelihoods"], out["old"]["loglikelihoods"], strict=True)
        for x, y in zip(a, c, strict=True)
    )
    assert diff < 1e-5, diff
    med = {k: statistics.median(v) for k, v in seconds.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    print(
        json.dumps(
            {
                "benchmark": "mmlu_scoring_speed",
                "cpu": cpu_name(),
                "torch_threads": torch.get_num_threads(),
                "load_average": os.getloadavg(),
                "baseline": args.baseline,
                "model": {"n_layer": 4, "d_model": 256, "max_seq_len": 256, "vocab_size": 4096},
                "items": len(data.items),
                "subjects": len(subjects),
                "fewshot_policy": "reduce",
                "n_truncated": out["old"]["n_truncated"],
                "mean_k": out["old"]["mean_k"],
                "rounds": args.rounds,
                "seconds": {k: [round(x, 2) for x in v] for k, v in seconds.items()},
                "median_s": {k: round(v, 2) for k, v in med.items()},
                "spread_s": {k: round(max(v) - min(v), 2) for k, v in seconds.items()},
                "speedup_new": round(med["old"] / med["new"], 2),
                "speedup_new_shared": round(med["old"] / med["new_shared"], 2),
                "cpu_seconds": {k: [round(x, 2) for x in v] for k, v in cpu.items()},
                "median_cpu_s": {k: round(v, 2) for k, v in med_cpu.items()},
                "spread_cpu_s": {k: round(max(v) - min(v), 2) for k, v in cpu.items()},
                "cpu_speedup_new": round(med_cpu["old"] / med_cpu["new"], 2),
                "cpu_speedup_new_shared": round(med_cpu["old"] / med_cpu["new_shared"], 2),
                "same_predictions": True,
                "max_abs_loglik_diff": diff,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
