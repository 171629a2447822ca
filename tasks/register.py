"""Stage `register`: every model into the MLflow registry, with lineage, `candidate` and a gated `champion`.

Each checkpoint (base, sft, reward, dpo, rlhf) is logged as a pyfunc model-from-code and registered as
`<prefix>-<name>`. The new version is tagged with its lineage (git commit, dirty flag, dvc.lock hashes of
its inputs, tokenizer fingerprint, eval protocol and scores) and gets alias `candidate`. `champion`
moves to it only if its gated metrics pass against the current champion; the decision and its figures
are recorded on the version.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from tasks import paths, tracking
from tasks.config import Params, RegisterConfig
from tasks.io import read_json, write_json
from tasks.stage import StageError, stage_main

log = logging.getLogger(__name__)

MODELS = ("base", "sft", "reward", "dpo", "rlhf")
STAGE_OF = {"base": "pretrain", "sft": "sft", "reward": "reward", "dpo": "dpo", "rlhf": "rlhf"}


def lineage(name: str) -> dict[str, str]:
    """dvc.lock hashes of the inputs and output of the stage that produced this checkpoint."""
    lock_path = Path("dvc.lock")
    if not lock_path.exists():
        return {}
    stage = yaml.safe_load(lock_path.read_text()).get("stages", {}).get(STAGE_OF[name], {})
    tags = {}
    for kind in ("deps", "outs"):
        for entry in stage.get(kind, []):
            if entry["path"].startswith("data/"):
                tags[f"dvc.{kind}.{entry['path']}"] = entry.get("md5", entry.get("hash", ""))
    return tags


def eval_scores(name: str) -> dict[str, float]:
    path = paths.EVAL / f"{name}.json"
    if not path.exists():
        return {}
    data = read_json(path)
    return {k: float(v) for k, v in data.get("scores", {}).items() if isinstance(v, int | float)}


def scores_from_tags(tags: dict[str, str]) -> dict[str, float]:
    """The eval.* scores recorded on a version (the figures the champion was chosen on)."""
    scores = {}
    for key, value in tags.items():
        if key.startswith("eval."):
            try:
                scores[key[len("eval.") :]] = float(value)
            except ValueError:
                continue
    return scores


def gate(new: dict[str, float], champion: dict[str, float], cfg: RegisterConfig) -> tuple[bool, str]:
    """Does a candidate with scores `new` replace the champion with scores `champion`?"""
    if not champion:
        return True, "no champion yet"
    reasons, ok = [], True
    if "mmlu/acc" in new and "mmlu/acc" in champion:
        drop = champion["mmlu/acc"] - new["mmlu/acc"]
        passed = drop <= cfg.max_mmlu_drop
        ok &= passed
        reasons.append(
            f"mmlu/acc {new['mmlu/acc']:.4f} vs {champion['mmlu/acc']:.4f} "
            f"(drop {drop:.4f} {'<=' if passed else '>'} {cfg.max_mmlu_drop})"
        )
    if "ppl/val" in new and "ppl/val" in champion:
        rise = new["ppl/val"] / champion["ppl/val"] - 1
        passed = rise <= cfg.max_ppl_increase
        ok &= passed
        reasons.append(
            f"ppl/val {new['ppl/val']:.3f} vs {champion['ppl/val']:.3f} "
            f"(rise {rise:+.2%} {'<=' if passed else '>'} {cfg.max_ppl_increase:.0%})"
        )
    return ok, "; ".join(reasons) or "no comparable metrics"


def register_one(name: str, params: Params, tracker: Any) -> dict[str, Any]:
    cfg = params.register
    ckpt = paths.checkpoint(name)
    if not (ckpt / "model.safetensors").exists():
        raise StageError(f"{ckpt} has no model.safetensors; run the stages before register")
    meta = read_json(ckpt / "config.json")
    registered = f"{cfg.model_prefix}-{name}"
    tracking.log_chat_model(name, registered, ckpt, paths.TOKENIZER_JSON)
    version = tracking.latest_version(registered, tracker.run_id)
    scores = eval_scores(name)
    champion = tracking.version_by_alias(registered, "champion")
    champion_scores = scores_from_tags(champion.tags if champion else {})
    promote, reason = gate(scores, champion_scores, cfg)
    git = tracking.git_info()
    tags = {
        **git,
        **lineage(name),
        "tokenizer_fingerprint": meta.get("tokenizer_fingerprint", ""),
        "stage": STAGE_OF[name],
        "parent": meta.get("parent", ""),
        "profile": params.profile,
        **{f"eval.{k}": v for k, v in scores.items()},
        "champion.decision": ("promoted: " if promote else "kept previous champion: ") + reason,
    }
    protocol = paths.EVAL / f"{name}.json"
    if protocol.exists():
        tags["protocol"] = json.dumps(read_json(protocol).get("protocol", {}), sort_keys=True)
    tracking.tag_version(registered, version.version, tags)
    tracking.set_alias(registered, "candidate", version.version)
    if promote:
        tracking.set_alias(registered, "champion", version.version)
    log.info("%s v%s: %s", registered, version.version, tags["champion.decision"])
    return {"name": registered, "version": int(version.version), "champion": promote, "decision": reason}


def run(params: Params, tracker: Any) -> dict[str, Any]:
    results = {name: register_one(name, params, tracker) for name in MODELS}
    paths.REGISTRY.mkdir(parents=True, exist_ok=True)
    write_json(paths.REGISTRY / "registered.json", results)
    return results


if __name__ == "__main__":
    stage_main("register", run)
