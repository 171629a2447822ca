"""Registered models in use: `pipeline chat`, `pipeline export`, `pipeline replay`.

A model is named `<registered name>@<alias>` (e.g. `pipeline-sft@champion`) or `<name>/<version>`, and
is always loaded through MLflow (the pyfunc of tasks/serve/pyfunc.py), exactly as `mlflow models serve` loads it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

import yaml

from tasks.core import tracking


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
    model, version = tracking.load_registered(ref)
    if model.meta.get("kind") == "scalar_head":
        raise tracking.ModelRefError(f"{ref} is a reward model: it scores conversations, it does not chat")
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


def export(ref: str, out_dir: Path) -> Path:
    """Write the registered model as a Hugging Face Llama checkpoint (+ tokenizer) that transformers loads."""
    from models.hf import export_hf
    from tasks.data.chat_tokenizer import CHAT_TEMPLATE

    model, version = tracking.load_registered(ref)
    if model.meta.get("kind") == "scalar_head":
        raise tracking.ModelRefError(f"{ref} is a reward model; only causal LMs export as a Llama checkpoint")
    tok = model.tokenizer
    export_hf(
        model.model,
        out_dir,
        tok.path,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        chat_template=CHAT_TEMPLATE,
    )
    print(f"exported {version.name} v{version.version} ({ref}) to {out_dir}")
    return out_dir


class ReplayError(RuntimeError):
    pass


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env)
    if proc.returncode != 0:
        raise ReplayError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode} (in {cwd})")


def replay(ref: str, workdir: Path | None = None, keep: bool = False) -> bool:
    """Reproduce a registered version from its lineage: its git commit in a worktree, its recorded params,
    `dvc repro` of its stage; then compare the weights hash (and the dvc.lock hashes of its inputs).

    Returns True when the reproduced weights equal the registered ones.
    """
    from flows.pipeline import stage_env
    from models.checkpoint import load_checkpoint, state_dict_hash

    version = tracking.resolve_version(ref)
    tags = dict(version.tags)
    missing = [t for t in ("git.commit", "stage", "weights_sha256", "params.artifact") if not tags.get(t)]
    if missing or tags.get("git.commit") == "unknown":
        raise ReplayError(f"{ref} (v{version.version}) lacks the lineage tags {missing or ['git.commit']}")
    commit, stage, expected = tags["git.commit"], tags["stage"], tags["weights_sha256"]
    name = version.name.rsplit("-", 1)[-1]
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True)
    if top.returncode != 0:
        raise ReplayError("pipeline replay runs inside the project's git repository")
    repo = Path(top.stdout.strip())
    if tags.get("git.dirty") == "true":
        print(
            f"warning: v{version.version} was trained from a tree with uncommitted changes on top of "
            f"{commit[:12]}; the replay uses the committed state and the recorded params",
            flush=True,
        )
    base = Path(tempfile.mkdtemp(prefix="pipeline-replay-", dir=workdir))
    tree = base / "worktree"
    env = stage_env()
    env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()  # the replay's stage runs go to the same store,
    env["PIPELINE_EXPERIMENT"] = "llm-pipeline-replay"  # in an experiment of their own
    env.pop("PIPELINE_PARENT_RUN_ID", None)
    dvc = str(Path(sys.executable).parent / "dvc")
    _run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=repo)
    try:
        run_id, artifact = tags["params.artifact"][len("runs:/") :].split("/", 1)
        params_file = tracking.download_run_artifact(run_id, artifact, base / "recorded")
        if tags.get("params.sha256"):
            import hashlib

            if hashlib.sha256(params_file.read_bytes()).hexdigest() != tags["params.sha256"]:
                raise ReplayError(f"{tags['params.artifact']} does not match the recorded params.sha256")
        shutil.copyfile(params_file, tree / "params.yaml")
        print(f"replaying {version.name} v{version.version}: commit {commit[:12]}, stage {stage}, in {tree}")
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
        if keep:
            print(f"kept the worktree at {tree} (remove it with `git worktree remove --force {tree}`)")
        else:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=repo, capture_output=True)
            shutil.rmtree(base, ignore_errors=True)
