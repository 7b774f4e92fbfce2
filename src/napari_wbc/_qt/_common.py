"""Glue shared by the widgets: running core generators in workers, output layers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator

from napari.layers import Image
from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_info

from ..errors import WBCError
from ..progress import Progress

log = logging.getLogger(__name__)

#: Marks layers a widget made, so a re-run replaces them instead of piling up.
OWNER_KEY = "napari_wbc_output"


def rgb_image_layers(viewer) -> list[Image]:
    """Image layers that hold RGB(A) data."""
    return [layer for layer in viewer.layers if isinstance(layer, Image) and layer.rgb]


def image_levels(layer: Image) -> list:
    """The layer's data as a list of levels, full resolution first."""
    return list(layer.data) if layer.multiscale else [layer.data]


def output_layer(viewer, name: str, data, source=None, layer_type="image", metadata=None, **kwargs):
    """Add a layer, or update the one a previous run made under the same name."""
    metadata = {**(metadata or {}), OWNER_KEY: True}
    if source is not None:
        kwargs.setdefault("scale", source.scale)
        kwargs.setdefault("translate", source.translate)
        kwargs.setdefault("units", source.units)
    existing = viewer.layers[name] if name in viewer.layers else None
    if existing is not None and existing.metadata.get(OWNER_KEY):
        multiscale = isinstance(data, list)
        if layer_type != "image" or existing.multiscale == multiscale:
            existing.data = data
            existing.metadata.update(metadata)
            return existing
        index = viewer.layers.index(existing)
        viewer.layers.remove(existing)
    else:
        index = None
    if layer_type == "image":
        layer = viewer.add_image(
            data, name=name, rgb=True, multiscale=isinstance(data, list), metadata=metadata, **kwargs
        )
    else:
        layer = getattr(viewer, f"add_{layer_type}")(data, name=name, metadata=metadata, **kwargs)
    if index is not None:
        viewer.layers.move(viewer.layers.index(layer), index)
    return layer


class WorkerRunner:
    """Runs one core generator at a time in a thread, wired to a widget.

    Progress events move the widget's progress bar and a napari activity
    progress; Cancel quits the worker at its next yield; errors go to napari's
    notifications. Layers are only touched in ``on_done``, on the main thread.
    """

    def __init__(self, widget, description: str):
        self.widget = widget
        self.description = description
        self.worker: GeneratorWorker | None = None
        self._pbar = None

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(
        self,
        gen: Generator[Progress, None, object],
        on_done: Callable[[object], None],
        on_progress: Callable[[Progress], None] | None = None,
    ) -> GeneratorWorker | None:
        if self.worker is not None:
            show_info(f"{self.description} is already running")
            return None
        def guarded():
            # superqt takes a RuntimeError from the work for a deleted worker and
            # never emits `finished`; torch raises RuntimeError for real errors.
            try:
                return (yield from gen)
            except RuntimeError as exc:
                raise WBCError(str(exc)) from exc

        # Errors are shown by _on_error; do not also re-raise them in the Qt loop.
        worker = create_worker(guarded, _start_thread=False, _ignore_errors=True)
        self.worker = worker
        self._pbar = napari_progress(total=0, desc=self.description)
        worker.yielded.connect(self._on_yielded)
        if on_progress is not None:
            worker.yielded.connect(on_progress)
        worker.returned.connect(on_done)
        worker.errored.connect(self._on_error)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self._set_running(True)
        self.widget.status.value = f"{self.description}: started"
        worker.start()
        return worker

    def cancel(self) -> None:
        if self.worker is not None:
            self.widget.status.value = f"{self.description}: cancelling…"
            self.worker.quit()

    def notify_error(self, message: str) -> None:
        self.widget.status.value = message
        show_error(message)

    # -- signal handlers (main thread) -------------------------------------
    def _on_yielded(self, event: Progress) -> None:
        bar = self.widget.progress
        bar.max = max(event.total, 1)
        bar.value = min(event.done, bar.max) if event.total else 0
        text = f"{event.stage}: {event.message}" if event.message else event.stage
        self.widget.status.value = text
        pbar = self._pbar  # a handler below may process events and close it
        if pbar is not None:
            if pbar.total != event.total:
                pbar.total = event.total
            pbar.n = event.done
            pbar.set_description(f"{self.description}: {event.stage}")

    def _on_error(self, exc: BaseException) -> None:
        log.debug("%s failed", self.description, exc_info=exc)
        self.notify_error(f"{self.description} failed: {exc}")

    def _on_aborted(self) -> None:
        self.widget.status.value = f"{self.description}: cancelled"

    def _on_finished(self) -> None:
        self.worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        self.widget.run_button.enabled = not running
        self.widget.cancel_button.enabled = running
        if not running:
            self.widget.progress.value = 0
