"""Stage `evaluate`: MMLU (lm-eval-harness protocol) and held-out perplexity for every language model.

Reads data/checkpoints/{base,sft,dpo,rlhf}/ (whichever exist; the reward model is a scorer, not a language
model, so it is not evaluated here), data/tokenizer/, data/tokens/val.bin and the MMLU source
(evaluate.mmlu_dir: a CSV directory or hf:cais/mmlu). Writes:

    data/eval/<model>.json   metrics, scores (the names register gates on: mmlu/acc, ppl/val), protocol,
                             per-item log-likelihoods, data hashes, tokenizer fingerprint
    data/eval/summary.json   flat {"base/mmlu_acc": ..., "base/ppl": ...} for `dvc metrics show`
    data/eval/comparison.md  one row per model
    data/eval/comparison.png bar charts of the same

A model's summary entries are exactly its result["metrics"], so a new metric (the reward-model win rate,
for one) is added by putting it in that dict: the summary, table, chart and MLflow pick it up.
Evaluation runs in float32 (no autocast) so scores match the Hugging Face export to 1e-4.
"""

from __future__ import annotations

import io
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from tasks import mmlu, paths, perplexity
from tasks.config import EvaluateConfig, Params
from tasks.io import sha256_file, write_json
from tasks.stage import StageError, stage_main
from tasks.tokens import ChatTokenizer

log = logging.getLogger(__name__)

LM_MODELS = ("base", "sft", "dpo", "rlhf")  # in pipeline order; "reward" is deliberately absent
MMLU_BATCH = 16
PPL_BATCH = 8
# Metrics where lower is better (the table marks the best model per column).
LOWER_IS_BETTER = {"ppl", "bpb", "word_ppl"}


def available_models(root: Path = paths.CHECKPOINTS) -> list[str]:
    return [name for name in LM_MODELS if (Path(root) / name / "config.json").is_file()]


def check_vocab(model_vocab: int, tokenizer: ChatTokenizer, where: str) -> None:
    """A model whose embedding is smaller than the tokenizer would index out of range (or, worse, be
    scored with another tokenizer's ids)."""
    if model_vocab < tokenizer.vocab_size:
        raise StageError(
            f"{where}: model vocab_size {model_vocab} is smaller than the tokenizer's {tokenizer.vocab_size} "
            f"({tokenizer.path}); the checkpoint was trained with another tokenizer: re-run the pipeline"
        )


def load_lm(path: Path, tokenizer: ChatTokenizer) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The causal LM in a checkpoint (the policy of a policy+value checkpoint), in float32 eval mode."""
    from models.checkpoint import load_checkpoint

    model: Any
    model, meta = load_checkpoint(path)
    if meta.get("kind") == "scalar_head":
        raise StageError(f"{path} is a reward (scalar head) checkpoint, not a language model")
    if meta.get("kind") == "policy_value":
        model = model.transformer  # PPO's value head is training machinery; the policy is the model
    check_vocab(model.config.vocab_size, tokenizer, str(path))
    expected = meta.get("tokenizer_fingerprint")
    if expected:
        tokenizer.check_fingerprint(expected, str(path))
    else:
        log.warning("%s records no tokenizer fingerprint; assuming %s", path, tokenizer.path)
    return model.float().eval(), meta


def evaluate_model(
    name: str,
    model: torch.nn.Module,
    tokenizer: ChatTokenizer,
    data: mmlu.MMLUData,
    cfg: EvaluateConfig,
    val_shard: Path,
    device: str = "cpu",
    shard_dtype: str | None = None,
) -> dict[str, Any]:
    start = time.time()
    model = model.to(device)
    scores = mmlu.score_items(
        model, tokenizer, data.items, data.k_shot, MMLU_BATCH, device, shots=data.shots, prepend_bos=True
    )
    mmlu_seconds = time.time() - start
    ppl = perplexity.shard_perplexity(
        model,
        tokenizer,
        val_shard,
        cfg.ppl_window,
        cfg.ppl_stride,
        cfg.ppl_max_tokens,
        dtype=shard_dtype,
        batch_size=PPL_BATCH,
        device=device,
    )
    metrics = {
        "mmlu_acc": scores["acc"],
        **{f"mmlu_acc_{cat}": v["acc"] for cat, v in scores["per_category"].items()},
        "ppl": ppl["ppl"],
        "bpb": ppl["bpb"],
        "word_ppl": ppl["word_ppl"],
    }
    log.info(
        "%s: MMLU %.4f on %d items (%d truncated, %.1f items/s), val ppl %.3f, bpb %.4f",
        name,
        scores["acc"],
        scores["n_items"],
        scores["n_truncated"],
        scores["n_items"] / max(mmlu_seconds, 1e-9),
        ppl["ppl"],
        ppl["bpb"],
    )
    return {
        "model": name,
        "metrics": metrics,
        "scores": register_scores(metrics),
        "protocol": {
            "mmlu": mmlu.protocol(data.k_shot, data.split, prepend_bos=True),
            "perplexity": {k: ppl[k] for k in ("window", "stride")}
            | {"max_tokens": cfg.ppl_max_tokens, "text": str(val_shard)},
        },
        "mmlu": {
            **{
                k: scores[k]
                for k in ("acc", "n_items", "n_truncated", "max_seq_len", "per_subject", "per_category")
            },
            "k_shot": data.k_shot,
            "split": data.split,
            "source": data.source,
            "subjects": data.subjects,
            "data_hash": data.data_hash,
            "items": [
                {"subject": it.subject, "where": it.where, "answer": a, "prediction": p, "loglikelihoods": ll}
                for it, a, p, ll in zip(
                    data.items,
                    scores["answers"],
                    scores["predictions"],
                    scores["loglikelihoods"],
                    strict=True,
                )
            ],
        },
        "perplexity": ppl,
        "tokenizer_fingerprint": tokenizer.fingerprint,
    }


def register_scores(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics under the names the register stage gates on ("mmlu/acc", "ppl/val", ...)."""
    out = {}
    for key, value in metrics.items():
        if key.startswith("mmlu_acc"):
            out["mmlu/acc" + key[len("mmlu_acc") :]] = value
        elif key in LOWER_IS_BETTER:
            out[f"{key}/val"] = value
        else:
            out[key] = value
    return out


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    return {f"{name}/{key}": value for name, res in results.items() for key, value in res["metrics"].items()}


def comparison_markdown(results: dict[str, dict[str, Any]], header: str = "") -> str:
    keys = list(dict.fromkeys(k for res in results.values() for k in res["metrics"]))
    best = {}
    for k in keys:
        vals = {
            n: r["metrics"][k] for n, r in results.items() if isinstance(r["metrics"].get(k), float | int)
        }
        vals = {n: v for n, v in vals.items() if not math.isnan(v)}
        if len(vals) > 1:
            best[k] = (min if k in LOWER_IS_BETTER else max)(vals, key=lambda n: vals[n])
    lines = [header] if header else []
    lines += ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, res in results.items():
        cells = []
        for k in keys:
            v = res["metrics"].get(k)
            text = "-" if v is None else f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
            cells.append(f"**{text}**" if best.get(k) == name else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_png(results: dict[str, dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display on CI / in DVC runs
    import matplotlib.pyplot as plt

    names = list(results)
    panels = [("mmlu_acc", "MMLU accuracy", 0.25), ("bpb", "bits per byte (val)", None)]
    extra = [
        k
        for k in dict.fromkeys(k for r in results.values() for k in r["metrics"])
        if not k.startswith(("mmlu_acc", "ppl", "bpb", "word_ppl"))
    ]
    panels += [(k, k, None) for k in extra]  # e.g. a win rate added later gets its own panel
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (key, title, chance) in zip(axes[0], panels, strict=True):
        values = [results[n]["metrics"].get(key, float("nan")) for n in names]
        bars = ax.bar(names, values, color="#4C72B0")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
            ax.legend(fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def run(params: Params, tracker: Any) -> dict[str, float]:
    from tasks.io import atomic_write_bytes, atomic_write_text

    cfg = params.evaluate
    torch.manual_seed(params.seed)
    tokenizer = ChatTokenizer.load(paths.TOKENIZER_JSON)
    names = available_models()
    if not names:
        raise StageError(f"no language-model checkpoints under {paths.CHECKPOINTS} ({', '.join(LM_MODELS)})")
    from models.checkpoint import read_checkpoint_config

    for name in names:  # cheap checks of every checkpoint before the long evaluation starts
        vocab = read_checkpoint_config(paths.checkpoint(name))["model"].get("vocab_size", 0)
        check_vocab(vocab, tokenizer, str(paths.checkpoint(name)))
    from tasks.shards import check_tokens

    val_shard = paths.TOKENS / "val.bin"
    shard_dtype = check_tokens(tokenizer)["dtype"]  # also: the shards were made by this tokenizer
    data = mmlu.load_mmlu(cfg.mmlu_dir, cfg.mmlu_split, cfg.subjects, cfg.k_shot, cfg.max_items_per_subject)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info(
        "MMLU: %d items, %d subjects, %d-shot, split %s",
        len(data.items),
        len(data.subjects),
        data.k_shot,
        data.split,
    )

    results: dict[str, dict[str, Any]] = {}
    for name in names:
        path = paths.checkpoint(name)
        model, meta = load_lm(path, tokenizer)
        res = evaluate_model(name, model, tokenizer, data, cfg, val_shard, device, shard_dtype)
        res["checkpoint"] = {
            "path": str(path),
            "sha256": sha256_file(path / "model.safetensors"),
            "stage": meta.get("stage", name),
        }
        res["perplexity"]["tokens_sha256"] = sha256_file(val_shard)
        results[name] = res
        write_json(paths.EVAL / f"{name}.json", res)
        del model

    summary = summarize(results)
    write_json(paths.EVAL / "summary.json", summary)
    write_json(paths.METRICS / "evaluate.json", summary)  # outside the data/eval out, for `dvc metrics show`
    header = (
        f"MMLU {data.k_shot}-shot on {data.split} ({len(data.items)} items, {len(data.subjects)} subjects); "
        f"perplexity on {val_shard} (window {cfg.ppl_window}, stride {cfg.ppl_stride}).\n"
    )
    atomic_write_text(paths.EVAL / "comparison.md", comparison_markdown(results, header))
    atomic_write_bytes(paths.EVAL / "comparison.png", comparison_png(results))
    if tracker is not None:
        tracker.log_metrics(summary)
        for f in ("summary.json", "comparison.md", "comparison.png", *[f"{n}.json" for n in names]):
            tracker.log_artifact(paths.EVAL / f, artifact_path="eval")
    return summary


if __name__ == "__main__":
    stage_main("evaluate", run)
