"""Export of labelled cells: CSV, GeoJSON for QuPath, and crops per class.

A cell table is a pandas DataFrame with one row per cell and at least the
columns ``x`` and ``y`` (full-resolution pixels, x = column) and ``class``;
optional columns are ``confidence``, ``needs_review``, ``diameter`` (px) and
``p_<class>`` (one probability per class). Every writer is atomic: it writes a
temporary file next to the target and renames it when complete.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import atomic_write, atomic_write_stream
from .errors import WBCError
from .images import cut_square

#: Colours per class (RGB 0–255), shared by napari layers and QuPath export.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "neutrophil": (31, 119, 180),
    "segmented_neutrophil": (31, 119, 180),
    "band_neutrophil": (23, 190, 207),
    "lymphocyte": (44, 160, 44),
    "monocyte": (148, 103, 189),
    "eosinophil": (255, 127, 14),
    "basophil": (140, 86, 75),
    "ig": (227, 119, 194),
    "erythroblast": (214, 39, 40),
    "platelet": (188, 189, 34),
    "unknown": (127, 127, 127),
}
_FALLBACK = [
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150),
    (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141),
]  # fmt: skip


def class_colour(name: str) -> tuple[int, int, int]:
    """A stable colour for a class name (fixed for known classes, hashed otherwise)."""
    if name in CLASS_COLOURS:
        return CLASS_COLOURS[name]
    return _FALLBACK[sum(map(ord, name)) % len(_FALLBACK)]


def _check_table(cells: pd.DataFrame) -> None:
    missing = [c for c in ("x", "y", "class") if c not in cells.columns]
    if missing:
        raise WBCError(f"cell table lacks column(s) {', '.join(missing)}")


def probability_columns(cells: pd.DataFrame) -> list[str]:
    """The ``p_<class>`` columns of a cell table, in order."""
    return [c for c in cells.columns if c.startswith("p_")]


def cells_to_csv(
    cells: pd.DataFrame, path: str | Path, pixel_size_um: float | None = None
) -> Path:
    """Write a cell table as CSV: x, y in pixels (and µm when the pixel size is known), class,
    confidence, needs_review, out_of_distribution and ood_score (with a model's trust
    statistics), diameter and per-class probabilities.
    """
    _check_table(cells)
    table = pd.DataFrame({"x": cells["x"].astype(float), "y": cells["y"].astype(float)})
    if pixel_size_um:
        table["x_um"] = table["x"] * pixel_size_um
        table["y_um"] = table["y"] * pixel_size_um
    table["class"] = cells["class"].astype(str)
    for col in ("confidence", "needs_review", "out_of_distribution", "ood_score", "diameter"):
        if col in cells.columns:
            table[col] = cells[col].to_numpy()
    for col in probability_columns(cells):
        table[col] = cells[col].to_numpy()
    return atomic_write_stream(path, lambda fh: table.to_csv(fh, index=False, float_format="%.6g"))


def _circle(
    x: float, y: float, radius: float, bounds: tuple[float, float] | None, n: int = 24
) -> list[list[float]]:
    """A closed ring of ``n`` vertices, clipped to the image (0 … width, 0 … height)."""
    angles = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    xs = np.clip(x + radius * np.cos(angles), 0, bounds[0] if bounds else None)
    ys = np.clip(y + radius * np.sin(angles), 0, bounds[1] if bounds else None)
    ring = [[round(float(a), 2), round(float(b), 2)] for a, b in zip(xs, ys, strict=True)]
    return [*ring, ring[0]]


def cells_to_geojson(
    cells: pd.DataFrame,
    path: str | Path | None = None,
    image_shape: tuple[int, int] | None = None,
) -> dict:
    """QuPath-compatible GeoJSON: a FeatureCollection of classified detections.

    Each cell is a Feature with a Polygon (a circle of the cell's ``diameter``)
    or a Point geometry (without a diameter), and properties that QuPath reads:
    ``objectType: "detection"``, ``classification: {name, color}`` and
    ``measurements`` (confidence and class probabilities). Coordinates are
    full-resolution pixels, which is what QuPath expects. A cell at the edge
    of the image has its polygon clipped to the image: to x, y ≥ 0 always, and
    to the width and height when ``image_shape`` (rows, columns) is given.
    Writes ``path`` when given and returns the dictionary.
    """
    _check_table(cells)
    prob_cols = probability_columns(cells)
    bounds = (float(image_shape[1]), float(image_shape[0])) if image_shape else None
    features = []
    for row in cells.to_dict("records"):
        name = str(row["class"])
        x, y = float(row["x"]), float(row["y"])
        diameter = row.get("diameter")
        if diameter is not None and np.isfinite(diameter) and diameter > 0:
            ring = _circle(x, y, diameter / 2, bounds)
            geometry = {"type": "Polygon", "coordinates": [ring]}
        else:
            geometry = {"type": "Point", "coordinates": [x, y]}
        measurements = {}
        if "confidence" in row:
            measurements["confidence"] = float(row["confidence"])
        for col in prob_cols:
            measurements[col] = float(row[col])
        props = {
            "objectType": "detection",
            "classification": {"name": name, "color": list(class_colour(name))},
            "isLocked": False,
            "measurements": measurements,
        }
        if row.get("needs_review"):
            props["needs_review"] = True
        features.append({"type": "Feature", "geometry": geometry, "properties": props})
    collection = {"type": "FeatureCollection", "features": features}
    if path is not None:
        atomic_write_stream(path, lambda fh: json.dump(collection, fh))
    return collection


def iter_export_crops(
    image,
    cells: pd.DataFrame,
    folder: str | Path,
    crop_px: int,
    prefix: str = "cell",
    fmt: str = "png",
) -> Iterable:
    """Save a square crop around each cell into ``folder/<class>/``: a training set.

    ``image`` is a numpy or dask (Y, X, 3) array; crops reaching past the
    border are padded with white (glass). Yields progress; returns the list of
    written paths.
    """
    from PIL import Image

    from .progress import Progress

    _check_table(cells)
    folder = Path(folder)
    pil_format = "JPEG" if fmt.lower() in ("jpg", "jpeg") else fmt.upper()
    written = []
    for i, row in enumerate(cells.to_dict("records")):
        x, y = round(row["x"]), round(row["y"])
        crop = cut_square(image, row["y"], row["x"], crop_px)
        cls = str(row["class"])
        target = folder / cls / f"{prefix}_{i:05d}_x{x}_y{y}.{fmt}"
        atomic_write(
            target,
            lambda tmp, crop=crop: Image.fromarray(crop).save(tmp, format=pil_format),
            f".{fmt}",
        )
        written.append(target)
        yield Progress("crops", i + 1, len(cells), cls)
    return written
