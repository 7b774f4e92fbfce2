"""Classify the white cells of a whole smear, block by block.

One pass over the image: each block of a fixed grid is read once with a halo
wide enough for a whole crop around any cell whose centre lies in the block;
cells are detected in it (or taken from the user's points / labels), the ones
whose centre the block owns are kept, their crops are cut from the block in
memory, stain-normalized with the model's reference, and classified by the
ensemble with test-time augmentation. Memory is bounded by one block, however
large the slide.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import dask.array as da
import numpy as np
import pandas as pd

from .errors import WBCError
from .progress import Progress, ProgressGen

log = logging.getLogger(__name__)

RBC_DIAMETER_UM = 7.5


@dataclass
class ClassifyConfig:
    """Parameters of a smear classification run.

    Attributes
    ----------
    pixel_size_um : float or None
        Micrometres per pixel; None estimates the scale from the red cells.
    rbc_diameter_px : float or None
        Red-cell diameter in pixels, overriding ``pixel_size_um``.
    stain_normalize : bool
        Map the image's stains onto the model's reference before classifying.
    tta : str or None
        Test-time augmentation ("none", "flips", "d4"); None uses the model's.
    block : int
        Edge of the processing blocks in pixels.
    batch_size : int
        Crops per forward pass.
    review_confidence : float
        Cells classified with less confidence are flagged ``needs_review``.
    review_disagreement : float
        Cells where more than this fraction of members disagree with the
        ensemble are flagged ``needs_review``.
    device : str
        "auto", "cpu", "cuda", "mps".
    """

    pixel_size_um: float | None = None
    rbc_diameter_px: float | None = None
    stain_normalize: bool = True
    tta: str | None = None
    block: int = 2048
    batch_size: int = 32
    review_confidence: float = 0.6
    review_disagreement: float = 0.0
    device: str = "auto"
    extra: dict = field(default_factory=dict)


def _as_dask(image) -> da.Array:
    if isinstance(image, da.Array):
        return image
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise WBCError(f"expected an 8-bit RGB image (Y, X, 3), got {arr.dtype} {arr.shape}")
    return da.from_array(arr, chunks=(2048, 2048, 3))


def iter_resolve_scale(image, config: ClassifyConfig) -> ProgressGen[tuple[float, str]]:
    """The red-cell diameter in pixels and how it was obtained."""
    if config.rbc_diameter_px:
        return float(config.rbc_diameter_px), "given red-cell diameter"
    if config.pixel_size_um:
        return RBC_DIAMETER_UM / config.pixel_size_um, f"pixel size {config.pixel_size_um:g} µm"
    from .scale import iter_estimate_rbc_diameter

    estimate = yield from iter_estimate_rbc_diameter(image)
    return float(estimate.rbc_diameter_px), f"estimated from {estimate.n_cells} red cells"


def _crop_side(ensemble, rbc_px: float) -> int:
    """Side of one crop in image pixels: the model's field of view at this scale."""
    return max(int(round(ensemble.fov_rbc * rbc_px)), 8)


def _cut(block: np.ndarray, cy: float, cx: float, side: int) -> np.ndarray:
    """A side×side crop centred on (cy, cx) of an in-memory block, padded with glass."""
    half = side // 2
    y0, x0 = int(round(cy)) - half, int(round(cx)) - half
    h, w = block.shape[:2]
    crop = np.full((side, side, 3), 255, np.uint8)
    ys0, xs0 = max(y0, 0), max(x0, 0)
    ys1, xs1 = min(y0 + side, h), min(x0 + side, w)
    if ys1 > ys0 and xs1 > xs0:
        crop[ys0 - y0 : ys1 - y0, xs0 - x0 : xs1 - x0] = block[ys0:ys1, xs0:xs1]
    return crop


def iter_classify_smear(
    image,
    ensemble,
    config: ClassifyConfig | None = None,
    points: np.ndarray | None = None,
    labels=None,
) -> ProgressGen[pd.DataFrame]:
    """Find and classify the white cells of a smear of any size.

    Parameters
    ----------
    image : ndarray or dask array
        Full-resolution (Y, X, 3) uint8 RGB.
    ensemble : napari_wbc.inference.Ensemble
        The classifier (see :func:`napari_wbc.models.files.load_any`).
    config : ClassifyConfig
    points : ndarray (N, 2), optional
        Cell centres (y, x) in pixels to classify instead of detecting.
    labels : array-like (Y, X), optional
        A label image of cell masks (0 = background), one cell per label, to
        classify instead of detecting.

    Yields
    ------
    Progress
        Stages "scale", "stain", "blocks"; each "blocks" event carries the
        running differential count in ``info["counts"]`` and the cells of the
        finished block in ``info["cells"]``.

    Returns
    -------
    DataFrame
        One row per cell: y, x, diameter, class, confidence, needs_review,
        disagreement, p_<class> for every class, plus the scale used in
        ``df.attrs``.
    """
    from .inference import disagreement, predict_crops

    config = config or ClassifyConfig()
    arr = _as_dask(image)
    height, width = arr.shape[:2]
    rbc_px, scale_note = yield from iter_resolve_scale(arr, config)
    side = _crop_side(ensemble, rbc_px)
    yield Progress("scale", 1, 1, f"red cell ≈ {rbc_px:.0f} px ({scale_note}); crops {side} px")

    normalizer = None
    if config.stain_normalize and ensemble.stain is not None:
        from .stain import StainReference, iter_prepare_normalizer

        method = ensemble.members[0].config.training.get("stain_method", "macenko")
        try:
            normalizer = yield from iter_prepare_normalizer(
                [arr], method, StainReference.from_dict(ensemble.stain)
            )
        except WBCError as exc:
            raise WBCError(f"{exc}; or classify without stain normalization") from exc

    given = _given_cells(points, labels, height, width)
    halo = int(math.ceil(side / 2 + 1.5 * rbc_px * 2))
    step = max(int(config.block), side)
    grid = [(y, x) for y in range(0, height, step) for x in range(0, width, step)]
    classes = list(ensemble.classes)
    counts = dict.fromkeys(classes, 0)
    tables = []
    for i, (y0, x0) in enumerate(grid):
        y1, x1 = min(y0 + step, height), min(x0 + step, width)
        if given is not None:
            own = given[(given.y >= y0) & (given.y < y1) & (given.x >= x0) & (given.x < x1)]
            if own.empty:
                yield Progress("blocks", i + 1, len(grid), "no cells here", {"counts": dict(counts)})
                continue
        hy0, hx0 = max(y0 - halo, 0), max(x0 - halo, 0)
        hy1, hx1 = min(y1 + halo, height), min(x1 + halo, width)
        block = np.asarray(arr[hy0:hy1, hx0:hx1].compute())
        if given is None:
            from .detection import detect_cells

            found = detect_cells(block, rbc_diameter_px=rbc_px)
            found = found[found["kind"] == "wbc"] if "kind" in found else found
            found = found.assign(y=found["y"] + hy0, x=found["x"] + hx0)
            own = found[(found.y >= y0) & (found.y < y1) & (found.x >= x0) & (found.x < x1)]
        if own.empty:
            yield Progress("blocks", i + 1, len(grid), "no cells here", {"counts": dict(counts)})
            continue
        crops = np.stack([_cut(block, cy - hy0, cx - hx0, side) for cy, cx in zip(own.y, own.x, strict=True)])
        if normalizer is not None:
            crops = normalizer(crops)
        result = predict_crops(ensemble, crops, config.batch_size, config.tta, _device(config))
        table = pd.DataFrame(
            {
                "y": own.y.to_numpy(float),
                "x": own.x.to_numpy(float),
                "diameter": own["diameter"].to_numpy(float) if "diameter" in own else np.nan,
                "class": [classes[k] for k in result["pred"]],
                "confidence": result["confidence"].astype(float),
            }
        )
        table["disagreement"] = disagreement(result["member_probs"], result["probs"])
        table["needs_review"] = (table["confidence"] < config.review_confidence) | (
            table["disagreement"] > config.review_disagreement
        )
        for k, name in enumerate(classes):
            table[f"p_{name}"] = result["probs"][:, k].astype(float)
        tables.append(table)
        for name in table["class"]:
            counts[name] += 1
        yield Progress(
            "blocks",
            i + 1,
            len(grid),
            f"{sum(counts.values())} cells",
            {"counts": dict(counts), "cells": table},
        )
    columns = ["y", "x", "diameter", "class", "confidence", "disagreement", "needs_review"]
    cells = (
        pd.concat(tables, ignore_index=True)
        if tables
        else pd.DataFrame({c: [] for c in columns + [f"p_{n}" for n in classes]})
    )
    cells.attrs.update(
        rbc_diameter_px=rbc_px,
        scale=scale_note,
        crop_px=side,
        stain_normalized=normalizer is not None,
        classes=classes,
    )
    return cells


def _device(config: ClassifyConfig):
    from .models.build import get_device

    return get_device(config.device)


def _given_cells(points, labels, height: int, width: int) -> pd.DataFrame | None:
    """User-supplied cells (points or a label image) as a y, x, diameter table."""
    if points is not None and labels is not None:
        raise WBCError("give cell points or a label image, not both")
    if points is not None:
        pts = np.asarray(points, dtype=float).reshape(-1, 2)
        inside = (pts[:, 0] >= 0) & (pts[:, 0] < height) & (pts[:, 1] >= 0) & (pts[:, 1] < width)
        if not inside.all():
            log.warning("%d points outside the image are ignored", int((~inside).sum()))
        pts = pts[inside]
        return pd.DataFrame({"y": pts[:, 0], "x": pts[:, 1], "diameter": np.nan})
    if labels is not None:
        from skimage.measure import regionprops_table

        lab = np.asarray(labels)
        if lab.shape[:2] != (height, width):
            raise WBCError(
                f"the label image is {lab.shape[:2]} but the smear is {(height, width)}; "
                "they must have the same size"
            )
        props = regionprops_table(lab.astype(np.int64), properties=("label", "centroid", "equivalent_diameter_area"))
        return pd.DataFrame(
            {
                "y": props["centroid-0"],
                "x": props["centroid-1"],
                "diameter": props["equivalent_diameter_area"],
                "label": props["label"],
            }
        )
    return None


def differential_count(cells: pd.DataFrame, classes=None) -> pd.DataFrame:
    """Count and percentage per class, plus a total row."""
    classes = list(classes) if classes is not None else sorted(cells["class"].unique())
    counts = cells["class"].value_counts().reindex(classes, fill_value=0)
    total = int(counts.sum())
    table = pd.DataFrame(
        {"class": classes, "count": counts.to_numpy(int), "percent": 100 * counts.to_numpy() / max(total, 1)}
    )
    review = cells.groupby("class")["needs_review"].sum() if "needs_review" in cells else None
    if review is not None:
        table["needs_review"] = review.reindex(classes, fill_value=0).to_numpy(int)
    total_row = {"class": "total", "count": total, "percent": 100.0 if total else 0.0}
    if review is not None:
        total_row["needs_review"] = int(table["needs_review"].sum())
    return pd.concat([table, pd.DataFrame([total_row])], ignore_index=True)
