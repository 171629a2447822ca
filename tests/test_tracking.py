"""The tracking module: absolute URIs, parent/child runs, secrets never printed, logged or stored."""

import mlflow
import pytest

from tasks.core import tracking


def test_relative_sqlite_uri_is_refused(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    with pytest.raises(tracking.TrackingError, match="relative"):
        tracking.tracking_uri()


REDACTION = [  # (key, value, what is printed, logged or stored)
    ("ingest.pretrain.hf_token", "hf_abc", "***"),
    ("db.password", "p", "***"),
    ("storage.access_key", "AKIAXXXX", "***"),
    ("aws_secret_access_key", "x/y+z", "***"),
    ("ssh.private_key", "-----BEGIN KEY-----", "***"),
    ("service.api_key", "k1", "***"),
    ("client.apiKey", "k2", "***"),
    ("gcp.credentials", '{"type": "service_account"}', "***"),
    ("proxy.auth", "basic abc", "***"),
    ("tokenizer.bos_token", "<|bos|>", "<|bos|>"),  # vocabulary, not a credential
    ("tokenizer.role_tokens", "['<|system|>']", "['<|system|>']"),
    ("evaluate.max_new_tokens", "32", "32"),
    ("author", "Ann", "Ann"),
    ("evaluate.mmlu_dir", "https://u:pw@host/x", "https://u:***@host/x"),
    ("uri", "https://u:pa/ss@host/x", "https://u:***@host/x"),  # a / in the password
    ("uri", "https://u:p@ss@host/x", "https://u:***@host/x"),  # an @ in the password
    ("uri", "postgresql://user:p%40ss@db:5432/mlflow", "postgresql://user:***@db:5432/mlflow"),
    ("uri", "https://ghp_abc123@github.com/o/r.git", "https://***@github.com/o/r.git"),  # a token as user
    ("uri", "https://host/data?token=abc&split=train", "https://host/data?token=***&split=train"),
    (
        "uri",
        "s3://b/k?X-Amz-Credential=AK%2F1&X-Amz-Signature=abc&X-Amz-Security-Token=t&n=1",
        "s3://b/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***&n=1",
    ),
    (
        "uri",
        "https://acct.blob.core.windows.net/c/x?sv=2022&sig=abc",
        "https://acct.blob.core.windows.net/c/x?sv=2022&sig=***",
    ),
    ("uri", "https://host/cb#access_token=xyz&state=1", "https://host/cb#access_token=***&state=1"),
    (
        "uri",
        "http://127.0.0.1:5000/#/experiments/1/runs/abc",
        "http://127.0.0.1:5000/#/experiments/1/runs/abc",
    ),
    ("uri", "http://host:8080/pkg/@scope/x", "http://host:8080/pkg/@scope/x"),
    ("uri", "https://u:1234/5@h/x", "https://u:***@h/x"),  # digits and a / in the password: not a port
    ("uri", "postgresql://u:12/34/5@db:5432/m?x=a@b", "postgresql://u:***@db:5432/m?x=a@b"),
    ("uri", "http://localhost:5173/@vite/client", "http://localhost:5173/@vite/client"),  # a path
    ("uri", "sqlite:////tmp/x/mlflow.db", "sqlite:////tmp/x/mlflow.db"),
    ("ref", "models:/pipeline-sft@champion", "models:/pipeline-sft@champion"),
    (
        "overrides",
        "ingest.pretrain.hf_token=abc ingest.sft.path=https://a:b@h/x evaluate.max_new_tokens=3",
        "ingest.pretrain.hf_token=*** ingest.sft.path=https://a:***@h/x evaluate.max_new_tokens=3",
    ),
    (
        "",
        "MLflow tracking server http://u:s3cr/et@10.0.0.1:5000 is not reachable (refused)",
        "MLflow tracking server http://u:***@10.0.0.1:5000 is not reachable (refused)",
    ),
]


@pytest.mark.parametrize("key, value, shown", REDACTION, ids=[f"{k}={v[:40]}" for k, v, _ in REDACTION])
def test_secrets_are_redacted_and_nothing_else(key, value, shown):
    assert tracking.redact(key, value) == shown


def test_params_file_is_stored_redacted_with_its_sha256(mlflow_store, tmp_path):
    import hashlib

    import yaml

    params = {
        "ingest": {"pretrain": {"path": "https://u:s3cr/et@h/x.parquet", "hf_token": "hf_secret"}},
        "tokenizer": {"bos_token": "<|bos|>"},
        "seed": 3,
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with tracking.stage_run("register") as run:
        sha = run.log_params_file(tmp_path / "params.yaml", "lineage/params.yaml")
    stored = tracking.download_run_artifact(run.run_id, "lineage", tmp_path / "got")
    raw = (stored / "params.yaml").read_bytes()
    assert b"s3cr" not in raw and b"hf_secret" not in raw
    assert yaml.safe_load(raw) == {
        "ingest": {"pretrain": {"path": "https://u:***@h/x.parquet", "hf_token": "***"}},
        "tokenizer": {"bos_token": "<|bos|>"},
        "seed": 3,
    }
    assert sha == hashlib.sha256(raw).hexdigest() == (stored / "params.yaml.sha256").read_text().strip()


def test_summary_artifact_and_cli_errors_carry_no_secrets(monkeypatch, tmp_path, capsys):
    from flows.cli import main
    from flows.deploy import free_port
    from flows.pipeline import summary_markdown

    port = free_port()  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:s3cr/et@127.0.0.1:{port}")
    text = summary_markdown(
        tmp_path,
        "tiny",
        {"ingest": "failed"},
        {"ingest": 1.0},
        "run1",
        "0",
        error="stage `ingest`: cannot read https://ghp_tok@github.com/x?token=abc",
    )
    assert "s3cr" not in text and "ghp_tok" not in text and "token=abc" not in text
    assert f"http://user:***@127.0.0.1:{port}/#/experiments/0/runs/run1" in text
    monkeypatch.chdir(tmp_path)
    for password in ("s3cr/et", "s3cret"):  # a / makes the URI unparseable for urllib: still no traceback
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:{password}@127.0.0.1:{port}")
        assert main(["run", "--profile", "tiny"]) == 2
        err = capsys.readouterr().err
        assert "is not reachable" in err and f"http://user:***@127.0.0.1:{port}" in err
        assert password not in err


def test_stage_run_is_a_child_of_the_flow_run(mlflow_store):
    with (
        tracking.flow_run("pipeline", {"pipeline.flow": "test"}) as parent,
        tracking.stage_run(
            "ingest", {"api_token": "s3cret", "n": 3, "src": "https://u:pw@h/x?token=t"}, profile="tiny"
        ) as child,
    ):
        child.log_metrics({"rows": 5.0}, step=1)
    run = mlflow.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.tags["pipeline.stage"] == "ingest" and run.data.tags["pipeline.profile"] == "tiny"
    assert run.data.params == {"api_token": "***", "n": "3", "src": "https://u:***@h/x?token=***"}
    assert run.data.metrics["rows"] == 5.0
