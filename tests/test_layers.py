"""The import direction of DESIGN.md: prefect only in flows/, models/ is pure PyTorch."""

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


def test_prefect_only_in_flows():
    for package in ("tasks", "models"):
        for path, names in imported_modules(package).items():
            assert "prefect" not in names, f"{path} imports prefect; only flows/ may"


def test_models_import_torch_only():
    allowed = {"torch", "safetensors", "models"} | set(sys.stdlib_module_names)
    for path, names in imported_modules("models").items():
        extra = names - allowed
        assert not extra, f"{path} imports {sorted(extra)}; models/ is pure PyTorch"


def test_tasks_do_not_import_flows():
    for path, names in imported_modules("tasks").items():
        assert "flows" not in names, f"{path} imports flows/; imports go flows -> tasks -> models"


def test_only_tracking_modules_import_mlflow():
    allowed = {"tasks/core/tracking.py", "tasks/core/registry.py", "tasks/serve/pyfunc.py"}
    for path, names in imported_modules("tasks").items():
        if "mlflow" in names:
            assert path in allowed, (
                f"{path} imports mlflow; stages log through tasks/core/tracking.py (runs) and "
                "tasks/core/registry.py (models)"
            )


# tasks/ is layered: the stage entry points (tasks/<stage>.py) use the libraries; a library package uses
# only the packages listed for it, so core never depends on training code and no library on a stage.
LIBRARY_LAYERS = {
    "core": {"core"},
    "data": {"core", "data"},
    "train": {"core", "data", "train"},
    "eval": {"core", "data", "train", "eval"},
    "serve": {"core", "data", "serve"},
}


def tasks_imports(path: Path) -> set[str]:
    """The tasks.* modules a file imports, as dotted names ("tasks.core.paths", "tasks.sft", ...)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tasks":
                names |= {f"tasks.{alias.name}" for alias in node.names}
            elif node.module.startswith("tasks."):
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("tasks.")}
    return names


def test_tasks_holds_only_stage_entry_points():
    from tasks.core.stages import STAGES

    modules = {p.stem for p in (REPO / "tasks").glob("*.py")} - {"__init__"}
    assert modules == set(STAGES), "tasks/*.py are the stage entry points; libraries live in subpackages"
    assert {p.name for p in (REPO / "tasks").iterdir() if p.is_dir() and p.name != "__pycache__"} == set(
        LIBRARY_LAYERS
    )


@pytest.mark.parametrize("package", sorted(LIBRARY_LAYERS))
def test_library_packages_import_only_lower_layers(package):
    allowed = LIBRARY_LAYERS[package]
    for path in sorted((REPO / "tasks" / package).rglob("*.py")):
        for name in tasks_imports(path):
            parts = name.split(".")
            assert len(parts) > 1 and parts[1] in allowed, (
                f"{path.relative_to(REPO)} imports {name}; tasks/{package} may use only {sorted(allowed)}"
            )
