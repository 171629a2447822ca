"""Progress of long loops (training steps, evaluation items) as a person watching sees it.

On a terminal: a tqdm bar with rate and ETA. Otherwise (a stage under `pipeline run`, whose output goes to
the Prefect log; CI; a file): one plain log line every PIPELINE_PROGRESS_EVERY seconds (default 30) with
done/total, rate, elapsed and ETA, and one when the loop ends if any was printed. PIPELINE_PROGRESS=bar,
lines or off forces a mode. Progress never changes what a stage computes (it is not a DVC dep).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO, Any

log = logging.getLogger("tasks.progress")


def clock(seconds: float) -> str:
    """0:07, 3:25, 1:02:03."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """`with Progress(total, "pretrain", unit="step") as p: ... p.update(1, loss=2.3)`."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        initial: int = 0,
        enabled: bool = True,
        stream: IO[str] | None = None,
        every_s: float | None = None,
    ) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done = self.start_done = int(initial)
        self.stream = stream or sys.stderr
        self.every_s = float(os.environ.get("PIPELINE_PROGRESS_EVERY", "30")) if every_s is None else every_s
        mode = os.environ.get("PIPELINE_PROGRESS", "")
        if not enabled or mode == "off" or self.total <= 0:
            self.mode = "off"
        elif mode in ("bar", "lines"):
            self.mode = mode
        else:
            self.mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.start = self.last_line = time.monotonic()
        self.lines = 0
        self.bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            try:  # a terminal that reports no size (some pseudo-terminals) would get an empty bar
                sized = os.get_terminal_size(self.stream.fileno()).columns > 0
            except (OSError, ValueError, AttributeError):
                sized = False
            self.bar = tqdm(
                total=self.total,
                initial=self.done,
                desc=desc,
                unit=unit,
                file=self.stream,
                dynamic_ncols=sized,
                ncols=None if sized else 100,
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def line(self) -> str:
        """`pretrain: step 120/600 (20%), 3.1 step/s, elapsed 0:38, ETA 2:35`."""
        elapsed = time.monotonic() - self.start
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = clock((self.total - self.done) / rate) if rate > 0 else "?"
        pct = 100 * self.done / self.total
        return (
            f"{self.desc}: {self.unit} {self.done}/{self.total} ({pct:.0f}%), {rate:.3g} {self.unit}/s, "
            f"elapsed {clock(elapsed)}, ETA {eta}"
        )

    def update(self, n: int = 1, **postfix: float) -> None:
        self.done = min(self.total, self.done + n)
        if self.mode == "bar":
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.bar.update(n)
        elif self.mode == "lines":
            now = time.monotonic()
            if now - self.last_line >= self.every_s and self.done < self.total:
                self.last_line = now
                self.lines += 1
                log.info("%s", self.line())

    def close(self) -> None:
        if self.mode == "bar":
            self.bar.close()
        elif self.mode == "lines" and self.lines:
            log.info("%s", self.line())  # the end of a loop that reported along the way
        self.mode = "off"
