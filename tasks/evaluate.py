"""Stage `evaluate`: MMLU (lm-eval-harness protocol), held-out perplexity, held-out task accuracy and
reward-model win rate.

Reads the checkpoint of every language model of the stage registry (tasks/core/stages.py: base, sft, dpo,
rlhf, grpo; whichever exist; the reward model is a scorer, not a language model, so it is not evaluated
here), data/tokenizer/, data/tokens/val.bin, the MMLU source
(evaluate.mmlu_dir: a CSV directory or hf:cais/mmlu) and, for the win rate, data/checkpoints/reward/ and
the preference prompts in data/validated/preference.parquet. Writes:

    data/eval/<model>.json   metrics, scores (the names register gates on: mmlu/acc, ppl/val), protocol,
                             per-item log-likelihoods, data hashes, tokenizer fingerprint
    data/eval/summary.json   flat {"base/mmlu_acc": ..., "base/ppl": ...} for `dvc metrics show`
    data/eval/comparison.md  one row per model
    data/eval/comparison.png bar charts of the same
    data/eval/report.html    the whole run on one page: each training stage's final metrics and key
                             curves (data/metrics/, data/plots/), this evaluation, sample answers

data/eval changes as a whole or not at all (tasks/eval/outputs.py): a kill or a failed write (a full disk) leaves
every previous file as it was.

A model's summary entries are exactly its result["metrics"], so a new metric is added by putting it in
that dict: the summary, table, chart and MLflow pick it up (tasks/eval/report.py).
Evaluation runs in float32 (no autocast) so scores match the Hugging Face export to 1e-4.

Each model is scored with its own tokenizer (tasks/eval/models.py): the pipeline's data/tokenizer/, or, for a
line started from an open model (sft.init), the tokenizer and chat template its checkpoint carries. MMLU
prepends a bos token only when that tokenizer has one; perplexity of a model with its own tokenizer is
measured on the same held-out documents as data/tokens/val.bin (encode's split of
data/validated/pretrain.parquet), encoded with its tokenizer (bits per byte compare across tokenizers).

Win rate (`winrate_vs_sft`, for the policies sft, dpo, rlhf; tasks/eval/winrate.py): on preference prompts
that no preference stage trained on (the intersection of the held-out splits of reward, dpo and rlhf, see
tasks/eval/winrate.py heldout_rows), each policy against the SFT reference, greedy responses scored by the reward model; the
same responses against the rows' true answers (`answer_f1`, `answer_rouge_l`; tasks/eval/similarity.py).

Task accuracy (`task_acc`, tasks/eval/tasks_accuracy.py): the first evaluate.task_problems held-out
verifiable problems (tasks/data/verifiable.py; no SFT conversation and no GRPO rollout holds one), answered
greedily in batches, exact match of the checked answer; `task_acc_lenient`: the first number of the answer
is right, whatever its format. result["tasks"] keeps the first task_samples answers (prompt, answer,
expected, correct), also written to data/eval/task_samples.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch

from models.adapters import weights_sha256
from tasks.core import paths
from tasks.core.config import EvaluateConfig, Params
from tasks.core.io import sha256_file
from tasks.core.stage import StageError, stage_main
from tasks.data import verifiable
from tasks.data.chat_tokenizer import ChatTokenizer
from tasks.eval import mmlu, mmlu_data, mmlu_prompt, perplexity, tasks_accuracy, winrate
from tasks.eval.models import (
    LM_MODELS,
    available_models,
    check_vocab,
    heldout_documents,
    load_lm,
    model_tokenizers,
    own_tokenizer,
)
from tasks.eval.outputs import write_outputs
from tasks.eval.report import register_scores, summarize

log = logging.getLogger(__name__)

MMLU_BATCH = 16
PPL_BATCH = 8
TASK_BATCH = 32


def fewshot_policy(cfg: EvaluateConfig) -> str:
    """evaluate.fewshot_policy, checked: "truncate" (the harness) or "reduce" (see tasks/eval/mmlu.py)."""
    try:
        return mmlu_prompt.check_fewshot_policy(cfg.fewshot_policy)
    except ValueError as exc:
        raise StageError(f"evaluate.fewshot_policy: {exc}") from exc


def evaluate_model(
    name: str,
    model: torch.nn.Module,
    tokenizer: ChatTokenizer,
    data: mmlu_data.MMLUData,
    cfg: EvaluateConfig,
    val_shard: Path,
    device: str = "cpu",
    shard_dtype: str | None = None,
    harness: winrate.WinRate | None = None,
    problems: Sequence[verifiable.Problem] = (),
    documents: Sequence[str] = (),
    encoded: dict[tuple[str, bool, int], mmlu.Requests] | None = None,
) -> dict[str, Any]:
    """documents: the held-out text for a model with its own tokenizer (heldout_documents); perplexity is
    measured on them when given, else on val_shard. encoded: MMLU requests by (tokenizer fingerprint, bos,
    context length), filled and reused across the models of one run (the prompts do not depend on the
    weights, and encoding them is a tenth of a model's MMLU time at a short context)."""
    start = time.time()
    model = model.to(device)
    policy = fewshot_policy(cfg)
    bos = bool(tokenizer.specials.bos)  # an open model without a bos token (Qwen) is scored without one
    encoded = {} if encoded is None else encoded
    key = (tokenizer.fingerprint, bos, int(cast(Any, model).config.max_seq_len))
    if key not in encoded:
        encoded[key] = mmlu.encode_items(
            tokenizer,
            data.items,
            data.k_shot,
            data.shots,
            max_len=key[2],
            prepend_bos=bos,
            fewshot_policy=policy,
        )
    scores = mmlu.score_items(
        model,
        tokenizer,
        data.items,
        data.k_shot,
        MMLU_BATCH,
        device,
        shots=data.shots,
        prepend_bos=bos,
        fewshot_policy=policy,
        requests=encoded[key],
    )
    mmlu_seconds = time.time() - start
    if documents:
        text = paths.validated("pretrain")
        ppl = perplexity.documents_perplexity(
            model,
            tokenizer,
            list(documents),
            cfg.ppl_window,
            cfg.ppl_stride,
            cfg.ppl_max_tokens,
            source=f"{text} (held-out documents)",
            batch_size=PPL_BATCH,
            device=device,
        )
        ppl["text_sha256"] = sha256_file(text)
    else:
        ppl = perplexity.shard_perplexity(
            model,
            tokenizer,
            val_shard,
            cfg.ppl_window,
            cfg.ppl_stride,
            cfg.ppl_max_tokens,
            batch_size=PPL_BATCH,
            device=device,
        )
        ppl["tokens_sha256"] = sha256_file(val_shard)
    metrics = {
        "mmlu_acc": scores["acc"],
        **{f"mmlu_acc_{cat}": v["acc"] for cat, v in scores["per_category"].items()},
        "ppl": ppl["ppl"],
        "bpb": ppl["bpb"],
        "word_ppl": ppl["word_ppl"],
    }
    task = None
    if problems:
        task = tasks_accuracy.task_accuracy(
            model, tokenizer, problems, cfg.task_max_new_tokens, TASK_BATCH, cfg.task_samples
        )
        metrics["task_acc"] = task["accuracy"]
        metrics["task_acc_lenient"] = task["accuracy_lenient"]
    won = harness.evaluate(name, model) if harness is not None and name in winrate.POLICIES else None
    if won is not None:
        metrics["winrate_vs_sft"] = won["winrate"]
        metrics["response_length"] = won["completions/mean_length"]  # tokens, greedy, held-out prompts
        if "answer_f1" in won:  # the same answers against the true ones, no reward model involved
            metrics["answer_f1"], metrics["answer_rouge_l"] = won["answer_f1"], won["answer_rouge_l"]
    log.info(
        "%s: MMLU %.4f on %d items (%d truncated, %d with fewer shots, %.1f items/s), val ppl %.3f, bpb %.4f",
        name,
        scores["acc"],
        scores["n_items"],
        scores["n_truncated"],
        scores["n_reduced"],
        scores["n_items"] / max(mmlu_seconds, 1e-9),
        ppl["ppl"],
        ppl["bpb"],
    )
    result: dict[str, Any] = {
        "model": name,
        "metrics": metrics,
        "scores": register_scores(metrics),
        "protocol": {
            "mmlu": mmlu_prompt.protocol(data.k_shot, data.split, prepend_bos=bos, fewshot_policy=policy)
            | {"data_hash": data.data_hash, "tokenizer_fingerprint": tokenizer.fingerprint},
            "perplexity": {k: ppl[k] for k in ("window", "stride")}
            | {"max_tokens": cfg.ppl_max_tokens, "text": ppl["source"]},
        },
        "mmlu": {
            **{
                k: scores[k]
                for k in (
                    "acc",
                    "n_items",
                    "n_truncated",
                    "n_reduced",
                    "mean_k",
                    "fewshot_policy",
                    "max_seq_len",
                    "per_subject",
                    "per_category",
                )
            },
            "k_shot": data.k_shot,
            "split": data.split,
            "source": data.source,
            "subjects": data.subjects,
            "data_hash": data.data_hash,
            "items": [
                {
                    "subject": it.subject,
                    "where": it.where,
                    "answer": a,
                    "prediction": p,
                    "loglikelihoods": ll,
                    "k_used": k,
                    "truncated_tokens": cut,
                }
                for it, a, p, ll, k, cut in zip(
                    data.items,
                    scores["answers"],
                    scores["predictions"],
                    scores["loglikelihoods"],
                    scores["k_used"],
                    scores["truncated_tokens"],
                    strict=True,
                )
            ],
        },
        "perplexity": ppl,
        "tokenizer_fingerprint": tokenizer.fingerprint,
    }
    if won is not None and harness is not None:
        result["protocol"]["winrate"] = harness.protocol
        result["winrate"] = won
    if task is not None:
        result["protocol"]["tasks"] = {
            "families": list(cfg.task_families),
            "problems": len(problems),
            "split": f"held out: sha256(problem key) % 100 < {verifiable.HELDOUT_PERCENT}",
            "decoding": f"greedy, at most {cfg.task_max_new_tokens} new tokens, exact match of the answer",
        }
        result["tasks"] = task
    return result


def task_problems(cfg: EvaluateConfig) -> list[verifiable.Problem]:
    """The held-out verifiable problems every model answers (none when evaluate.task_problems is 0)."""
    return verifiable.heldout_problems(cfg.task_families, cfg.task_problems) if cfg.task_problems > 0 else []


def run(params: Params, tracker: Any) -> dict[str, float]:
    cfg = params.evaluate
    torch.manual_seed(params.seed)
    names = available_models()
    if not names:
        raise StageError(f"no language-model checkpoints under {paths.CHECKPOINTS} ({', '.join(LM_MODELS)})")
    from models.checkpoint import read_checkpoint_config

    fewshot_policy(cfg)  # a bad value fails now, not after the first model
    problems = task_problems(cfg)
    reward_dir = paths.checkpoint("reward")
    checked = names + (["reward"] if (reward_dir / "config.json").is_file() else [])
    tokenizers = model_tokenizers(checked)  # each checkpoint's own
    for name in checked:  # cheap checks of every checkpoint before the long evaluation starts
        path, tokenizer = paths.checkpoint(name), tokenizers[name]
        ckpt_cfg = read_checkpoint_config(path)
        check_vocab(ckpt_cfg["model"].get("vocab_size", 0), tokenizer, str(path))
        recorded = ckpt_cfg.get("tokenizer_fingerprint")
        if recorded and recorded != tokenizer.fingerprint:
            raise StageError(
                f"{path} was trained with tokenizer {recorded[:12]}, but {tokenizer.path} is "
                f"{tokenizer.fingerprint[:12]}: its token ids mean other strings; re-run the stages after "
                "`tokenizer` (dvc repro)"
            )
    scorer = [n for n in ("sft", "reward", *winrate.POLICIES) if n in tokenizers]  # the win rate's models
    other = [n for n in scorer if tokenizers[n].fingerprint != tokenizers[scorer[0]].fingerprint]
    if other:
        raise StageError(
            f"{', '.join(str(paths.checkpoint(n)) for n in other)} trained with another tokenizer than "
            f"{paths.checkpoint(scorer[0])}; they all descend from sft: re-run the stages after sft (dvc repro)"
        )
    from tasks.data.shards import check_tokens

    val_shard = paths.TOKENS / "val.bin"
    shard_dtype = None
    own = [n for n in names if own_tokenizer(tokenizers[n])]
    if len(own) < len(names):  # the shards were made by data/tokenizer/
        shard_dtype = check_tokens(next(tokenizers[n] for n in names if n not in own))["dtype"]
    documents = heldout_documents(params) if own else []
    data = mmlu_data.load_mmlu(
        cfg.mmlu_dir, cfg.mmlu_split, cfg.subjects, cfg.k_shot, cfg.max_items_per_subject
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info(
        "MMLU: %d items, %d subjects, %d-shot, split %s",
        len(data.items),
        len(data.subjects),
        data.k_shot,
        data.split,
    )

    harness = winrate.setup(params, tokenizers["sft"], names, device) if "sft" in tokenizers else None
    results: dict[str, dict[str, Any]] = {}
    encoded: dict[tuple[str, bool, int], mmlu.Requests] = {}  # MMLU prompts, encoded once per tokenizer
    for name in names:
        path, tokenizer = paths.checkpoint(name), tokenizers[name]
        model, meta = load_lm(path, tokenizer)
        res = evaluate_model(
            name,
            model,
            tokenizer,
            data,
            cfg,
            val_shard,
            device,
            shard_dtype,
            harness,
            problems,
            documents if name in own else (),
            encoded,
        )
        res["checkpoint"] = {
            "path": str(path),
            "sha256": weights_sha256(path),  # model.safetensors' (adapter checkpoints: adapters + base)
            "stage": meta.get("stage", name),
        }
        results[name] = res
        del model

    summary = summarize(results)
    header = (
        f"MMLU {data.k_shot}-shot on {data.split} ({len(data.items)} items, {len(data.subjects)} subjects, "
        f"few-shot policy {fewshot_policy(cfg)}); "
        f"perplexity on {val_shard if not own else 'the held-out documents of ' + str(val_shard)}"
        f"{' (' + ', '.join(own) + ': with their own tokenizer)' if own else ''}"
        f" (window {cfg.ppl_window}, stride {cfg.ppl_stride})"
        + (
            f"; win rate vs sft on {len(harness.rows)} held-out prompts (greedy, {cfg.max_new_tokens} new tokens)"
            if harness is not None
            else ""
        )
        + ".\n"
    )
    samples = [] if not problems else ["task_samples.md"]
    write_outputs(results, summary, header, bool(samples))
    if tracker is not None:
        tracker.log_metrics(summary)
        for f in ("summary.json", "comparison.md", "comparison.png", *samples, *[f"{n}.json" for n in names]):
            tracker.log_artifact(paths.EVAL / f, artifact_path="eval")
        tracker.log_artifact(paths.EVAL / "report.html", artifact_path="eval")
    return summary


if __name__ == "__main__":
    stage_main("evaluate", run)
