"""Glue shared by the widgets: running core generators in workers, output layers."""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Generator

from magicgui.widgets import Container, Label
from napari.layers import Image
from napari.qt.threading import GeneratorWorker, create_worker
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFrame, QScrollArea, QSizePolicy, QVBoxLayout, QWidget
from superqt import QCollapsible

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


def output_layer(
    viewer, name: str, data, source=None, layer_type="image", metadata=None, **kwargs
):
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
            data,
            name=name,
            rgb=True,
            multiscale=isinstance(data, list),
            metadata=metadata,
            **kwargs,
        )
    else:
        layer = getattr(viewer, f"add_{layer_type}")(data, name=name, metadata=metadata, **kwargs)
    if index is not None:
        viewer.layers.move(viewer.layers.index(layer), index)
    return layer


#: What a cancelled run returns to the runner (instead of a result).
CANCELLED = object()

#: Progress bar and status updates at most this often (seconds), to keep the
#: main thread free; the last event of a stage is always shown.
_UI_INTERVAL = 0.1


def _first_number(text: str, pattern: str = r"(\d+)") -> str | None:
    match = re.search(pattern, text)
    return match.group(1) if match else None


def _percent(event) -> str:
    return f" ({100 * event.done // event.total}%)" if event.total else ""


def plain_route(note: str) -> str:
    """The automatic model choice's note, the model named as the Classify widget names it."""
    from ..routing import GENERALIST, SPECIALIST

    names = {
        SPECIALIST: "the PBC specialist",
        GENERALIST: "the three-lab ensemble",
    }
    model, sep, why = note.partition(": ")
    if sep and model in names:
        return f"Model chosen: {names[model]} ({model}). {why[:1].upper()}{why[1:]}"
    return f"Model chosen: {note}"


def _route(event) -> str:
    n = _first_number(event.message, r"^(\d+) cells to")
    if n is not None:  # cells being cut to choose by
        return f"Choosing the model: looking at {n} cells"
    return plain_route(event.message) if event.message else "Choosing the model"


def _scale(event) -> str:
    measured = re.match(r"red cell ≈ (\d+) px \(([^)]*)\)", event.message)
    if measured:
        return f"Red cells measured: about {measured.group(1)} px across ({measured.group(2)})"
    return "Measuring the red cells to set the scale"


def _doubtful(event) -> str:
    n = _first_number(event.message, r"/(\d+) crops")
    cells = f"{n} uncertain cells" if n else "the uncertain cells"
    return f"Checking {cells} more closely{_percent(event)}"


def _cells_found(event) -> str:
    n = _first_number(event.message, r"^(\d+) cells")
    found = f", {n} cells so far" if n else ""
    part = f" (part {event.done} of {event.total})" if event.total > 1 else ""
    return f"Finding and classifying the white cells{part}{found}"


def _adapt(event) -> str:
    if event.message.startswith("not adapted"):
        return event.message[:1].upper() + event.message[1:]
    return f"Adapting the model to this image's cells{_percent(event)}"


def _training(stage: str):
    what = {
        "stage1": "Training the whole network",
        "stage2": "Training the classifier on the cells' features",
    }[stage]

    def describe(event) -> str:
        epoch = event.info.get("epoch")
        if event.info.get("event") == "epoch":
            best = event.info.get("best_val_macro_f1", event.info["val_macro_f1"])
            return (
                f"{what}: round {epoch} done, macro-F1 {event.info['val_macro_f1']:.2f} on "
                f"the validation cells (the best round, {best:.2f}, is the one kept)"
            )
        if epoch is not None and "batch" in event.info:
            return f"{what}: round {epoch}{_percent(event)}"
        if event.message.startswith("validating"):
            return f"{what}: checking it on the validation cells"
        if event.message.startswith("extracting"):
            return f"{what}: measuring the cells' features{_percent(event)}"
        return f"{what}: {event.message}" if event.message else what

    return describe


#: Each stage of the core's work in words a hematologist reads without the docs
#: (the core's stage names and messages are short and technical: "route",
#: "doubtful: classified 4/4 crops in doubt (model 3/3, views 2-4)").
_STAGE_WORDS: dict[str, Callable] = {
    "model": lambda e: e.message or "Loading the model",
    "scale": _scale,
    "setup": lambda e: "Measuring the glass colour and the nuclear stain",
    "sample": lambda e: "Reading the image's stain colours",
    "fit": lambda e: "Measuring the stain colours",
    "stain": lambda e: "Measuring the stain colours",
    "cache": lambda e: "Preparing the model",
    "detect": lambda e: f"Finding the white cells: {e.message}",
    "blocks": _cells_found,
    "route": _route,
    "classify": lambda e: f"Classifying the cells{_percent(e)}",
    "doubtful": _doubtful,
    "adapt": _adapt,
    "layer": lambda e: f"Drawing the {e.message}" if e.message else "Drawing the cells",
    "crops": lambda e: f"Cutting out the annotated cells{_percent(e)}",
    "write": lambda e: f"Cutting out the annotated cells{_percent(e)}",
    "read": lambda e: f"Reading the cell images{_percent(e)}",
    "features": lambda e: f"Measuring the cells' features{_percent(e)}",
    "stage1": _training("stage1"),
    "stage2": _training("stage2"),
    "validate": lambda e: "Checking the saved model on the validation cells",
    "apply": lambda e: "Applying the stain normalization",
    "teach": lambda e: (
        f"Teaching the model your cells: {e.message[:1].lower()}{e.message[1:]}{_percent(e)}"
    ),
    "done": lambda e: "Finished",
}


def plain_status(event) -> str:
    """A progress event as a sentence for the status line."""
    describe = _STAGE_WORDS.get(event.stage)
    if describe is not None:
        try:
            return describe(event)
        except (KeyError, TypeError, ValueError):  # an event shaped unlike the core's today
            log.debug("no plain words for %r", event, exc_info=True)
    return f"{event.stage}: {event.message}" if event.message else event.stage


_WARMING = []
_LOADED = threading.Event()


def models_loaded() -> bool:
    """Whether torch and the inference code are imported (so using them cannot block)."""
    return _LOADED.is_set()


def warm_up_models() -> None:
    """Import torch, timm and the inference code in a background thread, once.

    Importing them takes seconds and, in its C parts, holds the interpreter's
    lock: done when Run is first pressed it froze napari for 0.4 s (and for
    2 s when done on the main thread). Started when a widget opens, it runs
    while the user chooses the image and settings.
    """
    if "napari_wbc.inference" in sys.modules and not _WARMING:
        _LOADED.set()  # imported before any widget opened
    if _WARMING or _LOADED.is_set():
        return

    def load():
        import gc

        # The import makes a million long-lived objects (torch, timm): the
        # collector's full scans while they pile up paused napari's main
        # thread for 0.1-0.4 s, several times. None of them is garbage worth
        # scanning for, so the collector waits, and after the import they are
        # moved out of its way for good (gc.freeze): a later full collection
        # no longer scans them either.
        collecting = gc.isenabled()
        gc.disable()
        try:
            import napari_wbc.inference  # noqa: F401
        except Exception:  # reported properly when Run imports it again
            log.debug("warm-up import failed", exc_info=True)
            return
        finally:
            gc.freeze()
            if collecting:
                gc.enable()
        _LOADED.set()

    thread = threading.Thread(target=load, name="napari-wbc warm-up", daemon=True)
    _WARMING.append(thread)
    thread.start()


def same_layer(a, b) -> bool:
    """Whether two layer references are the same layer.

    napari hands a plugin a new proxy object on every access to a layer, so
    ``is`` says two references to one layer differ.
    """
    if a is None or b is None:
        return a is b
    return getattr(a, "unique_id", id(a)) == getattr(b, "unique_id", id(b))


def wrapping_label(**kwargs) -> Label:
    """A magicgui Label whose text wraps instead of widening the dock (and the window)."""
    label = Label(**kwargs)
    label.native.setWordWrap(True)
    label.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    label.native.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return label


def narrow_combo(widget, characters: int = 8) -> None:
    """Let a ComboBox shrink below its longest choice (model paths can be long)."""
    combo = widget.native if isinstance(widget.native, QComboBox) else None
    if combo is None:
        combo = widget.native.findChild(QComboBox)
    if combo is not None:
        combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        combo.setMinimumContentsLength(characters)


class _PageScroll(QScrollArea):
    """A scroll area that asks for its page's full height, and takes what it gets."""

    def sizeHint(self):
        hint = super().sizeHint()
        page = self.widget()
        if page is not None:
            hint.setHeight(page.sizeHint().height())
        return hint

    def minimumSizeHint(self):
        # As wide as the page needs (no horizontal scrolling), as low as two rows:
        # the dock's footer (its button, status and result) keeps its height.
        hint = super().minimumSizeHint()
        page = self.widget()
        if page is not None:
            bar = self.verticalScrollBar().sizeHint().width()
            hint.setWidth(page.minimumSizeHint().width() + bar)
            hint.setHeight(MIN_SETTINGS_HEIGHT)
        return hint


#: The least height (px) a dock's scrolling settings area is squeezed to.
MIN_SETTINGS_HEIGHT = 56


class _Footer(QWidget):
    """The footer: as tall as its wrapped texts need at its present width, and no more.

    Its status lines wrap (their height depends on the width). Reported as
    height-for-width, the whole dock became height-for-width, and Qt's dock
    layout then took the dock's preferred height, settings unscrolled, as its
    least: after a run the window grew past 800 px. The footer answers
    instead with the height its layout needs at the width it has, updated
    when that width changes.
    """

    def hasHeightForWidth(self) -> bool:
        return False

    def _height(self) -> int:
        layout = self.layout()
        width = self.width()
        if layout is None or width <= 0 or not layout.hasHeightForWidth():
            return layout.sizeHint().height() if layout is not None else 0
        return layout.heightForWidth(width)

    def sizeHint(self):
        hint = super().sizeHint()
        hint.setHeight(self._height())
        return hint

    def minimumSizeHint(self):
        hint = super().minimumSizeHint()
        hint.setHeight(self._height())
        return hint

    def resizeEvent(self, event):
        super().resizeEvent(event)
        if event.oldSize().width() != event.size().width():
            self.updateGeometry()


class DockPage(Container):
    """A widget whose settings scroll above a footer that never does.

    The settings sit in sections inside a vertical scroll area; the main
    button, the progress, the status and the result sit in the footer
    below it (:meth:`add_footer`), always in view. Docked on the right of
    napari beside the other widgets at 1280 × 800, the settings scroll
    rather than push the button or the result out of sight, and the page
    asks for no more width than its narrowest useful layout (labels wrap,
    combo boxes shrink), so the canvas keeps half the window.
    """

    def __init__(self):
        super().__init__(labels=False)
        self.margins = (0, 0, 0, 0)
        self._forms: list[Container] = []
        self.page = QWidget()
        self._page_layout = QVBoxLayout(self.page)
        self._page_layout.setContentsMargins(4, 4, 4, 4)
        self.scroll = _PageScroll()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.scroll.setWidget(self.page)
        self.native.layout().addWidget(self.scroll, 1)
        self.footer = _Footer()
        self._footer_layout = QVBoxLayout(self.footer)
        self._footer_layout.setContentsMargins(4, 2, 4, 4)
        self._footer_layout.setSpacing(4)
        self.footer.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)
        self.native.layout().addWidget(self.footer, 0)
        # Expanding: beside other docked widgets this one takes the spare height.
        self.native.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)

    def add_form(self, widgets, title: str | None = None, expanded: bool = True) -> Container:
        """Add labelled controls, in a collapsible section when ``title`` is given."""
        form = Container(labels=True, widgets=widgets)
        form.margins = (0, 0, 0, 0)
        for widget in widgets:
            if hasattr(widget, "choices"):
                narrow_combo(widget)
        self._forms.append(form)
        if title is None:
            self._page_layout.addWidget(form.native)
        else:
            self.add_section(title, form.native, expanded)
        return form

    def add_section(self, title: str, qwidget: QWidget, expanded: bool = True) -> QCollapsible:
        """Add a Qt widget in a collapsible section."""
        box = QCollapsible(title)
        box.setDuration(0)
        box.addWidget(qwidget)
        if expanded:
            box.expand(animate=False)
        else:
            box.collapse(animate=False)
        self._page_layout.addWidget(box)
        return box

    def add_qt(self, qwidget: QWidget) -> None:
        """Add a Qt widget to the page."""
        self._page_layout.addWidget(qwidget)

    def add_footer(self, qwidget: QWidget) -> None:
        """Add a Qt widget to the footer: always in view, never scrolled."""
        self._footer_layout.addWidget(qwidget)

    def finish(self) -> None:
        """Push the controls to the top of the page."""
        self._page_layout.addStretch(1)

    def reset_choices(self, *_args) -> None:
        for form in self._forms:
            form.reset_choices()


class WorkerRunner:
    """Runs one core generator at a time in a thread, wired to a widget.

    Progress events move the widget's progress bar and a napari activity
    progress; Cancel stops the work at its next yield, in the worker thread,
    so the generator's clean-up runs there at once; errors go to napari's
    notifications. Layers are only touched in ``on_done``, on the main thread.
    """

    def __init__(self, widget, description: str):
        self.widget = widget
        self.description = description
        self.worker: GeneratorWorker | None = None
        self.cancelling = False
        self._pbar = None
        self._on_cancelled: Callable[[], None] | None = None
        self._shown_at = 0.0
        self._last_stage = None
        self._bar: Callable[[Progress], tuple[int, int] | None] | None = None

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(
        self,
        gen: Generator[Progress, None, object],
        on_done: Callable[[object], None],
        on_progress: Callable[[Progress], None] | None = None,
        on_cancelled: Callable[[], None] | None = None,
        bar: Callable[[Progress], tuple[int, int] | None] | None = None,
    ) -> GeneratorWorker | None:
        """Run ``gen`` in a worker; ``on_done(result)`` or ``on_cancelled()`` at the end.

        ``bar(event)`` gives the progress bar's ``(done, total)`` for an event,
        or None to leave it where it is (by default the event's own, and an
        event of unknown total leaves it).
        """
        if self.worker is not None:
            show_info(f"{self.description} is already running")
            return None

        def guarded():
            try:
                while True:
                    try:
                        event = next(gen)
                    except StopIteration as stop:
                        return stop.value
                    except RuntimeError as exc:
                        # superqt takes a RuntimeError from the work for a deleted
                        # worker and never emits `finished`; torch raises
                        # RuntimeError for real errors.
                        raise WBCError(str(exc)) from exc
                    yield event
                    if self.cancelling:
                        return CANCELLED
            finally:
                gen.close()  # clean-up (temporary files, grad mode) in this thread

        # Errors are shown by _on_error; do not also re-raise them in the Qt loop.
        worker = create_worker(guarded, _start_thread=False, _ignore_errors=True)
        self.worker = worker
        self.cancelling = False
        self._on_cancelled = on_cancelled
        self._bar = bar
        self._shown_at, self._last_stage = 0.0, None
        self._pbar = napari_progress(total=0, desc=self.description)
        worker.yielded.connect(self._on_yielded)
        if on_progress is not None:
            worker.yielded.connect(on_progress)
        worker.returned.connect(lambda value: self._on_returned(value, on_done))
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._set_running(True)
        self.widget.status.value = f"{self.description}: started"
        worker.start()
        return worker

    def cancel(self) -> None:
        """Stop the work at its next progress event."""
        if self.worker is not None and not self.cancelling:
            self.cancelling = True
            self.widget.status.value = f"{self.description}: cancelling…"
            self.widget.cancel_button.enabled = False

    def notify_error(self, message: str) -> None:
        self.widget.status.value = message
        show_error(message)

    # -- signal handlers (main thread) -------------------------------------
    def _on_yielded(self, event: Progress) -> None:
        now = time.monotonic()
        final = bool(event.total) and event.done >= event.total
        if event.stage == self._last_stage and not final and now - self._shown_at < _UI_INTERVAL:
            return
        self._shown_at, self._last_stage = now, event.stage
        if self._bar is not None:
            shown = self._bar(event)
        else:
            shown = (event.done, event.total) if event.total else None
        if shown is not None:
            done, total = shown
            bar = self.widget.progress
            bar.max = max(total, 1)
            bar.value = min(max(done, 0), bar.max)
        if not self.cancelling:  # keep "cancelling…" until the work stops
            self.widget.status.value = plain_status(event)
        pbar = self._pbar  # a handler below may process events and close it
        if pbar is not None and shown is not None:
            if pbar.total != shown[1]:
                pbar.total = shown[1]
            # The stage is shown in the widget; napari's activity bar keeps its
            # first description: setting a new one re-lays out the activity
            # panel, up to 0.1 s on the main thread each time.
            pbar.n = shown[0]

    def _on_returned(self, value, on_done) -> None:
        if value is CANCELLED:
            self.widget.status.value = f"{self.description}: cancelled"
            if self._on_cancelled is not None:
                self._on_cancelled()
        else:
            on_done(value)

    def _on_error(self, exc: BaseException) -> None:
        log.debug("%s failed", self.description, exc_info=exc)
        self.notify_error(f"{self.description} failed: {exc}")

    def _on_finished(self) -> None:
        self.worker = None
        self.cancelling = False
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._set_running(False)

    def _set_running(self, running: bool) -> None:
        self.widget.run_button.enabled = not running
        self.widget.cancel_button.enabled = running
        if not running:
            self.widget.progress.value = 0


def button_row(*widgets) -> QWidget:
    """magicgui widgets side by side in one row, without margins."""
    row = Container(widgets=list(widgets), layout="horizontal", labels=False)
    row.margins = (0, 0, 0, 0)
    return row.native
