"""Health alerts of a training stage: logged as warnings, tagged on the MLflow run, fatal if asked.

With `alerts.fail_on_alert` a stage whose final metrics raise an alert fails before writing anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tasks.core.config import Params
from tasks.core.stage import StageError

log = logging.getLogger(__name__)


def raise_or_tag(found: list[str], params: Params, tracker: Any) -> list[str]:
    """Log each alert as a warning and tag the MLflow run; with alerts.fail_on_alert, fail the stage."""
    for message in found:
        log.warning("ALERT: %s", message)
    if tracker is not None:
        tracker.set_tags({"health.alerts": " | ".join(found) or "none"})
    if found and params.alerts.fail_on_alert:
        raise StageError("health alert (alerts.fail_on_alert=true), nothing written: " + "; ".join(found))
    return found


def alerts_at_end(
    max_steps: int, check: Callable[[dict[str, float]], list[str]], params: Params, tracker: Any
) -> Callable[[int, dict[str, float]], None]:
    """An on_step hook for the loop: run the checks on the last step's metrics. The loop calls it before
    it writes its curve and before the stage writes its checkpoint, so a failure leaves no new output."""

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if step == max_steps:
            raise_or_tag(check(metrics), params, tracker)

    return on_step
