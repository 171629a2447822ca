"""The model card of a registered model: what it is, what it was trained on and how, how it scored, what it
is for and what it cannot do.

register writes it as the description of every version it registers; `pipeline export` writes the
version's description as README.md (with Hugging Face front matter), so the two are the same text. Only
records made at registration are used: the checkpoint's config (architecture, lineage), the version's
tags (dvc.lock hashes, params, git commit, weights and integrity hashes) and the evaluation scores.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

KIND = {
    "causal_lm": "A causal language model (Llama-style decoder)",
    "scalar_head": "A reward model (Llama-style decoder with a scalar head: one score per conversation)",
}
USE = {
    "pretrain": "continuing text in the style of its corpus; a starting point for fine-tuning",
    "sft": "answering questions in the chat template it was fine-tuned on",
    "reward": "scoring conversations relative to each other (Bradley-Terry): which of two answers is better",
    "dpo": "answering questions in the chat template, tuned towards the preferred answers of its pairs",
    "rlhf": "answering questions in the chat template, tuned with PPO against the reward model",
    "grpo": "answering checkable questions (arithmetic and similar) in the chat template, tuned with GRPO",
}


def _table(rows: list[tuple[str, str]], header: tuple[str, str]) -> list[str]:
    out = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return out + [f"| {k} | {v} |" for k, v in rows]


def model_card(
    registered: str,
    version: str,
    config: Mapping[str, Any],
    tags: Mapping[str, str],
    scores: Mapping[str, float],
    sources: Mapping[str, Any],
    n_params: int,
) -> str:
    """The card (markdown). `config`: the checkpoint's config.json; `tags`: the version's tags;
    `scores`: its evaluation scores; `sources`: params.yaml's ingest section (secrets already redacted);
    `n_params`: the model's parameter count."""
    model = config["model"]
    kind = config.get("kind", "causal_lm")
    stage = tags.get("stage") or config.get("stage", "?")
    parent = tags.get("parent") or config.get("parent") or ""
    lines = [f"# {registered} v{version}", ""]
    lines.append(
        f"{KIND.get(kind, kind)}, trained by the `{stage}` stage of llm-pipeline"
        + (f" from `{parent}`" if parent else " from scratch")
        + f" (profile `{tags.get('profile', '?')}`, seed {tags.get('seed', '?')})."
    )
    lines += ["", "## Architecture", ""]
    arch = [
        ("parameters", f"{n_params / 1e6:.2f}M"),
        ("layers x width", f"{model['n_layer']} x {model['d_model']}"),
        ("attention heads (key/value)", f"{model['n_head']} ({model.get('n_kv_head') or model['n_head']})"),
        ("vocabulary", str(model["vocab_size"])),
        ("context", f"{model['max_seq_len']} tokens"),
        ("position encoding", f"RoPE, theta {model.get('rope_theta', 10000.0)}"),
        ("tied embeddings", "yes" if model.get("tie_embeddings", True) else "no"),
    ]
    if config.get("merged_adapter"):
        arch.append(("LoRA", "trained as adapters, merged into these weights"))
    lines += _table(arch, ("property", "value"))
    lines += ["", "## Data", ""]
    for dataset, src in sources.items():
        if not isinstance(src, Mapping):
            continue
        where = {"embedded": "the embedded default corpus (this Python's standard library docs and source)"}
        origin = where.get(src.get("kind", ""), src.get("hf_id") or src.get("path") or src.get("kind", "?"))
        lines.append(f"- {dataset}: {src.get('kind', '?')}: {origin}")
    hashes = sorted((k.split(".", 2)[2], v) for k, v in tags.items() if k.startswith("dvc.deps.data/"))
    if hashes:
        lines += ["", f"Inputs of the `{stage}` stage (dvc.lock md5):", ""]
        lines += _table([(f"`{path}`", f"`{md5}`") for path, md5 in hashes], ("path", "md5"))
    if tags.get("tokenizer_fingerprint"):
        lines += ["", f"Tokenizer: byte-level BPE, fingerprint `{tags['tokenizer_fingerprint']}`."]
    lines += ["", "## Training", ""]
    stage_params = tags.get(f"params.{stage}")
    if stage_params:
        lines += [
            f"The `{stage}` section of params.yaml (the whole file is stored with the register run):",
            "",
            "```json",
            json.dumps(json.loads(stage_params), indent=2, sort_keys=True),
            "```",
        ]
    final = {k: v for k, v in (config.get("metrics") or {}).items() if not k.startswith("val/")}
    if final:
        lines += ["", "Last training step:", ""]
        lines += _table([(k, f"{v:.4g}") for k, v in sorted(final.items())], ("metric", "value"))
    lines += ["", "## Evaluation", ""]
    if scores:
        lines += _table([(k, f"{v:.4g}") for k, v in sorted(scores.items())], ("score", "value"))
        if tags.get("champion.decision"):
            lines += ["", f"Champion gate: {tags['champion.decision']}"]
    else:
        lines.append("Not evaluated (the evaluate stage scores language models: MMLU, perplexity, win rate).")
    lines += ["", "## Intended use", ""]
    lines.append(
        f"Research and teaching: a model made end to end by a reproducible pipeline, for {USE.get(stage, stage)}. "
        "Served with `mlflow models serve -m models:/"
        + f"{registered}/{version}` or `pipeline chat {registered}/{version}`."
    )
    lines += ["", "## Limitations", ""]
    size = n_params
    lines.append(
        f"- {size / 1e6:.2f}M parameters and a {model['max_seq_len']}-token context: "
        + ("expect fluent-looking but often wrong text." if size > 50e6 else "expect mostly incoherent text.")
    )
    mmlu = scores.get("mmlu/acc")
    if mmlu is not None:
        lines.append(f"- MMLU accuracy {mmlu:.3f} against 0.25 for chance: it has no reliable knowledge.")
    if any(isinstance(s, Mapping) and s.get("kind") == "embedded" for s in sources.values()):
        lines.append(
            "- Trained on one narrow domain (Python's documentation): it knows nothing else, in English only."
        )
    lines += [
        "- No safety tuning beyond its preference data; it may repeat its training text.",
        "- Not for decisions about people, nor for any use where a wrong answer causes harm.",
        "",
        "## Lineage",
        "",
    ]
    lineage = [
        (
            "git commit",
            f"`{tags.get('git.commit', '?')}`"
            + (" (with uncommitted changes)" if tags.get("git.dirty") == "true" else ""),
        ),
        ("weights sha256", f"`{tags.get('weights_sha256', '?')}`"),
        ("integrity manifest sha256", f"`{tags.get('manifest.sha256', '?')}`"),
        ("rebuild", f"`pipeline replay {registered}/{version}`"),
    ]
    lines += _table(lineage, ("record", "value"))
    return "\n".join(lines) + "\n"


def front_matter(stage: str, kind: str) -> str:
    """Hugging Face model-card metadata for an exported folder."""
    task = "text-classification" if kind == "scalar_head" else "text-generation"
    tags = ", ".join(["llm-pipeline", stage] if stage else ["llm-pipeline"])
    return f"---\nlibrary_name: transformers\npipeline_tag: {task}\ntags: [{tags}]\n---\n\n"
