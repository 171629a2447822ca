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


def reward_collapse(zero_std_by_step: dict[int, float], patience: int) -> list[str]:
    """GRPO learns nothing from a group whose completions all got the same reward (advantage 0): an alert
    when every group of `patience` rollouts in a row had reward_std 0 (all right, or all wrong).
    zero_std_by_step: the fraction of groups with reward_std 0, by the step of the rollout."""
    run, longest, end = 0, 0, -1
    for step in sorted(zero_std_by_step):
        run = run + 1 if zero_std_by_step[step] >= 1.0 else 0
        if run > longest:
            longest, end = run, step
    if patience < 1 or longest < patience:
        return []
    return [
        f"GRPO reward collapse: reward_std was 0 in every group for {longest} rollouts in a row (up to "
        f"step {end}) >= alerts.grpo_collapse_steps {patience}: no learning signal (all completions of a "
        "prompt scored the same; check the reward, the sampling temperature, or the task's difficulty)"
    ]


def kl_runaway(kl_by_step: dict[int, float], max_kl: float, what: str) -> list[str]:
    """An alert naming the rollout with the largest KL to the reference when any is above max_kl."""
    over = {s: kl for s, kl in kl_by_step.items() if kl > max_kl}
    if not over:
        return []
    step, kl = max(over.items(), key=lambda item: item[1])
    return [
        f"{what} KL {kl:.3f} (rollout of step {step}) > {max_kl} in {len(over)} rollout(s): the policy "
        "drifts from its reference"
    ]
