"""Progress of long work: live bars on a terminal (rich: the stage, epoch / step, loss, time left; nested work such
as a pruning step's fine-tuning shows as a second bar), one plain line per epoch or step elsewhere (CI, nohup, a log
file), with what is running, the loss and metric, time spent and time left. ``quiet()`` turns every progress display
off (the command line's ``--quiet``); ``stage(name)`` prefixes what runs inside it with a recipe stage's name.

Example:
    >>> import io
    >>> stream = io.StringIO()
    >>> progress = Progress("prune", total=2, mode="lines", stream=stream)
    >>> progress.step(loss=0.5, accuracy=0.9)
    >>> stream.getvalue().startswith("prune 1/2: loss 0.5000, accuracy 0.9000")
    True
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

SETTINGS: dict[str, Any] = {"quiet": False, "stage": None}
_DISPLAY: dict[str, Any] = {"progress": None, "tasks": 0}


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Label every progress display inside the block with ``name`` (e.g. a recipe's "1 prune")."""
    previous = SETTINGS["stage"]
    SETTINGS["stage"] = name
    try:
        yield
    finally:
        SETTINGS["stage"] = previous


def quiet(on: bool = True) -> None:
    """Turn every progress display off (or back on)."""
    SETTINGS["quiet"] = on


def _labelled(label: str) -> str:
    return f"{SETTINGS['stage']}: {label}" if SETTINGS["stage"] and not label.startswith(str(SETTINGS["stage"])) else label


def _display(stream: IO[str] | None) -> Any:
    """The one rich display every bar shares (nested bars are rows of it); started with its first bar."""
    if _DISPLAY["progress"] is None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        console = Console(file=stream if stream is not None else sys.stderr)
        display = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        display.start()
        _DISPLAY["progress"] = display
    return _DISPLAY["progress"]


def _release() -> None:
    _DISPLAY["tasks"] -= 1
    if _DISPLAY["tasks"] <= 0:
        _stop_display()


def _stop_display() -> None:
    if _DISPLAY["progress"] is not None:
        _DISPLAY["progress"].stop()
        _DISPLAY["progress"], _DISPLAY["tasks"] = None, 0


atexit.register(_stop_display)


def progress_mode(progress: bool | str | None) -> str:
    """ "bar" on a terminal, "lines" when not, "off" when asked (``progress=False``); True forces a bar."""
    if progress is False or progress == "off" or SETTINGS["quiet"]:
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


def _values(values: dict[str, Any]) -> list[str]:
    return [
        f"{key.replace('_', ' ')} {value:.4f}" if isinstance(value, float) else f"{key.replace('_', ' ')} {value}"
        for key, value in values.items()
        if value is not None
    ]


class Progress:
    """Counts steps of a ``total``. "lines" mode prints one line per step with elapsed and remaining time; "bar" mode
    is a live row (stage, label, steps done, the latest values, elapsed, time left) that ``update`` can also move
    between steps (e.g. per batch inside an epoch); "off" counts silently."""

    def __init__(self, label: str, total: int | None, mode: str = "lines", stream: IO[str] | None = None, unit_total: int | None = None) -> None:
        self.label, self.total, self.mode = _labelled(label), total, "off" if SETTINGS["quiet"] else mode
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0
        self.started = time.perf_counter()
        self._task = None
        self._units = unit_total is not None
        if self.mode == "bar":
            _DISPLAY["tasks"] += 1
            self._task = _display(stream).add_task(self.label, total=unit_total or total, info="")

    def update(self, completed: float | None = None, description: str | None = None, **values: Any) -> None:
        """Move the live bar (bar mode only): its completed units, its description, the values it shows."""
        if self._task is None or _DISPLAY["progress"] is None:
            return
        fields: dict[str, Any] = {"info": ", ".join(_values(values))} if values else {}
        if description is not None:
            fields["description"] = _labelled(description)
        _DISPLAY["progress"].update(self._task, completed=completed, **fields)

    def close(self) -> None:
        """Remove the live bar (the display stops with its last bar)."""
        if self._task is not None and _DISPLAY["progress"] is not None:
            _DISPLAY["progress"].remove_task(self._task)
            self._task = None
            _release()

    def step(self, **values: Any) -> None:
        self.count += 1
        if self.mode == "bar":
            if self._task is not None and _DISPLAY["progress"] is not None:
                _DISPLAY["progress"].update(self._task, info=", ".join(_values(values)), **({} if self._units else {"completed": self.count}))
            if self.total and self.count >= self.total:
                self.close()
            return
        if self.mode != "lines":
            return
        elapsed = time.perf_counter() - self.started
        parts = _values(values)
        where = f"{self.count}/{self.total}" if self.total else str(self.count)
        timing = f"{_duration(elapsed)} elapsed"
        if self.total:
            timing += f", ~{_duration(elapsed / self.count * (self.total - self.count))} left"
        self.stream.write(f"{self.label} {where}: {', '.join(parts + [timing])}\n")
        self.stream.flush()


__all__ = ["SETTINGS", "Progress", "progress_mode", "quiet", "stage"]
