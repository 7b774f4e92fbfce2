"""The Classify widget: find and classify white cells, count them, export them."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    FileEdit,
    FloatSpinBox,
    ProgressBar,
    PushButton,
)
from napari.layers import Labels, Points
from napari.utils.notifications import show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QMenu,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QToolButton,
)

from ._cells import (
    CLASSIFY_WIDGETS,
    SESSION_MODELS,
    SYMBOL_CELL,
    SYMBOL_REVIEW,
    camera,
    class_rgba,
    corrected_count,
)
from ._common import (
    OWNER_KEY,
    DockPage,
    WorkerRunner,
    button_row,
    image_levels,
    models_loaded,
    plain_route,
    rgb_image_layers,
    same_layer,
    warm_up_models,
    wrapping_label,
)

if TYPE_CHECKING:
    import napari

SOURCE_DETECT = "detect automatically"
SOURCE_POINTS = "points layer"
SOURCE_LABELS = "labels layer"
MODEL_AUTO = "automatic (chosen per image)"
MODEL_DEFAULT = "three-lab ensemble (any lab)"
MODEL_PBC = "PBC specialist (CellaVision-like images)"
MODEL_FILE = "model file…"

#: Cells are drawn hollow (rings; squares for review: _cells.SYMBOL_*), so the cell shows.
#: Rings are drawn this much wider than the cell, so they sit around it.
RING_SCALE = 1.35
#: Ring line width, relative to the marker size.
RING_WIDTH = 0.08

#: Milliseconds between the steps that show a new result layer.
_STEP_MS = 5


def image_frame(image_layer) -> dict:
    """Where an image layer sits in the world: scale, translate, units and its size."""
    return {
        "scale": tuple(image_layer.scale),
        "translate": tuple(image_layer.translate),
        "units": tuple(image_layer.units),
        "image_shape": tuple(int(n) for n in image_levels(image_layer)[0].shape[:2]),
    }


def cell_markers(cells: pd.DataFrame, frame: dict, show_labels: bool) -> tuple[np.ndarray, dict]:
    """Points data and keyword arguments for the classified cells (built off the main thread).

    Hollow markers in the class colour around each cell, squares for the cells
    to review, the class name as text, in the image's scale and units
    (``frame``, from :func:`image_frame`).
    """
    classes = cells.attrs.get("classes") or sorted(cells["class"].unique())
    features = cells.drop(columns=["y", "x"]).reset_index(drop=True)
    if "reviewed" not in features.columns:
        features["reviewed"] = False  # set when the user confirms or corrects a class
    review = features["needs_review"].to_numpy(bool)
    diameter = cells["diameter"] if "diameter" in cells.columns else pd.Series(dtype=float)
    size = float(np.nanmedian(diameter)) if diameter.notna().any() else 20.0
    colours = class_rgba(features["class"].astype(str).tolist())
    kwargs = dict(
        features=features,
        face_color="transparent",
        border_color=colours if len(colours) else "white",
        border_width=RING_WIDTH,
        border_width_is_relative=True,
        symbol=np.where(review, SYMBOL_REVIEW, SYMBOL_CELL) if len(review) else SYMBOL_CELL,
        size=RING_SCALE * size,
        text={
            "string": "{class}",
            "size": 8,
            "color": "white",
            "anchor": "upper_left",
            "visible": show_labels,
        },
        scale=frame["scale"],
        translate=frame["translate"],
        units=frame["units"],
        metadata={
            **cells.attrs,
            OWNER_KEY: True,
            "napari_wbc_cells": True,
            # cells.attrs hold the pixel size the cells were found with
            # (the user's over the file's), which exports use.
            "classes": list(classes),
            "image_shape": frame["image_shape"],
        },
    )
    return cells[["y", "x"]].to_numpy(float).reshape(-1, 2), kwargs


def _refill_points(layer, data: np.ndarray, kwargs: dict) -> None:
    """Give an existing Points layer new points and the look :func:`cell_markers` sets."""
    layer.selected_data = set()
    # Points and their features change together: the features first empty,
    # so the new data does not inherit the old rows.
    layer.data = np.empty((0, 2))
    layer.features = kwargs["features"].iloc[:0]
    layer.data = data
    layer.features = kwargs["features"]
    for key in ("scale", "translate", "units", "size", "symbol", "border_color"):
        setattr(layer, key, kwargs[key])
    layer.face_color = kwargs["face_color"]
    layer.border_width = kwargs["border_width"]
    layer.text = kwargs["text"]
    layer.metadata = kwargs["metadata"]
    layer.refresh()


class CountTable(QTableWidget):
    """The differential count: count and percentage per class, and a total."""

    def __init__(self):
        super().__init__(0, 4)
        self.setHorizontalHeaderLabels(["class", "count", "%", "review"])
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.verticalHeader().setVisible(False)
        # Compact rows, all of them shown: the table is as tall as its rows.
        rows = self.verticalHeader()
        rows.setMinimumSectionSize(1)
        rows.setDefaultSectionSize(self.fontMetrics().height() + 4)
        rows.setSectionResizeMode(QHeaderView.ResizeMode.Fixed)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.horizontalHeader().setStretchLastSection(True)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        # The columns fit the dock's width (the last one stretches): never a
        # horizontal scroll bar taking a row's height.
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Fixed)
        self._fit_rows()
        self.setToolTip("Click a class (again) to step through its cells")

    def _fit_rows(self) -> None:
        """Make the table exactly as tall as its header and rows (a few empty rows before a run)."""
        n = max(self.rowCount(), 3)
        height = self.horizontalHeader().sizeHint().height()
        height += n * self.verticalHeader().defaultSectionSize() + 2 * self.frameWidth()
        self.setFixedHeight(height)

    def setRowCount(self, rows: int) -> None:
        super().setRowCount(rows)
        self._fit_rows()

    def show_counts(self, table: pd.DataFrame) -> None:
        from ..export import class_colour

        self.setRowCount(len(table))
        for r, row in enumerate(table.to_dict("records")):
            values = [
                row["class"],
                str(row["count"]),
                f"{row['percent']:.1f}",
                str(row.get("needs_review", "")),
            ]
            for c, value in enumerate(values):
                item = QTableWidgetItem(value)
                if c == 0 and row["class"] != "total":
                    item.setBackground(QColor(*class_colour(row["class"]), 160))
                self.setItem(r, c, item)

    def rows(self) -> dict[str, int]:
        """The counts shown, by class (with "total")."""
        return {
            self.item(r, 0).text(): int(self.item(r, 1).text()) for r in range(self.rowCount())
        }


class ClassifyWidget(DockPage):
    """Detect and classify the white cells of an image layer into a Points layer."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        warm_up_models()  # torch loads while the user picks the settings
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._image_choices)
        self.model = ComboBox(
            label="model",
            choices=self._model_choices,
            tooltip="automatic: the PBC specialist classifies an image whose cells look "
            "like its training cells (CellaVision-like images), the three-lab ensemble any "
            "other. Three-lab ensemble: trained on three labs' cells with randomized stains "
            "and optics, for smears from any lab. PBC specialist: trained on one lab's "
            "CellaVision images, best on images like those and near chance elsewhere. "
            "See MODEL_CARD.md.",
        )
        self.model_file = FileEdit(
            label="model file", filter="*.safetensors *.json", visible=False
        )
        self.source = ComboBox(
            label="cells from", choices=[SOURCE_DETECT, SOURCE_POINTS, SOURCE_LABELS]
        )
        self.cells_layer = ComboBox(
            label="cells layer", choices=self._cells_choices, visible=False
        )
        self.device = ComboBox(label="device", choices=self._device_choices)
        self.stain = CheckBox(
            text="stain normalization",
            value=True,
            tooltip="map the image's stains onto the model's stain reference before classifying; "
            "a model trained on many stains without one (the built-in model) takes the image "
            "as it is",
        )
        self.adapt = ComboBox(
            label="adapt",
            choices=[("auto", "auto"), ("always", "on"), ("never", "off")],
            value="auto",
            tooltip="adapting moves the model's classifier to where this image's cells lie, "
            "without labels (class prototypes from the cells it is surest of; needs 128 cells "
            "or more). Automatic: only an image the automatic model choice gives the three-lab "
            "model (one unlike the PBC specialist's training images) and that holds enough "
            "cells; leave one lab out it raised macro-F1 on both held-out labs, while on PBC "
            "it costs accuracy, and PBC-like images go to the specialist (docs/results.md). "
            "Always: any model, with a note when there are too few cells.",
        )
        self.classes = ComboBox(
            label="classes",
            choices=[("all", "all"), ("5-part", "5-part")],
            value="all",
            tooltip="the count panel: every class of the model (with the built-in models: "
            "the 5-part differential, immature granulocytes, erythroblasts and platelets), "
            "or the 5-part differential (neutrophil, lymphocyte, monocyte, eosinophil, "
            "basophil), each cell called the likeliest of those five. Where the 5-part count "
            "is your lab's own, it is more accurate on smears from labs the models never saw "
            "(docs/results.md).",
        )
        self.exhaustive = CheckBox(
            text="all views, all models",
            value=False,
            tooltip="off: the two cheapest models look at each cell first; only cells they "
            "do not agree on with confidence get the other models, then the rotated "
            "views (5-10x fewer passes; macro-F1 as good in docs/benchmarks.md); on: "
            "every rotated and flipped view of every model for every cell",
        )
        self.pixel_size = FloatSpinBox(
            label="µm per pixel",
            value=0.0,
            min=0.0,
            max=10.0,
            step=0.01,
            tooltip="0 = from the file, else measured on the red cells",
        )
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, max=1)
        self.status = wrapping_label(value="")
        self.show_labels = CheckBox(text="show class names", value=True)

        self.add_form([self.image, self.model, self.model_file, self.source, self.cells_layer])
        self.add_form(
            [self.device, self.classes, self.stain, self.adapt, self.exhaustive, self.pixel_size],
            title="Settings",
            expanded=False,
        )
        self.add_qt(self.show_labels.native)
        self.finish()
        # Always in view: Run, the progress, the status and the count.
        self.add_footer(button_row(self.run_button, self.cancel_button, self.progress))
        self.add_footer(self.status.native)
        self.counts = CountTable()
        self.add_footer(self.counts)
        from .teach import TeachPanel

        self.teacher = TeachPanel(self)  # Teach this lab
        self._then = None
        # One row for Teach and Export (a menu): the footer fits beside two other docks.
        self.export_button = QToolButton()
        self.export_button.setText("Export")
        self.export_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        menu = QMenu(self.export_button)
        self.export_actions = {}
        for kind, text in (
            ("csv", "Cells as CSV…"),
            ("geojson", "Cells as GeoJSON (QuPath imports it)…"),
            ("crops", "A crop of every cell, a folder per class…"),
        ):
            action = menu.addAction(text)
            action.triggered.connect(lambda _checked=False, kind=kind: self._export(kind))
            self.export_actions[kind] = action
        self.export_button.setMenu(menu)
        self.add_footer(self.teacher.footer_row(self.export_button))

        self.runner = WorkerRunner(self, description="cell classification")
        self.result_layer: Points | None = None
        self._revealing = False  # a new result layer is being shown, step by step
        self._live: list[pd.DataFrame] = []
        self._step: dict[str, int] = {}

        self.model.changed.connect(lambda v: setattr(self.model_file, "visible", v == MODEL_FILE))
        self.source.changed.connect(self._on_source_changed)
        self.run_button.clicked.connect(lambda: self.run())
        self.cancel_button.clicked.connect(self.cancel)
        self.show_labels.changed.connect(self._on_show_labels)
        # Every click, also on the row already selected, steps to the next cell.
        self.counts.cellClicked.connect(lambda row, _col: self.step_class(row))
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        CLASSIFY_WIDGETS.append(self)
        self.native.destroyed.connect(
            lambda *_: CLASSIFY_WIDGETS.remove(self) if self in CLASSIFY_WIDGETS else None
        )

    # -- choices -----------------------------------------------------------
    def _image_choices(self, _w=None):
        return [(layer.name, layer) for layer in rgb_image_layers(self.viewer)]

    def _cells_choices(self, _w=None):
        kind = Points if self.source.value == SOURCE_POINTS else Labels
        return [
            (layer.name, layer)
            for layer in self.viewer.layers
            if isinstance(layer, kind) and not layer.metadata.get(OWNER_KEY)
        ]

    def _model_choices(self, _w=None):
        return [
            MODEL_AUTO,
            MODEL_DEFAULT,
            MODEL_PBC,
            *[str(p) for p in SESSION_MODELS],
            MODEL_FILE,
        ]

    @staticmethod
    def _device_choices(_w=None):
        choices = ["auto", "cpu"]
        if not models_loaded():
            # Importing torch here would block napari for seconds (it loads in
            # the background); "auto" finds a GPU anyway, and the list fills
            # in at the next refresh.
            return choices
        try:
            import torch

            if torch.cuda.is_available():
                choices.append("cuda")
            if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
                choices.append("mps")
        except ImportError:  # pragma: no cover - torch is a dependency
            pass
        return choices

    def _refresh_layers(self, _event=None):
        self.image.reset_choices()
        self.cells_layer.reset_choices()

    def _on_source_changed(self, value):
        self.cells_layer.visible = value != SOURCE_DETECT
        self.cells_layer.reset_choices()

    def _on_show_labels(self, value: bool) -> None:
        layer = self.result_layer
        if layer is not None and any(same_layer(layer, other) for other in self.viewer.layers):
            layer.text.visible = bool(value)

    def _model_path(self) -> str:
        choice = self.model.value
        if choice == MODEL_AUTO:
            from ..routing import AUTO_MODEL

            return AUTO_MODEL
        if choice == MODEL_DEFAULT:
            from ..models.files import default_model_path

            return str(default_model_path())
        if choice == MODEL_PBC:
            from ..models.files import builtin_model_path

            return str(builtin_model_path("wbc-pbc"))
        if choice == MODEL_FILE:
            path = Path(self.model_file.value)
            if not path.is_file():
                raise ValueError("choose a model file (.safetensors or ensemble .json)")
            return str(path)
        return choice

    # -- run ---------------------------------------------------------------
    def run(self, then=None):
        """Classify in a worker; the Points layer is made when it finishes.

        ``then()`` is called once the result is shown (Teach classifies again).
        """
        # torch and timm load in the worker (inference, pipeline): imported
        # here they would freeze napari for seconds at the first Run.
        from ..errors import WBCError
        from ..pipeline import ClassifyConfig

        layer = self.image.value
        if layer is None:
            self.runner.notify_error("open an RGB image first")
            return
        try:
            model_path = self._model_path()
            points = labels = None
            if self.source.value != SOURCE_DETECT:
                cells_layer = self.cells_layer.value
                if cells_layer is None:
                    raise ValueError(f"choose the {self.source.value} holding the cells")
                if isinstance(cells_layer, Points):
                    # Points may be drawn on a layer with another scale: map through world.
                    points = np.asarray(
                        [
                            layer.world_to_data(cells_layer.data_to_world(p))
                            for p in cells_layer.data
                        ]
                    ).reshape(-1, 2)
                else:
                    labels = cells_layer.data
        except (ValueError, WBCError) as exc:
            self.runner.notify_error(str(exc))
            return
        file_pixel_size = layer.metadata.get("pixel_size_um")
        config = ClassifyConfig(
            pixel_size_um=self.pixel_size.value or None,
            stain_normalize=self.stain.value,
            device=self.device.value,
            adapt={"on": True, "off": False}.get(self.adapt.value, self.adapt.value),
            exhaustive=self.exhaustive.value,
        )
        level0 = image_levels(layer)[0]
        show_labels = self.show_labels.value
        panel = self.classes.value
        frame = image_frame(layer)
        image_name = layer.name
        self._clear_counts()

        def work():
            from ..pipeline import iter_classify_smear
            from ..progress import Progress
            from ..routing import load_model

            loading = (
                "Loading the models to choose from"
                if model_path == "auto"
                else f"Loading the model ({Path(model_path).stem})"
            )
            yield Progress("model", 0, 1, loading)
            ensemble = load_model(
                model_path,
                device=config.device if config.device != "auto" else "cpu",
                classes=panel,
            )
            cells = yield from iter_classify_smear(
                level0,
                ensemble,
                config,
                points=points,
                labels=labels,
                file_pixel_size_um=file_pixel_size,
            )
            yield Progress("layer", 0, 1, f"{len(cells)} cells")
            # Everything the layer needs is built here, off the main thread.
            markers = cell_markers(cells, frame, show_labels)
            # What the run used, so that Teach cuts and refits as it classified.
            markers[1]["metadata"].update(
                model_asked=str(model_path),
                image_layer=image_name,
                stain_normalize=config.stain_normalize,
                panel=panel,
            )
            return cells, markers, _count_table(cells)

        self._then = then
        self.runner.start(
            work(),
            on_done=lambda result: self._show(layer, *result),
            on_progress=self._on_progress,
            on_cancelled=self._clear_counts,
        )

    def cancel(self):
        """Stop the run (or the teaching) at its next block; no partial layer or count is left."""
        self.runner.cancel()
        self.teacher.runner.cancel()

    @property
    def busy(self) -> bool:
        """Whether a run or a teaching is going on or its result is still being shown."""
        return self.runner.running or self._revealing or self.teacher.busy

    def _reveal(self, steps: list) -> None:
        """Run ``steps`` one per turn of the event loop (a new result layer, shown in steps)."""
        if not steps:
            self._revealing = False
            return
        try:
            steps[0]()
        except RuntimeError:  # the layer's Qt side is gone (the user removed it)
            self._revealing = False
            return
        # A real timer, not a zero one: Qt runs zero timers as posted events,
        # all before any input, paint or other timer; a short delay lets the
        # event loop turn (and draw) between steps.
        QTimer.singleShot(_STEP_MS, partial(self._reveal, steps[1:]))

    def _clear_counts(self) -> None:
        self._live = []
        self.counts.setRowCount(0)

    def _on_progress(self, event):
        """Update the count table live as blocks finish (main thread)."""
        from ..pipeline import differential_count

        cells = event.info.get("cells")
        if cells is not None and not self.runner.cancelling:
            self._live.append(cells)
            table = pd.concat(self._live, ignore_index=True)
            self.counts.show_counts(differential_count(table, sorted(event.info["counts"])))

    def _show(self, image_layer, cells: pd.DataFrame, markers, table: pd.DataFrame):
        data, kwargs = markers
        name = f"{image_layer.name} cells"
        existing = self.viewer.layers[name] if name in self.viewer.layers else None
        if existing is not None and existing.metadata.get(OWNER_KEY):
            # Update our earlier result in place: removing a layer makes napari
            # run a full garbage collection on the main thread (~0.4 s stall).
            _refill_points(existing, data, kwargs)
            self.result_layer = existing
            self._show_summary(image_layer, cells, table)
            return
        # A new layer is shown in steps, one per turn of the event loop, so
        # that napari's main thread pauses several times briefly instead of
        # once for long (issue #17): added hidden; shown (its markers' first
        # draw); its class names (the text's first draw); the count and status.
        kwargs = {**kwargs, "text": {**kwargs["text"], "visible": False}}
        layer = self.viewer.add_points(data, name=name, visible=False, **kwargs)
        self.result_layer = layer
        self._revealing = True

        def show_markers():
            layer.visible = True

        def show_names():
            layer.text.visible = bool(self.show_labels.value)

        steps = [show_markers, show_names, partial(self._show_summary, image_layer, cells, table)]
        QTimer.singleShot(_STEP_MS, partial(self._reveal, steps))

    def _show_summary(self, image_layer, cells: pd.DataFrame, table: pd.DataFrame) -> None:
        """The count table, the status line and the cell selection hook of a finished run."""
        events = self.result_layer.selected_data.events.items_changed
        events.disconnect(self._on_point_selected)  # no-op unless connected already
        events.connect(self._on_point_selected)
        # A correction (Train widget: Set class of selected) changes the features.
        changed = self.result_layer.events.features
        changed.disconnect(self._on_features_changed)
        changed.connect(self._on_features_changed)
        self._step = {}
        self.counts.show_counts(table)
        attrs = cells.attrs
        review = int(cells["needs_review"].sum()) if len(cells) else 0
        status = (
            f"{len(cells)} cells, {review} to review (squares); red cell ≈ "
            f"{attrs.get('rbc_diameter_px', 0):.0f} px ({attrs.get('scale', '')})"
        )
        if attrs.get("route"):
            status += f"\n{plain_route(attrs['route'])}"
        if attrs.get("warning"):
            # Most cells look unlike the model's training cells: say it where
            # the count is read, and once as a notification.
            status = f"⚠ {attrs['warning']}\n{status}"
            show_warning(f"{image_layer.name}: {attrs['warning']}")
        self.status.value = status
        self.teacher.result_shown()
        then, self._then = self._then, None
        if then is not None:
            then()

    def _on_features_changed(self, _event=None) -> None:
        """Count again after the user confirmed, corrected or excluded cells."""
        layer = self.result_layer
        if layer is None or self.busy or len(layer.features) != len(layer.data):
            return  # a run refills the layer; its own count follows
        self.counts.show_counts(corrected_count(layer.features, layer.metadata.get("classes")))

    # -- navigation ---------------------------------------------------------
    def _centre_on(self, index: int) -> None:
        layer = self.result_layer
        if layer is None or index >= len(layer.data):
            return
        world = layer.data_to_world(layer.data[index])
        camera(self.viewer).center = tuple(world[-2:])

    def _on_point_selected(self, _event=None):
        layer = self.result_layer
        if layer is not None and len(layer.selected_data) == 1:
            self._centre_on(next(iter(layer.selected_data)))

    def step_class(self, row: int) -> int | None:
        """Centre on the next cell of the class in ``row`` of the count table.

        Returns the cell's index in the result layer.
        """
        layer = self.result_layer
        item = self.counts.item(row, 0)
        if (
            layer is None
            or item is None
            or not any(same_layer(layer, other) for other in self.viewer.layers)
        ):
            return None
        name = item.text()
        classes = layer.features["class"].astype(str).to_numpy()
        members = np.flatnonzero(classes == name) if name != "total" else np.arange(len(classes))
        if not len(members):
            return None
        step = self._step.get(name, -1) + 1
        self._step[name] = step
        index = int(members[step % len(members)])
        self._centre_on(index)
        self.status.value = f"{name}: cell {step % len(members) + 1}/{len(members)}"
        return index

    # -- export ---------------------------------------------------------------
    def _export(self, kind: str, path: str | None = None):
        from magicgui.widgets import request_values

        from ..export import cells_to_csv, cells_to_geojson, iter_export_crops
        from ..progress import run

        layer = self.result_layer
        if layer is None or len(layer.data) == 0:
            self.runner.notify_error("run a classification first")
            return None
        if path is None:
            mode = "d" if kind == "crops" else "w"
            titles = {
                "csv": "Export cells as CSV",
                "geojson": "Export cells as GeoJSON (QuPath)",
                "crops": "Export a crop of every cell into a folder per class",
            }
            values = request_values(
                path={"annotation": Path, "label": "save to", "options": {"mode": mode}},
                title=titles[kind],
            )
            if not values:
                return None
            path = values["path"]
        if kind != "crops":
            path = Path(path)
            if not path.suffix:
                path = path.with_suffix(f".{kind}")
        cells = layer.features.copy()
        cells["y"], cells["x"] = layer.data[:, 0], layer.data[:, 1]
        pixel = layer.metadata.get("pixel_size_um")
        if kind == "csv":
            out = cells_to_csv(cells, path, pixel_size_um=pixel)
        elif kind == "geojson":
            cells_to_geojson(cells, path, image_shape=layer.metadata.get("image_shape"))
            out = path
        else:
            image = self.image.value
            crop = int(layer.metadata.get("crop_px", 64))
            out = run(iter_export_crops(image_levels(image)[0], cells, path, crop))
            out = f"{len(out)} crops in {path}"
        show_info(f"exported {out}")
        return out


def _count_table(cells: pd.DataFrame) -> pd.DataFrame:
    from ..pipeline import differential_count

    classes = cells.attrs.get("classes") or sorted(cells["class"].unique())
    return differential_count(cells, classes)
