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
from .images import cut_square
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
    stain_method : str or None
        "macenko" or "reinhard"; None uses the method the model was trained with.
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
    stain_method: str | None = None
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
    return max(round(ensemble.fov_rbc * rbc_px), 8)


def iter_classify_smear(
    image,
    ensemble,
    config: ClassifyConfig | None = None,
    points: np.ndarray | None = None,
    labels=None,
    client=None,
    source_path=None,
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
    client : dask.distributed.Client, optional
        Run the blocks on this cluster. Workers read their windows from
        ``source_path`` and load the model from the ensemble's file, so both
        must be reachable from the workers.
    source_path : path, optional
        The image file, needed with ``client``.

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
    config = config or ClassifyConfig()
    arr = _as_dask(image)
    height, width = arr.shape[:2]
    rbc_px, scale_note = yield from iter_resolve_scale(arr, config)
    side = _crop_side(ensemble, rbc_px)
    yield Progress("scale", 1, 1, f"red cell ≈ {rbc_px:.0f} px ({scale_note}); crops {side} px")

    normalizer = None
    if config.stain_normalize and ensemble.stain is not None:
        from .stain import StainReference, iter_prepare_normalizer

        method = config.stain_method or ensemble.members[0].config.training.get(
            "stain_method", "macenko"
        )
        try:
            normalizer = yield from iter_prepare_normalizer(
                [arr], method, StainReference.from_dict(ensemble.stain)
            )
        except WBCError as exc:
            raise WBCError(f"{exc}; or classify without stain normalization") from exc

    given = _given_cells(points, labels, height, width)
    detector = None
    if given is None:
        from .detection import iter_prepare_detection

        # One threshold and glass colour for the whole image: blocks agree.
        detector = yield from iter_prepare_detection(arr, rbc_diameter_px=rbc_px)
    halo = math.ceil(side / 2 + 3 * rbc_px)
    step = max(int(config.block), side)
    grid = [(y, x) for y in range(0, height, step) for x in range(0, width, step)]
    classes = list(ensemble.classes)
    counts = dict.fromkeys(classes, 0)
    tables = []

    def windows():
        for y0, x0 in grid:
            own_box = (y0, x0, min(y0 + step, height), min(x0 + step, width))
            wy0, wx0 = max(y0 - halo, 0), max(x0 - halo, 0)
            if detector is not None:
                from .detection import align_to_grid

                wy0, wx0 = align_to_grid(wy0, detector), align_to_grid(wx0, detector)
            window = (wy0, wx0, min(own_box[2] + halo, height), min(own_box[3] + halo, width))
            own = None if given is None else _inside(given, own_box)
            yield own_box, window, own

    def local_results():
        for own_box, (wy0, wx0, wy1, wx1), own in windows():
            if own is not None and own.empty:
                yield None
                continue
            block = np.asarray(arr[wy0:wy1, wx0:wx1].compute())
            yield classify_block(
                block,
                (wy0, wx0),
                own_box,
                ensemble,
                normalizer,
                rbc_px,
                side,
                config,
                own,
                detector,
            )

    if client is None:
        results = local_results()
    else:
        results = _iter_remote(
            client, source_path, ensemble, normalizer, rbc_px, side, config, windows(), detector
        )
    for i, table in enumerate(results):
        if table is not None and len(table):
            tables.append(table)
            for name in table["class"]:
                counts[name] += 1
        info = {"counts": dict(counts)}
        if table is not None and len(table):
            info["cells"] = table
        yield Progress("blocks", i + 1, len(grid), f"{sum(counts.values())} cells", info)
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


def _inside(cells: pd.DataFrame, box) -> pd.DataFrame:
    """Cells whose centre lies in the half-open box (y0, x0, y1, x1): ownership."""
    y0, x0, y1, x1 = box
    return cells[(cells.y >= y0) & (cells.y < y1) & (cells.x >= x0) & (cells.x < x1)]


def classify_block(
    block: np.ndarray,
    origin: tuple[int, int],
    own_box: tuple[int, int, int, int],
    ensemble,
    normalizer,
    rbc_px: float,
    side: int,
    config: ClassifyConfig,
    own: pd.DataFrame | None = None,
    detector=None,
) -> pd.DataFrame:
    """Detect (unless ``own`` cells are given) and classify the cells one block owns.

    ``block`` is the block with its halo, in memory, whose top-left pixel is
    ``origin`` in the full image; ``own_box`` is the part of the image this
    block owns. Returns the owned cells in full-image coordinates.
    """
    from .inference import disagreement, predict_crops

    hy0, hx0 = origin
    if own is None:
        from .detection import detect_in_window

        found = detect_in_window(block, (hy0, hx0), detector)
        own = _inside(found[found["kind"] == "wbc"], own_box)
    if own.empty:
        return None
    crops = np.stack(
        [cut_square(block, cy - hy0, cx - hx0, side) for cy, cx in zip(own.y, own.x, strict=True)]
    )
    if normalizer is not None:
        crops = normalizer(crops)
    result = predict_crops(ensemble, crops, config.batch_size, config.tta, _device(config))
    classes = list(ensemble.classes)
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
    return table


def _remote_block(
    path, window, own_box, model_path, normalizer, rbc_px, side, config, own, detector
):
    """Run one block on a dask worker: read its window from the file, classify."""
    from .images import read_smear
    from .models.files import load_any

    smear = read_smear(path)
    try:
        y0, x0, y1, x1 = window
        block = np.asarray(smear.levels[0][y0:y1, x0:x1].compute(scheduler="sync"))
    finally:
        smear.close()
    ensemble = load_any(model_path, device="cpu")
    return classify_block(
        block, (y0, x0), own_box, ensemble, normalizer, rbc_px, side, config, own, detector
    )


def _iter_remote(
    client, source_path, ensemble, normalizer, rbc_px, side, config, windows, detector
):
    """Submit every block to the cluster; yield tables as they complete."""
    from dask.distributed import as_completed

    if source_path is None or ensemble.path is None:
        raise WBCError("running on a cluster needs the image and the model as files")
    futures = [
        client.submit(
            _remote_block,
            *(str(source_path), w, own_box, str(ensemble.path), normalizer),
            *(rbc_px, side, config, own, detector),
            pure=False,
        )
        for own_box, w, own in windows
    ]
    try:
        for future in as_completed(futures):
            yield future.result()
    finally:
        for future in futures:
            future.cancel()


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
        props = regionprops_table(
            lab.astype(np.int64), properties=("label", "centroid", "equivalent_diameter_area")
        )
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
        {
            "class": classes,
            "count": counts.to_numpy(int),
            "percent": 100 * counts.to_numpy() / max(total, 1),
        }
    )
    review = cells.groupby("class")["needs_review"].sum() if "needs_review" in cells else None
    if review is not None:
        table["needs_review"] = review.reindex(classes, fill_value=0).to_numpy(int)
    total_row = {"class": "total", "count": total, "percent": 100.0 if total else 0.0}
    if review is not None:
        total_row["needs_review"] = int(table["needs_review"].sum())
    return pd.concat([table, pd.DataFrame([total_row])], ignore_index=True)
