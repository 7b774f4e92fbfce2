"""The Train widget: fine-tune the classifier from cells annotated in napari."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.layers import Labels, Points
from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

from ..annotations import DEFAULT_MIN_CONFIDENCE, EXCLUDED
from ._cells import SESSION_MODELS, camera, register_session_model, set_cells_class
from ._common import (
    DockPage,
    WorkerRunner,
    button_row,
    image_levels,
    narrow_combo,
    rgb_image_layers,
    same_layer,
    warm_up_models,
    wrapping_label,
)

if TYPE_CHECKING:
    import napari

SOURCE_LABELS = "labels layer"
SOURCE_POINTS = "points layer (class feature)"
SOURCE_CROPS = "crops (CSV or folder)"
BASE_DEFAULT = "default ensemble (first member)"
BASE_FILE = "model file…"
SCRATCH = "from scratch: "
STAGES = [("both stages", "both"), ("stage 2 only (quick)", "stage2"), ("stage 1 only", "stage1")]


STAGE_NAMES = {1: "stage 1", 2: "stage 2"}


class LossPlot(QWidget):
    """Loss and validation macro-F1 per whole epoch, drawn with QPainter.

    A few lines drawn by hand cost well under a millisecond per epoch on the
    main thread, where a matplotlib redraw took hundreds. The x axis counts
    whole epochs; the caption names the stages actually trained.
    """

    LOSS = QColor(31, 119, 180)
    F1 = QColor(255, 127, 14)

    def __init__(self):
        super().__init__()
        self.epochs: list[dict] = []
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setFixedHeight(130)

    @property
    def canvas(self) -> QWidget:
        return self

    def clear(self) -> None:
        self.epochs = []
        self.update()

    def add(self, entry: dict) -> None:
        self.epochs.append(entry)
        self.update()

    def caption(self) -> str:
        """What the x axis shows, naming only the stages trained."""
        stages = sorted({int(e.get("stage", 1)) for e in self.epochs})
        if not stages:
            return "epoch"
        return "epoch (" + ", then ".join(STAGE_NAMES.get(s, f"stage {s}") for s in stages) + ")"

    def paintEvent(self, _event) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        text = self.palette().windowText().color()
        metrics = painter.fontMetrics()
        line = metrics.height()
        left, right, top, bottom = 8 + metrics.horizontalAdvance("0.00"), 8, line + 4, 2 * line + 4
        width, height = self.width() - left - right, self.height() - top - bottom
        if width < 20 or height < 20:
            return
        painter.setPen(QPen(text, 1))
        painter.drawRect(left, top, width, height)
        painter.setPen(QPen(self.LOSS, 1))
        painter.drawText(left, line, "loss")
        painter.setPen(QPen(self.F1, 1))
        painter.drawText(left + metrics.horizontalAdvance("loss   "), line, "val macro-F1 (0–1)")
        painter.setPen(QPen(text, 1))
        painter.drawText(left, self.height() - 4, self.caption())
        n = len(self.epochs)
        if n == 0:
            return
        xs = [left + width * (i + 0.5) / n for i in range(n)]
        # Whole-epoch ticks: at most ~8 labels.
        step = max(1, int(np.ceil(n / 8)))
        for i in range(0, n, step):
            painter.drawText(int(xs[i]) - 4, top + height + line, str(i + 1))
        for i in range(1, n):  # a dotted line where stage 2 starts
            if self.epochs[i].get("stage") != self.epochs[i - 1].get("stage"):
                painter.setPen(QPen(text, 1, Qt.PenStyle.DotLine))
                x = (xs[i - 1] + xs[i]) / 2
                painter.drawLine(QPointF(x, top), QPointF(x, top + height))
        loss = np.array([e["loss"] for e in self.epochs], float)
        peak = float(np.nanmax(loss)) if np.isfinite(loss).any() else 1.0
        painter.setPen(QPen(text, 1))
        painter.drawText(2, top + line, f"{peak:.2f}")
        f1 = np.array([e["val_macro_f1"] for e in self.epochs], float)
        for values, colour in ((loss / max(peak, 1e-9), self.LOSS), (f1, self.F1)):
            painter.setPen(QPen(colour, 2))
            ys = [top + height * (1 - min(max(v, 0.0), 1.0)) for v in np.nan_to_num(values)]
            points = [QPointF(x, y) for x, y in zip(xs, ys, strict=True)]
            painter.drawPolyline(QPolygonF(points))
            for point in points:
                painter.drawEllipse(point, 2.5, 2.5)


def training_bar(config):
    """The progress bar over every epoch of the stages run: ``bar(event) -> (done, total)``.

    The trainer counts each stage's batches from 0 and validates between
    epochs with no total; one bar over both stages never goes back.
    Preparation (scale, crops, features) leaves the bar where it is.
    """
    steps = 1000
    stage1 = config.epochs_stage1 if config.stages in ("both", "stage1") else 0
    stage2 = config.epochs_stage2 if config.stages in ("both", "stage2") else 0
    total = max(stage1 + stage2, 1) * steps

    def bar(event):
        if event.stage == "done":
            return total, total
        if event.stage not in ("stage1", "stage2") or "batch" not in event.info:
            return None
        if not event.total:
            return None
        offset, epochs = (0, stage1) if event.stage == "stage1" else (stage1, stage2)
        return offset * steps + event.done * epochs * steps // event.total, total

    return bar


def saved_macro_f1(path) -> float | None:
    """The validation macro-F1 a saved model file records, if any."""
    from ..errors import WBCError
    from ..models.files import read_model_config

    try:
        metrics = read_model_config(path).metrics or {}
    except (OSError, ValueError, WBCError):
        return None
    value = metrics.get("macro_f1")
    return None if value is None else float(value)


def _is_result(layer) -> bool:
    """Whether a layer is a Classify widget's result (cells with predicted classes)."""
    return isinstance(layer, Points) and bool(layer.metadata.get("napari_wbc_cells"))


class TrainWidget(DockPage):
    """Fine-tune a classifier on cells annotated in napari, and review classified cells."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        warm_up_models()  # torch loads while the user picks the settings
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._image_choices)
        self.source = ComboBox(
            label="annotations", choices=[SOURCE_POINTS, SOURCE_LABELS, SOURCE_CROPS]
        )
        self.layer = ComboBox(label="layer", choices=self._layer_choices)
        self.crops = FileEdit(label="crops", mode="r", visible=False)
        self.classes = LineEdit(label="classes", tooltip="label value = position in this list")
        self.new_class = LineEdit(label="new class")
        self.review_by = ComboBox(label="review by", choices=["confidence", "disagreement"])
        self.review_button = PushButton(
            text="Next cell", tooltip="Select and centre on the next cell to review"
        )
        self.pick = ComboBox(
            label="class", choices=self._pick_choices, tooltip="The class to give the cells"
        )
        self.set_class_button = PushButton(
            text="Set class",
            tooltip="Set the class of the selected cells: confirms or corrects them; only the "
            "cells you confirmed or corrected are trained on",
        )
        self.include_predicted = CheckBox(
            text="use confident predictions",
            value=False,
            tooltip="By default only the cells you confirmed or corrected count",
        )
        self.min_confidence = FloatSpinBox(
            label="confidence ≥", value=DEFAULT_MIN_CONFIDENCE, min=0.0, max=1.0, step=0.05,
            visible=False,
        )  # fmt: skip
        self.counts = wrapping_label(value="")
        self.count_button = PushButton(text="Count annotations")
        self.add_class_button = PushButton(text="Add class")
        self.base = ComboBox(label="base model", choices=self._base_choices)
        self.base_file = FileEdit(label="model file", filter="*.safetensors *.json", visible=False)
        self.stages = ComboBox(label="stages", choices=STAGES, value="both")
        self.epochs1 = SpinBox(label="epochs, stage 1", value=5, min=1, max=500)
        self.epochs2 = SpinBox(label="epochs, stage 2", value=5, min=0, max=500)
        self.val_fraction = FloatSpinBox(
            label="validation", value=0.2, min=0.05, max=0.9, step=0.05
        )
        self.seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1)
        self.output = FileEdit(label="output", mode="w", filter="*.safetensors")
        self.run_button = PushButton(text="Train")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, max=1)
        self.status = wrapping_label(value="")

        self.add_form([self.image, self.source, self.layer, self.crops])
        review = Container(
            widgets=[self.review_by, self.include_predicted, self.min_confidence], labels=True
        )
        review.margins = (0, 0, 0, 0)
        self._forms.append(review)
        self.add_section("Review and correct", review.native)
        self.add_qt(self.counts.native)
        self.add_form([self.count_button])
        self.add_form(
            [self.classes, self.new_class, self.add_class_button], title="Classes", expanded=False
        )
        self.add_form(
            [self.base, self.base_file, self.stages, self.epochs1, self.epochs2,
             self.val_fraction, self.seed, self.output],
            title="Training settings",
            expanded=False,
        )  # fmt: skip
        self.plot = LossPlot()
        self.add_section("Loss and validation per round", self.plot)
        self.finish()
        # Always in view: confirming or correcting a cell (one click each), Train,
        # the progress and the status.
        narrow_combo(self.pick, characters=5)
        self.add_footer(button_row(self.review_button, self.pick, self.set_class_button))
        self.add_footer(button_row(self.run_button, self.cancel_button, self.progress))
        self.add_footer(self.status.native)

        self.runner = WorkerRunner(self, description="training")
        self.model_path: Path | None = None
        self._review: tuple[object, str, np.ndarray] | None = None
        self._review_pos = 0

        self.source.changed.connect(self._on_source_changed)
        self.base.changed.connect(self._on_base_changed)
        self.add_class_button.clicked.connect(lambda: self.add_class(self.new_class.value))
        self.classes.changed.connect(self._on_classes_changed)
        self.set_class_button.clicked.connect(lambda: self.set_class(self.pick.value))
        self.include_predicted.changed.connect(self._on_include_predicted)
        self.min_confidence.changed.connect(lambda _v: self.update_counts())
        self.layer.changed.connect(lambda _v: self.update_counts())
        self.count_button.clicked.connect(self.update_counts)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.review_button.clicked.connect(self.review_next)
        self.review_by.changed.connect(lambda _v: setattr(self, "_review", None))
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._on_base_changed(self.base.value)

    # -- choices -----------------------------------------------------------
    def _image_choices(self, _w=None):
        return [(layer.name, layer) for layer in rgb_image_layers(self.viewer)]

    def _layer_choices(self, _w=None):
        """Layers of the chosen kind; Classify results first, the newest first (the default)."""
        kind = Points if self.source.value == SOURCE_POINTS else Labels
        layers = [layer for layer in self.viewer.layers if isinstance(layer, kind)]
        results = [layer for layer in reversed(layers) if _is_result(layer)]
        others = [layer for layer in layers if not _is_result(layer)]
        return [(layer.name, layer) for layer in results + others]

    def _base_choices(self, _w=None):
        from ..models.registry import get_preset, list_presets

        scratch = [SCRATCH + spec.name for name in list_presets() for spec in get_preset(name)]
        return [BASE_DEFAULT, *[str(p) for p in SESSION_MODELS], BASE_FILE, *scratch]

    def _class_list(self, _w=None) -> list[str]:
        return [c.strip() for c in self.classes.value.split(",") if c.strip()]

    def _pick_choices(self, _w=None) -> list[str]:
        return [*self._class_list(), EXCLUDED]

    def _refresh_layers(self, event=None):
        self.image.reset_choices()
        self.layer.reset_choices()
        self.base.reset_choices()
        new = getattr(event, "value", None) if getattr(event, "type", "") == "inserted" else None
        if new is not None and _is_result(new) and self.source.value == SOURCE_POINTS:
            # A new Classify result: its cells are the ones to confirm or correct.
            self.layer.value = self._choice_for(new)

    def _on_classes_changed(self, _value=None):
        self.pick.reset_choices()
        if self.pick.value == EXCLUDED and self._class_list():
            self.pick.value = self._class_list()[0]  # "Set class" never excludes by default

    def _on_source_changed(self, value):
        self.layer.visible = value != SOURCE_CROPS
        self.crops.visible = value == SOURCE_CROPS
        self.layer.reset_choices()
        self.update_counts()

    def _on_include_predicted(self, value):
        self.min_confidence.visible = bool(value)
        self.update_counts()

    def _on_base_changed(self, value):
        """Show the file picker when needed; take the class list from the base model."""
        from ..errors import WBCError
        from ..models.files import read_model_config
        from ..models.registry import PBC_CLASSES

        self.base_file.visible = value == BASE_FILE
        try:
            path = self._base_path()
        except (ValueError, WBCError):
            # No usable base yet (e.g. no default model installed): offer the PBC classes.
            if not self.classes.value:
                self.classes.value = ", ".join(PBC_CLASSES)
            return
        if path is None:
            classes = PBC_CLASSES if not self.classes.value else self._class_list()
        else:
            from ..annotations import base_model_file

            classes = read_model_config(base_model_file(path)).classes
        extra = [c for c in self._class_list() if c not in classes]
        self.classes.value = ", ".join([*classes, *extra])

    def _base_path(self) -> str | None:
        """The base model file or ensemble, or None to train from scratch."""
        choice = self.base.value
        if choice == BASE_DEFAULT:
            from ..models.files import default_model_path

            return str(default_model_path())
        if choice == BASE_FILE:
            path = Path(self.base_file.value)
            if not path.is_file():
                raise ValueError("choose a base model file (.safetensors or ensemble .json)")
            return str(path)
        if choice.startswith(SCRATCH):
            return None
        return choice

    # -- annotations ---------------------------------------------------------
    def add_class(self, name: str) -> None:
        """Append a class (e.g. "blast") to the class list."""
        name = name.strip()
        if name and name not in self._class_list():
            self.classes.value = ", ".join([*self._class_list(), name])
            self.new_class.value = ""

    def set_class(self, name: str) -> None:
        """Set the ``class`` of the selected points, confirming or correcting them.

        On the Classify output the points are also marked ``reviewed``: only
        reviewed cells are trained on by default. :data:`EXCLUDED` keeps a
        point out of training (not a white cell, or unsure).
        """
        layer = self._points_target()
        if layer is None or not layer.selected_data:
            self.runner.notify_error(
                "select a cell first: choose the cells layer, then click the cell "
                "with the select tool (arrow)"
            )
            return
        rows = sorted(layer.selected_data)
        set_cells_class(layer, rows, name)
        self.status.value = f"{len(rows)} point(s) set to {name}"
        self.update_counts()

    def _points_target(self) -> Points | None:
        """The Points layer whose selected cells "Set class" applies to.

        The layer chosen above when cells are selected in it; else the layer
        where the user selected them (then chosen above, so that the
        corrections made there are the ones trained on).
        """
        chosen = self.layer.value if self.source.value == SOURCE_POINTS else None
        chosen = chosen if isinstance(chosen, Points) else None
        if chosen is not None and chosen.selected_data:
            return chosen
        active = self.viewer.layers.selection.active
        if isinstance(active, Points) and active.selected_data:
            if self.source.value == SOURCE_POINTS and not same_layer(active, chosen):
                self.layer.value = self._choice_for(active)
            return active
        return chosen if chosen is not None else (active if isinstance(active, Points) else None)

    def _choice_for(self, layer):
        """The layer choice that is ``layer`` (choices hold napari's proxies)."""
        for choice in self.layer.choices:
            if same_layer(choice, layer):
                return choice
        return self.layer.value

    def _cells(self) -> pd.DataFrame | None:
        """Annotated cells in image pixels (y, x, label); None for ready-made crops."""
        from ..annotations import cells_from_labels, cells_from_points

        if self.source.value == SOURCE_CROPS:
            return None
        layer = self.layer.value
        if layer is None:
            raise ValueError(f"choose the {self.source.value} holding the annotations")
        if isinstance(layer, Labels):
            cells = cells_from_labels(np.asarray(layer.data), self._class_list())
        else:
            cells = cells_from_points(
                layer.data,
                layer.features,
                include_predicted=self.include_predicted.value,
                min_confidence=self.min_confidence.value,
            )
        image = self.image.value
        if image is not None and len(cells):
            # Annotations may be drawn on a layer with another scale: map through world.
            yx = cells[["y", "x"]].to_numpy(float)
            mapped = np.array([image.world_to_data(layer.data_to_world(p))[-2:] for p in yx])
            cells[["y", "x"]] = mapped.reshape(-1, 2)
        return cells

    def update_counts(self) -> pd.DataFrame | None:
        """Show the cells per class of the annotations, with warnings for too few."""
        from ..annotations import annotation_summary
        from ..errors import WBCError

        try:
            cells = self._cells()
        except (ValueError, WBCError) as exc:
            self.counts.value = str(exc)
            return None
        if cells is None:
            self.counts.value = "counted when training starts"
            return None
        table, warnings = annotation_summary(cells, self._class_list())
        shown = table[table["count"] > 0]
        text = ", ".join(f"{r['class']}: {r['count']}" for r in shown.to_dict("records"))
        if not text:
            text = "no annotated cells"
            if "reviewed" in getattr(self.layer.value, "features", {}):
                text += " yet: confirm or correct classified cells (Review and correct)"
        if warnings:
            text += "\n⚠ too few: " + "; ".join(warnings)
        self.counts.value = text
        return table

    # -- training --------------------------------------------------------------
    def _config(self):
        from ..training import TrainConfig

        scratch = self.base.value.startswith(SCRATCH)
        return TrainConfig(
            **({"spec": self.base.value[len(SCRATCH) :]} if scratch else {}),
            epochs_stage1=self.epochs1.value,
            epochs_stage2=self.epochs2.value,
            val_fraction=self.val_fraction.value,
            seed=self.seed.value,
            stages=self.stages.value,
        )

    def _output_path(self) -> Path:
        value = str(self.output.value or "")
        if value in ("", "."):
            raise ValueError("choose where to save the trained model (output)")
        path = Path(value)
        return path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")

    def run(self, config=None):
        """Train in a worker; on success the model is offered in every Classify widget.

        ``config`` (a TrainConfig) overrides the widget's settings (tests, scripts).
        """
        from ..annotations import check_trainable, iter_finetune, iter_finetune_crops
        from ..datasets import load_labelled_crops
        from ..errors import WBCError

        try:
            config = config or self._config()
            config.validate()
            output = self._output_path()
            base = self._base_path()
            classes = self._class_list()
            cells = self._cells()
            if cells is None:
                crops = load_labelled_crops(self.crops.value)
                check_trainable(crops)
                gen = iter_finetune_crops(crops, base, output, config)
            else:
                layer = self.image.value
                if layer is None:
                    raise ValueError("open the RGB image the annotations belong to")
                check_trainable(cells, classes)
                gen = iter_finetune(
                    image_levels(layer)[0],
                    cells,
                    classes,
                    base,
                    output,
                    config,
                    pixel_size_um=layer.metadata.get("pixel_size_um"),
                )
        except (ValueError, WBCError) as exc:
            self.runner.notify_error(str(exc))
            return None
        self.update_counts()
        self.plot.clear()
        return self.runner.start(
            self._drive(gen),
            on_done=self._done,
            on_progress=self._on_progress,
            on_cancelled=self._cancelled,
            bar=training_bar(config),
        )

    def _drive(self, gen):
        """Run ``gen`` in the worker thread with gradients on.

        Pooled threads may carry another run's grad mode (the trainer switches
        it off while validating); the runner closes ``gen`` in this thread on
        Cancel, so its clean-up (no model file, no working folder) runs at once.
        """
        import torch

        torch.set_grad_enabled(True)
        return (yield from gen)

    def cancel(self):
        """Stop training at the next batch; no model file is written."""
        self.runner.cancel()

    def _on_progress(self, event):
        if event.info.get("event") == "epoch":
            self.plot.add(event.info)

    def _cancelled(self):
        self.status.value = "training: cancelled; no model written"

    def _done(self, path):
        self.model_path = Path(path)
        register_session_model(path)
        self.base.reset_choices()
        f1 = saved_macro_f1(path)
        if f1 is None and self.plot.epochs:  # no metrics in the file: the trainer's best
            f1 = self.plot.epochs[-1].get("best_val_macro_f1")
        score = (
            f" It scores a macro-F1 of {f1:.2f} on the validation cells (the best of its "
            "rounds, which is the one saved)."
            if f1 is not None
            else ""
        )
        self.status.value = (
            f"Saved {Path(path).name}.{score} It is now offered in the Classify widget."
        )

    # -- review ----------------------------------------------------------------
    def _classified_layer(self) -> Points | None:
        active = self.viewer.layers.selection.active
        if isinstance(active, Points) and active.metadata.get("napari_wbc_cells"):
            return active
        for layer in reversed(self.viewer.layers):
            if isinstance(layer, Points) and layer.metadata.get("napari_wbc_cells"):
                return layer
        return None

    def review_next(self) -> int | None:
        """Select and centre on the next cell to review (least confident first)."""
        from ..annotations import review_order

        layer = self._classified_layer()
        if layer is None or len(layer.data) == 0:
            self.runner.notify_error("classify the cells first (Classify widget)")
            return None
        by = self.review_by.value
        if self._review is None or not same_layer(self._review[0], layer) or self._review[1] != by:
            self._review = (layer, by, review_order(layer.features, by))
            self._review_pos = 0
        order = self._review[2]
        if len(order) != len(layer.data):  # the layer changed under us
            self._review = (layer, by, review_order(layer.features, by))
            order = self._review[2]
        index = int(order[self._review_pos % len(order)])
        self._review_pos += 1
        self.viewer.layers.selection.active = layer
        layer.selected_data = {index}
        camera(self.viewer).center = tuple(layer.data_to_world(layer.data[index])[-2:])
        row = layer.features.iloc[index]
        self.status.value = (
            f"cell {self._review_pos}/{len(order)}: {row.get('class', '?')} "
            f"(confidence {float(row.get('confidence', float('nan'))):.2f})"
        )
        if "class" in layer.features.columns and row.get("class") in self.pick.choices:
            self.pick.value = row["class"]  # "Set class" now confirms it
        return index
