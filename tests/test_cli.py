"""The `pipeline` command line as a person meets it (subprocesses, as a shell runs them).

Every subcommand and option has help; `--version` names the package and the tools; everyday commands
print no library warnings; a failed stage ends `pipeline run` with one paragraph (stage, cause, log,
how to resume), exit code 1 and no traceback; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from flows.cli import COMMANDS, build_parser
from tests.helpers.project import make_project

REPO = Path(__file__).resolve().parents[1]


def pipeline(*args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        PYTHONUNBUFFERED="1",
    )
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("cli") / "project")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_subcommand_and_option_has_help():
    parser = build_parser()
    commands = subcommands(parser)
    assert set(commands) == set(COMMANDS) and len(commands) == 8
    top = pipeline("--help")
    assert top.returncode == 0, top.stderr
    for name, sub in commands.items():
        assert f"    {name} " in top.stdout and COMMANDS[name][0][:40] in " ".join(top.stdout.split())
        missing = [
            a.dest
            for a in sub._actions
            if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()
        ]
        assert not missing, f"pipeline {name}: no help for {missing}"
        shown = pipeline(name, "--help")
        assert shown.returncode == 0 and shown.stderr == "", shown.stderr
        for action in sub._actions:
            for flag in action.option_strings:
                assert flag in shown.stdout, (name, flag)
    assert all(a.help for a in parser._actions if a.option_strings)


def test_version_names_the_package_and_its_tools():
    proc = pipeline("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"pipeline {version('llm-pipeline')} (prefect {version('prefect')}, "
        f"mlflow {version('mlflow')}, dvc {version('dvc')})"
    )


def test_everyday_commands_print_no_warnings(project):
    for args in (("stages",), ("params", "--profile", "tiny")):
        proc = pipeline(*args, cwd=project)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == "", f"pipeline {' '.join(args)} printed on stderr:\n{proc.stderr}"
    assert "pretrain   <- encode" in pipeline("stages", cwd=project).stdout


def test_export_prints_only_what_it_did(tmp_path):
    """No library warning (MLflow's red type-hint warning at model load) on a normal export."""
    from tests.test_serving import tiny_registered_model

    uri = tiny_registered_model(tmp_path, name="cli-export")
    ref = uri.removeprefix("models:/")
    proc = pipeline("export", ref, str(tmp_path / "hf"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"pipeline export printed on stderr:\n{proc.stderr}"
    assert proc.stdout.strip() == f"exported cli-export v{ref.split('/')[1]} ({ref}) to {tmp_path / 'hf'}"
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_a_bad_model_reference_is_one_line_and_debug_adds_the_traceback(project, tmp_path):
    plain = pipeline("export", "pipeline-nosuch@champion", str(tmp_path / "out"), cwd=project)
    assert plain.returncode == 2
    assert "Traceback" not in plain.stderr and "pipeline-nosuch" in plain.stderr, plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1, plain.stderr
    debug = pipeline("--debug", "export", "pipeline-nosuch@champion", str(tmp_path / "out"), cwd=project)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr, debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()


@pytest.mark.e2e
def test_a_failed_stage_ends_with_one_paragraph_and_no_traceback(project):
    ingest = project / "tasks" / "ingest.py"
    original = ingest.read_text()
    marker = 'stage_main("ingest", run)'
    assert marker in original
    broken = original.replace(
        marker,
        "from tasks.core.stage import StageError\n\n    def broken(params, tracker):\n"
        '        raise StageError("injected: data/source.txt is unreadable")\n\n'
        '    stage_main("ingest", broken)',
    )
    ingest.write_text(broken)
    try:
        proc = pipeline("run", "--profile", "tiny", "--stage", "ingest", "--retries", "0", cwd=project)
    finally:
        ingest.write_text(original)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-4000:]
    last = proc.stderr.strip().split("\n\n")[-1]
    assert last.startswith("pipeline: stage `ingest` failed: injected: data/source.txt is unreadable."), last
    assert "Its log: .pipeline/logs/ingest.log" in last and "run `pipeline run` again" in last, last
    assert "\n" not in last.strip(), "one paragraph"
    log = (project / ".pipeline" / "logs" / "ingest.log").read_text()
    assert "stage ingest failed: injected: data/source.txt is unreadable" in log
