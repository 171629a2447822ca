"""Test isolation: every session gets its own MLflow store, Prefect home and DVC-free temp dirs."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="pipeline-tests-"))
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_DIR / 'mlflow.db'}"
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["GX_ANALYTICS_ENABLED"] = "false"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Idle OpenMP threads sleep instead of spinning: on 2 shared cores spinning threads starve the stage
# subprocesses (measured: a tiny training step from 4 s to 0.04 s under load). Inherited by subprocesses.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["HF_DATASETS_CACHE"] = str(_SESSION_DIR / "hf-datasets")


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (~10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def data_workspace(tmp_path_factory) -> Path:
    """One full small data run (embedded data -> ingest -> validate -> tokenizer -> encode), made once per
    session and copied per test by `ws`."""
    from tasks import encode, ingest, tokenizer, validate
    from tests.helpers.datahelpers import make_params

    root = tmp_path_factory.mktemp("data-workspace")
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    try:
        params = make_params(tokenizer={"vocab_size": 512})
        ingest.run(params, None)
        validate.run(params, None)
        tokenizer.run(params, None)
        encode.run(params, None)
    finally:
        mp.undo()
    return root


@pytest.fixture
def ws(data_workspace, tmp_path, monkeypatch) -> Path:
    """A private copy of the session's data workspace, as the working directory."""
    shutil.copytree(data_workspace / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def bpe(tmp_path_factory):
    """A byte-level BPE tokenizer (vocab 1000) trained on the vendored MMLU dev text."""
    from tests.helpers.evalhelpers import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", 1000)


def _seed_line(config: pytest.Config) -> str | None:
    """pytest-randomly shuffles modules, then the tests in each (module fixtures are still built once);
    its seed reproduces the order. `-q` (our addopts) hides the report header, so it is printed here."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is None or not config.getoption("randomly_reorganize"):
        return None
    return f"Using --randomly-seed={seed} (the same order again: pytest --randomly-seed={seed})"


def pytest_sessionstart(session: pytest.Session) -> None:
    line = _seed_line(session.config)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if line and reporter is not None:
        reporter.write_line(line)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    line = _seed_line(config)
    if line:
        terminalreporter.write_line(line)
