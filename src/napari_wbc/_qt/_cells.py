"""What the Classify, Train and Teach widgets share about result cells (no widget here).

The session's new models, the camera, class colours, setting a cell's class
(a confirmation or a correction) and the count as the user left it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

#: Cells are drawn as hollow discs, those flagged for review as squares: a shape,
#: which no class colour can be mistaken for.
SYMBOL_CELL = "disc"
SYMBOL_REVIEW = "square"
#: Classify widgets alive, told when a new model is registered.
CLASSIFY_WIDGETS: list = []

#: Models saved by the training widget during this session, offered at once.
SESSION_MODELS: list[Path] = []


def register_session_model(path: str | Path) -> None:
    """Offer a newly trained model in every Classify widget."""
    path = Path(path)
    if path not in SESSION_MODELS:
        SESSION_MODELS.append(path)
    for widget in list(CLASSIFY_WIDGETS):
        widget.model.reset_choices()


def camera(viewer):
    """The viewer's camera (``viewer.scene.camera`` since napari 0.9)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def class_rgba(names) -> np.ndarray:
    """RGBA (0–1) of each class name, in the colours the count table and exports use."""
    from napari_wbc.export import class_colour

    lookup = {name: (*np.asarray(class_colour(name)) / 255, 1.0) for name in set(names)}
    return np.array([lookup[n] for n in names], float).reshape(-1, 4)


def set_cells_class(layer, rows, name: str) -> None:
    """Give cells of a Points layer the class ``name``: a confirmation or a correction.

    The one way every widget sets a class (Train's "Set class", Teach's
    "Right" and "Set class"): on a Classify result the cells are also marked
    ``reviewed`` (only reviewed cells are training labels), their ring takes
    the class colour and is no longer a review square; on other layers the
    point is filled with it. Setting the features tells the Classify widget
    to count again.
    """
    rows = sorted(int(r) for r in rows)
    features = layer.features.copy()
    if "class" not in features.columns:
        features["class"] = pd.Series([""] * len(layer.data), dtype=object)
    features["class"] = features["class"].astype(object)
    features.loc[rows, "class"] = name
    classified = bool(layer.metadata.get("napari_wbc_cells"))
    if classified:
        if "reviewed" not in features.columns:
            features["reviewed"] = False
        features.loc[rows, "reviewed"] = True
    layer.features = features
    colour = class_rgba([name])[0]
    if classified:  # hollow rings: colour the ring; reviewed cells are no longer squares
        border = np.asarray(layer.border_color).copy()
        border[rows] = colour
        layer.border_color = border
        symbols = np.asarray(layer.symbol, dtype=object).copy()
        if symbols.ndim:
            symbols[rows] = SYMBOL_CELL
            layer.symbol = list(symbols)
    else:
        face = np.asarray(layer.face_color).copy()
        face[rows] = colour
        layer.face_color = face
    layer.refresh()


def corrected_count(features: pd.DataFrame, classes=None) -> pd.DataFrame:
    """The differential count of the result layer's cells as the user left them.

    A cell excluded (not a white cell) is not counted, a class the user added
    gets a row, and a cell the user confirmed or corrected no longer waits
    for review.
    """
    from napari_wbc.annotations import EXCLUDED
    from napari_wbc.pipeline import differential_count

    names = features["class"].astype(str)
    classes = list(classes or [])
    classes += sorted({n for n in names if n not in classes and n not in ("", EXCLUDED)})
    cells = features.assign(**{"class": names})
    if "needs_review" in cells.columns and "reviewed" in cells.columns:
        reviewed = cells["reviewed"].fillna(False).astype(bool)
        cells["needs_review"] = cells["needs_review"].fillna(False).astype(bool) & ~reviewed
    return differential_count(cells, classes)
