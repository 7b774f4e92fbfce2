"""Turn a user's annotations into training crops and fine-tune a classifier on them.

Annotations come as a label image (each connected region of one value is a
cell; the value is the class index + 1), as points with a ``class`` feature,
or as ready-made crops. Cells are cut at the model's field of view (the same
crop side the smear pipeline classifies with: ``fov_rbc`` × the red-cell
diameter in pixels), saved as PNGs in one folder per class, and handed to the
two-stage trainer of :mod:`napari_wbc.training`, starting from a base model's
weights (or from scratch).

The model file appears at ``output`` only when training completes: training
writes into a hidden working folder next to it, which is removed when the
run ends, fails or is cancelled (the generator closed). A cancelled run keeps
nothing, not even its best epoch so far: a half-trained model is easy to
mistake for a finished one.

This module imports torch only when training starts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError, WBCError
from .progress import Progress, ProgressGen

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MIN_CONFIDENCE",
    "EXCLUDED",
    "MIN_CELLS_PER_CLASS",
    "REVIEW_ORDERS",
    "annotation_summary",
    "base_model_file",
    "cells_from_labels",
    "cells_from_points",
    "check_trainable",
    "iter_finetune",
    "iter_finetune_crops",
    "iter_write_training_crops",
    "review_order",
]

#: Fewer annotated cells than this in a class give a warning (training still runs).
MIN_CELLS_PER_CLASS = 5
#: The class that marks a point as not to be trained on (not a white cell, unsure).
EXCLUDED = "exclude"
#: Predictions at least this confident count as labels when predictions are included.
DEFAULT_MIN_CONFIDENCE = 0.9
#: Values of the ``by`` argument of :func:`review_order`.
REVIEW_ORDERS = ("confidence", "disagreement")


def cells_from_labels(labels, classes: Sequence[str]) -> pd.DataFrame:
    """One cell per connected region of a label image.

    Parameters
    ----------
    labels : array-like (Y, X) of int
        0 is background; value ``k`` marks a cell of class ``classes[k - 1]``.
        Touching regions of different values are different cells.
    classes : sequence of str
        The class list the values index.

    Returns
    -------
    DataFrame
        Columns ``y``, ``x`` (centroid, pixels), ``diameter`` (of the disc of
        the same area, pixels) and ``label`` (class name), one row per region.

    Raises
    ------
    WBCError
        When the image holds values that name no class.
    """
    from skimage.measure import label as connected
    from skimage.measure import regionprops

    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise WBCError(f"expected a 2-D label image, got shape {arr.shape}")
    values = np.unique(arr)
    bad = [int(v) for v in values if v < 0 or v > len(classes)]
    if bad:
        names = ", ".join(f"{i} = {c}" for i, c in enumerate(classes, 1))
        raise WBCError(
            f"label values {bad} name no class; the values are 1 … {len(classes)} "
            f"({names}). Repaint those cells or add classes to the list"
        )
    regions = regionprops(connected(arr, background=0, connectivity=2))
    rows = []
    for region in regions:
        y, x = region.centroid
        value = int(arr[tuple(region.coords[0])])
        rows.append((y, x, 2 * math.sqrt(region.area / math.pi), classes[value - 1]))
    return pd.DataFrame(rows, columns=["y", "x", "diameter", "label"]).astype(
        {"y": float, "x": float, "diameter": float, "label": object}
    )


def cells_from_points(
    points,
    features: pd.DataFrame,
    include_predicted: bool = False,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
) -> pd.DataFrame:
    """Cells from points (y, x in image pixels) with a ``class`` feature.

    Points whose class is empty, missing or :data:`EXCLUDED` are skipped: they
    are cells not yet annotated, or ones the user ruled out. On the Classify
    output (points with a ``reviewed`` feature) only the cells the user
    confirmed or corrected count, so training learns from the corrections, not
    from the model's own guesses; ``include_predicted`` adds the predictions
    made with at least ``min_confidence``.

    Returns
    -------
    DataFrame
        Columns ``y``, ``x`` and ``label``.

    Raises
    ------
    WBCError
        When ``features`` has no ``class`` column or its length differs.
    """
    pts = np.asarray(points, float).reshape(-1, 2)
    if "class" not in features.columns:
        raise WBCError(
            "the points have no 'class' feature; set a class on the points (class picker) first"
        )
    if len(features) != len(pts):
        raise WBCError(f"{len(pts)} points but {len(features)} rows of features")
    names = features["class"].to_numpy(object)
    keep = np.array([isinstance(n, str) and n.strip() not in ("", EXCLUDED) for n in names], bool)
    if "reviewed" in features.columns:
        chosen = features["reviewed"].fillna(False).to_numpy(bool)
        if include_predicted and "confidence" in features.columns:
            chosen = chosen | (features["confidence"].to_numpy(float) >= min_confidence)
        keep &= chosen
    return pd.DataFrame(
        {"y": pts[keep, 0], "x": pts[keep, 1], "label": [n.strip() for n in names[keep]]}
    )


def iter_write_training_crops(
    image, cells: pd.DataFrame, folder: str | os.PathLike, crop_px: int
) -> ProgressGen[pd.DataFrame]:
    """Save a square crop around every cell into ``folder/<label>/``.

    Crops reaching past the image border are padded with white (glass), as
    the smear pipeline pads them; every PNG is written atomically.

    Parameters
    ----------
    image : ndarray or dask array (Y, X, 3) uint8
    cells : DataFrame
        ``y``, ``x`` (pixels) and ``label``.
    folder : path-like
    crop_px : int
        Side of the crops in image pixels.

    Returns
    -------
    DataFrame
        ``path`` (str) and ``label`` of every crop, in the order of ``cells``:
        the input of :func:`napari_wbc.training.iter_train`.
    """
    from .export import iter_export_crops

    if crop_px < 1:
        raise WBCError(f"crop side must be at least 1 px, got {crop_px}")
    table = pd.DataFrame(
        {"y": cells["y"].to_numpy(float), "x": cells["x"].to_numpy(float)}
    ).assign(**{"class": cells["label"].astype(str).to_numpy()})
    paths = yield from iter_export_crops(image, table, folder, int(crop_px), prefix="train")
    return pd.DataFrame({"path": [str(p) for p in paths], "label": list(table["class"])})


def annotation_summary(
    cells: pd.DataFrame, classes: Sequence[str], min_per_class: int = MIN_CELLS_PER_CLASS
) -> tuple[pd.DataFrame, list[str]]:
    """Cells per class and warnings about classes with too few of them.

    Parameters
    ----------
    cells : DataFrame
        With a ``label`` column.
    classes : sequence of str
        The class list; labels outside it are counted too (after it).
    min_per_class : int
        Annotated classes with fewer cells get a warning. Classes with no
        cells get none: they are simply not trained on.

    Returns
    -------
    table : DataFrame
        ``class``, ``count``, ``ok`` (count 0 or at least ``min_per_class``).
    warnings : list of str
    """
    counts = cells["label"].astype(str).value_counts() if len(cells) else pd.Series(dtype=int)
    names = list(classes) + sorted(set(counts.index) - set(classes))
    table = pd.DataFrame({"class": names, "count": [int(counts.get(n, 0)) for n in names]})
    table["ok"] = (table["count"] == 0) | (table["count"] >= min_per_class)
    warnings = [
        f"{row['class']}: only {row['count']} cell{'s' if row['count'] != 1 else ''} "
        f"(at least {min_per_class} recommended)"
        for row in table.to_dict("records")
        if not row["ok"]
    ]
    return table, warnings


def check_trainable(cells: pd.DataFrame, classes: Sequence[str] | None = None) -> None:
    """Raise :class:`DataError` when the annotations cannot be trained on.

    Every annotated class needs at least 2 cells (one goes to validation),
    at least two classes must be annotated, and, when ``classes`` is given,
    every label must be in it.
    """
    if len(cells) == 0:
        raise DataError("no annotated cells: paint or mark some cells with their class first")
    labels = cells["label"].astype(str)
    if classes is not None:
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise DataError(f"cells are labelled {unknown}, which the class list lacks; add them")
    counts = labels.value_counts()
    few = [f"{name} ({n})" for name, n in counts.items() if n < 2]
    if few:
        raise DataError(
            f"training needs at least 2 cells of each annotated class (one is kept for "
            f"validation); too few: {', '.join(sorted(few))}. Annotate more of them "
            "or remove their annotations"
        )
    if len(counts) < 2:
        raise DataError(
            f"only one class is annotated ({counts.index[0]}); annotate cells of at "
            "least two classes"
        )


def review_order(features: pd.DataFrame, by: str = "confidence") -> np.ndarray:
    """Indices of classified cells in the order a user should review them.

    Parameters
    ----------
    features : DataFrame
        The Classify output (``confidence`` and ``disagreement`` columns).
    by : {"confidence", "disagreement"}
        "confidence": least confident first (ties: most disagreement first);
        "disagreement": the cells the ensemble members disagree most on
        first (ties: least confident first).

    Returns
    -------
    ndarray of int
    """
    if by not in REVIEW_ORDERS:
        raise WBCError(f"review order must be one of {', '.join(REVIEW_ORDERS)}, got {by!r}")
    n = len(features)

    def column(name):
        if name in features.columns:
            return features[name].to_numpy(float)
        if name == by:
            raise WBCError(f"the cells have no {name!r} column; classify them first")
        return np.zeros(n)

    confidence, disagreement = column("confidence"), column("disagreement")
    # np.lexsort sorts by the last key first; both orders are stable.
    if by == "confidence":
        return np.lexsort((-disagreement, confidence))
    return np.lexsort((confidence, -disagreement))


def base_model_file(path: str | os.PathLike) -> Path:
    """The model file to fine-tune from: the file itself, or an ensemble's first member."""
    from .models.files import read_ensemble

    path = Path(path)
    if path.suffix.lower() == ".json":
        return Path(read_ensemble(path).members[0].path)
    return path


def _working_dir(output: Path) -> Path:
    return output.parent / f".{output.name}.training"


def iter_finetune_crops(
    crops: pd.DataFrame,
    base_model: str | os.PathLike | None,
    output: str | os.PathLike,
    config,
) -> ProgressGen[Path]:
    """Train on labelled crops, starting from a base model, and write ``output``.

    Parameters
    ----------
    crops : DataFrame
        ``path`` and ``label`` of the crops.
    base_model : path-like or None
        Model or ensemble file (an ensemble's first member is used) whose
        weights start the training; None trains ``config.spec`` from scratch.
    output : path-like
        Model file to write; it appears only when training completes.
    config : napari_wbc.training.TrainConfig
        With ``stages``: "both" / "stage1" fine-tune the whole network from
        the base model; "stage2" keeps the base model's backbone and only
        re-trains its classifier (quick; the classes must be the base's).

    Yields
    ------
    Progress
        The trainer's events (``info["event"] == "epoch"`` at each epoch's end).

    Returns
    -------
    Path
        ``output``.
    """
    from .models.files import read_model_config
    from .training import iter_train

    output = Path(output)
    base = base_model_file(base_model) if base_model else None
    if config.stages == "stage2":
        if base is None:
            raise WBCError(
                "stage 2 alone re-trains a base model's classifier: choose a base model"
            )
        known = set(read_model_config(base).classes)
        new = sorted(set(crops["label"].astype(str)) - known)
        if new:
            raise DataError(
                f"stage 2 alone keeps the base model's classes and {new} are new; "
                "train both stages to add classes"
            )
        config = dataclasses.replace(config, base_model=None)
    else:
        config = dataclasses.replace(config, base_model=str(base) if base else None)
    work = _working_dir(output)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        target = work / output.name
        if config.stages == "stage2":
            shutil.copyfile(base, target)
        path = yield from iter_train(crops, config, target, resume=False)
        os.replace(path, output)
    finally:
        # Reached on success, error and cancel (GeneratorExit) alike.
        shutil.rmtree(work, ignore_errors=True)
    yield Progress("done", 1, 1, f"saved {output}")
    return output


def iter_finetune(
    image,
    cells: pd.DataFrame,
    classes: Sequence[str],
    base_model: str | os.PathLike | None,
    output: str | os.PathLike,
    config,
    pixel_size_um: float | None = None,
    rbc_diameter_px: float | None = None,
    crops_dir: str | os.PathLike | None = None,
) -> ProgressGen[Path]:
    """Fine-tune a classifier on cells annotated in an image.

    Parameters
    ----------
    image : ndarray or dask array (Y, X, 3) uint8
        Full-resolution RGB image the cells are in.
    cells : DataFrame
        ``y``, ``x`` (pixels) and ``label`` (see :func:`cells_from_labels`,
        :func:`cells_from_points`).
    classes : sequence of str
        The class list; every label must be in it.
    base_model : path-like or None
        Model or ensemble file to start from; None trains ``config.spec``
        from scratch.
    output : path-like
        Model file to write (``.safetensors``).
    config : napari_wbc.training.TrainConfig
        Stages, epochs, validation fraction, seed, ...
    pixel_size_um, rbc_diameter_px : float, optional
        The image's scale; estimated from its red cells when neither is given.
    crops_dir : path-like, optional
        Keep the training crops here (``<label>/`` subfolders); by default they
        go to a temporary folder removed at the end.

    Yields
    ------
    Progress
        "scale", "crops", then the trainer's events.

    Returns
    -------
    Path
        ``output``, written only when training completes.

    Raises
    ------
    DataError
        When a class has fewer than 2 cells, or only one class is annotated.
    """
    from .models.files import read_model_config
    from .models.registry import get_spec
    from .pixels import as_dask_rgb
    from .preprocess import crop_side
    from .scale import iter_resolve_scale

    check_trainable(cells, classes)
    config.validate()
    spec = read_model_config(base_model_file(base_model)).spec if base_model else None
    spec = spec or get_spec(config.spec)
    arr = as_dask_rgb(image)
    scale = yield from iter_resolve_scale(arr, pixel_size_um, rbc_diameter_px=rbc_diameter_px)
    rbc_px = scale.rbc_diameter_px
    # The crop side the pipeline classifies with, so training sees what inference sees.
    side = crop_side(spec.fov_rbc, rbc_px)
    yield Progress("scale", 1, 1, f"red cell ≈ {rbc_px:.0f} px ({scale.note}); crops {side} px")
    temporary = crops_dir is None
    folder = Path(tempfile.mkdtemp(prefix="napari-wbc-crops-")) if temporary else Path(crops_dir)
    try:
        crops = yield from iter_write_training_crops(arr, cells, folder, side)
        return (yield from iter_finetune_crops(crops, base_model, output, config))
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
