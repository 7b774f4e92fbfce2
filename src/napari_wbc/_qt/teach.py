"""Teach this lab: the Classify dock's rows that step through a few cells, then refit.

After a Classify run, "Teach this lab" picks about five cells per predicted
class (:func:`napari_wbc.teach.choose_cells_to_teach`) and shows them one by
one; the user confirms each ("Right", or Enter) or corrects it (its class's
number key, or the class then "Set class"), as the Train widget's "Set class"
does, so the count follows.
"Refit" teaches the model the confirmed and corrected cells in a worker
(:func:`napari_wbc.teach.iter_teach_smear`), saves it as a new model file,
offers it in the Classify model choice and classifies the smear again with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from magicgui.widgets import ComboBox, PushButton
from napari.layers import Points
from qtpy.QtCore import QEvent, QObject, Qt, QTimer
from qtpy.QtWidgets import QHBoxLayout, QStackedWidget, QWidget

from ._common import WorkerRunner, image_levels, narrow_combo, same_layer

#: Cells asked about per predicted class.
CELLS_PER_CLASS = 5


def _is_result(layer) -> bool:
    return isinstance(layer, Points) and bool(layer.metadata.get("napari_wbc_cells"))


def _key(value) -> int:
    return int(getattr(value, "value", value))


class _AnswerKeys(QObject):
    """While cells are asked about: Enter confirms, 1-9 correct to the class numbered so."""

    def __init__(self, panel):
        super().__init__()
        self.panel = panel

    def eventFilter(self, obj, event) -> bool:
        if event.type() != QEvent.Type.KeyPress or not self.panel.asking:
            return False
        key = _key(event.key())
        if key in (_key(Qt.Key.Key_Return), _key(Qt.Key.Key_Enter)):
            self.panel.confirm()
            return True
        if _key(Qt.Key.Key_1) <= key <= _key(Qt.Key.Key_9):
            self.panel.key_class(key - _key(Qt.Key.Key_0))
            return True
        return False


class TeachPanel:
    """The Teach rows of a :class:`~napari_wbc._qt.classify.ClassifyWidget`.

    Its worker reports through the Classify dock's progress bar, Cancel and
    status line; "Refit" is its main button.
    """

    def __init__(self, classify):
        self.classify = classify
        self.queue: list[int] = []
        self.position = 0
        self.layer: Points | None = None
        self.saved: Path | None = None
        self._taught: tuple[np.ndarray, list[str]] | None = None
        self._pending = False
        self.teach_button = PushButton(
            text="Teach this lab",
            tooltip="Step through about five cells of each class: confirm or correct each, "
            "then Refit teaches the model your lab's cells (seconds) and classifies again",
        )
        self.refit_button = PushButton(
            text="Refit",
            enabled=False,
            tooltip="Teach the model the cells you confirmed or corrected, save it as a new "
            "model file and classify the smear again with it",
        )
        self.right_button = PushButton(text="Right ✓", tooltip="The class is right (Enter)")
        self.pick = ComboBox(label="class", choices=self._class_choices)
        self.set_class_button = PushButton(
            text="Set class", tooltip="Give the cell the class chosen here"
        )
        narrow_combo(self.pick, characters=2)
        # One row of the Classify dock's footer (:meth:`footer_row`): Teach this lab
        # (and Export) at rest, the answers while a cell is asked about; Refit beside them.
        # Pages of a stack, not widgets shown and hidden: the row keeps its size, so
        # napari's dock area does not widen when the pages change.
        self.rest = QWidget()
        self.answers = QWidget()
        for page, widgets in (
            (self.rest, [self.teach_button.native]),
            (
                self.answers,
                [self.right_button.native, self.pick.native, self.set_class_button.native],
            ),
        ):
            layout = QHBoxLayout(page)
            layout.setContentsMargins(0, 0, 0, 0)
            layout.setSpacing(2)
            for widget in widgets:
                layout.addWidget(widget)
        self.pages = QStackedWidget()
        self.pages.addWidget(self.rest)
        self.pages.addWidget(self.answers)
        self.asking = False

        # For the WorkerRunner: the dock's status, progress and Cancel.
        self.status = classify.status
        self.progress = classify.progress
        self.cancel_button = classify.cancel_button
        self.run_button = self.refit_button
        self.runner = WorkerRunner(self, description="teaching")

        self.teach_button.clicked.connect(lambda: self.start())
        self.right_button.clicked.connect(lambda: self.confirm())
        self.set_class_button.clicked.connect(lambda: self.correct(self.pick.value))
        self.refit_button.clicked.connect(lambda: self.refit())
        # Enter confirms; the number keys 1-9 set the class numbered so in the picker.
        # Keys the dock's focused widget leaves unused; not the canvas's, where napari's
        # layer modes use the numbers.
        self._keys = _AnswerKeys(self)
        classify.native.installEventFilter(self._keys)

    # -- the cells ------------------------------------------------------------
    def result_layer(self) -> Points | None:
        """The layer taught from: the Classify dock's result, else the newest result in the viewer."""
        viewer = self.classify.viewer
        layer = getattr(self.classify, "result_layer", None)
        if layer is not None and any(same_layer(layer, other) for other in viewer.layers):
            return layer
        results = [other for other in viewer.layers if _is_result(other)]
        return results[-1] if results else None

    def class_names(self) -> list[str]:
        """The classes a cell can be given, in the picker's (and the number keys') order."""
        from ..annotations import EXCLUDED

        layer = self.layer if self.layer is not None else self.result_layer()
        classes = list(layer.metadata.get("classes", [])) if layer is not None else []
        return [*classes, EXCLUDED]

    def _class_choices(self, _w=None) -> list[tuple[str, str]]:
        # Shown with the number key that sets it ("3 lymphocyte"); the value is the name.
        names = self.class_names()
        return [(f"{i} {name}" if i <= 9 else name, name) for i, name in enumerate(names, 1)]

    def key_class(self, number: int) -> None:
        """Number key ``number`` (1-based, as shown in the picker): correct the cell to that class."""
        names = self.class_names()
        if 1 <= number <= len(names):
            self.correct(names[number - 1])

    def result_shown(self) -> None:
        """A Classify run finished: the cells asked about so far belong to the last result."""
        self.queue, self.position, self.layer = [], 0, None
        self.set_asking(False)
        self._update_refit()

    def start(self) -> int | None:
        """Choose the cells to ask about and show the first; returns its index."""
        from ..teach import choose_cells_to_teach

        layer = self.result_layer()
        if layer is None or len(layer.data) == 0:
            self.runner.notify_error("classify the cells first (Run)")
            return None
        self.layer = layer
        classes = list(layer.metadata.get("classes", []))
        features = layer.features
        probs = features[[f"p_{c}" for c in classes]].to_numpy(float)
        self.queue = [int(i) for i in choose_cells_to_teach(probs, layer.data, CELLS_PER_CLASS)]
        self.position = 0
        self.pick.reset_choices()
        self.set_asking(True)
        return self.show_cell()

    def current(self) -> int | None:
        """The index (in the result layer) of the cell asked about, or None when done."""
        if self.layer is None or self.position >= len(self.queue):
            return None
        return self.queue[self.position]

    def show_cell(self) -> int | None:
        """Select and centre on the cell asked about; the class picker starts on its class."""
        from ._cells import camera

        index = self.current()
        if index is None:
            self._finished_asking()
            return None
        layer = self.layer
        self.classify.viewer.layers.selection.active = layer
        layer.selected_data = {index}
        camera(self.classify.viewer).center = tuple(layer.data_to_world(layer.data[index])[-2:])
        row = layer.features.iloc[index]
        name = str(row.get("class", ""))
        if name in self.pick.choices:
            self.pick.value = name
        self.status.value = (
            f"Cell {self.position + 1} of {len(self.queue)}: {name}? "
            "Right ✓ (Enter), or its class's number key (as in the list), or pick it: Set class."
        )
        return index

    def confirm(self) -> None:
        """The cell asked about has the class shown: confirm it and go on."""
        index = self.current()
        if index is not None:
            self._answer(index, str(self.layer.features["class"].iloc[index]))

    def correct(self, name: str) -> None:
        """The cell asked about is a ``name``: correct it and go on."""
        index = self.current()
        if index is not None:
            self._answer(index, name)

    def _answer(self, index: int, name: str) -> None:
        from ._cells import set_cells_class

        set_cells_class(self.layer, [index], name)  # as Train's "Set class": the count follows
        self.position += 1
        self._update_refit()
        self.show_cell()

    def footer_row(self, *rest) -> QWidget:
        """The Teach row for the Classify footer; ``rest``: more widgets for the page at rest."""
        for widget in rest:
            self.rest.layout().addWidget(widget)
        row = QWidget()
        layout = QHBoxLayout(row)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addWidget(self.pages, 1)
        layout.addWidget(self.refit_button.native)
        return row

    def set_asking(self, asking: bool) -> None:
        """Show the answers (Right, class, Set class) while a cell is asked about, else Teach."""
        self.asking = bool(asking)
        self.pages.setCurrentWidget(self.answers if self.asking else self.rest)

    def _finished_asking(self) -> None:
        self.set_asking(False)
        n = len(self._reviewed()[1]) if self.layer is not None else 0
        self.status.value = (
            f"{n} cells confirmed or corrected. Refit teaches the model these cells and "
            "classifies the smear again."
        )

    def _reviewed(self) -> tuple[np.ndarray, list[str]]:
        """Positions (result layer pixels) and classes of the cells confirmed or corrected."""
        from ..annotations import cells_from_points

        layer = self.layer if self.layer is not None else self.result_layer()
        if layer is None or "reviewed" not in layer.features.columns:
            return np.zeros((0, 2)), []
        cells = cells_from_points(layer.data, layer.features)  # reviewed, not excluded
        return cells[["y", "x"]].to_numpy(float), list(cells["label"])

    def _update_refit(self) -> None:
        self.refit_button.enabled = bool(self._reviewed()[1]) and not self.runner.running

    # -- refit ------------------------------------------------------------------
    def _image(self, layer):
        name = layer.metadata.get("image_layer")
        viewer = self.classify.viewer
        if name is not None and name in viewer.layers:
            return viewer.layers[name]
        return self.classify.image.value

    def refit(self, config=None):
        """Teach the model the reviewed cells in a worker; then save, offer and classify again.

        ``config`` (a :class:`~napari_wbc.teach.TeachConfig`) overrides the
        defaults (tests, scripts).
        """
        from ..teach import free_model_path, iter_teach_smear, taught_models_dir

        layer = self.layer if self.layer is not None else self.result_layer()
        if layer is None:
            self.runner.notify_error("classify the cells first (Run)")
            return None
        self.layer = layer
        yx, labels = self._reviewed()
        image = self._image(layer)
        if not labels or image is None:
            self.runner.notify_error(
                "confirm or correct some cells first (Teach this lab)"
                if image is not None
                else "open the image the cells were classified on"
            )
            return None
        meta = layer.metadata
        asked = meta.get("model_asked", "auto")
        # With the automatic choice, the model it chose for this smear.
        model = (meta.get("model") or asked) if asked == "auto" else asked
        # The cells may lie on a layer with another scale: map through world.
        positions = np.array(
            [image.world_to_data(layer.data_to_world(p))[-2:] for p in yx]
        ).reshape(-1, 2)
        source = getattr(getattr(image, "source", None), "path", None)
        stem = Path(source).stem if source else image.name
        output = free_model_path(taught_models_dir(), f"{stem}-taught")
        device = self.classify.device.value
        gen = iter_teach_smear(
            image_levels(image)[0],
            positions,
            labels,
            model,
            meta["rbc_diameter_px"],
            bool(meta.get("stain_normalize", True)),
            config=config,
            device="cpu" if device == "auto" else device,
            source=image.name,
            save_to=output,
        )
        self._taught = (yx, labels)
        self.set_asking(False)
        return self.runner.start(gen, on_done=self._saved, on_cancelled=self._cancelled)

    def _cancelled(self) -> None:
        self.status.value = "Teaching cancelled: no model saved; your answers are kept."

    @property
    def busy(self) -> bool:
        """Teaching, or its model saved and the smear about to be classified again."""
        return self.runner.running or self._pending

    def _saved(self, path) -> None:
        """The taught model is saved: offer it and classify the smear again with it."""
        from ._cells import register_session_model

        self.saved = Path(path)
        register_session_model(path)
        self._pending = True
        # Once this worker has finished (it shares Cancel and the progress bar).
        QTimer.singleShot(0, self._classify_again)

    def _classify_again(self) -> None:
        classify = self.classify
        classify.model.value = str(self.saved)
        image = self._image(self.layer)
        if image is not None:
            classify.image.value = image
        try:
            classify.run(then=self._reclassified)
        finally:
            self._pending = False

    def _reclassified(self) -> None:
        """Keep the user's answers on the cells found again, and say what happened."""
        from ..teach import match_cells
        from ._cells import corrected_count, set_cells_class

        yx, labels = self._taught or (np.zeros((0, 2)), [])
        layer = self.result_layer()
        self.layer = layer
        kept = agreed = 0
        if layer is not None and labels:
            features = layer.features
            found = match_cells(yx, layer.data, features.get("diameter"))
            classes = features["class"].astype(str).to_numpy()
            by_class: dict[str, list[int]] = {}
            for i, name in zip(found, labels, strict=True):
                if i >= 0:
                    agreed += int(classes[i] == name)
                    by_class.setdefault(name, []).append(int(i))
            for name, rows in by_class.items():
                set_cells_class(layer, rows, name)
                kept += len(rows)
            # The Classify run is still closing: count the answers now.
            self.classify.counts.show_counts(
                corrected_count(layer.features, layer.metadata.get("classes"))
            )
        where = f"{self.saved.name} in {self.saved.parent}" if self.saved else "a new file"
        self.status.value = (
            f"Taught with {len(labels)} cells; saved as {where}. The smear was classified "
            f"again with it: {agreed} of {kept} taught cells come out as you taught them, "
            "and your answers are kept in the count. The taught model is in the model choice "
            "for this lab's next smears."
        )
