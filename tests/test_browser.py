"""What a person sees after a run: the files it leaves to look at, and in a browser the Prefect UI and
the MLflow UI of `pipeline ui`.

One tiny pipeline run for the module, as a user makes it (`pipeline run --profile tiny` with no Prefect
or MLflow server: the history lands in the project's .prefect/ and mlflow.db), one `pipeline deploy`
(stopped once it serves: the deployment stays), then `pipeline ui` on free ports. Headless Chromium
(the system's /usr/bin/chromium, driven by Playwright) opens the pages; each browser test saves a
screenshot under $PYTEST_ARTIFACTS/browser (default tests/artifacts/browser) of what its assertions claim.
Without Chromium the browser tests are skipped and the file checks still run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flows.deploy import free_port
from tasks.core import stages
from tests.helpers.project import make_project
from tests.test_history import user_env
from tests.test_operate import Lines, spawn, stop

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("PYTEST_ARTIFACTS", REPO / "tests" / "artifacts")) / "browser"
DEPLOYMENT = "browser"

pytestmark = pytest.mark.e2e
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium); the browser tests need it",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The tiny run, the deployment, and `pipeline ui` serving both; yields URLs, ids and the project."""
    project = make_project(tmp_path_factory.mktemp("browser") / "project")
    env = user_env()
    cli = [sys.executable, "-m", "flows.cli"]
    run = subprocess.run(
        [*cli, "run", "--profile", "tiny"], cwd=project, env=env, capture_output=True, text=True, timeout=1800
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    deploy = spawn([*cli, "deploy", "--profile", "tiny", "--name", DEPLOYMENT], project, env)
    Lines(deploy).wait_for("is being served", timeout=300)
    stop(deploy)
    ports = {"prefect": free_port(), "mlflow": free_port()}
    ui = spawn(
        [*cli, "ui", "--prefect-port", str(ports["prefect"]), "--mlflow-port", str(ports["mlflow"])],
        project,
        env,
    )
    try:
        Lines(ui).wait_for("ready", timeout=300)
        yield {
            "project": project,
            "prefect": f"http://127.0.0.1:{ports['prefect']}",
            "mlflow": f"http://127.0.0.1:{ports['mlflow']}",
        }
    finally:
        stop(ui)


@pytest.fixture(scope="module")
def prefect_api(site):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: f"{site['prefect']}/api"}), get_client(sync_client=True) as c:
        yield c


@pytest.fixture(scope="module")
def browser(site):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):  # every test using it needs Chromium (needs_chromium)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(60_000)
    page = context.new_page()
    yield page
    context.close()


def the_run(prefect_api):
    """The flow run `pipeline run` made, kept in .prefect/ (the quick-run test adds a deployment's run)."""
    (run,) = [r for r in prefect_api.read_flow_runs() if r.deployment_id is None]
    return run


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def main_text(page) -> str:
    return " ".join(page.locator("body").inner_text().split())


# ------------------------------------------------------------------------------------------- Prefect
@needs_chromium
def test_prefect_shows_the_flow_run_with_every_stage_as_a_task_run(site, prefect_api, page):
    flow_run = the_run(prefect_api)
    page.goto(f"{site['prefect']}/runs", wait_until="networkidle")
    page.get_by_text(flow_run.name, exact=True).first.wait_for()
    assert "llm-pipeline" in main_text(page) and "Completed" in main_text(page)
    shot(page, "prefect-runs")
    page.get_by_text(flow_run.name, exact=True).first.click()
    page.wait_for_url(re.compile(f"flow-run/{flow_run.id}"))
    page.locator("li.p-tab", has_text="Task Runs").first.click()
    for stage in stages.STAGES:
        page.get_by_text(stage, exact=True).first.wait_for()
    text = main_text(page)
    assert f"{len(stages.STAGES)} Task runs" in text and f"({len(stages.STAGES)} Completed)" in text, text
    shot(page, "prefect-task-runs")
    page.locator("li.p-tab", has_text="Logs").first.click()
    page.get_by_text("running repro --single-item ingest").first.wait_for()
    shot(page, "prefect-logs")


@needs_chromium
def test_prefect_shows_the_summary_artifact(site, prefect_api, page):
    flow_run = the_run(prefect_api)
    page.goto(f"{site['prefect']}/flow-runs/flow-run/{flow_run.id}", wait_until="networkidle")
    page.locator("li.p-tab", has_text="Artifacts").first.click()
    page.get_by_text("pipeline-summary", exact=True).first.click()
    page.get_by_text("Key metrics (data/metrics/*.json)").wait_for()
    # the markdown is rendered: a table row per stage and a link per registered model
    table = page.locator("table").first
    for stage in stages.STAGES:
        assert table.locator("td", has_text=re.compile(f"^{stage}$")).count() == 1, stage
    for model in stages.models():
        assert page.get_by_text(re.compile(f"pipeline-{model} v1 \\(champion\\)")).count() >= 1, model
    shot(page, "prefect-summary-artifact")
    page.get_by_text("MLflow parent run").first.scroll_into_view_if_needed()
    shot(page, "prefect-summary-links")


@needs_chromium
def test_a_run_starts_from_the_deployment_page_with_a_typed_form(site, prefect_api, page):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    dep = prefect_api.read_deployment_by_name(f"llm-pipeline/{DEPLOYMENT}")
    page.goto(f"{site['prefect']}/deployments/deployment/{dep.id}/run", wait_until="networkidle")

    def control(name: str, selector: str = "input, textarea"):
        """The form control of one flow parameter (inside the form property its label heads)."""
        label = page.locator(".schema-form-property__label", has_text=re.compile(f"^{name} \\(Optional\\)$"))
        prop = label.first.locator(
            "xpath=ancestor::*[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]"
        )
        return prop.locator(selector).first

    assert control("profile").evaluate("e => e.tagName") == "TEXTAREA"
    assert control("profile").input_value() == "tiny"  # the deployment's own parameters
    for name in ("retries", "retry_delay_seconds"):
        assert control(name).get_attribute("type") == "number", name
    assert control("retries").input_value() == "1"
    assert control("force", "[role=switch]").count() == 1  # a boolean is a toggle
    assert page.get_by_text("Add item").count() >= 1  # overrides: a list of KEY=VALUE strings
    shot(page, "prefect-deployment-run-form")

    page.goto(f"{site['prefect']}/deployments/deployment/{dep.id}", wait_until="networkidle")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Quick run", exact=True).click()
    page.get_by_text("scheduled to start now").first.wait_for()  # the UI's notice
    made = prefect_api.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
    )
    assert len(made) == 1 and made[0].parameters["profile"] == "tiny", made
    assert page.get_by_text(f"{made[0].name} scheduled to start now").count() >= 1
    page.locator("li.p-tab", has_text="Upcoming").first.click()
    page.get_by_text(made[0].name, exact=True).first.wait_for()  # listed under the deployment's runs
    shot(page, "prefect-deployment-quick-run")


# -------------------------------------------------------------------------------------------- MLflow
def close_assistant(page) -> None:
    """MLflow 3 opens a promotion dialog and its assistant panel over the page: close both."""
    page.wait_for_timeout(1000)  # both open a moment after the page
    if page.locator("[role=dialog]").count():
        page.keyboard.press("Escape")
        page.locator(".du-bois-light-modal-wrap").first.wait_for(state="hidden")
    button = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
    if button.count():
        button.first.click()


@needs_chromium
def test_mlflow_shows_the_parent_run_with_a_child_per_stage(site, page):
    page.goto(f"{site['mlflow']}/#/experiments/1/runs", wait_until="load")
    parent = page.get_by_role("link", name="pipeline", exact=True)
    parent.wait_for()
    close_assistant(page)
    parent.locator("xpath=ancestor::*[contains(@class,'ag-cell-value')][1]").locator("button").first.click()
    for stage in stages.STAGES:
        page.get_by_role("link", name=stage, exact=True).wait_for()
    assert f"{len(stages.STAGES) + 1} matching runs" in main_text(page)
    shot(page, "mlflow-runs")


@needs_chromium
def test_mlflow_shows_the_registered_models_with_their_aliases(site, page):
    page.goto(f"{site['mlflow']}/#/models", wait_until="load")
    for model in stages.models():
        page.get_by_role("link", name=f"pipeline-{model}", exact=True).wait_for()
    close_assistant(page)
    rows = page.get_by_role("row")
    for model in stages.models():
        row = rows.filter(has=page.get_by_role("link", name=f"pipeline-{model}", exact=True))
        assert re.search(r"@\s*champion\s*:\s*Version 1", row.inner_text()), row.inner_text()
    shot(page, "mlflow-registered-models")


@needs_chromium
def test_mlflow_draws_a_stage_metric_chart(site, page):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=site["mlflow"])
    (sft,) = client.search_runs(["1"], filter_string="attributes.run_name = 'sft'")
    page.goto(f"{site['mlflow']}/#/experiments/1/runs/{sft.info.run_id}/model-metrics", wait_until="load")
    page.get_by_text("Model metrics", exact=True).first.wait_for()
    close_assistant(page)
    chart = page.locator(".js-plotly-plot, canvas, svg.main-svg").first
    chart.wait_for()
    text = main_text(page)
    assert "loss" in text and "Step" in text, text[:2000]
    shot(page, "mlflow-sft-metrics")


# ---------------------------------------------------------------------------- files and curve images
def test_every_training_stage_logged_its_key_curves_as_images(site):
    """Each stage's CSV has every column the key charts name, and its MLflow run holds one PNG per chart."""
    from mlflow.tracking import MlflowClient

    from tasks.core.curves import charts, slug

    client = MlflowClient(tracking_uri=f"sqlite:///{site['project'] / 'mlflow.db'}")
    for entry in stages.MODEL_STAGES:
        header = (site["project"] / "data" / "plots" / f"{entry.stage}.csv").read_text().splitlines()[0]
        missing = {c for _, cols in charts(entry.stage) for c in cols} - set(header.split(","))
        assert not missing, f"{entry.stage}: the key charts name columns its curve lacks: {sorted(missing)}"
        (run,) = client.search_runs(["1"], filter_string=f"attributes.run_name = '{entry.stage}'")
        logged = sorted(f.path for f in client.list_artifacts(run.info.run_id, "curves"))
        assert logged == sorted(f"curves/{entry.stage}_{slug(n)}.png" for n, _ in charts(entry.stage))


def test_evaluate_wrote_the_run_report_and_the_summary_links_it(site, prefect_api):
    report = site["project"] / "data" / "eval" / "report.html"
    text = report.read_text()
    for entry in stages.MODEL_STAGES:
        assert f"<h3>{entry.stage}</h3>" in text, entry.stage
    for model in stages.language_models():
        assert f"<td>{model}</td>" in text, model
    assert "Sample answers" in text and text.count("data:image/png;base64,") > len(stages.MODEL_STAGES)
    flow_run = the_run(prefect_api)
    (art,) = prefect_api.read_artifacts()
    assert art.flow_run_id == flow_run.id and report.resolve().as_uri() in art.data


@needs_chromium
def test_the_run_report_opens_in_a_browser(site, page):
    page.goto((site["project"] / "data" / "eval" / "report.html").resolve().as_uri())
    page.get_by_role("heading", name="llm-pipeline run report").wait_for()
    images = page.locator("img")
    assert images.count() > len(stages.MODEL_STAGES)
    assert all(images.nth(i).evaluate("e => e.naturalWidth") > 0 for i in range(images.count()))
    shot(page, "run-report")


def test_registered_versions_carry_their_model_card_and_export_writes_it(site, tmp_path):
    from mlflow.tracking import MlflowClient

    from tasks.serve.card import front_matter

    client = MlflowClient(tracking_uri=f"sqlite:///{site['project'] / 'mlflow.db'}")
    for entry in stages.MODEL_STAGES:
        version = client.get_model_version(f"pipeline-{entry.model}", "1")
        card = version.description
        assert card.startswith(f"# pipeline-{entry.model} v1\n"), card[:200]
        assert f"trained by the `{entry.stage}` stage" in card and "## Limitations" in card
        assert f"| git commit | `{version.tags['git.commit']}`" in card
    out = tmp_path / "hf-sft"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "export", "pipeline-sft@champion", str(out)],
        cwd=site["project"],
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    sft = client.get_model_version("pipeline-sft", "1")
    assert (out / "README.md").read_text() == front_matter("sft", "causal_lm") + sft.description


@needs_chromium
def test_mlflow_shows_the_model_card_on_the_version_page(site, page):
    page.goto(f"{site['mlflow']}/#/models/pipeline-dpo/versions/1", wait_until="load")
    page.get_by_text("trained by the", exact=False).first.wait_for()
    close_assistant(page)
    text = main_text(page)
    for section in ("Architecture", "Data", "Training", "Evaluation", "Intended use", "Limitations"):
        assert section in text, section
    shot(page, "mlflow-model-card")
