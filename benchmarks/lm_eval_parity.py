"""Our MMLU scorer against EleutherAI lm-evaluation-harness itself, on the same local data and weights.

Not part of the test suite: lm-eval is not a project dependency. Run it with a Python that has lm-eval and
can import this repository's models/ and tasks/ (torch, tokenizers, safetensors, numpy, pyyaml):

    python3 -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install torch==2.13.0 lm-eval transformers
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 /tmp/lmeval/bin/python benchmarks/lm_eval_parity.py \
        [--subjects abstract_algebra,astronomy,machine_learning] [--items 20] [--k-shot 5] [--max-len 512]

What it does, all offline:
1. trains a small byte-level BPE on the MMLU dev/val text and builds a random Llama-style model (ours),
   exported as is with models.hf.export_hf. The harness runs with add_bos_token=True, which it passes to
   AutoTokenizer (transformers 5 then prepends <|bos|>) and to tok_encode, so its token ids start with
   <|bos|> as ours do (prepend_bos): without it every log-likelihood differs;
2. converts the MMLU CSVs (data/mmlu, original layout) to one parquet file per subject and split with the
   cais/mmlu columns (question, subject, choices, answer);
3. writes one task YAML per subject: the harness's own mmlu default template and description (read from the
   installed lm_eval package), with only dataset_path/dataset_kwargs pointed at those parquet files;
4. runs lm_eval.simple_evaluate (model "hf", float32, CPU, log_samples) and our tasks.mmlu.score_items on
   the same items, and prints JSON: per-item log-likelihood max abs difference, predictions and accuracy
   agreement, and how many prompts were left-truncated (max_len is small on purpose so that some are).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.config import ModelConfig  # noqa: E402
from models.hf import export_hf  # noqa: E402
from models.llama import Transformer  # noqa: E402
from tasks.data.chat_tokenizer import ChatTokenizer  # noqa: E402
from tasks.eval import mmlu, mmlu_data  # noqa: E402

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def default_mmlu_dir() -> Path:
    for candidate in (ROOT / "data" / "mmlu", ROOT.parent / "shared" / "mmlu"):
        if (candidate / "dev").is_dir():
            return candidate
    return ROOT / "data" / "mmlu"


def train_tokenizer(out: Path, mmlu_dir: Path, vocab_size: int) -> ChatTokenizer:
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [p.read_text() for split in ("dev", "val") for p in sorted((mmlu_dir / split).glob("*.csv"))]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out))
    return ChatTokenizer.load(out)


def write_parquet(mmlu_dir: Path, out: Path, subject: str, split: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(mmlu_dir / split / f"{subject}_{split}.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    table = pa.table(
        {
            "question": [r[0] for r in rows],
            "subject": [subject] * len(rows),
            "choices": [r[1:5] for r in rows],
            "answer": ["ABCD".index(r[5].strip()) for r in rows],
        }
    )
    path = out / f"{subject}_{split}.parquet"
    pq.write_table(table, path)
    return path


def write_tasks(mmlu_dir: Path, out: Path, subjects: list[str], split: str) -> list[str]:
    """One YAML per subject: the installed harness's template + description, local parquet data."""
    import lm_eval
    import yaml

    default = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    template = yaml.safe_load((default / "_default_template_yaml").read_text())
    names = []
    for subject in subjects:
        own = yaml.safe_load((default / f"mmlu_{subject}.yaml").read_text())
        files = {s: str(write_parquet(mmlu_dir, out, subject, s)) for s in sorted({split, "dev"})}
        cfg = {
            **template,
            "task": f"local_mmlu_{subject}",
            "description": own["description"],
            "dataset_path": "parquet",
            "dataset_kwargs": {"data_files": files},
            "test_split": split,
            "fewshot_split": "dev",
        }
        (out / f"local_mmlu_{subject}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        names.append(cfg["task"])
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mmlu-dir", type=Path, default=default_mmlu_dir())
    ap.add_argument("--subjects", default="abstract_algebra,astronomy,machine_learning")
    ap.add_argument("--split", default="test", help="the harness's mmlu evaluates test; val works too")
    ap.add_argument("--items", type=int, default=20, help="first N items per subject")
    ap.add_argument("--k-shot", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=512, help="model context; small => some prompts truncated")
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    subjects = args.subjects.split(",")
    torch.manual_seed(0)

    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tok = train_tokenizer(tmp / "tokenizer.json", args.mmlu_dir, args.vocab)
        model = Transformer(
            ModelConfig(
                vocab_size=-(-tok.vocab_size // 64) * 64,
                n_layer=2,
                n_head=4,
                n_kv_head=2,
                d_model=64,
                max_seq_len=args.max_len,
            )
        ).eval()
        with torch.no_grad():
            model.embed.weight.mul_(20)  # sharper than the init, so the four choices do not nearly tie
        hf_dir = export_hf(
            model, tmp / "hf", tok.path, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id
        )
        (tmp / "tasks").mkdir()
        task_names = write_tasks(args.mmlu_dir, tmp / "tasks", subjects, args.split)

        start = time.time()
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args={
                "pretrained": str(hf_dir),
                "dtype": "float32",
                "device": "cpu",
                "add_bos_token": True,
                "max_length": args.max_len,
            },
            tasks=task_names,
            num_fewshot=args.k_shot,
            batch_size=args.batch_size,
            limit=args.items,
            log_samples=True,
            task_manager=TaskManager(include_path=str(tmp / "tasks")),
        )
        harness_s = time.time() - start
        assert out is not None
        harness: dict[tuple[str, int], list[float]] = {}
        for subject, name in zip(subjects, task_names, strict=True):
            for sample in out["samples"][name]:
                harness[(subject, sample["doc_id"])] = [float(r[0]) for r in sample["filtered_resps"]]

        data = mmlu_data.load_mmlu(str(args.mmlu_dir), args.split, subjects, args.k_shot, args.items)
        start = time.time()
        ours = mmlu.score_items(model, tok, data.items, args.k_shot, args.batch_size, shots=data.shots)
        ours_s = time.time() - start

    index: dict[str, int] = {}
    theirs, keys = [], []
    for it in data.items:
        doc_id = index.get(it.subject, 0)
        index[it.subject] = doc_id + 1
        keys.append((it.subject, doc_id))
        theirs.append(harness[(it.subject, doc_id)])
    diff = max(
        abs(a - b)
        for x, y in zip(ours["loglikelihoods"], theirs, strict=True)
        for a, b in zip(x, y, strict=True)
    )
    theirs_acc = mmlu.accuracy(data.items, theirs)
    harness_acc = {s: out["results"][n]["acc,none"] for s, n in zip(subjects, task_names, strict=True)}
    n_per = {s: v["n"] for s, v in ours["per_subject"].items()}
    harness_micro = sum(harness_acc[s] * n_per[s] for s in subjects) / sum(n_per.values())
    print(
        json.dumps(
            {
                "lm_eval_version": getattr(lm_eval, "__version__", "?"),
                "split": args.split,
                "subjects": subjects,
                "k_shot": args.k_shot,
                "max_len": args.max_len,
                "n_items": len(data.items),
                "n_truncated": ours["n_truncated"],
                "max_abs_loglikelihood_diff": diff,
                "item0_loglikelihoods": {"ours": ours["loglikelihoods"][0], "harness": theirs[0]},
                "predictions_equal": ours["predictions"] == theirs_acc["predictions"],
                "acc_ours": ours["acc"],
                "acc_harness_samples": theirs_acc["acc"],
                "acc_harness_reported_micro": harness_micro,
                "acc_harness_per_subject": harness_acc,
                "acc_ours_per_subject": {s: v["acc"] for s, v in ours["per_subject"].items()},
                "seconds_harness_incl_setup": round(harness_s, 2),
                "seconds_ours": round(ours_s, 2),
                "cpu": platform.processor() or platform.machine(),
                "torch": torch.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
