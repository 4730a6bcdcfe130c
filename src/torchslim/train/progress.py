"""Progress of long work: a bar on a terminal, one plain line per epoch or step elsewhere (CI, nohup, a log file),
with what is running, the loss and metric, time spent and time left.

Example:
    >>> import io
    >>> stream = io.StringIO()
    >>> progress = Progress("prune", total=2, mode="lines", stream=stream)
    >>> progress.step(loss=0.5, accuracy=0.9)
    >>> stream.getvalue().startswith("prune 1/2: loss 0.5000, accuracy 0.9000")
    True
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


def progress_mode(progress: bool | str | None) -> str:
    """ "bar" on a terminal, "lines" when not, "off" when asked (``progress=False``); True forces a bar."""
    if progress is False or progress == "off":
        return "off"
    if progress is True or progress == "bar":
        return "bar"
    if progress == "lines":
        return "lines"
    return "bar" if sys.stderr.isatty() else "lines"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    minutes, second = divmod(seconds, 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours}h{minute:02d}m" if hours else f"{minute}m{second:02d}s" if minute else f"{second}s"


class Progress:
    """Counts steps of a ``total``; in "lines" mode prints one line per step with elapsed and remaining time."""

    def __init__(self, label: str, total: int | None, mode: str = "lines", stream: IO[str] | None = None) -> None:
        self.label, self.total, self.mode = label, total, mode
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self.started = time.perf_counter()

    def step(self, **values: Any) -> None:
        self.count += 1
        if self.mode != "lines":
            return
        elapsed = time.perf_counter() - self.started
        parts = [
            f"{key.replace('_', ' ')} {value:.4f}" if isinstance(value, float) else f"{key.replace('_', ' ')} {value}"
            for key, value in values.items()
            if value is not None
        ]
        where = f"{self.count}/{self.total}" if self.total else str(self.count)
        timing = f"{_duration(elapsed)} elapsed"
        if self.total:
            timing += f", ~{_duration(elapsed / self.count * (self.total - self.count))} left"
        self.stream.write(f"{self.label} {where}: {', '.join(parts + [timing])}\n")
        self.stream.flush()


__all__ = ["Progress", "progress_mode"]
