"""`pipeline` commands down the paths users take, beyond help and failed-stage messages (test_cli.py).

`stages` prints dvc.yaml's order with each stage's upstreams; `run --stage` with a stage dvc.yaml lacks is
a config error (exit 2) naming it and the known stages, before params.yaml is written or any stage runs;
`deploy --interval` creates a deployment on that interval and pauses it on Ctrl-C, `--cron` with
`--interval` is refused; `chat` passes its options to the model (greedy reply equal to the model's own
answer, --system starts the conversation, /reset forgets, /exit and Ctrl-D end with 0) and refuses
options out of range or a reward model with exit 2.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import pytest
import torch

from flows.cli import main
from flows.deploy import free_port
from models.checkpoint import load_checkpoint, save_checkpoint
from models.heads import ScalarHeadModel
from models.llama import Transformer
from tasks.core import registry, tracking
from tasks.core.stages import stage_graph, stage_order
from tests.helpers.servers import stop_server
from tests.test_serving import tiny_checkpoint, tiny_registered_model

REPO = Path(__file__).resolve().parents[1]


def test_stages_prints_the_graph_order_with_each_stages_upstreams(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["stages"]) == 0
    lines = [line.split(" <- ") for line in capsys.readouterr().out.splitlines()]
    order, graph = stage_order(REPO / "dvc.yaml"), stage_graph(REPO / "dvc.yaml")
    assert [name.strip() for name, _ in lines] == order
    seen: set[str] = set()
    for name, ups in lines:
        upstream = set() if ups == "(source)" else set(ups.split(", "))
        assert upstream == set(graph[name.strip()]) and upstream <= seen, (name, ups)
        seen.add(name.strip())
    assert lines[0][1] == "(source)"


def test_run_with_an_unknown_stage_is_a_config_error_before_anything_runs(
    prefect_harness, tmp_path, monkeypatch, capsys
):
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--profile", "tiny", "--stage", "ingest", "--stage", "pretrian"]) == 2
    err = capsys.readouterr().err
    assert (
        "config error: unknown stage(s) pretrian; dvc.yaml has " + ", ".join(stage_order(REPO / "dvc.yaml"))
        in err
    )
    assert "Traceback" not in err
    assert not (tmp_path / "params.yaml").exists() and not (tmp_path / "data").exists()


@contextlib.contextmanager
def own_prefect_server(tmp: Path, env: dict[str, str]) -> Iterator[str]:
    """`prefect server start` on a free loopback port with a database of its own; yields its API URL.
    The deploy test's own, so that its deployment and Ctrl-C meet no other test's runs or load."""
    port = free_port()
    server_env = dict(
        env,
        PREFECT_HOME=str(tmp / "prefect-home"),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
    )
    server_env.pop("PREFECT_API_URL", None)
    log = tmp / "prefect-server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-ui",
            ],
            env=server_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        stop_server(server)


def signal_state(pid: int) -> str:
    """The signal lines of /proc/<pid>/status (blocked, ignored, caught): what a Ctrl-C depends on."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "(gone)"
    return " ".join(
        line for line in lines if line.startswith(("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt"))
    )


def test_deploy_with_an_interval_schedules_it_and_pauses_on_ctrl_c(tmp_path):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PYTHONFAULTHANDLER="1",  # a SIGABRT (sent below if it hangs) prints every thread's stack
    )
    with own_prefect_server(tmp_path, env) as api_url:
        env["PREFECT_API_URL"] = api_url
        name = f"interval-{os.getpid()}"
        cmd = [sys.executable, "-m", "flows.cli", "deploy", "--profile", "tiny", "--name", name]
        log = tmp_path / "deploy.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [*cmd, "--interval", "86400"],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Ctrl-C as at a terminal: a suite started in the background (`make test &` from a script)
                # ignores SIGINT, and a child inherits an ignored signal (seen: SigIgn had SIGINT, the
                # deploy never saw the Ctrl-C)
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        try:
            with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as prefect:
                deadline = time.time() + 180
                while True:
                    try:
                        dep = prefect.read_deployment_by_name(f"llm-pipeline/{name}")
                        break
                    except Exception:  # not created yet (ObjectNotFound)
                        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                        time.sleep(1)
                assert [s.schedule.interval for s in dep.schedules] == [timedelta(days=1)]
                # the first run is a day away: deploying starts no training run (Prefect alone anchors at now)
                assert dep.schedules[0].schedule.anchor_date > datetime.now(UTC) + timedelta(hours=23)
                assert dep.parameters == {"profile": "tiny", "overrides": [], "retries": 1}
                assert not dep.paused
                # Ctrl-C once the runner polls (status READY): before that, serve has not installed its handler
                while prefect.read_deployment(dep.id).status.value != "READY":
                    assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                    time.sleep(0.5)
                proc.send_signal(signal.SIGINT)
                try:
                    code = proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    state = signal_state(proc.pid)
                    proc.send_signal(signal.SIGABRT)
                    proc.wait(timeout=30)
                    raise AssertionError(
                        f"pipeline deploy did not stop on Ctrl-C; its signals: {state}\n{log.read_text()[-6000:]}"
                    ) from None
                assert code == 0, log.read_text()[-3000:]
                assert prefect.read_deployment(dep.id).paused  # Ctrl-C pauses it: no runs pile up unserved
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    with pytest.raises(SystemExit) as refused:
        main(["deploy", "--cron", "0 3 * * *", "--interval", "60"])
    assert refused.value.code == 2


# ------------------------------------------------------------------------------------------- chat
@pytest.fixture(scope="module")
def chat_ref(tmp_path_factory) -> str:
    uri = tiny_registered_model(tmp_path_factory.mktemp("cli-chat"), "cli-paths-chat")
    return uri.removeprefix("models:/")


def chat(ref: str, typed: str, *options: str, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    code = main(["chat", ref, *options])
    out = capsys.readouterr()
    return code, out.out, out.err


def replies(out: str) -> list[str]:
    return [part.split("\nyou> ", 1)[0] for part in out.split("bot> ")[1:]]


def test_chat_passes_its_options_and_keeps_or_forgets_the_history(chat_ref, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = mlflow.pyfunc.load_model(f"models:/{chat_ref}")
    params = {"max_new_tokens": 6, "temperature": 0.0}

    def expected(*messages: dict[str, str]) -> str:
        return model.predict([{"messages": list(messages)}], params=params)[0]

    system = {"role": "system", "content": "Answer briefly."}
    q1, q2 = {"role": "user", "content": "What is json?"}, {"role": "user", "content": "And yaml?"}
    code, out, _ = chat(
        chat_ref,
        "What is json?\n\nAnd yaml?\n/reset\nAnd yaml?\n/exit\nnever read\n",
        "--max-new-tokens", "6", "--system", "Answer briefly.",
        monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert code == 0
    first, second, after_reset = replies(out)
    assert first == expected(system, q1)
    assert second == expected(system, q1, {"role": "assistant", "content": first}, q2)
    assert after_reset == expected(system, q2)  # /reset keeps the system message, forgets the rest
    code, out, _ = chat(chat_ref, "", monkeypatch=monkeypatch, capsys=capsys)  # Ctrl-D at once
    assert code == 0 and "chatting with cli-paths-chat v" in out
    # Sampling options reach the model: top-k 1 is greedy at any temperature.
    code, out, _ = chat(
        chat_ref, "What is json?\n", "--max-new-tokens", "6", "--temperature", "2", "--top-k", "1",
        monkeypatch=monkeypatch, capsys=capsys,
    )  # fmt: skip
    assert code == 0 and replies(out) == [expected(q1)]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--temperature", "-1"], "temperature must be a finite number >= 0, got -1.0"),
        (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
        (["--top-k", "-2"], "top_k must be >= 0 (0: off), got -2"),
        (["--max-new-tokens", "0"], "max_new_tokens must be in 1..256, got 0"),
        (["--max-new-tokens", "300"], "max_new_tokens must be in 1..256, got 300"),
    ],
)
def test_chat_options_out_of_range_exit_2_before_the_first_message(
    chat_ref, options, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    code, out, err = chat(chat_ref, "hello\n", *options, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and f"pipeline: {message}" in err, err
    assert "you> " not in out and "Traceback" not in err


def test_chat_refuses_a_reward_model_with_exit_2(tmp_path, monkeypatch, capsys):
    ckpt = tiny_checkpoint(tmp_path)  # a workspace and its tokenizer; the reward model replaces the model
    lm, meta = load_checkpoint(ckpt)
    shutil.rmtree(ckpt)
    torch.manual_seed(0)
    fingerprint = {"tokenizer_fingerprint": meta["tokenizer_fingerprint"]}
    save_checkpoint(ckpt, ScalarHeadModel(Transformer(lm.config)), lm.config, fingerprint)
    with tracking.stage_run("cli-paths"):
        info = registry.log_chat_model(
            "reward", "cli-paths-reward", ckpt, tmp_path / "data/tokenizer/tokenizer.json"
        )
    monkeypatch.chdir(tmp_path)
    ref = f"cli-paths-reward/{info.registered_model_version}"
    code, out, err = chat(ref, "hello\n", monkeypatch=monkeypatch, capsys=capsys)
    assert (
        code == 2 and f"pipeline: {ref} is a reward model: it scores conversations, it does not chat" in err
    )
    assert "you> " not in out
