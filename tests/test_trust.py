"""What the operating commands refuse to do with data they did not make or cannot verify.

- `pipeline export` never replaces a directory it did not write (no export marker) unless --force, and
  never the repository root, one of its parents, `/` or $HOME;
- loading a registered model (`pipeline chat`, `pipeline export`, the pyfunc under `mlflow models serve`)
  verifies its code, weights and tokenizer against the manifest recorded at registration;
- `pipeline replay` checks out only a commit in the history of a trusted ref, and only with the params
  whose sha256 was stored with the register run's artifacts and matches the version's tags.

Each refusal is checked with the files on disk: nothing deleted, nothing checked out, no forged code run.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from flows.cli import main
from flows.registered import ReplayError
from tasks.core.manifest import ManifestError
from tests.test_serving import tiny_registered_model

GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny chat model registered in the session's store: (work dir, registered name)."""
    root = tmp_path_factory.mktemp("trust")
    tiny_registered_model(root, name="trust-chat")
    return root, "trust-chat"


def register_again(root: Path, name: str) -> str:
    """A new version of the same tiny model (each tampering test spoils its own); returns `name/N`."""
    from tasks.core import registry, tracking

    with tracking.stage_run("trust-test"):
        info = registry.log_chat_model("chat", name, root / "ckpt", root / "data/tokenizer/tokenizer.json")
    return f"{name}/{info.registered_model_version}"


def stored_model_dir(ref: str) -> Path:
    """The registered version's files in the artifact store (a local directory for the sqlite store)."""
    from mlflow.tracking import MlflowClient

    name, number = ref.split("/")
    client = MlflowClient()
    model_id = client.get_model_version(name, number).source.rsplit("/", 1)[-1]
    return Path(urllib.parse.urlparse(client.get_logged_model(model_id).artifact_location).path)


# ------------------------------------------------------------------------------------------ export
def test_export_refuses_a_non_empty_directory_it_did_not_write(chat_model, tmp_path, capsys):
    root, name = chat_model
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["export", f"{name}/1", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} is not empty and holds no previous export" in err and "--force" in err
    assert files(out) == {"notes.txt": b"keep me"}

    assert main(["export", f"{name}/1", str(out), "--force"]) == 0  # the user said so
    assert (out / "model.safetensors").is_file() and (out / ".pipeline-export.json").is_file()
    assert main(["export", f"{name}/1", str(out)]) == 0  # a previous export is replaced without --force

    (out / "notes.txt").write_text("added after the export")
    before = files(out)
    assert main(["export", f"{name}/1", str(out)]) == 2
    assert "notes.txt" in capsys.readouterr().err  # the marker lists what the export wrote; this is not
    assert files(out) == before


def test_export_never_replaces_the_repo_root_its_parents_root_or_home(
    chat_model, tmp_path, monkeypatch, capsys
):
    from flows.registered import ExportError, check_export_dir
    from tasks.core.config import REPO_ROOT

    for protected in (Path("/"), REPO_ROOT, REPO_ROOT.parent):  # checked without exporting anything
        with pytest.raises(ExportError, match="refusing to replace"):
            check_export_dir(protected, force=True)
    _, name = chat_model
    home = tmp_path / "home"
    repo = home / "work" / "repo"
    (repo / "src").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "src" / "code.py").write_text("print('mine')\n")
    (home / ".bashrc").write_text("# mine\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(repo / "src")
    before = files(tmp_path)
    for target in (repo, repo.parent, home, Path("~"), Path(".."), Path(".")):
        assert main(["export", f"{name}/1", str(target), "--force"]) == 2, target
        err = capsys.readouterr().err
        assert "refusing to replace" in err, err
    assert files(tmp_path) == before


# ------------------------------------------------------------------------------- model integrity
def tamper(model_dir: Path, what: str, marker: Path) -> str:
    """Change one thing in a stored model; returns the name the refusal must mention."""
    run_marker = f"\nimport os\nos.mkdir({str(marker)!r})\n"
    if what == "serving code":
        with open(model_dir / "pyfunc.py", "a") as fh:
            fh.write(run_marker)
        return "pyfunc.py"
    if what == "code module":
        with open(model_dir / "code/models/checkpoint.py", "a") as fh:
            fh.write(run_marker)
        return "code/models/checkpoint.py"
    if what == "extra code file":
        (model_dir / "code/models/sitecustomize.py").write_text(run_marker)
        return "code/models/sitecustomize.py"
    if what == "weights":
        weights = next((model_dir / "artifacts").rglob("model.safetensors"))
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF  # one flipped byte in the last tensor
        weights.write_bytes(bytes(data))
        return str(weights.relative_to(model_dir))
    if what == "tokenizer":
        tok = model_dir / "artifacts/tokenizer.json"
        spec = json.loads(tok.read_text())
        spec["model"]["vocab"]["zz-forged"] = 0
        tok.write_text(json.dumps(spec))
        return "artifacts/tokenizer.json"
    if what == "weights and manifest":  # the manifest rewritten to match: its own recorded hash differs
        from tasks.core.manifest import MANIFEST, sha256_file

        weights_rel = tamper(model_dir, "weights", marker)
        manifest = json.loads((model_dir / MANIFEST).read_text())
        manifest["files"][weights_rel] = sha256_file(model_dir / weights_rel)
        (model_dir / MANIFEST).write_text(json.dumps(manifest))
        return "manifest.json"
    raise AssertionError(what)


CASES = ["serving code", "code module", "extra code file", "weights", "tokenizer", "weights and manifest"]


@pytest.mark.parametrize("what", CASES)
def test_a_tampered_model_is_refused_by_chat_export_and_pyfunc_load(chat_model, tmp_path, capsys, what):
    import mlflow

    root, name = chat_model
    ref = register_again(root, name)
    assert main(["export", ref, str(tmp_path / "ok")]) == 0  # the untampered version loads
    marker = tmp_path / "forged-code-ran"
    named = tamper(stored_model_dir(ref), what, marker)
    capsys.readouterr()
    for argv in (["export", ref, str(tmp_path / "hf")], ["chat", ref]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "was changed after registration" in err and named in err, err
    assert not (tmp_path / "hf").exists()
    if what != "serving code":  # pyfunc.py is the loader itself: only a check before loading can catch it
        with pytest.raises(ManifestError, match=named.replace(".", r"\.")):
            mlflow.pyfunc.load_model(f"models:/{ref}")
    assert not marker.exists(), "the forged code ran"


@pytest.mark.parametrize("tag", ["sha256.code", "sha256.weights", "sha256.tokenizer", "manifest.sha256"])
def test_an_edited_integrity_tag_is_refused(chat_model, tmp_path, capsys, tag):
    from mlflow.tracking import MlflowClient

    root, name = chat_model
    ref = register_again(root, name)
    MlflowClient().set_model_version_tag(name, ref.split("/")[1], tag, "0" * 64)
    assert main(["export", ref, str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"tag {tag}" in err and "was changed after registration" in err, err
    assert not (tmp_path / "hf").exists()


def test_bytecode_in_the_store_is_neither_refused_nor_run(chat_model, tmp_path, monkeypatch, capsys):
    """Loading a version in place with byte-code on (MLflow loads a local store's files where they are)
    writes __pycache__/pyfunc.*.pyc into the store: chat and export must still load the version (CI
    failed on this), and a forged .pyc there, stamped to match pyfunc.py, must never run."""
    import importlib.util
    import sys
    from importlib._bootstrap_external import _code_to_timestamp_pyc  # type: ignore[attr-defined]

    import mlflow

    root, name = chat_model
    ref = register_again(root, name)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    mlflow.pyfunc.load_model(f"models:/{ref}")  # as a user's notebook or `mlflow models serve` would
    store = stored_model_dir(ref)
    pyc = Path(importlib.util.cache_from_source(str(store / "pyfunc.py")))
    assert pyc.is_file(), "the in-place load wrote no byte-code: this test shows nothing"
    assert main(["export", ref, str(tmp_path / "hf")]) == 0, capsys.readouterr().err

    marker = tmp_path / "forged-bytecode-ran"
    source = store / "pyfunc.py"
    forged = compile(f"import os\nos.mkdir({str(marker)!r})\n", str(source), "exec")
    stat = source.stat()  # the header Python checks before it trusts a .pyc: source mtime and size
    pyc.write_bytes(_code_to_timestamp_pyc(forged, int(stat.st_mtime), stat.st_size))
    assert main(["export", ref, str(tmp_path / "hf2")]) == 0, capsys.readouterr().err
    assert not marker.exists(), "the forged byte-code ran"


# ------------------------------------------------------------------------------------------ replay
@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """A git repo whose committed sft checkpoint is registered by the register stage's own functions,
    plus a commit on another branch (not in the history of HEAD). No DVC: every refusal comes first."""
    from tasks import register
    from tasks.core import tracking
    from tasks.core.config import dump_params, load_params, resolve_params
    from tests.test_serving import tiny_checkpoint

    repo = tmp_path_factory.mktemp("replay") / "repo"
    repo.mkdir()
    (repo / "data/checkpoints").mkdir(parents=True)
    tiny_checkpoint(repo).rename(repo / "data/checkpoints/sft")
    dump_params(resolve_params("tiny", ["register.model_prefix=trust"]), repo / "params.yaml")
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    for cmd in (["add", "-A"], ["commit", "-qm", "registered"]):
        subprocess.run([*GIT, *cmd], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
    for cmd in (
        ["checkout", "-qb", "other"],
        ["commit", "-q", "--allow-empty", "-m", "x"],
        ["checkout", "-q", "main"],
    ):
        subprocess.run([*GIT, *cmd], cwd=repo, check=True)
    other = subprocess.run(["git", "rev-parse", "other"], cwd=repo, capture_output=True, text=True).stdout
    cwd = Path.cwd()
    os.chdir(repo)
    try:
        params = load_params(Path("params.yaml"))
        with tracking.stage_run("register", params) as tracker:
            sha = tracker.log_params_file(Path("params.yaml"), register.PARAMS_ARTIFACT)
            register.register_one("sft", params, tracker, sha)
    finally:
        os.chdir(cwd)
    return {
        "repo": repo,
        "ref": "trust-sft/1",
        "head": head.strip(),
        "other": other.strip(),
        "run": tracker.run_id,
    }


def worktrees(repo: Path) -> list[str]:
    out = subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True, text=True).stdout
    return out.strip().splitlines()


def test_replay_checks_the_lineage_and_prints_its_plan_before_running(lineage, monkeypatch, capsys):
    from flows.registered import verify_lineage
    from tasks.core import registry

    repo = lineage["repo"]
    plan = verify_lineage(registry.resolve_version(lineage["ref"]), repo, "HEAD", repo.parent / "check")
    assert plan.commit == lineage["head"] and plan.stage == "sft"
    assert plan.params_file.read_bytes() == (repo / "params.yaml").read_bytes()
    with pytest.raises(ReplayError, match="is not in the history of HEAD"):  # another trusted ref: its own
        verify_lineage(version_with(lineage, "git.commit", lineage["other"]), repo, "HEAD", repo.parent / "x")
    assert (
        verify_lineage(
            version_with(lineage, "git.commit", lineage["other"]), repo, "other", repo.parent / "y"
        ).commit
        == lineage["other"]
    )

    monkeypatch.chdir(repo)
    assert main(["replay", lineage["ref"]]) == 2  # no DVC in this repo: `dvc repro` fails, after the plan
    out = capsys.readouterr().out
    plan_at = out.index(f"will run, in a worktree of {lineage['head']}")
    assert plan_at < out.index("+ git worktree add --detach -- ") < out.rindex("dvc repro sft")
    assert len(worktrees(repo)) == 1


def version_with(lineage: dict, tag: str, value: str):
    """The registered version as MLflow returns it, with one tag replaced in memory only."""
    from tasks.core import registry

    version = registry.resolve_version(lineage["ref"])
    version.tags[tag] = value
    return version


def other_run_artifact(lineage: dict) -> str:
    """A params.yaml with its own stored hash, in another run: consistent in itself, not the register run."""
    from tasks.core import tracking

    forged = lineage["repo"].parent / "forged-params.yaml"
    forged.write_text((lineage["repo"] / "params.yaml").read_text().replace("seed: 1337", "seed: 1", 1))
    with tracking.stage_run("forger") as tracker:
        tracker.log_params_file(forged, "lineage/params.yaml")
    return f"runs:/{tracker.run_id}/lineage/params.yaml"


FORGED = {  # case: (tag, forged value (or a function of the lineage), the refusal)
    "commit not in the history": ("git.commit", lambda lin: lin["other"], "is not in the history of HEAD"),
    "commit given as an option": ("git.commit", "--output=/tmp/owned", "is not a commit id"),
    "commit that does not exist": ("git.commit", "f" * 40, "is not a commit of"),
    "stage params edited": (
        "params.sft",
        lambda lin: json.dumps({"sft": {"lr": 1.0}}),
        "tag params.sft does not match the sft section",
    ),
    "params hash edited": ("params.sha256", "0" * 64, "tag params.sha256 does not match"),
    "params of another run": ("params.artifact", other_run_artifact, "not an artifact of the register run"),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_a_forged_lineage_tag_is_refused_before_anything_runs(lineage, monkeypatch, capsys, case):
    from mlflow.tracking import MlflowClient

    tag, value, message = FORGED[case]
    value = value(lineage) if callable(value) else value
    client = MlflowClient()
    name, number = lineage["ref"].split("/")
    original = client.get_model_version(name, number).tags[tag]
    client.set_model_version_tag(name, number, tag, value)
    monkeypatch.chdir(lineage["repo"])
    try:
        rc = main(["replay", lineage["ref"]])
    finally:
        client.set_model_version_tag(name, number, tag, original)
    out, err = capsys.readouterr()
    assert rc == 2 and message in err, out + err
    assert "+ git" not in out and len(worktrees(lineage["repo"])) == 1


def test_a_changed_params_artifact_is_refused(lineage, monkeypatch, capsys):
    import mlflow

    stored = Path(urllib.parse.urlparse(mlflow.get_run(lineage["run"]).info.artifact_uri).path)
    params = stored / "lineage/params.yaml"
    original = params.read_text()
    params.write_text(original.replace("seed: 1337", "seed: 7", 1))
    monkeypatch.chdir(lineage["repo"])
    try:
        rc = main(["replay", lineage["ref"]])
    finally:
        params.write_text(original)
    out, err = capsys.readouterr()
    assert rc == 2 and "does not match the sha256 stored with it" in err, out + err
    assert "+ git" not in out and len(worktrees(lineage["repo"])) == 1
