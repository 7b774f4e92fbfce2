"""The Classify widget: find and classify white cells, count them, export them."""

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
    Label,
    ProgressBar,
    PushButton,
)
from napari.layers import Labels, Points
from napari.utils.notifications import show_info
from qtpy.QtGui import QColor
from qtpy.QtWidgets import QAbstractItemView, QTableWidget, QTableWidgetItem

from ._common import OWNER_KEY, WorkerRunner, image_levels, output_layer, rgb_image_layers

if TYPE_CHECKING:
    import napari

SOURCE_DETECT = "detect automatically"
SOURCE_POINTS = "points layer"
SOURCE_LABELS = "labels layer"
MODEL_DEFAULT = "default ensemble"
MODEL_FILE = "model file…"

#: Models saved by the training widget during this session, offered at once.
SESSION_MODELS: list[Path] = []


def register_session_model(path: str | Path) -> None:
    """Offer a newly trained model in every Classify widget."""
    path = Path(path)
    if path not in SESSION_MODELS:
        SESSION_MODELS.append(path)
    for widget in list(_WIDGETS):
        widget.model.reset_choices()


_WIDGETS: list[ClassifyWidget] = []


def camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


class CountTable(QTableWidget):
    """The differential count: count and percentage per class, and a total."""

    def __init__(self):
        super().__init__(0, 4)
        self.setHorizontalHeaderLabels(["class", "count", "%", "review"])
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.verticalHeader().setVisible(False)
        self.setMinimumHeight(180)

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
        self.resizeColumnsToContents()


class ClassifyWidget(Container):
    """Detect and classify the white cells of an image layer into a Points layer."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._image_choices)
        self.model = ComboBox(label="model", choices=self._model_choices)
        self.model_file = FileEdit(
            label="model file", filter="*.safetensors *.json", visible=False
        )
        self.device = ComboBox(label="device", choices=self._device_choices())
        self.stain = CheckBox(text="stain normalization", value=True)
        self.pixel_size = FloatSpinBox(
            label="pixel size (µm, 0 = auto)", value=0.0, min=0.0, max=10.0, step=0.01
        )
        self.source = ComboBox(
            label="cells from", choices=[SOURCE_DETECT, SOURCE_POINTS, SOURCE_LABELS]
        )
        self.cells_layer = ComboBox(
            label="cells layer", choices=self._cells_choices, visible=False
        )
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, max=1)
        self.status = Label(value="")
        self.export_csv = PushButton(text="Export CSV…")
        self.export_geojson = PushButton(text="Export GeoJSON (QuPath)…")
        self.export_crops = PushButton(text="Export crops…")
        self.extend(
            [
                self.image, self.model, self.model_file, self.device, self.stain,
                self.pixel_size, self.source, self.cells_layer, self.run_button,
                self.cancel_button, self.progress, self.status,
            ]
        )  # fmt: skip
        self.counts = CountTable()
        self.native.layout().addWidget(self.counts)
        exports = Container(widgets=[self.export_csv, self.export_geojson, self.export_crops])
        self.append(exports)
        self.runner = WorkerRunner(self, description="cell classification")
        self.result_layer: Points | None = None
        self._live: list[pd.DataFrame] = []

        self.model.changed.connect(lambda v: setattr(self.model_file, "visible", v == MODEL_FILE))
        self.source.changed.connect(self._on_source_changed)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.export_csv.clicked.connect(lambda: self._export("csv"))
        self.export_geojson.clicked.connect(lambda: self._export("geojson"))
        self.export_crops.clicked.connect(lambda: self._export("crops"))
        self.counts.itemSelectionChanged.connect(self._on_count_row_selected)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        _WIDGETS.append(self)
        self.native.destroyed.connect(
            lambda *_: _WIDGETS.remove(self) if self in _WIDGETS else None
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
        return [MODEL_DEFAULT, *[str(p) for p in SESSION_MODELS], MODEL_FILE]

    @staticmethod
    def _device_choices():
        choices = ["auto", "cpu"]
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

    def _model_path(self) -> str:
        choice = self.model.value
        if choice == MODEL_DEFAULT:
            from ..models.files import default_model_path

            return str(default_model_path())
        if choice == MODEL_FILE:
            path = Path(self.model_file.value)
            if not path.is_file():
                raise ValueError("choose a model file (.safetensors or ensemble .json)")
            return str(path)
        return choice

    # -- run ---------------------------------------------------------------
    def run(self):
        """Classify in a worker; the Points layer is made when it finishes."""
        from ..errors import WBCError
        from ..models.files import load_any
        from ..pipeline import ClassifyConfig, iter_classify_smear

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
        pixel = self.pixel_size.value or layer.metadata.get("pixel_size_um")
        config = ClassifyConfig(
            pixel_size_um=pixel or None,
            stain_normalize=self.stain.value,
            device=self.device.value,
        )
        level0 = image_levels(layer)[0]
        self._live = []
        self.counts.setRowCount(0)

        def work():
            from ..progress import Progress

            yield Progress("model", 0, 1, f"loading {Path(model_path).name}")
            ensemble = load_any(
                model_path, device=config.device if config.device != "auto" else "cpu"
            )
            cells = yield from iter_classify_smear(
                level0, ensemble, config, points=points, labels=labels
            )
            return cells

        self.runner.start(
            work(), on_done=lambda cells: self._show(layer, cells), on_progress=self._on_progress
        )

    def cancel(self):
        """Stop the running worker; no partial layer is left."""
        self.runner.cancel()

    def _on_progress(self, event):
        """Update the count table live as blocks finish (main thread)."""
        from ..pipeline import differential_count

        cells = event.info.get("cells")
        if cells is not None:
            self._live.append(cells)
            table = pd.concat(self._live, ignore_index=True)
            self.counts.show_counts(differential_count(table, sorted(event.info["counts"])))

    def _show(self, image_layer, cells: pd.DataFrame):
        from ..export import class_colour
        from ..pipeline import differential_count

        classes = cells.attrs.get("classes") or sorted(cells["class"].unique())
        features = cells.drop(columns=["y", "x"]).reset_index(drop=True)
        colours = {name: np.array([*class_colour(name), 255]) / 255 for name in classes}
        face = np.array([colours[c] for c in features["class"]]).reshape(-1, 4)
        border = np.where(
            features["needs_review"].to_numpy(bool)[:, None], [[1, 0, 0, 1]], [[1, 1, 1, 1]]
        )
        size = float(np.nanmedian(cells["diameter"])) if cells["diameter"].notna().any() else 20.0
        name = f"{image_layer.name} cells"
        kwargs = dict(
            features=features,
            face_color=face if len(face) else "white",
            border_color=border if len(border) else "white",
            border_width=0.12,
            size=size,
            scale=image_layer.scale,
            translate=image_layer.translate,
            metadata={
                **cells.attrs,
                "napari_wbc_cells": True,
                "classes": list(classes),
                "pixel_size_um": image_layer.metadata.get("pixel_size_um"),
            },
        )
        existing = self.viewer.layers[name] if name in self.viewer.layers else None
        if existing is not None and existing.metadata.get(OWNER_KEY):
            self.viewer.layers.remove(existing)
        self.result_layer = output_layer(
            self.viewer, name, cells[["y", "x"]].to_numpy(float), layer_type="points", **kwargs
        )
        self.result_layer.selected_data.events.items_changed.connect(self._on_point_selected)
        self.counts.show_counts(differential_count(cells, classes))
        attrs = cells.attrs
        review = int(cells["needs_review"].sum()) if len(cells) else 0
        self.status.value = (
            f"{len(cells)} cells, {review} to review; red cell ≈ {attrs.get('rbc_diameter_px', 0):.0f} px "
            f"({attrs.get('scale', '')})"
        )

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

    def _on_count_row_selected(self):
        layer = self.result_layer
        rows = {i.row() for i in self.counts.selectedIndexes()}
        if layer is None or len(rows) != 1:
            return
        name = self.counts.item(rows.pop(), 0).text()
        classes = layer.features["class"].to_numpy()
        members = np.flatnonzero(classes == name) if name != "total" else np.arange(len(classes))
        if len(members):
            # Each click on the same row steps to the next cell of that class.
            step = getattr(self, "_step", {}).get(name, -1) + 1
            self._step = {**getattr(self, "_step", {}), name: step}
            self._centre_on(int(members[step % len(members)]))

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
            values = request_values(path={"annotation": Path, "options": {"mode": mode}})
            if not values:
                return None
            path = values["path"]
        cells = layer.features.copy()
        cells["y"], cells["x"] = layer.data[:, 0], layer.data[:, 1]
        pixel = layer.metadata.get("pixel_size_um") or self.pixel_size.value or None
        if kind == "csv":
            out = cells_to_csv(cells, path, pixel_size_um=pixel)
        elif kind == "geojson":
            cells_to_geojson(cells, path)
            out = path
        else:
            image = self.image.value
            crop = int(layer.metadata.get("crop_px", 64))
            out = run(iter_export_crops(image_levels(image)[0], cells, path, crop))
            out = f"{len(out)} crops in {path}"
        show_info(f"exported {out}")
        return out
