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
    """Progress events as tqdm bars on stderr, one line per stage (a callback for :func:`run`).

    A stage with a known ``total`` gets a bar with its count, elapsed and
    remaining time; one without just its message. tqdm is imported when the
    first event arrives, so a quiet run never imports it.
    """

    def __init__(self, stream=None, min_interval: float = 0.1):
        self.stream = stream or sys.stderr
        self.min_interval = min_interval
        self._bar = None
        self._stage: str | None = None
        self._last = 0.0

    def __call__(self, event: Progress) -> None:
        now = time.monotonic()
        final = bool(event.total) and event.done >= event.total
        if event.stage == self._stage and not final and now - self._last < self.min_interval:
            return
        self._last = now
        # The message goes into the format itself: tqdm's postfix would add ", ".
        message = event.message[:80].replace("{", "{{").replace("}", "}}")
        if event.total:
            layout = "{desc} {bar:30} {n_fmt}/{total_fmt} [{elapsed}<{remaining}] " + message
            total, done = event.total, min(event.done, event.total)
        else:
            layout, total, done = "{desc} [{elapsed}] " + message, None, event.done
        if event.stage != self._stage:
            self.close()
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=done,
                desc=f"{event.stage:>10}",
                bar_format=layout,
                file=self.stream,
                leave=True,
                mininterval=self.min_interval,
            )
            self._stage = event.stage
            return
        bar = self._bar
        bar.total, bar.n, bar.bar_format = total, done, layout
        bar.refresh()

    def close(self) -> None:
        """End the current stage's line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._stage = None
