"""Progress events for long work, and the synchronous driver.

Long work is written as a generator (``iter_...``) that yields
:class:`Progress` events and *returns* its result. The same generator is driven
by :func:`run` in scripts, tests and the CLI, and by a napari thread worker in
the GUI, where quitting the worker cancels the work at the next ``yield``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    """One progress event.

    Parameters
    ----------
    stage : str
        Short name of the current stage ("fit", "tiles", "stage1", ...).
    done, total : int
        Units of work done so far out of ``total`` (``total`` may be 0 when
        unknown).
    message : str
        Human-readable detail.
    info : dict
        Extra numbers for whoever listens (loss, metrics, partial results).
    """

    stage: str
    done: int = 0
    total: int = 0
    message: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        return self.done / self.total if self.total else None


ProgressGen = Generator[Progress, None, T]


def run(
    gen: Generator[Progress, None, T],
    callback: Callable[[Progress], None] | None = None,
) -> T:
    """Drive a progress generator to the end and return its result."""
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(event)


def relabel(
    gen: Generator[Progress, None, T], label: Callable[[Progress], Progress]
) -> Generator[Progress, None, T]:
    """``gen``'s events passed through ``label`` (a stage of a larger run); returns its result.

    Use ``result = yield from relabel(gen, label)`` inside another progress
    generator, so that cancelling it still stops ``gen`` at its next event.
    """
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            return stop.value
        yield label(event)


class TerminalBar:
    """A minimal progress bar on stderr for the CLI (a callback for :func:`run`)."""

    def __init__(self, stream=None, width: int = 30, min_interval: float = 0.1):
        self.stream = stream or sys.stderr
        self.width = width
        self.min_interval = min_interval
        self._last = 0.0
        self._stage = None

    def __call__(self, event: Progress) -> None:
        now = time.monotonic()
        final = event.total and event.done >= event.total
        if event.stage == self._stage and not final and now - self._last < self.min_interval:
            return
        if self._stage is not None and event.stage != self._stage:
            self.stream.write("\n")
        self._stage, self._last = event.stage, now
        if event.total:
            filled = int(self.width * min(event.done / event.total, 1.0))
            bar = "#" * filled + "-" * (self.width - filled)
            text = f"\r{event.stage:>10} [{bar}] {event.done}/{event.total} {event.message}"
        else:
            text = f"\r{event.stage:>10} {event.message}"
        self.stream.write(text[:160].ljust(60))
        self.stream.flush()

    def close(self) -> None:
        if self._stage is not None:
            self.stream.write("\n")
            self.stream.flush()
            self._stage = None
