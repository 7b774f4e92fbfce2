"""The Train widget: fine-tune the classifier from cells annotated in napari."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.layers import Labels, Points

from ._common import WorkerRunner, image_levels, rgb_image_layers
from .classify import SESSION_MODELS, camera, register_session_model

if TYPE_CHECKING:
    import napari

SOURCE_LABELS = "labels layer"
SOURCE_POINTS = "points layer (class feature)"
SOURCE_CROPS = "crops (CSV or folder)"
BASE_DEFAULT = "default ensemble (first member)"
BASE_FILE = "model file…"
SCRATCH = "from scratch: "
STAGES = [("both stages", "both"), ("stage 2 only (quick)", "stage2"), ("stage 1 only", "stage1")]


class LossPlot:
    """Loss and validation macro-F1 per epoch, drawn with matplotlib in the widget."""

    def __init__(self):
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(4, 2.4), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(160)
        self.loss_ax = self.figure.add_subplot(111)
        self.f1_ax = self.loss_ax.twinx()
        self.epochs: list[dict] = []
        self.clear()

    def clear(self) -> None:
        self.epochs = []
        self._draw()

    def add(self, entry: dict) -> None:
        self.epochs.append(entry)
        self._draw()

    def _draw(self) -> None:
        x = np.arange(1, len(self.epochs) + 1)
        loss = [e["loss"] for e in self.epochs]
        f1 = [e["val_macro_f1"] for e in self.epochs]
        self.loss_ax.clear()
        self.f1_ax.clear()
        self.loss_ax.plot(x, loss, "o-", color="tab:blue", label="loss")
        self.f1_ax.plot(x, f1, "s-", color="tab:orange", label="val macro-F1")
        self.f1_ax.set_ylim(0, 1)
        self.loss_ax.set_xlabel("epoch (stage 1, then stage 2)")
        self.loss_ax.set_ylabel("loss", color="tab:blue")
        self.f1_ax.set_ylabel("val macro-F1", color="tab:orange")
        self.canvas.draw_idle()


class TrainWidget(Container):
    """Fine-tune a classifier on cells annotated in napari, and review classified cells."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._image_choices)
        self.source = ComboBox(
            label="annotations", choices=[SOURCE_LABELS, SOURCE_POINTS, SOURCE_CROPS]
        )
        self.layer = ComboBox(label="layer", choices=self._layer_choices)
        self.crops = FileEdit(label="crops", mode="r", visible=False)
        self.base = ComboBox(label="base model", choices=self._base_choices)
        self.base_file = FileEdit(label="model file", filter="*.safetensors *.json", visible=False)
        self.classes = LineEdit(label="classes (label value = position)")
        self.new_class = LineEdit(label="new class")
        self.add_class_button = PushButton(text="Add class")
        self.counts = Label(label="cells per class", value="")
        self.count_button = PushButton(text="Count annotations")
        self.pick = ComboBox(label="class", choices=self._class_list)
        self.set_class_button = PushButton(text="Set class of selected points")
        self.stages = ComboBox(label="stages", choices=STAGES, value="both")
        self.epochs1 = SpinBox(label="epochs stage 1", value=5, min=1, max=500)
        self.epochs2 = SpinBox(label="epochs stage 2", value=5, min=0, max=500)
        self.val_fraction = FloatSpinBox(
            label="validation fraction", value=0.2, min=0.05, max=0.9, step=0.05
        )
        self.seed = SpinBox(label="seed", value=0, min=0, max=2**31 - 1)
        self.output = FileEdit(label="output", mode="w", filter="*.safetensors")
        self.run_button = PushButton(text="Train")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, max=1)
        self.status = Label(value="")
        self.review_by = ComboBox(label="review by", choices=["confidence", "disagreement"])
        self.review_button = PushButton(text="Next cell to review")
        self._cancelling = False
        self.extend(
            [
                self.image, self.source, self.layer, self.crops, self.base, self.base_file,
                self.classes, self.new_class, self.add_class_button, self.counts,
                self.count_button, self.pick, self.set_class_button, self.stages,
                self.epochs1, self.epochs2,
                self.val_fraction, self.seed, self.output, self.run_button,
                self.cancel_button, self.progress, self.status,
            ]
        )  # fmt: skip
        self.plot = LossPlot()
        self.native.layout().addWidget(self.plot.canvas)
        self.extend([self.review_by, self.review_button])
        self.runner = WorkerRunner(self, description="training")
        self.model_path: Path | None = None
        self._review: tuple[object, str, np.ndarray] | None = None
        self._review_pos = 0

        self.source.changed.connect(self._on_source_changed)
        self.base.changed.connect(self._on_base_changed)
        self.add_class_button.clicked.connect(lambda: self.add_class(self.new_class.value))
        self.classes.changed.connect(lambda _v: self.pick.reset_choices())
        self.set_class_button.clicked.connect(lambda: self.set_class(self.pick.value))
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
        kind = Points if self.source.value == SOURCE_POINTS else Labels
        return [(layer.name, layer) for layer in self.viewer.layers if isinstance(layer, kind)]

    def _base_choices(self, _w=None):
        from ..models.registry import get_preset, list_presets

        scratch = [SCRATCH + spec.name for name in list_presets() for spec in get_preset(name)]
        return [BASE_DEFAULT, *[str(p) for p in SESSION_MODELS], BASE_FILE, *scratch]

    def _class_list(self, _w=None) -> list[str]:
        return [c.strip() for c in self.classes.value.split(",") if c.strip()]

    def _refresh_layers(self, _event=None):
        self.image.reset_choices()
        self.layer.reset_choices()
        self.base.reset_choices()

    def _on_source_changed(self, value):
        self.layer.visible = value != SOURCE_CROPS
        self.crops.visible = value == SOURCE_CROPS
        self.layer.reset_choices()
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
        """Set the ``class`` feature of the selected points of the points layer."""
        layer = self._points_target()
        if layer is None or not layer.selected_data:
            self.runner.notify_error("select some points of a points layer first")
            return
        features = layer.features.copy()
        if "class" not in features.columns:
            features["class"] = pd.Series([""] * len(layer.data), dtype=object)
        features["class"] = features["class"].astype(object)
        rows = sorted(layer.selected_data)
        features.loc[rows, "class"] = name
        layer.features = features
        from ..export import class_colour

        colours = np.asarray(layer.face_color).copy()
        colours[rows] = [*np.asarray(class_colour(name)) / 255, 1.0]
        layer.face_color = colours
        self.status.value = f"{len(rows)} point(s) set to {name}"
        self.update_counts()

    def _points_target(self) -> Points | None:
        if self.source.value == SOURCE_POINTS and isinstance(self.layer.value, Points):
            return self.layer.value
        active = self.viewer.layers.selection.active
        return active if isinstance(active, Points) else None

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
            cells = cells_from_points(layer.data, layer.features)
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
        text = text or "no annotated cells"
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
        self._cancelling = False
        return self.runner.start(
            self._drive(gen), on_done=self._done, on_progress=self._on_progress
        )

    def _drive(self, gen):
        """Run ``gen`` in the worker thread; stop it there when Cancel is pressed.

        Cancelling from inside the worker (instead of quitting it) closes the
        generator in the thread that ran it, so its clean-up (no model file,
        no working folder) happens at once, and torch's thread-local grad
        mode, switched off while the trainer validates, is restored in that
        pooled thread rather than left off for the next worker.
        """
        import torch

        from ..errors import WBCError

        torch.set_grad_enabled(True)  # pooled threads may carry another run's state
        try:
            while True:
                try:
                    event = next(gen)
                except StopIteration as stop:
                    return stop.value
                except RuntimeError as exc:
                    # superqt treats a RuntimeError as a deleted worker and never
                    # reports it; pass it on as an error the user gets to see.
                    raise WBCError(f"training failed: {exc}") from exc
                yield event
                if self._cancelling:
                    return None
        finally:
            gen.close()

    def cancel(self):
        """Stop training at the next batch; no model file is written."""
        if self.runner.running:
            self._cancelling = True
            self.status.value = "training: cancelling…"

    def _on_progress(self, event):
        if event.info.get("event") == "epoch":
            self.plot.add(event.info)

    def _done(self, path):
        if path is None:  # cancelled
            self.status.value = "training: cancelled; no model written"
            return
        self.model_path = Path(path)
        register_session_model(path)
        self.base.reset_choices()
        last = self.plot.epochs[-1]["val_macro_f1"] if self.plot.epochs else float("nan")
        self.status.value = (
            f"saved {Path(path).name} (val macro-F1 {last:.2f}); "
            "it is now offered in the Classify widget"
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
        if self._review is None or self._review[0] is not layer or self._review[1] != by:
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
        if "class" in layer.features.columns and row.get("class") in self._class_list():
            self.pick.value = row["class"]
        return index
