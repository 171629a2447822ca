"""Stage `evaluate`: MMLU (lm-eval-harness protocol), held-out perplexity and reward-model win rate.

Reads data/checkpoints/{base,sft,dpo,rlhf}/ (whichever exist; the reward model is a scorer, not a language
model, so it is not evaluated here), data/tokenizer/, data/tokens/val.bin, the MMLU source
(evaluate.mmlu_dir: a CSV directory or hf:cais/mmlu) and, for the win rate, data/checkpoints/reward/ and
the preference prompts in data/validated/preference.parquet. Writes:

    data/eval/<model>.json   metrics, scores (the names register gates on: mmlu/acc, ppl/val), protocol,
                             per-item log-likelihoods, data hashes, tokenizer fingerprint
    data/eval/summary.json   flat {"base/mmlu_acc": ..., "base/ppl": ...} for `dvc metrics show`
    data/eval/comparison.md  one row per model
    data/eval/comparison.png bar charts of the same

A model's summary entries are exactly its result["metrics"], so a new metric is added by putting it in
that dict: the summary, table, chart and MLflow pick it up.
Evaluation runs in float32 (no autocast) so scores match the Hugging Face export to 1e-4.

Win rate (`winrate_vs_sft`, for the policies sft, dpo, rlhf): on preference prompts that no preference
stage trained on (the intersection of the held-out splits of reward, dpo and rlhf, see heldout_rows),
each policy and the SFT reference answer greedily (stop at <|end|>/<|eos|>, evaluate.max_new_tokens);
the reward model scores prompt + response at its last token; a policy wins a prompt when its reward is
higher, a tie (same response, or equal reward) counts 0.5. The SFT model against itself is exactly 0.5.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tasks.core import paths
from tasks.core.config import EvaluateConfig, Params
from tasks.core.io import sha256_file, write_json
from tasks.core.stage import StageError, stage_main
from tasks.data import chat_data
from tasks.data.chat_tokenizer import ChatTokenizer
from tasks.eval import mmlu, perplexity

log = logging.getLogger(__name__)

LM_MODELS = ("base", "sft", "dpo", "rlhf")  # in pipeline order; "reward" is deliberately absent
MMLU_BATCH = 16
PPL_BATCH = 8
WINRATE_BATCH = 8
POLICIES = ("sft", "dpo", "rlhf")  # the models that get a win rate against the SFT reference
RLHF_VAL_FRACTION = 0.1  # tasks/rlhf.py ProximalPolicy holds out this fraction of its prompts
# Until EvaluateConfig has the field: "truncate" (the harness) or "reduce" (fewer shots, see tasks/eval/mmlu.py).
FEWSHOT_POLICY_DEFAULT = "truncate"
# Metrics where lower is better (the table marks the best model per column).
LOWER_IS_BETTER = {"ppl", "bpb", "word_ppl"}


def fewshot_policy(cfg: EvaluateConfig) -> str:
    from tasks.core.stage import StageError

    policy = str(getattr(cfg, "fewshot_policy", FEWSHOT_POLICY_DEFAULT))
    try:
        return mmlu.check_fewshot_policy(policy)
    except ValueError as exc:
        raise StageError(f"evaluate.fewshot_policy: {exc}") from exc


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
    winrate: WinRate | None = None,
) -> dict[str, Any]:
    start = time.time()
    model = model.to(device)
    policy = fewshot_policy(cfg)
    scores = mmlu.score_items(
        model,
        tokenizer,
        data.items,
        data.k_shot,
        MMLU_BATCH,
        device,
        shots=data.shots,
        prepend_bos=True,
        fewshot_policy=policy,
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
    won = winrate.evaluate(name, model) if winrate is not None and name in POLICIES else None
    if won is not None:
        metrics["winrate_vs_sft"] = won["winrate"]
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
            "mmlu": mmlu.protocol(data.k_shot, data.split, prepend_bos=True, fewshot_policy=policy)
            | {"data_hash": data.data_hash, "tokenizer_fingerprint": tokenizer.fingerprint},
            "perplexity": {k: ppl[k] for k in ("window", "stride")}
            | {"max_tokens": cfg.ppl_max_tokens, "text": str(val_shard)},
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
    if won is not None and winrate is not None:
        result["protocol"]["winrate"] = winrate.protocol
        result["winrate"] = won
    return result


# ------------------------------------------------------------------------------------------- win rate
def heldout_rows(params: Params, prompt_lengths: Sequence[int], max_seq_len: int) -> tuple[list[int], str]:
    """Preference rows that none of reward, dpo and rlhf trained on: the intersection of their held-out
    splits (the same chat_data.split calls those stages make; rlhf splits only the prompts that fit its
    context, so its indices are mapped back to rows). Falls back to the reward stage's held-out split,
    with a note, if the intersection is empty (different seeds or fractions per stage)."""
    n = len(prompt_lengths)
    reward_val = set(chat_data.split(n, params.reward.val_fraction, params.reward.train.seed)[1].tolist())
    dpo_val = set(chat_data.split(n, params.dpo.val_fraction, params.dpo.train.seed)[1].tolist())
    room = max_seq_len - params.rlhf.max_new_tokens
    fitting = [i for i, length in enumerate(prompt_lengths) if length <= room]
    rlhf_val = {
        fitting[j] for j in chat_data.split(len(fitting), RLHF_VAL_FRACTION, params.rlhf.train.seed)[1]
    }
    both = sorted(reward_val & dpo_val & rlhf_val)
    if both:
        return both, "intersection of the reward, dpo and rlhf held-out splits"
    log.warning("the reward, dpo and rlhf held-out splits share no prompt; using the reward stage's split")
    return sorted(reward_val), "reward stage held-out split (dpo/rlhf held-out splits do not intersect it)"


def greedy_responses(
    model: Any,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    stop: Sequence[int],
    pad_id: int,
    batch_size: int = WINRATE_BATCH,
) -> list[list[int]]:
    """The greedy response to every prompt, up to and including its first stop token. Only prompts of equal
    length are generated together, so no row carries padding and each sees exactly its own tokens."""
    from models.generate import generate

    device = next(model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for length, idx in sorted(by_length.items()):
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            tokens = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)
            gen = generate(
                model, tokens, max_new_tokens=max_new_tokens, temperature=0.0, stop_tokens=stop, pad_id=pad_id
            )[:, length:].tolist()
            for i, row in zip(chunk, gen, strict=True):
                response = []
                for t in row:
                    response.append(t)
                    if t in stop:
                        break
                out[i] = response
    return out


@torch.no_grad()
def reward_scores(
    reward_model: Any,
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    pad_id: int,
    batch_size: int = WINRATE_BATCH,
) -> list[float]:
    """Reward of prompt + response, read at its last token (right padding; attention is causal)."""
    from models.heads import last_token_values

    device = next(reward_model.parameters()).device
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    out: list[float] = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        tokens = chat_data.pad(chunk, pad_id).to(device)
        lengths = torch.tensor([len(s) for s in chunk], device=device)
        out += last_token_values(reward_model(tokens).float(), lengths).cpu().tolist()
    return out


def win_rate(
    policy_responses: Sequence[list[int]],
    policy_rewards: Sequence[float],
    reference_responses: Sequence[list[int]],
    reference_rewards: Sequence[float],
) -> dict[str, Any]:
    """1 per prompt where the policy's reward is higher, 0 where lower, 0.5 on a tie; an identical response
    is a tie by definition (whatever rounding a different batch might give its reward)."""
    wins = []
    for pr, p, rr, r in zip(
        policy_responses, policy_rewards, reference_responses, reference_rewards, strict=True
    ):
        wins.append(0.5 if pr == rr or p == r else float(p > r))
    n = len(wins)
    return {
        "winrate": sum(wins) / n if n else float("nan"),
        "n_prompts": n,
        "n_identical": sum(a == b for a, b in zip(policy_responses, reference_responses, strict=True)),
        "reward_mean": sum(policy_rewards) / n if n else float("nan"),
        "reference_reward_mean": sum(reference_rewards) / n if n else float("nan"),
        "wins": wins,
    }


class WinRate:
    """Held-out prompts, the reward model and the SFT reference's responses and rewards, computed once."""

    def __init__(
        self,
        prompts: list[list[int]],
        rows: list[int],
        reward_model: Any,
        reference: Any,
        tokenizer: ChatTokenizer,
        max_new_tokens: int,
        protocol: dict[str, Any],
    ) -> None:
        self.prompts, self.rows, self.reward_model, self.tokenizer = prompts, rows, reward_model, tokenizer
        self.max_new_tokens = max_new_tokens
        self.stop = [tokenizer.end_id, tokenizer.eos_id]
        self.reference_responses = greedy_responses(
            reference, prompts, max_new_tokens, self.stop, tokenizer.pad_id
        )
        self.reference_rewards = reward_scores(
            reward_model, prompts, self.reference_responses, tokenizer.pad_id
        )
        self.protocol = protocol

    def evaluate(self, name: str, policy: Any) -> dict[str, Any]:
        start = time.time()
        responses = greedy_responses(
            policy, self.prompts, self.max_new_tokens, self.stop, self.tokenizer.pad_id
        )
        rewards = reward_scores(self.reward_model, self.prompts, responses, self.tokenizer.pad_id)
        res = win_rate(responses, rewards, self.reference_responses, self.reference_rewards)
        log.info(
            "%s: win rate vs sft %.3f on %d held-out prompts (%d identical responses, %.1fs)",
            name,
            res["winrate"],
            res["n_prompts"],
            res["n_identical"],
            time.time() - start,
        )
        res["per_prompt"] = [
            {
                "row": row,
                "reward": r,
                "reference_reward": rr,
                "win": w,
                "response": self.tokenizer.decode(resp),
            }
            for row, r, rr, w, resp in zip(
                self.rows, rewards, self.reference_rewards, res.pop("wins"), responses, strict=True
            )
        ]
        return res


def setup_winrate(params: Params, tokenizer: ChatTokenizer, names: list[str], device: str) -> WinRate | None:
    """The win-rate harness, or None (with the reason logged) when a piece is missing."""
    cfg = params.evaluate
    reward_dir, sft_dir, pref = (
        paths.checkpoint("reward"),
        paths.checkpoint("sft"),
        paths.validated("preference"),
    )
    missing = [str(p) for p in (reward_dir / "config.json", sft_dir / "config.json", pref) if not p.is_file()]
    if missing or not any(n in POLICIES for n in names) or cfg.winrate_prompts <= 0:
        log.warning(
            "no reward-model win rate: %s", f"missing {missing}" if missing else "no policy / 0 prompts"
        )
        return None
    from models.checkpoint import load_checkpoint

    reward_model: Any
    reward_model, reward_meta = load_checkpoint(reward_dir, kind="scalar_head")
    check_vocab(reward_model.config.vocab_size, tokenizer, str(reward_dir))
    if reward_meta.get("tokenizer_fingerprint"):
        tokenizer.check_fingerprint(reward_meta["tokenizer_fingerprint"], str(reward_dir))
    reference: Any
    reference, _ = load_lm(sft_dir, tokenizer)
    max_seq_len = min(reference.config.max_seq_len, reward_model.config.max_seq_len)
    room = max_seq_len - cfg.max_new_tokens
    if room < 1:
        raise StageError(
            f"evaluate.max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in {max_seq_len}"
        )
    rendered = [
        tokenizer.render_chat([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True)[0]
        for row in chat_data.read_rows("preference")
    ]
    rows, how = heldout_rows(params, [len(p) for p in rendered], reference.config.max_seq_len)
    fit = [i for i in rows if len(rendered[i]) <= room]
    rows = fit[: cfg.winrate_prompts]
    if not rows:
        log.warning("no reward-model win rate: no held-out prompt fits %d tokens", room)
        return None
    protocol = {
        "reference": "sft",
        "prompts": f"data/validated/preference.parquet rows held out from training ({how}), first "
        f"{cfg.winrate_prompts} whose chat prompt fits max_seq_len - max_new_tokens = {room} tokens",
        "rows": rows,
        "n_held_out": len(fit),
        "prompt_format": "render_chat([user: prompt], add_generation_prompt=True)",
        "decoding": "greedy",
        "max_new_tokens": cfg.max_new_tokens,
        "stop_tokens": [tokenizer.specials.end, tokenizer.specials.eos],
        "score": "reward model (scalar head) value at the last token of prompt + response",
        "win": "policy reward > reference reward: 1; equal reward or identical response: 0.5; else 0",
        "reward_checkpoint_sha256": sha256_file(reward_dir / "model.safetensors"),
        "reference_checkpoint_sha256": sha256_file(sft_dir / "model.safetensors"),
        "preference_sha256": sha256_file(pref),
    }
    start = time.time()
    harness = WinRate(
        [rendered[i] for i in rows],
        rows,
        reward_model.float().eval().to(device),
        reference.to(device),
        tokenizer,
        cfg.max_new_tokens,
        protocol,
    )
    log.info(
        "win rate: %d held-out prompts, reference answered and scored in %.1fs",
        len(rows),
        time.time() - start,
    )
    return harness


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
    panels: list[tuple[str, str, float | None]] = [
        ("mmlu_acc", "MMLU accuracy", 0.25),
        ("bpb", "bits per byte (val)", None),
    ]
    if any("winrate_vs_sft" in r["metrics"] for r in results.values()):
        panels.append(("winrate_vs_sft", "reward-model win rate vs sft", 0.5))
    extra = [
        k
        for k in dict.fromkeys(k for r in results.values() for k in r["metrics"])
        if not k.startswith(("mmlu_acc", "ppl", "bpb", "word_ppl", "winrate_vs_sft"))
    ]
    panels += [(k, k, None) for k in extra]  # any further metric gets its own panel
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (key, title, chance) in zip(axes[0], panels, strict=True):
        values = [results[n]["metrics"].get(key, float("nan")) for n in names]
        bars = ax.bar(names, values, color="#4C72B0")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance})")
            ax.legend(fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def run(params: Params, tracker: Any) -> dict[str, float]:
    from tasks.core.io import atomic_write_bytes, atomic_write_text

    cfg = params.evaluate
    torch.manual_seed(params.seed)
    tokenizer = ChatTokenizer.load(paths.TOKENIZER_JSON)
    names = available_models()
    if not names:
        raise StageError(f"no language-model checkpoints under {paths.CHECKPOINTS} ({', '.join(LM_MODELS)})")
    from models.checkpoint import read_checkpoint_config

    fewshot_policy(cfg)  # a bad value fails now, not after the first model
    reward_dir = paths.checkpoint("reward")
    checked = [paths.checkpoint(n) for n in names] + (
        [reward_dir] if (reward_dir / "config.json").is_file() else []
    )
    for path in checked:  # cheap checks of every checkpoint before the long evaluation starts
        ckpt_cfg = read_checkpoint_config(path)
        check_vocab(ckpt_cfg["model"].get("vocab_size", 0), tokenizer, str(path))
        recorded = ckpt_cfg.get("tokenizer_fingerprint")
        if recorded and recorded != tokenizer.fingerprint:
            raise StageError(
                f"{path} was trained with tokenizer {recorded[:12]}, but {tokenizer.path} is "
                f"{tokenizer.fingerprint[:12]}: its token ids mean other strings; re-run the stages after "
                "`tokenizer` (dvc repro)"
            )
    from tasks.data.shards import check_tokens

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

    winrate = setup_winrate(params, tokenizer, names, device)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        path = paths.checkpoint(name)
        model, meta = load_lm(path, tokenizer)
        res = evaluate_model(name, model, tokenizer, data, cfg, val_shard, device, shard_dtype, winrate)
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
        f"MMLU {data.k_shot}-shot on {data.split} ({len(data.items)} items, {len(data.subjects)} subjects, "
        f"few-shot policy {fewshot_policy(cfg)}); "
        f"perplexity on {val_shard} (window {cfg.ppl_window}, stride {cfg.ppl_stride})"
        + (
            f"; win rate vs sft on {len(winrate.rows)} held-out prompts (greedy, {cfg.max_new_tokens} new tokens)"
            if winrate is not None
            else ""
        )
        + ".\n"
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
