"""Stage `register`: every model into the MLflow registry, with lineage, `candidate` and a gated `champion`.

Each checkpoint (base, sft, reward, dpo, rlhf) is logged as a pyfunc model-from-code and registered as
`<prefix>-<name>`. The new version is tagged with its lineage (git commit, dirty flag, dvc.lock hashes of
its inputs, tokenizer fingerprint, eval protocol and scores) and gets alias `candidate`. `champion`
moves to it only if its gated metrics pass against the current champion; the decision and its figures
are recorded on the version, and its model card (tasks/serve/card.py) is its description.

For `pipeline replay`, each version also records `weights_sha256` (models.checkpoint.state_dict_hash of
the checkpoint), the producing stage's params as JSON (`params.<section>`), and the full params.yaml as
an artifact of the register run (`params.artifact`; its sha256 stored beside it as
`<artifact>.sha256` and in `params.sha256`). Every model also carries its integrity manifest tags
(tasks/core/manifest.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tasks.core import paths, registry, skip, stages, tracking
from tasks.core.config import Params, RegisterConfig
from tasks.core.io import read_json, write_json
from tasks.core.stage import StageError, stage_main
from tasks.serve.card import model_card

log = logging.getLogger(__name__)

PARAMS_ARTIFACT = "lineage/params.yaml"  # in the register run: the full params.yaml the models came from


def lineage(name: str) -> dict[str, str]:
    """dvc.lock hashes of the inputs and output of the stage that produced this checkpoint; without a
    dvc.lock (stages run by hand) the version says so (`lineage.dvc_lock: missing`) instead of carrying none."""
    lock_path = Path("dvc.lock")
    if not lock_path.exists():
        log.warning("no dvc.lock: %s is registered without the hashes of its inputs", name)
        return {"lineage.dvc_lock": "missing"}
    stage = yaml.safe_load(lock_path.read_text()).get("stages", {}).get(stages.model_stage(name).stage, {})
    tags = {}
    for kind in ("deps", "outs"):
        for entry in stage.get(kind, []):
            if entry["path"].startswith("data/"):
                tags[f"dvc.{kind}.{entry['path']}"] = entry.get("md5", entry.get("hash", ""))
    return tags


def init_tags(name: str) -> dict[str, str]:
    """Where the model's line started: `init.source` is `pipeline` (the pipeline's own base), or the open
    model sft started from (sft.init), found by following each checkpoint's parent to the one that records
    it: the hub id and revision (`init.hf_id`, `init.revision`) or the local folder (`init.folder`), with
    the folder's content sha256 (`init.sha256`) and its model_type; a registered model as the start also
    names its version (`init.registered_model`, `init.version`, `init.manifest_sha256`)."""
    seen: set[str] = set()
    current: str | None = name
    while current and current not in seen and (paths.checkpoint(current) / "config.json").is_file():
        seen.add(current)
        meta = read_json(paths.checkpoint(current) / "config.json")
        init = meta.get("init")
        if isinstance(init, dict) and init.get("source"):
            source = str(init["source"])
            tags = {
                "init.source": source,
                "init.sha256": str(init.get("sha256", "")),
                "init.model_type": str(init.get("model_type", "")),
                "init.stage": current,
            }
            if source.startswith("hf:"):
                hf_id, revision = source[len("hf:") :].split("@", 1)
                tags |= {"init.hf_id": hf_id, "init.revision": revision}
            else:
                tags["init.folder"] = str(init.get("folder", source))
            for key in ("registered_model", "version", "manifest_sha256"):  # models:/<name>@<alias>
                if key in init:
                    tags[f"init.{key}"] = str(init[key])
            return tags
        current = meta.get("parent")
    return {"init.source": "pipeline"}


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


GATED = ("mmlu/acc", "ppl/val")  # the scores the champion gate compares


def gate(new: dict[str, float], champion: dict[str, float] | None, cfg: RegisterConfig) -> tuple[bool, str]:
    """Does a candidate with scores `new` replace the champion with scores `champion` (None: no champion)?

    Each gated score the champion has must be in the candidate (an unevaluated candidate never replaces an
    evaluated champion) and within its margin: MMLU drop <= max_mmlu_drop, perplexity rise <=
    max_ppl_increase (equal scores pass). When neither has a gated score (the reward model, which evaluate
    does not score) the newer version wins, and the decision says so.
    """
    if champion is None:
        return True, "no champion yet"
    missing = [k for k in GATED if k in champion and k not in new]
    if missing:
        return False, "candidate has no " + ", ".join(f"{k} (champion {champion[k]:.4f})" for k in missing)
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
    if not reasons:
        if any(k in new for k in GATED):
            return True, "the champion has no gated metrics"
        return True, "no gated metrics on either version: the newer one wins"
    return ok, "; ".join(reasons)


def promote(registered: str, version: str, scores: dict[str, float], cfg: RegisterConfig) -> tuple[bool, str]:
    """Record the scores on a version, give it `candidate`, and `champion` if the gate passes.

    The decision and the figures it was made on go on the version as `champion.decision`.
    """
    champion = registry.version_by_alias(registered, "champion")
    ok, reason = gate(scores, scores_from_tags(champion.tags) if champion else None, cfg)
    if champion is not None:
        reason = f"vs champion v{champion.version}: {reason}"
    decision = ("promoted: " if ok else "kept previous champion: ") + reason
    registry.tag_version(
        registered, version, {**{f"eval.{k}": v for k, v in scores.items()}, "champion.decision": decision}
    )
    registry.set_alias(registered, "candidate", version)
    if ok:
        registry.set_alias(registered, "champion", version)
    return ok, decision


@contextlib.contextmanager
def merged_checkpoint(ckpt: Path, model: Any, meta: dict[str, Any]) -> Iterator[Path]:
    """The checkpoint to log: itself, or for LoRA adapters (models/adapters.py) the merged model in a temp
    dir of the same name, so that the registry serves and exports a plain model without the base."""
    if "adapter" not in meta:
        yield ckpt
        return
    from models.checkpoint import save_checkpoint

    lineage = {k: v for k, v in meta.items() if k not in ("model", "kind", "adapter")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / ckpt.name
        extra = {  # an open model's tokenizer and chat template (tasks/train/open_model.py:tokenizer_files)
            f.name: f
            for f in ckpt.iterdir()
            if f.name.startswith("tokenizer") or f.name == "chat_template.jinja"
        }
        save_checkpoint(
            out, model, model.config, meta={**lineage, "merged_adapter": meta["adapter"]}, files=extra
        )
        yield out


def register_one(name: str, params: Params, tracker: Any, params_sha256: str = "") -> dict[str, Any]:
    from models.checkpoint import load_checkpoint, state_dict_hash

    cfg = params.register
    ckpt = paths.checkpoint(name)
    if not (ckpt / "model.safetensors").exists() and not (ckpt / "adapter.safetensors").exists():
        raise StageError(f"{ckpt} has no model.safetensors; run the stages before register")
    meta = read_json(ckpt / "config.json")
    model, _ = load_checkpoint(ckpt)
    weights_sha256 = state_dict_hash(model)
    registered = f"{cfg.model_prefix}-{name}"
    # a model that carries its own (open model's) tokenizer is registered with it
    tokenizer = ckpt / "tokenizer.json" if (ckpt / "tokenizer.json").exists() else paths.TOKENIZER_JSON
    with merged_checkpoint(ckpt, model, meta) as logged:
        registry.log_chat_model(name, registered, logged, tokenizer)
    version = registry.latest_version(registered, tracker.run_id)
    stage = stages.model_stage(name).stage
    section = getattr(params, stage)
    stage_params = {stage: dataclasses.asdict(section)}
    if stage == "pretrain":
        stage_params["model"] = params.model.to_dict()  # as params.yaml holds it (replay compares them)
    tags = {
        **tracking.git_info(),
        **lineage(name),
        **init_tags(name),
        "tokenizer_fingerprint": meta.get("tokenizer_fingerprint", ""),
        "weights_sha256": weights_sha256,
        "stage": stage,
        "parent": meta.get("parent", ""),
        "profile": params.profile,
        "seed": params.seed,
        f"params.{stage}": json.dumps(stage_params, sort_keys=True),
        "params.artifact": f"runs:/{tracker.run_id}/{PARAMS_ARTIFACT}",
        "params.sha256": params_sha256,
    }
    protocol = paths.EVAL / f"{name}.json"
    if protocol.exists():
        tags["protocol"] = json.dumps(read_json(protocol).get("protocol", {}), sort_keys=True)
    registry.tag_version(registered, version.version, tags)
    promoted, decision = promote(registered, version.version, eval_scores(name), cfg)
    log.info("%s v%s: %s", registered, version.version, decision)
    # The model card, from what the version now records (tags, scores, decision): its description, and
    # the README.md of `pipeline export`.
    stored = registry.resolve_version(f"{registered}/{version.version}")
    card = model_card(
        registered,
        version.version,
        meta,
        dict(stored.tags),
        eval_scores(name),
        tracking.redact_tree(dataclasses.asdict(params.ingest)),
        sum(p.numel() for p in model.parameters()),
    )
    registry.describe_version(registered, version.version, card)
    return {"name": registered, "version": int(version.version), "champion": promoted, "decision": decision}


def run(params: Params, tracker: Any) -> dict[str, Any]:
    # Every model or none: a missing checkpoint is named before the first version is registered. A stage
    # an open model made unnecessary (pretrain, tasks/core/skip.py) left a marker, not a model: not registered.
    models = [n for n in stages.models() if not (paths.checkpoint(n) / skip.MARKER).is_file()]
    for name in sorted(set(stages.models()) - set(models)):
        log.info("%s: not registered (%s)", name, read_json(paths.checkpoint(name) / skip.MARKER)["skipped"])
    missing = [str(paths.checkpoint(n)) for n in models if not any(paths.checkpoint(n).glob("*.safetensors"))]
    if missing:
        raise StageError(
            f"no checkpoint in {', '.join(missing)}; run the stages before register (nothing registered)"
        )
    params_file = Path("params.yaml")
    # The params.yaml (secrets redacted) with its sha256 stored beside it: replay checks both and the tags.
    params_sha256 = tracker.log_params_file(params_file, PARAMS_ARTIFACT)
    results = {name: register_one(name, params, tracker, params_sha256) for name in models}
    paths.REGISTRY.mkdir(parents=True, exist_ok=True)
    write_json(paths.REGISTRY / "registered.json", results)
    return results


if __name__ == "__main__":
    stage_main("register", run)
