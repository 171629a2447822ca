"""What every stage's `__main__` does: load params.yaml, open the MLflow run, run, report errors clearly."""

from __future__ import annotations

import errno
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from tasks.core.config import ConfigError, Params, load_params


class StageError(RuntimeError):
    """Bad input or a failed check; the message says what is wrong and where. Outputs are untouched."""


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("PIPELINE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
        force=True,
    )
    for noisy in ("urllib3", "alembic", "matplotlib", "filelock", "git", "httpx", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stage_main(name: str, run: Callable[[Params, Any], dict[str, Any] | None]) -> None:
    """Entry point of `python -m tasks.<name>`; run(params, tracker) does the work."""
    setup_logging()
    log = logging.getLogger(f"tasks.{name}")
    start = time.time()
    try:
        params = load_params()
        from tasks.core import tracking  # after params: a bad params.yaml fails before MLflow starts

        section = getattr(params, name, None)
        with tracking.stage_run(
            name, {"seed": params.seed, name: section}, profile=params.profile
        ) as tracker:
            run(params, tracker)
            tracker.log_metrics({"stage/seconds": time.time() - start})
    except (ConfigError, StageError) as exc:  # bad input: the message says what and where
        log.error("stage %s failed: %s", name, exc)
        sys.exit(1)
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # the environment, not a bug: one line naming the file (outputs are written all or nothing)
            log.error("stage %s failed: %s; its previous outputs are unchanged", name, exc)
        else:  # anything else: the message first, then the traceback for a bug report
            log.error("stage %s failed: %s: %s", name, type(exc).__name__, exc, exc_info=True)
        sys.exit(1)
    log.info("stage %s done in %.1fs", name, time.time() - start)
