"""The import direction of DESIGN.md: prefect only in flows/, models/ is pure PyTorch."""

import ast
import sys
from pathlib import Path

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


def test_only_tracking_module_imports_mlflow():
    allowed = {"tasks/core/tracking.py", "tasks/serve/pyfunc.py"}
    for path, names in imported_modules("tasks").items():
        if "mlflow" in names:
            assert path in allowed, f"{path} imports mlflow; stages log through tasks/core/tracking.py"
