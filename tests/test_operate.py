"""Operating the pipeline with real servers on loopback.

One module-scoped setup: `pipeline ui` starts a real Prefect server and a real MLflow server (free ports,
temp PREFECT_HOME, temp sqlite store and artifact dir); `pipeline deploy` serves the flow as a
deployment; the tiny pipeline runs through it twice: first with the register stage broken (it fails,
is retried, the flow run fails), then fixed (upstream stages are skipped, register runs). Every test
below reads what those runs left: Prefect flow/task runs and the markdown artifact, MLflow parent/child
runs, registered versions with lineage and aliases; then serving, chat through a pseudo-terminal,
export, replay, and bad input. No test changes what another reads (the champion gate is tested on its own
store in test_register.py; the shutdown test stops a `pipeline ui` of its own), so any order passes.
"""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flows.deploy import free_port
from tasks.core import stages
from tests.helpers.project import make_project

REPO = Path(__file__).resolve().parents[1]
# Every stage but register: the gating test makes register fail, so these are the ones that complete.
STAGES = [s for s in stages.STAGES if s != "register"]
MODELS = stages.models()
DEPLOYMENT = "llm-pipeline/test"
CRON = "0 3 1 1 *"

pytestmark = pytest.mark.e2e


class Lines:
    """A subprocess's merged output, read by a thread, so a test can wait for a line without blocking."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines, self.queue = proc, [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self.queue.put(line)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self.queue.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if text in line:
                return line
        raise AssertionError(f"{text!r} not seen in {timeout}s; output:\n{''.join(self.lines)[-4000:]}")


def spawn(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The project in a temp git+DVC repo, tiny params, committed (what lineage tags point at)."""
    return make_project(tmp_path_factory.mktemp("operate") / "project")


def start_ui(cwd: Path, tmp: Path, **extra_env: str) -> dict:
    """`pipeline ui` in cwd on two free loopback ports, its stores under tmp; returns once it is ready."""
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PREFECT_HOME=str(tmp / "prefect-home"),
        PYTHONUNBUFFERED="1",
        **extra_env,
    )
    env.pop("PREFECT_API_URL", None)
    ports = {"prefect": free_port(), "mlflow": free_port()}
    proc = spawn(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "ui",
            "--prefect-port",
            str(ports["prefect"]),
            "--mlflow-port",
            str(ports["mlflow"]),
            "--mlflow-store",
            f"sqlite:///{tmp / 'mlflow.db'}",
            "--artifacts",
            str(tmp / "artifacts"),
        ],
        cwd,
        env,
    )
    out = Lines(proc)
    try:
        out.wait_for("ready", timeout=300)
    except AssertionError:
        stop(proc)
        raise
    state = json.loads((cwd / ".pipeline/ui.json").read_text())
    return {"proc": proc, "out": out, "ports": ports, "state": state, "env": env}


@pytest.fixture(scope="module")
def ui(project, tmp_path_factory):
    """`pipeline ui` for the module, stopped after its last test."""
    servers = start_ui(project, tmp_path_factory.mktemp("servers"))
    yield servers
    stop(servers["proc"])


@pytest.fixture(scope="module")
def env(project, ui) -> dict[str, str]:
    """The environment of `pipeline` commands pointed at the servers (as a user's shell would be)."""
    state = ui["state"]
    return dict(
        ui["env"],
        PREFECT_API_URL=state["prefect_api_url"],
        MLFLOW_TRACKING_URI=state["mlflow_tracking_uri"],
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        PREFECT_LOGGING_LEVEL="INFO",
    )


@pytest.fixture(scope="module")
def clients(env):
    """Prefect (sync) and MLflow clients of the servers, for this module only."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        with (
            temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}),
            get_client(sync_client=True) as pc,
        ):
            yield pc, MlflowClient()


@pytest.fixture(scope="module")
def deployment(project, env, clients):
    """`pipeline deploy --cron ...`: creates the deployment and serves its runs in this working tree."""
    prefect, _ = clients
    proc = spawn(
        [sys.executable, "-m", "flows.cli", "deploy", "--profile", "tiny", "--name", "test", "--cron", CRON],
        project,
        env,
    )
    out = Lines(proc)
    deadline = time.time() + 180
    while True:
        try:
            dep = prefect.read_deployment_by_name(DEPLOYMENT)
            break
        except Exception:
            assert proc.poll() is None and time.time() < deadline, "".join(out.lines)[-4000:]
            time.sleep(1)
    yield dep
    stop(proc)  # Ctrl-C: it pauses its schedule via the API, so before the servers stop


@pytest.fixture(scope="module")
def runs(project, clients, deployment):
    """Run 1: register broken (fails, retried once with backoff, flow run fails). Run 2: fixed, resumes."""
    from prefect.deployments import run_deployment

    register = project / "tasks/register.py"
    original = register.read_text()
    broken = original.replace('stage_main("register", run)', 'raise SystemExit("injected failure")')
    assert broken != original
    params = {"profile": "tiny", "retries": 1, "retry_delay_seconds": 0.5}
    register.write_text(broken)
    try:
        first = run_deployment(DEPLOYMENT, parameters=params, timeout=900, poll_interval=2)
    finally:
        register.write_text(original)
    second = run_deployment(DEPLOYMENT, parameters=params, timeout=900, poll_interval=2)
    return first, second


def task_runs(prefect, flow_run) -> dict:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    return {t.name: t for t in runs}


def summary_artifact(prefect, flow_run) -> str:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    arts = prefect.read_artifacts(
        artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["pipeline-summary"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]),
        )
    )
    assert len(arts) == 1
    return arts[0].data


# ------------------------------------------------------------------------------------------- tests
def test_ui_prints_urls_and_binds_loopback(ui):
    ports = ui["ports"]
    text = "".join(ui["out"].lines)
    assert f"Prefect UI: http://127.0.0.1:{ports['prefect']}" in text
    assert f"MLflow UI:  http://127.0.0.1:{ports['mlflow']}" in text
    assert f"export PREFECT_API_URL=http://127.0.0.1:{ports['prefect']}/api" in text
    assert answers(f"http://127.0.0.1:{ports['prefect']}/api/health")
    assert answers(f"http://127.0.0.1:{ports['mlflow']}/health")
    assert ui["state"]["mlflow_tracking_uri"] == f"http://127.0.0.1:{ports['mlflow']}"


def test_deployment_has_typed_parameters_and_schedule(deployment):
    schema = deployment.parameter_openapi_schema
    props = schema["properties"]
    assert {"profile", "overrides", "stages", "force", "retries", "retry_delay_seconds"} <= set(props)
    assert props["force"]["type"] == "boolean"
    assert props["retries"]["minimum"] == 0 and props["retries"]["type"] == "integer"
    assert deployment.enforce_parameter_schema
    assert deployment.parameters["profile"] == "tiny"
    assert [s.schedule.cron for s in deployment.schedules] == [CRON]


def test_bad_deployment_parameter_is_refused(clients, deployment):
    from prefect.exceptions import PrefectHTTPStatusError

    prefect, _ = clients
    for bad in ({"retries": -1}, {"overrides": ["no-equals-sign"]}, {"force": "sometimes"}):
        with pytest.raises(PrefectHTTPStatusError, match="(?i)validation") as info:
            prefect.create_flow_run_from_deployment(deployment.id, parameters=bad)
        assert list(bad)[0] in str(info.value)
        print(info.value)


def test_failed_stage_is_retried_then_rerun_resumes_from_it(runs, clients):
    prefect, _ = clients
    first, second = runs
    assert first.state.is_failed(), first.state
    tasks = task_runs(prefect, first)
    assert set(tasks) == {*STAGES, "register"}
    assert all(tasks[s].state.is_completed() for s in STAGES)
    assert tasks["register"].state.is_failed() and tasks["register"].run_count == 2  # 1 retry
    assert "**Failed:** stage `register`" in summary_artifact(prefect, first)

    assert second.state.is_completed(), second.state
    results = prefect.read_flow_run(second.id).state
    tasks = task_runs(prefect, second)
    assert set(tasks) == {*STAGES, "register"} and all(t.state.is_completed() for t in tasks.values())
    assert results.is_completed()
    summary = summary_artifact(prefect, second)
    for stage in STAGES:
        assert f"| {stage} | skipped |" in summary
    assert "| register | ran |" in summary


def test_summary_artifact_has_metrics_and_links(runs, clients, env):
    prefect, mlflow_client = clients
    summary = summary_artifact(prefect, runs[1])
    assert "## Key metrics" in summary and "| pretrain |" in summary
    assert f"]({env['MLFLOW_TRACKING_URI']}/#/experiments/" in summary
    assert f"[pipeline-sft v1]({env['MLFLOW_TRACKING_URI']}/#/models/pipeline-sft/versions/1)" in summary


def test_mlflow_parent_and_child_runs(runs, clients):
    _, client = clients
    exp = client.get_experiment_by_name("llm-pipeline")
    all_runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = sorted(
        (r for r in all_runs if r.data.tags.get("pipeline.flow") == "prefect"),
        key=lambda r: r.info.start_time,
    )
    assert [p.info.status for p in parents] == ["FAILED", "FINISHED"]

    def children(parent):
        kids = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        return sorted(r.data.tags["pipeline.stage"] for r in kids)

    assert children(parents[0]) == sorted(STAGES)  # register failed before opening a run
    assert children(parents[1]) == ["register"]  # the rest was skipped by DVC: no new runs


def test_registered_versions_carry_lineage_and_aliases(runs, clients, project):
    _, client = clients
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout
    for model in MODELS:
        name = f"pipeline-{model}"
        version = client.get_model_version_by_alias(name, "champion")
        assert version.version == "1"
        assert client.get_model_version_by_alias(name, "candidate").version == "1"
        tags = version.tags
        assert tags["git.commit"] == head.strip() and tags["git.dirty"] == "false"
        assert len(tags["weights_sha256"]) == 64 and tags["tokenizer_fingerprint"]
        assert tags["params.artifact"].endswith("/lineage/params.yaml") and tags["params.sha256"]
        assert any(k.startswith("dvc.deps.data/") for k in tags) and any(
            k.startswith("params.") for k in tags
        )
        assert tags["champion.decision"].startswith("promoted: no champion yet")
    assert "mmlu/acc" in json.dumps(client.get_model_version("pipeline-sft", "1").tags)


def test_mlflow_models_serve_answers_chat_over_http(runs, project, env):
    port = free_port()
    proc = spawn(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/pipeline-sft@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        project,
        env,
    )
    out = Lines(proc)
    try:
        deadline = time.time() + 180
        while not answers(f"http://127.0.0.1:{port}/ping"):
            assert proc.poll() is None and time.time() < deadline, "".join(out.lines)[-4000:]
            time.sleep(0.5)

        def invoke(body: dict) -> tuple[int, dict]:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        messages = [{"role": "user", "content": "What does json.dumps do?"}]
        status, answer = invoke({"inputs": [{"messages": messages}], "params": {"max_new_tokens": 16}})
        assert status == 200, answer
        assert isinstance(answer["predictions"][0], str) and answer["predictions"][0].strip()
        status, refused = invoke({"inputs": [{"messages": messages}], "params": {"max_new_tokens": 100000}})
        assert status >= 400 and "max_new_tokens" in json.dumps(refused)
    finally:
        stop(proc, signal.SIGTERM)


def test_chat_streams_in_a_pseudo_terminal(runs, project, env, clients):
    from tasks.core import registry

    model, _ = registry.load_registered("pipeline-sft@champion")
    question = "What does json.dumps do?"
    params = {"max_new_tokens": 24, "temperature": 0.0}
    expected = model.predict(None, {"messages": [{"role": "user", "content": question}]}, params)[0]

    master, slave = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "chat", "pipeline-sft@champion", "--max-new-tokens", "24"],
        cwd=project,
        env=env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, count: int, timeout: float = 120) -> None:
        nonlocal seen
        deadline = time.time() + timeout
        while seen.count(marker) < count:
            assert time.time() < deadline, seen.decode(errors="replace")
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break

    try:
        read_until(b"you> ", 1)
        assert b"chatting with pipeline-sft v1" in seen
        os.write(master, question.encode() + b"\n")
        read_until(b"you> ", 2)
        os.write(master, b"\x04")  # Ctrl-D on an empty line: EOF
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = seen.decode().replace("\r\n", "\n")
    reply = text.split("bot> ", 1)[1].rsplit("\nyou> ", 1)[0]
    assert reply == expected  # streamed piece by piece, the same text as the served model's greedy answer


def test_export_writes_a_hf_checkpoint_with_the_registered_weights(runs, clients, tmp_path):
    from flows.cli import main
    from models.checkpoint import state_dict_hash
    from models.hf import import_hf

    _, client = clients
    out = tmp_path / "hf"
    assert main(["export", "pipeline-sft@champion", str(out)]) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    registered = client.get_model_version_by_alias("pipeline-sft", "champion").tags["weights_sha256"]
    assert state_dict_hash(import_hf(out)) == registered


def test_replay_reproduces_the_registered_weights(runs, project, env):
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "replay", "pipeline-base@champion"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    plan = proc.stdout.index("will run, in a worktree of")  # the verified plan, printed before it runs
    assert plan < proc.stdout.index("+ git worktree add --detach -- ")
    assert "replay: weights match the registered version" in proc.stdout
    report = json.loads(proc.stdout[proc.stdout.index("\n{\n") : proc.stdout.rindex("\n}") + 2])
    assert report["weights_match"] and report["inputs_differ"] == []
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=project, capture_output=True, text=True)
    assert len(worktrees.stdout.strip().splitlines()) == 1  # the temporary worktree is gone


def test_unknown_model_name_and_alias_are_clear_errors(runs, clients, tmp_path, capsys):
    from flows.cli import main

    assert main(["export", "no-such-model@champion", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no registered model named 'no-such-model'" in err and "pipeline-sft" in err
    assert main(["chat", "pipeline-sft@no-such-alias"]) == 2
    err = capsys.readouterr().err
    assert "has no alias 'no-such-alias'" in err and "champion (v1)" in err
    assert not (tmp_path / "x").exists()


def test_unreachable_tracking_server_fails_before_training(tmp_path):
    port = free_port()  # nothing listens there
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    env.pop("PREFECT_API_URL", None)
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--profile", "tiny"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"MLflow tracking server http://127.0.0.1:{port} is not reachable" in proc.stderr
    assert time.time() - start < 60
    assert not (tmp_path / "params.yaml").exists() and not (tmp_path / "data").exists()


def test_ui_stops_both_servers_on_sigint(tmp_path):
    """Ctrl-C on `pipeline ui` (one of its own: the module's servers stay up for the other tests)."""
    ui = start_ui(tmp_path, tmp_path, PYTHONPATH=str(REPO))
    proc, ports = ui["proc"], ui["ports"]
    assert (tmp_path / ".pipeline/ui.json").is_file()
    assert stop(proc, signal.SIGINT, timeout=90) == 0
    assert "both servers stopped" in "".join(ui["out"].lines)
    assert not answers(f"http://127.0.0.1:{ports['prefect']}/api/health")
    assert not answers(f"http://127.0.0.1:{ports['mlflow']}/health")
    assert not (tmp_path / ".pipeline/ui.json").exists()


def test_replay_that_does_not_reproduce_exits_1_and_keep_leaves_the_worktree(
    runs, project, env, clients, tmp_path
):
    """A version whose recorded weights hash is not what its lineage trains (a copy of pipeline-base v1
    with another weights_sha256): the replay runs, says NOT reproduced, exits 1; --workdir/--keep leave
    its worktree there."""
    _, client = clients
    v1 = client.get_model_version("pipeline-base", "1")
    name = "replaycheck-base"  # replay finds the checkpoint by the name's last part: base
    client.create_registered_model(name)
    model_id = v1.model_id or v1.source.rsplit("/", 1)[-1]
    copy = client.create_model_version(name, v1.source, run_id=v1.run_id, model_id=model_id)
    for key, value in {**v1.tags, "weights_sha256": "0" * 64}.items():
        client.set_model_version_tag(name, str(copy.version), key, value)
    workdir = tmp_path / "replays"
    workdir.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "replay",
            f"{name}/{copy.version}",
            "--workdir",
            str(workdir),
            "--keep",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "replay: NOT reproduced (weights or inputs differ from the registered version)" in proc.stdout
    report = json.loads(proc.stdout[proc.stdout.index("\n{\n") : proc.stdout.rindex("\n}") + 2])
    assert report["weights_sha256"]["registered"] == "0" * 64
    assert report["weights_sha256"]["replayed"] == v1.tags["weights_sha256"]  # it did reproduce v1
    (kept,) = workdir.glob("pipeline-replay-*/worktree")
    assert f"kept the worktree at {kept}" in proc.stdout and (kept / "data/checkpoints/base").is_dir()
    subprocess.run(["git", "worktree", "remove", "--force", str(kept)], cwd=project, check=True)
