"""The evaluate stage before and after: tasks.evaluate.run at a baseline commit (a git worktree) and in
this working tree, on one synthetic checkpoint set, alternated round by round; the MMLU items and every
score in data/eval/<model>.json must be equal.

The set: base, sft, dpo, rlhf and grpo (random weights, the cpu profile's shape: 4 layers, d_model 256,
context 256) and a reward model, a byte-level BPE (vocab 1000) trained on the MMLU dev text, a small
val shard and preference rows (tests/test_evaluate.py's make_workspace). Each run is a fresh process that
times evaluate.run only (not the imports).

    .venv/bin/python benchmarks/eval_stage.py --baseline-tree /tmp/base [--subjects 8] [--items 20] [--rounds 3]
    (make the tree with: git worktree add /tmp/base 67c5a4e)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUN = """
import json, sys, time
from tasks import evaluate
from tasks.core.config import EvaluateConfig, Params
cfg = json.loads(sys.argv[1])
params = Params(evaluate=EvaluateConfig(**cfg))
t = time.perf_counter()
evaluate.run(params, None)
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def make_set(root: Path, vocab: int = 1024) -> None:
    from models.checkpoint import save_checkpoint
    from models.config import ModelConfig
    from models.heads import ScalarHeadModel
    from models.llama import Transformer
    from tests.helpers.evalhelpers import train_tokenizer
    from tests.test_evaluate import make_workspace

    tok = train_tokenizer(root.parent / "tokenizer.json", 1000)
    make_workspace(root, tok, vocab)
    config = ModelConfig(vocab_size=vocab, n_layer=4, n_head=4, n_kv_head=2, d_model=256, max_seq_len=256)
    meta = {"tokenizer_fingerprint": tok.fingerprint}
    for name in ("base", "sft", "dpo", "rlhf", "grpo"):
        shutil.rmtree(root / "data/checkpoints" / name, ignore_errors=True)
        m = Transformer(config)
        save_checkpoint(root / "data/checkpoints" / name, m, config, meta={**meta, "stage": name})
    shutil.rmtree(root / "data/checkpoints/reward")
    reward = ScalarHeadModel(Transformer(config))
    save_checkpoint(root / "data/checkpoints/reward", reward, config, meta=meta)


def scores(root: Path) -> dict:
    """Everything of data/eval/<model>.json that is a score (metrics and the MMLU items)."""
    out = {}
    for path in sorted((root / "data/eval").glob("*.json")):
        if path.name != "summary.json":
            doc = json.loads(path.read_text())
            out[path.stem] = {"metrics": doc["metrics"], "items": doc["mmlu"]["items"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-tree", required=True, help="a checkout of the baseline commit")
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from tasks.eval import mmlu_data
    from tests.helpers.evalhelpers import MMLU_DIR

    cfg = {
        "mmlu_dir": str(MMLU_DIR),
        "subjects": mmlu_data.list_subjects(str(MMLU_DIR), "val")[: args.subjects],
        "k_shot": 5,
        "fewshot_policy": "reduce",
        "max_items_per_subject": args.items,
        "ppl_window": 256,
        "ppl_stride": 128,
        "winrate_prompts": 3,
        "max_new_tokens": 6,
        "task_problems": 16,
    }
    trees = {"old": Path(args.baseline_tree).resolve(), "new": ROOT}
    seconds: dict[str, list[float]] = {k: [] for k in trees}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_set(Path(tmp) / "set")
        for r in range(args.rounds):
            for key in list(trees)[r % 2 :] + list(trees)[: r % 2]:  # alternated, order swapped each round
                work = Path(tmp) / f"{key}{r}"
                shutil.copytree(Path(tmp) / "set", work)
                env = {
                    **os.environ,
                    "PYTHONPATH": str(trees[key]),
                    "MLFLOW_TRACKING_URI": f"sqlite:///{work}/m.db",
                }
                proc = subprocess.run(
                    [sys.executable, "-c", RUN, json.dumps(cfg)],
                    cwd=work,
                    env=env,
                    capture_output=True,
                    text=True,
                )
                if proc.returncode:
                    sys.exit(f"{key} failed:\n{proc.stderr[-3000:]}")
                seconds[key].append(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])
                results[key] = scores(work)
                shutil.rmtree(work)
    assert results["new"] == results["old"], "scores differ"
    med = {k: statistics.median(v) for k, v in seconds.items()}
    print(
        json.dumps(
            {
                "benchmark": "evaluate_stage",
                "load_average": os.getloadavg(),
                "models": sorted(results["new"]),
                "mmlu_items": len(next(iter(results["new"].values()))["items"]),
                "evaluate": {k: v for k, v in cfg.items() if k != "mmlu_dir"},
                "rounds": args.rounds,
                "seconds": {k: [round(x, 1) for x in v] for k, v in seconds.items()},
                "median_s": {k: round(v, 1) for k, v in med.items()},
                "spread_s": {k: round(max(v) - min(v), 1) for k, v in seconds.items()},
                "speedup": round(med["old"] / med["new"], 2),
                "identical_scores": True,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
