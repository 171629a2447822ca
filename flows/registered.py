"""Registered models in use: `pipeline chat`, `pipeline export`, `pipeline replay`.

A model is named `<registered name>@<alias>` (e.g. `pipeline-sft@champion`) or `<name>/<version>`, and
is always loaded through MLflow (the pyfunc of tasks/serve/pyfunc.py), exactly as `mlflow models serve` loads it.

(Not `flows/models.py`: a worker loads flows/pipeline.py by path with flows/ first on sys.path, where a
`models` module there shadowed the models package; tests/test_workpool.py checks no flows/ module does.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

import yaml

from tasks.core import registry, tracking
from tasks.core.config import REPO_ROOT


def chat(
    ref: str,
    params: dict[str, Any],
    system: str | None = None,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
) -> int:
    """An interactive terminal chat; the reply streams token by token. /reset clears, /exit or Ctrl-D quits."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    model, version = registry.load_registered(ref)
    if model.meta.get("kind") == "scalar_head":
        raise registry.ModelRefError(f"{ref} is a reward model: it scores conversations, it does not chat")
    model._generation(params)  # a bad max_new_tokens / temperature fails now, not at the first message
    print(
        f"chatting with {version.name} v{version.version} ({ref}); /reset clears the history, "
        "/exit or Ctrl-D quits",
        file=stdout,
        flush=True,
    )
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # EOF (Ctrl-D)
            print(file=stdout, flush=True)
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if system else []
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        print("bot> ", end="", file=stdout, flush=True)
        reply = ""
        try:
            for piece in model.stream_chat(history, params):
                reply += piece
                print(piece, end="", file=stdout, flush=True)
        except ValueError as exc:  # a conversation over the request limits: say so, keep the session
            history.pop()
            print(f"[refused: {exc}]", file=stdout, flush=True)
            continue
        print(file=stdout, flush=True)
        history.append({"role": "assistant", "content": reply})


EXPORT_MARKER = ".pipeline-export.json"  # written into every export: what it wrote, from which version


class ExportError(RuntimeError):
    pass


def _git_toplevel(cwd: Path) -> Path | None:
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True, text=True)
    return Path(proc.stdout.strip()).resolve() if proc.returncode == 0 else None


def check_export_dir(out_dir: Path, force: bool = False) -> Path:
    """Refuse an out_dir that an export would destroy; returns it resolved. Checked before any work.

    Never (even with force): `/`, $HOME, this project's root, the current git repository's root, the
    current directory, any parent of those, or a directory holding `.git`. Without force, a non-empty
    directory only when it is a previous export: its marker lists every file in it.
    """
    target = Path(out_dir).expanduser().resolve()
    cwd = Path.cwd().resolve()
    protected = {Path("/").resolve(), Path.home().resolve(), REPO_ROOT.resolve(), cwd}
    protected |= {top for top in (_git_toplevel(cwd),) if top is not None}
    for p in sorted(protected):
        if target == p or target in p.parents:
            raise ExportError(
                f"refusing to replace {target}: it is or contains {p} (/, $HOME, a repository root or the "
                "current directory); export into a new directory"
            )
    if (target / ".git").exists():
        raise ExportError(
            f"refusing to replace {target}: it is a git repository; export into a new directory"
        )
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} exists and is not a directory; export into a new directory")
    if force or not target.exists() or not any(target.iterdir()):
        return target
    marker = target / EXPORT_MARKER
    try:
        written = set(json.loads(marker.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ExportError(
            f"{target} is not empty and holds no previous export ({EXPORT_MARKER}); an export replaces the "
            "whole directory: choose a new one, or pass --force to replace it"
        ) from None
    others = sorted(p.name for p in target.iterdir() if p.name not in written | {EXPORT_MARKER})
    if others:
        raise ExportError(
            f"{target} holds a previous export plus files it did not write ({', '.join(others)}); an export "
            "replaces the whole directory: move them, or pass --force"
        )
    return target


def export_card(model: Any, version: Any) -> str:
    """README.md of an export: Hugging Face front matter, then the version's model card (its description,
    written by register); a version registered before cards existed gets one made from its tags now."""
    from tasks.serve.card import front_matter, model_card

    tags = dict(version.tags or {})
    card = version.description or model_card(
        version.name,
        str(version.version),
        model.meta,
        tags,
        {k[len("eval.") :]: float(v) for k, v in tags.items() if k.startswith("eval.")},
        {},
        sum(p.numel() for p in model.model.parameters()),
    )
    return front_matter(tags.get("stage") or model.meta.get("stage", ""), model.meta.get("kind", "")) + card


def export(ref: str, out_dir: Path, force: bool = False) -> Path:
    """Write the registered model as a Hugging Face Llama checkpoint (+ tokenizer) that transformers loads,
    with its model card as README.md.

    The directory is checked first (`check_export_dir`); the export replaces it whole and leaves a marker
    listing its files, so a later export may replace it again without --force.
    """
    from models.hf import export_hf

    out_dir = check_export_dir(out_dir, force)
    model, version = registry.load_registered(ref)
    if model.meta.get("kind") == "scalar_head":
        raise registry.ModelRefError(f"{ref} is a reward model; only causal LMs export as a Llama checkpoint")
    tok = model.tokenizer
    export_hf(
        model.model,
        out_dir,
        tok.path,
        bos_id=tok.bos_id if tok.specials.bos else None,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        chat_template=tok.chat_template,  # an open model's own template
    )
    (out_dir / "README.md").write_text(export_card(model, version))
    marker = {
        "model": version.name,
        "version": str(version.version),
        "files": sorted(p.name for p in out_dir.iterdir()),
    }
    (out_dir / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    print(f"exported {version.name} v{version.version} ({ref}) to {out_dir}")
    return out_dir


class ReplayError(RuntimeError):
    pass


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env)
    if proc.returncode != 0:
        raise ReplayError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode} (in {cwd})")


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)


@dataclasses.dataclass
class Lineage:
    """What a replay will run: a verified commit, stage and params file."""

    commit: str
    stage: str
    params_file: Path
    params_sha256: str
    run_id: str
    artifact: str


def verify_lineage(version: Any, repo: Path, trusted_ref: str, dst: Path) -> Lineage:
    """Check a version's lineage tags before anything runs; ReplayError naming what does not hold.

    Tags are editable by anyone who can write the registry, so none is taken on its word: the commit
    must be a commit id in the history of `trusted_ref`; the params file must be the one the register run
    that logged this version stored, matching the sha256 stored beside it, the `params.sha256` tag and the
    `params.<stage>` tag.
    """
    tags = dict(version.tags or {})
    need = ("git.commit", "stage", "weights_sha256", "params.artifact", "params.sha256")
    missing = [t for t in need if not tags.get(t)]
    if missing:
        raise ReplayError(f"{version.name} v{version.version} lacks the lineage tags {missing}")
    commit, stage = tags["git.commit"], tags["stage"]
    if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", commit):
        raise ReplayError(f"tag git.commit {commit!r} is not a commit id (40 or 64 hex digits)")
    if _git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{commit}^{{commit}}").returncode:
        raise ReplayError(f"tag git.commit {commit} is not a commit of {repo}")
    trusted = _git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{trusted_ref}^{{commit}}")
    if trusted.returncode:
        raise ReplayError(f"trusted ref {trusted_ref!r} is not a commit of {repo}")
    if _git(
        repo, "merge-base", "--is-ancestor", "--end-of-options", commit, trusted.stdout.strip()
    ).returncode:
        raise ReplayError(
            f"tag git.commit {commit} is not in the history of {trusted_ref}: a tag can name any commit, "
            "so replay runs only commits of a trusted branch (--trusted-ref to trust another)"
        )
    uri = tags["params.artifact"]
    run_id, _, artifact = uri.removeprefix("runs:/").partition("/")
    if not uri.startswith("runs:/") or run_id != version.run_id or not artifact:
        raise ReplayError(
            f"tag params.artifact {uri!r} is not an artifact of the register run {version.run_id} "
            f"that logged {version.name} v{version.version}"
        )
    try:
        params_file = tracking.download_run_artifact(run_id, artifact, dst)
        stored = tracking.download_run_artifact(run_id, f"{artifact}.sha256", dst).read_text().strip()
    except Exception as exc:  # MLflow raises its own errors for a missing artifact
        raise ReplayError(
            f"cannot read {artifact} and its stored {artifact}.sha256 from run {run_id} ({exc}); a version "
            "registered before params hashes were stored cannot be verified: register it again"
        ) from None
    sha = hashlib.sha256(params_file.read_bytes()).hexdigest()
    if sha != stored:
        raise ReplayError(
            f"{artifact} of run {run_id} does not match the sha256 stored with it: it was changed"
        )
    if tags["params.sha256"] != stored:
        raise ReplayError(
            f"tag params.sha256 does not match the sha256 stored with {artifact} in run {run_id}"
        )
    recorded = yaml.safe_load(params_file.read_text())
    sections = [stage, "model"] if stage == "pretrain" else [stage]
    try:
        tagged = json.loads(tags.get(f"params.{stage}", ""))
    except ValueError:
        tagged = None
    if tagged != {k: recorded.get(k) for k in sections}:
        raise ReplayError(
            f"tag params.{stage} does not match the {stage} section of {artifact} (whose sha256 checks out)"
        )
    redacted = sorted(k for k, v in tracking.flatten(recorded).items() if v == "***")
    if redacted:
        raise ReplayError(
            f"{artifact} was stored with secrets redacted ({', '.join(redacted)}): cannot replay it"
        )
    return Lineage(commit, stage, params_file, sha, run_id, artifact)


def replay(ref: str, workdir: Path | None = None, keep: bool = False, trusted_ref: str = "HEAD") -> bool:
    """Reproduce a registered version from its lineage: its git commit in a worktree, its recorded params,
    `dvc repro` of its stage; then compare the weights hash (and the dvc.lock hashes of its inputs).

    The lineage is verified first (`verify_lineage`) and what will run is printed before it runs.
    Returns True when the reproduced weights equal the registered ones.
    """
    from flows.pipeline import stage_env
    from models.checkpoint import load_checkpoint, state_dict_hash

    version = registry.resolve_version(ref)
    tags = dict(version.tags)
    name = version.name.rsplit("-", 1)[-1]
    top = _git(Path.cwd(), "rev-parse", "--show-toplevel")
    if top.returncode != 0:
        raise ReplayError("pipeline replay runs inside the project's git repository")
    repo = Path(top.stdout.strip())
    base = Path(tempfile.mkdtemp(prefix="pipeline-replay-", dir=workdir))
    tree = base / "worktree"
    added = False
    try:
        plan = verify_lineage(version, repo, trusted_ref, base / "recorded")
        commit, stage, expected = plan.commit, plan.stage, tags["weights_sha256"]
        if tags.get("git.dirty") == "true":
            print(
                f"warning: v{version.version} was trained from a tree with uncommitted changes on top of "
                f"{commit[:12]}; the replay uses the committed state and the recorded params",
                flush=True,
            )
        dvc = str(Path(sys.executable).parent / "dvc")
        add = ["git", "worktree", "add", "--detach", "--", str(tree), commit]
        print(
            f"replaying {version.name} v{version.version} ({ref}), stage {stage}\n"
            f"  commit {commit}: in the history of {trusted_ref}\n"
            f"  params runs:/{plan.run_id}/{plan.artifact}: sha256 {plan.params_sha256} (stored hash and "
            "tags agree)\n"
            f"will run, in a worktree of {commit}:\n"
            f"  {' '.join(add)}\n"
            f"  cp {plan.params_file} {tree / 'params.yaml'}\n"
            f"  {dvc} repro {stage}",
            flush=True,
        )
        env = stage_env()
        env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()  # the replay's stage runs go to the same store,
        env["PIPELINE_EXPERIMENT"] = "llm-pipeline-replay"  # in an experiment of their own
        env.pop("PIPELINE_PARENT_RUN_ID", None)
        _run(add, cwd=repo)
        added = True
        shutil.copyfile(plan.params_file, tree / "params.yaml")
        _run([dvc, "repro", stage], cwd=tree, env=env)
        reproduced = state_dict_hash(load_checkpoint(tree / "data" / "checkpoints" / name)[0])
        lock = yaml.safe_load((tree / "dvc.lock").read_text())["stages"].get(stage, {})
        now = {
            f"dvc.{kind}.{e['path']}": e.get("md5", e.get("hash", ""))
            for kind in ("deps", "outs")
            for e in lock.get(kind, [])
            if e["path"].startswith("data/")
        }
        recorded = {k: v for k, v in tags.items() if k.startswith("dvc.")}
        differ = sorted(k for k in recorded if now.get(k) != recorded[k])
        # Inputs must be identical; output directories also hold run metadata (timings, tokens/s), so
        # their hashes are reported but the weights hash is what decides.
        inputs_differ = [k for k in differ if k.startswith("dvc.deps.")]
        same = reproduced == expected and not inputs_differ
        report = {
            "model": f"{version.name} v{version.version}",
            "commit": commit,
            "stage": stage,
            "weights_sha256": {"registered": expected, "replayed": reproduced},
            "weights_match": reproduced == expected,
            "reproduced": same,
            "inputs_differ": inputs_differ,
            "outputs_differ": [k for k in differ if k.startswith("dvc.outs.")],
        }
        print(json.dumps(report, indent=2))
        print(
            "replay: weights match the registered version"
            if same
            else "replay: NOT reproduced (weights or inputs differ from the registered version)",
            flush=True,
        )
        return same
    finally:
        if keep and added:
            print(f"kept the worktree at {tree} (remove it with `git worktree remove --force {tree}`)")
        else:
            if added:
                _git(repo, "worktree", "remove", "--force", "--", str(tree))
            shutil.rmtree(base, ignore_errors=True)
