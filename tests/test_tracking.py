"""The tracking module: absolute URIs, parent/child runs, secrets never logged."""

import mlflow
import pytest

from tasks.core import tracking


def test_relative_sqlite_uri_is_refused(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    with pytest.raises(tracking.TrackingError, match="relative"):
        tracking.tracking_uri()


def test_secrets_are_redacted_but_tokenizer_tokens_are_not():
    assert tracking.redact("ingest.pretrain.hf_token", "hf_abc") == "***"
    assert tracking.redact("db.password", "p") == "***"
    assert tracking.redact("tokenizer.bos_token", "<|bos|>") == "<|bos|>"
    assert tracking.redact("evaluate.mmlu_dir", "https://u:pw@host/x") == "https://u:***@host/x"


def test_stage_run_is_a_child_of_the_flow_run(mlflow_store):
    with (
        tracking.flow_run("pipeline", {"pipeline.flow": "test"}) as parent,
        tracking.stage_run("ingest", {"api_token": "s3cret", "n": 3}, profile="tiny") as child,
    ):
        child.log_metrics({"rows": 5.0}, step=1)
    run = mlflow.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.tags["pipeline.stage"] == "ingest" and run.data.tags["pipeline.profile"] == "tiny"
    assert run.data.params == {"api_token": "***", "n": "3"}
    assert run.data.metrics["rows"] == 5.0
