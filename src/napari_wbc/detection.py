"""Finding white cells in smears of any size by their nuclear stain.

White cells are the only cells in blood with a nucleus, and every
Romanowsky-type stain (May-Grünwald-Giemsa, Wright, Leishman) leaves nuclei
absorbing green light far more than blue, whether they look blue-violet or
magenta, while red cells (pink, brownish or bluish grey, depending on the lab)
and glass absorb the two about evenly. Detection therefore thresholds that
nuclear density (:func:`napari_wbc.pixels.nuclear_density`) at a level set
from the image's own statistics (:func:`napari_wbc.pixels.nuclear_threshold`:
Otsu's threshold above the red cells' level, never within their spread), so
no lab's tint is built in. It then groups the pieces of one nucleus (the lobes
of a segmented neutrophil lie within about 0.6 red-cell diameters of each
other), and keeps groups with at least a small nucleus' worth of stain.
Platelets, which also take up some stain, are far smaller.

Every size is a multiple of the red-cell diameter, measured from the image
(:mod:`napari_wbc.scale`) when the pixel size is unknown, and the work is done
on a copy downsampled so that a red cell spans about 24 pixels.

Images of any size are processed block by block on the grid of
:mod:`napari_wbc.tiling`, each block read with a halo of more than 1.5 of the
largest cell's diameter; a cell is reported only by the block that owns its
centre, so each cell comes out once and the result does not depend on the
block size. The few image-wide numbers (the glass colour and the nuclear
threshold) are measured once, on windows of a fixed grid, before the blocks
are processed.

A detector is any :class:`Detector`: prepared once per image
(:meth:`Detector.iter_prepare`), then asked for the cells of one window at a
time (:meth:`Detector.detect`), reading the halo it asks for
(:attr:`Detector.halo`). :class:`ClassicalDetector` is the nuclear-stain
detector above; a learned detector is another subclass, and the smear
pipeline (:mod:`napari_wbc.pipeline`) runs either without knowing which.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from .errors import WBCError
from .pixels import (
    STAINED_DENSITY,
    as_rgb_image,
    background_of,
    downsample,
    grid_windows,
    nuclear_density,
    nuclear_threshold,
    optical_density,
    read_window,
)
from .progress import Progress, ProgressGen, run
from .scale import iter_resolve_scale
from .tiling import tile_grid

log = logging.getLogger(__name__)

__all__ = [
    "COLUMNS",
    "ClassicalDetector",
    "DetectionError",
    "Detector",
    "dedupe_boxes",
    "detect_cells",
    "detection_scores",
    "iter_detect",
    "iter_detect_cells",
    "match_detections",
]

#: Columns of the detection table, in order.
COLUMNS = [
    "y",
    "x",
    "diameter",
    "area",
    "nucleus_area",
    "bbox_y0",
    "bbox_x0",
    "bbox_y1",
    "bbox_x1",
    "score",
    "kind",
]

# Sizes in red-cell diameters (d).
_MERGE_DISTANCE = 0.6  # lobes of one nucleus lie at most this far apart
_MAX_CELL = 2.2  # largest white cell (monocytes reach 2 d)
_SPLIT_DIAMETER = 2.4  # a footprint wider than this may hold two cells
_SPLIT_DISTANCE = 1.2  # ... when its nucleus halves lie this far apart (a lymphocyte)
_HALO_CELLS = 1.6  # halo around each block, in largest-cell diameters
_SPECK_AREA = 0.01  # nuclear specks smaller than this (d²) are noise
_LARGEST_PIECE = 0.1  # a nucleus holds one piece at least this large (d²)
_PLATELET_DIAMETER = (0.1, 0.5)  # range of a platelet's stained part
# A platelet's granules stain paler than a nucleus: this far from the red
# cells' level towards the nuclear threshold.
_PLATELET_LEVEL = 0.4
_WORKING_RBC_PX = 24.0  # a red cell spans about this many pixels when working
_SMOOTHING = 0.04  # Gaussian sigma, against JPEG blocks and camera noise

#: Default bounds of the automatic nuclear threshold (nuclear density, green
#: minus blue optical density); the image's own statistics choose within them.
THRESHOLD_BOUNDS = (0.2, 1.5)
#: Default smallest nucleus (or group of lobes) of a white cell, in d²: above
#: the stained part of the largest platelet (half a red cell across, 0.2 d²).
MIN_NUCLEUS_AREA = 0.2


class DetectionError(WBCError, ValueError):
    """Detection cannot run with these inputs."""


@dataclass(frozen=True)
class _Setup:
    """Image-wide numbers every block uses, so that blocks agree."""

    rbc_diameter: float  # px at full resolution
    factor: int  # downsampling factor to the working scale
    background: tuple[float, float, float]
    threshold: float
    min_nucleus_area: float  # d²
    include_platelets: bool
    platelet_threshold: float

    @property
    def d_work(self) -> float:
        """Red-cell diameter in working pixels."""
        return self.rbc_diameter / self.factor


# ----------------------------------------------------------------- setup


def _working_factor(rbc_diameter: float) -> int:
    """Integer downsampling that brings a red cell to about 24-48 px."""
    return max(1, int(rbc_diameter // _WORKING_RBC_PX))


def _signal(rgb_work: np.ndarray, background, d_work: float) -> np.ndarray:
    """Smoothed nuclear density at the working scale."""
    sigma = max(_SMOOTHING * d_work, 0.5)
    return ndi.gaussian_filter(nuclear_density(rgb_work, background), sigma, mode="nearest")


def _iter_setup(
    rgb,
    d: float,
    threshold,
    threshold_bounds,
    min_nucleus_area,
    include_platelets,
    max_windows,
) -> ProgressGen[_Setup]:
    """Measure glass colour and nuclear threshold on fixed-grid windows (red cell ``d`` px)."""
    lo, hi = (float(v) for v in threshold_bounds)
    factor = _working_factor(d)
    boxes = grid_windows(rgb.shape, 1024, max_windows)
    backgrounds, samples = [], []
    for i, box in enumerate(boxes):
        # Windows start on the factor grid, so they see the same working
        # pixels as the blocks do.
        y0, y1, x0, x1 = box
        box = (y0 - y0 % factor, y1, x0 - x0 % factor, x1)
        pixels = read_window(rgb, box)
        backgrounds.append(background_of(pixels))
        samples.append(downsample(pixels, factor))
        yield Progress("setup", i + 1, len(boxes), "measuring glass colour and nuclear stain")
    background = np.median(np.stack(backgrounds), axis=0)
    values = np.concatenate([_signal(work, background, d / factor).ravel() for work in samples])
    stained = np.concatenate(
        [(optical_density(w, background).sum(axis=-1) > STAINED_DENSITY).ravel() for w in samples]
    )
    # Most stained pixels belong to red cells: their level.
    rbc_level = float(np.median(values[stained])) if stained.sum() > 50 else 0.0
    if threshold is None:
        threshold = float(np.clip(nuclear_threshold(values, stained), lo, hi))
    platelet_threshold = rbc_level + _PLATELET_LEVEL * (float(threshold) - rbc_level)
    setup = _Setup(
        rbc_diameter=d,
        factor=factor,
        background=tuple(float(v) for v in background),
        threshold=float(threshold),
        min_nucleus_area=float(min_nucleus_area),
        include_platelets=bool(include_platelets),
        platelet_threshold=float(platelet_threshold),
    )
    log.info(
        "detection: red cell %.1f px, working at 1/%d, nuclear threshold %.3f",
        d,
        factor,
        setup.threshold,
    )
    return setup


# ----------------------------------------------------------------- blocks


def _two_means(points: np.ndarray, iterations: int = 10) -> np.ndarray:
    """Split points (N×2) into two clusters; returns a 0/1 label per point.

    Starts from the two extreme points along the main axis, so the result
    depends only on the points.
    """
    centred = points - points.mean(axis=0)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    proj = centred @ vectors[:, -1]
    centres = points[[int(np.argmin(proj)), int(np.argmax(proj))]].astype(np.float64)
    labels = np.zeros(len(points), np.intp)
    for _ in range(iterations):
        dist = ((points[:, None, :] - centres[None]) ** 2).sum(axis=-1)
        labels = np.argmin(dist, axis=1)
        if labels.min() == labels.max():
            break
        centres = np.stack([points[labels == k].mean(axis=0) for k in (0, 1)])
    return labels


def _measure(nuc_pts, nuc_signal, foot_pts, f: int) -> dict:
    """Centre, size, bounds and score of one cell from its global working-grid pixels."""
    n = len(nuc_pts)
    cy, cx = nuc_pts.sum(axis=0, dtype=np.float64) / n
    area = len(foot_pts) * f * f
    return {
        "y": (cy + 0.5) * f - 0.5,
        "x": (cx + 0.5) * f - 0.5,
        "diameter": math.sqrt(4 * area / math.pi),
        "area": float(area),
        "nucleus_area": float(n * f * f),
        "bbox_y0": int(foot_pts[:, 0].min()) * f,
        "bbox_x0": int(foot_pts[:, 1].min()) * f,
        "bbox_y1": (int(foot_pts[:, 0].max()) + 1) * f,
        "bbox_x1": (int(foot_pts[:, 1].max()) + 1) * f,
        "score": float(nuc_signal.sum(dtype=np.float64) / n),
    }


def _split(nuc_pts, nuc_signal, foot_pts, setup: _Setup) -> list[dict] | None:
    """Two cells when a large group's nucleus falls apart into two well separated halves."""
    f, d = setup.factor, setup.d_work
    labels = _two_means(nuc_pts)
    parts = [labels == k for k in (0, 1)]
    sizes = [int(p.sum()) for p in parts]
    if min(sizes) * f * f < setup.min_nucleus_area * setup.rbc_diameter**2:
        return None
    centres = np.stack([nuc_pts[p].mean(axis=0) for p in parts])
    if np.hypot(*(centres[0] - centres[1])) < _SPLIT_DISTANCE * d:
        return None
    # Each footprint pixel goes to the nearer nucleus half.
    near = ((foot_pts[:, None, :] - centres[None]) ** 2).sum(axis=-1).argmin(axis=1)
    return [
        _measure(nuc_pts[parts[k]], nuc_signal[parts[k]], foot_pts[near == k], f) for k in (0, 1)
    ]


def _detect_block(rgb: np.ndarray, origin: tuple[int, int], setup: _Setup) -> pd.DataFrame:
    """Every cell found in one (haloed) block; coordinates are full-resolution, global."""
    f = setup.factor
    d = setup.d_work
    work = downsample(rgb, f)
    signal = _signal(work, setup.background, d)
    mask = signal > setup.threshold
    pieces, n_pieces = ndi.label(mask)
    # Drop noise specks before grouping so they cannot bridge two cells.
    piece_area = np.bincount(pieces.ravel(), minlength=n_pieces + 1)
    speck = piece_area < _SPECK_AREA * d * d
    speck[0] = False
    mask &= ~speck[pieces]
    # Group the pieces of one nucleus: everything within half the lobe gap.
    reach = ndi.distance_transform_edt(~mask) <= _MERGE_DISTANCE * d / 2
    groups, _ = ndi.label(reach)
    oy, ox = origin[0] // f, origin[1] // f
    min_nucleus = setup.min_nucleus_area * setup.rbc_diameter**2
    rows = []
    wbc_groups = []
    for label, box in enumerate(ndi.find_objects(groups), start=1):
        if box is None:
            continue
        in_group = groups[box] == label
        nuc = in_group & mask[box]
        n_nuc = int(nuc.sum())
        if n_nuc * f * f < min_nucleus:
            continue
        # A clump of platelets is many small pieces; a nucleus holds at least
        # one piece larger than any platelet's stained part.
        if piece_area[pieces[box][nuc]].max() * f * f < _LARGEST_PIECE * setup.rbc_diameter**2:
            continue
        wbc_groups.append(label)
        # Global working-grid coordinates: integers, so sums are exact and
        # every block computes the same numbers for the same cell.
        offset = np.array([box[0].start + oy, box[1].start + ox])
        nuc_pts = np.argwhere(nuc) + offset
        foot_pts = np.argwhere(in_group) + offset
        nuc_signal = signal[box][nuc]
        cell = _measure(nuc_pts, nuc_signal, foot_pts, f)
        cells = None
        if cell["diameter"] > _SPLIT_DIAMETER * setup.rbc_diameter:
            cells = _split(nuc_pts, nuc_signal, foot_pts, setup)
        rows.extend({**c, "kind": "wbc"} for c in cells or [cell])
    if setup.include_platelets:
        rows.extend(_platelets(signal, np.isin(groups, wbc_groups), (oy, ox), setup))
    if not rows:
        return _empty()
    return pd.DataFrame(rows, columns=COLUMNS)


def _platelets(signal, wbc_footprint, origin, setup: _Setup) -> list[dict]:
    """Small, weakly blue objects outside white cells (platelets stain paler than nuclei)."""
    f, d = setup.factor, setup.d_work
    faint = (signal > setup.platelet_threshold) & ~wbc_footprint
    pieces, _ = ndi.label(faint)
    rows = []
    for label, box in enumerate(ndi.find_objects(pieces), start=1):
        if box is None:
            continue
        part = pieces[box] == label
        n = int(part.sum())
        diameter = math.sqrt(4 * n / math.pi)
        if not _PLATELET_DIAMETER[0] * d <= diameter <= _PLATELET_DIAMETER[1] * d:
            continue
        touches = wbc_footprint[
            max(box[0].start - 1, 0) : box[0].stop + 1, max(box[1].start - 1, 0) : box[1].stop + 1
        ]
        if touches.any():
            continue
        pts = np.argwhere(part) + np.array([box[0].start + origin[0], box[1].start + origin[1]])
        rows.append({**_measure(pts, signal[box][part], pts, f), "kind": "platelet"})
    return rows


def _empty() -> pd.DataFrame:
    """A detection table with no rows and the right columns and types."""
    table = pd.DataFrame({c: pd.Series(dtype=np.float64) for c in COLUMNS})
    for c in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"):
        table[c] = table[c].astype(np.int64)
    table["kind"] = table["kind"].astype(object)
    return table


# -------------------------------------------------------------- detectors


def _check_rbc_diameter(rbc_diameter_px) -> None:
    """A given red-cell diameter must be a number of at least 4 pixels."""
    if rbc_diameter_px is None:
        return
    try:
        d = float(rbc_diameter_px)
    except (TypeError, ValueError):
        raise DetectionError(
            f"rbc_diameter_px must be a number of pixels; got {rbc_diameter_px!r}"
        ) from None
    if not math.isfinite(d) or d < 4:
        raise DetectionError(
            f"rbc_diameter_px={rbc_diameter_px!r} is too small; a red cell must span at "
            "least 4 pixels to find white cells"
        )


class Detector:
    """What finds cells in a smear, window by window; subclass it for a new detector.

    The smear pipeline and :func:`iter_detect` use a detector in three steps:

    1. ``prepared = yield from detector.iter_prepare(image, rbc_diameter_px)``
       once per image: measure whatever every window must share (a
       threshold, the glass colour) and return a detector ready for that
       image. It may yield :class:`~napari_wbc.progress.Progress` events.
    2. Read the halo it asks for: ``prepared.halo`` pixels around each block,
       with window origins on multiples of ``prepared.align``.
    3. ``prepared.detect(window, origin)`` for each in-memory window whose
       top-left pixel is ``origin`` in the image: a table with at least
       ``y``, ``x`` (the centre, full-image pixels) and ``diameter`` (px),
       optionally ``kind`` ("wbc" rows are classified). The caller keeps
       the cells the window's tile owns (:mod:`napari_wbc.tiling`), so a
       detector reports everything it sees and need not deduplicate.

    A detector must find the same cell at the same place in any window that
    holds the cell and its halo; then a tiled run equals a whole-image run.
    Prepared detectors are pickled to dask workers, so keep them small.
    """

    #: Window origins must be multiples of this many pixels.
    align: int = 1

    def iter_prepare(self, image, rbc_diameter_px: float) -> ProgressGen[Detector]:
        """Measure image-wide settings once; the default needs none and returns self."""
        return self
        yield  # a generator, like every iter_ function

    @property
    def halo(self) -> int:
        """Pixels of context needed around a block to find every cell centred in it."""
        raise NotImplementedError

    def detect(self, window: np.ndarray, origin: tuple[int, int]) -> pd.DataFrame:
        """Cells found in one (Y, X, 3) uint8 window, in full-image coordinates."""
        raise NotImplementedError


@dataclass(frozen=True)
class ClassicalDetector(Detector):
    """White cells by their nuclear stain (this module's method); see :func:`detect_cells`.

    Parameters are those of :func:`detect_cells`. :meth:`iter_prepare` fixes
    the glass colour and the nuclear threshold for the whole image.
    """

    threshold: float | None = None
    threshold_bounds: tuple[float, float] = THRESHOLD_BOUNDS
    min_nucleus_area: float = MIN_NUCLEUS_AREA
    include_platelets: bool = False
    max_windows: int = 16
    setup: _Setup | None = None

    def __post_init__(self):
        lo, hi = (float(v) for v in self.threshold_bounds)
        if not lo <= hi:
            raise DetectionError(
                f"threshold_bounds={self.threshold_bounds!r} must be (low, high), low <= high"
            )
        if self.min_nucleus_area <= 0:
            raise DetectionError(
                f"min_nucleus_area={self.min_nucleus_area} must be positive (in RBC diameters²)"
            )

    def iter_prepare(self, image, rbc_diameter_px: float) -> ProgressGen[ClassicalDetector]:
        setup = yield from _iter_setup(
            as_rgb_image(image),
            float(rbc_diameter_px),
            self.threshold,
            self.threshold_bounds,
            self.min_nucleus_area,
            self.include_platelets,
            self.max_windows,
        )
        return dataclasses.replace(self, setup=setup)

    def _ready(self) -> _Setup:
        if self.setup is None:
            raise DetectionError("prepare the detector on the image first (iter_prepare)")
        return self.setup

    @property
    def align(self) -> int:
        return self._ready().factor

    @property
    def halo(self) -> int:
        setup = self._ready()
        f = setup.factor
        return math.ceil(_HALO_CELLS * _MAX_CELL * setup.rbc_diameter / f) * f

    def detect(self, window: np.ndarray, origin: tuple[int, int]) -> pd.DataFrame:
        setup = self._ready()
        if origin[0] % setup.factor or origin[1] % setup.factor:
            raise DetectionError(
                f"window origin {origin} is not on the {setup.factor}-px working grid"
            )
        return _detect_block(np.asarray(window), origin, setup)


# -------------------------------------------------------------- public API


def iter_detect(
    image, detector: Detector, rbc_diameter_px: float, block: int = 2048
) -> ProgressGen[pd.DataFrame]:
    """Run any detector block by block over an image of any size; returns the cell table.

    Parameters
    ----------
    image : array-like, dask array or Smear
        ``(Y, X, 3)`` RGB smear; dask arrays are read window by window.
    detector : Detector
        Not yet prepared; it is prepared here on ``image``.
    rbc_diameter_px : float
        Red-cell diameter in pixels.
    block : int
        Edge of the blocks (rounded down to the detector's ``align``).

    Yields
    ------
    Progress
        The detector's preparation, then stage "detect", one event per block.
    """
    rgb = as_rgb_image(image)
    if int(block) < 64:
        raise DetectionError(f"block={block} px is too small; use at least 64 (default 2048)")
    detector = yield from detector.iter_prepare(rgb, rbc_diameter_px)
    align = detector.align
    # Blocks on the detector's grid, so every block downsamples the same
    # pixel groups as a single whole-image block would.
    block = max(align, int(block) // align * align)
    h, w = rgb.shape[:2]
    tiles = tile_grid((h, w), block, detector.halo, align)
    tables = []
    for tile in tiles:
        found = tile.select(detector.detect(read_window(rgb, tile.window), tile.origin))
        if len(found):
            tables.append(found)
        yield Progress(
            "detect", tile.index + 1, len(tiles), f"{sum(map(len, tables))} cells found"
        )
    if not tables:
        return _empty()
    table = pd.concat(tables, ignore_index=True)
    for c in ("bbox_y0", "bbox_y1"):
        if c in table:
            table[c] = table[c].clip(0, h)
    for c in ("bbox_x0", "bbox_x1"):
        if c in table:
            table[c] = table[c].clip(0, w)
    return table.sort_values(["y", "x"], kind="stable").reset_index(drop=True)


def iter_detect_cells(
    image,
    rbc_diameter_px: float | None = None,
    pixel_size_um: float | None = None,
    *,
    threshold: float | None = None,
    threshold_bounds: tuple[float, float] = THRESHOLD_BOUNDS,
    min_nucleus_area: float = MIN_NUCLEUS_AREA,
    include_platelets: bool = False,
    block: int = 2048,
    max_windows: int = 16,
) -> ProgressGen[pd.DataFrame]:
    """Detect white cells block by block, yielding progress; returns the table.

    Generator form of :func:`detect_cells` (same parameters); drive it with
    :func:`napari_wbc.progress.run`. Yields one event per block.
    """
    rgb = as_rgb_image(image)
    if int(block) < 64:
        raise DetectionError(f"block={block} px is too small; use at least 64 (default 2048)")
    detector = ClassicalDetector(
        threshold=threshold,
        threshold_bounds=threshold_bounds,
        min_nucleus_area=min_nucleus_area,
        include_platelets=include_platelets,
        max_windows=max_windows,
    )
    _check_rbc_diameter(rbc_diameter_px)
    scale = yield from iter_resolve_scale(
        rgb, pixel_size_um, rbc_diameter_px=rbc_diameter_px, max_windows=max_windows
    )
    if scale.source == "user" and scale.rbc_diameter_px < 4:
        raise DetectionError(
            f"at {pixel_size_um} µm/px a red cell spans {scale.rbc_diameter_px:.1f} px; white "
            "cells cannot be found below 4 px per red cell"
        )
    table = yield from iter_detect(rgb, detector, scale.rbc_diameter_px, block)
    return table[COLUMNS]


def detect_cells(
    image,
    rbc_diameter_px: float | None = None,
    pixel_size_um: float | None = None,
    *,
    threshold: float | None = None,
    threshold_bounds: tuple[float, float] = THRESHOLD_BOUNDS,
    min_nucleus_area: float = MIN_NUCLEUS_AREA,
    include_platelets: bool = False,
    block: int = 2048,
    max_windows: int = 16,
) -> pd.DataFrame:
    """Find the white (nucleated) cells of a smear.

    Parameters
    ----------
    image : array-like, dask.array.Array or Smear
        ``(Y, X, 3)`` RGB smear of any size; dask arrays are read block by
        block, never whole.
    rbc_diameter_px : float, optional
        Red-cell diameter in pixels, the unit of every size threshold.
    pixel_size_um : float, optional
        Micrometres per pixel, used when ``rbc_diameter_px`` is not given
        (a red cell is 7.5 µm). With neither, the red-cell size is measured
        from the image (:func:`napari_wbc.scale.estimate_rbc_diameter`).
    threshold : float, optional
        Fixed threshold of the nuclear density (green minus blue optical
        density, :func:`napari_wbc.pixels.nuclear_density`); by default set
        from the image's own statistics
        (:func:`napari_wbc.pixels.nuclear_threshold`).
    threshold_bounds : (float, float)
        Range the automatic threshold is kept in.
    min_nucleus_area : float
        Smallest nucleus (summed over its lobes) of a white cell, in squared
        red-cell diameters; platelets stay well below it.
    include_platelets : bool
        Also report small stained objects as ``kind == "platelet"``.
    block : int
        Edge (px) of the blocks processed one at a time.
    max_windows : int
        Most 1024 px windows read to measure the scale, glass colour and
        threshold.

    Returns
    -------
    pandas.DataFrame
        One row per cell, sorted by position, with columns :data:`COLUMNS`:
        ``y``, ``x`` (nucleus centre, full-resolution px), ``diameter`` and
        ``area`` (of the cell's footprint: its nucleus grown by 0.3 red-cell
        diameters, px and px²), ``nucleus_area`` (px²), ``bbox_y0``,
        ``bbox_x0``, ``bbox_y1``, ``bbox_x1`` (footprint bounds, end
        exclusive), ``score`` (mean nuclear density of the nucleus, higher is
        more strongly stained) and ``kind`` ("wbc", or "platelet").

    Raises
    ------
    DetectionError
        For unusable parameters.
    napari_wbc.scale.ScaleError
        When no scale is given and the image holds too few red cells to
        measure it.
    napari_wbc.errors.ImageReadError
        When the image cannot be read as RGB.
    """
    return run(
        iter_detect_cells(
            image,
            rbc_diameter_px,
            pixel_size_um,
            threshold=threshold,
            threshold_bounds=threshold_bounds,
            min_nucleus_area=min_nucleus_area,
            include_platelets=include_platelets,
            block=block,
            max_windows=max_windows,
        )
    )


def match_detections(detections: pd.DataFrame, boxes, by: str = "distance") -> dict:
    """Match detections to ground-truth boxes one to one.

    A detection can match a box that contains its centre. Pairs are taken
    greedily: by distance from the detection to the box centre (``by =
    "distance"``) or by detection score, highest first (``by = "score"``),
    each detection and box used at most once.

    Parameters
    ----------
    detections : pandas.DataFrame
        Columns ``x`` and ``y`` (and ``score`` for ``by="score"``).
    boxes : pandas.DataFrame or array-like
        Boxes with columns ``x, y, w, h`` (top-left corner and size, as in
        BCCD's CSV files), or an (N, 4) array in that order.
    by : {"distance", "score"}
        Greedy order.

    Returns
    -------
    dict
        ``tp``, ``fp``, ``fn`` (int), ``precision``, ``recall``, ``f1``
        (float; 1.0 when there is nothing to find and nothing found) and
        ``pairs``: list of (detection index, box index) positions.
    """
    if by not in ("distance", "score"):
        raise DetectionError(f"by={by!r}: use 'distance' or 'score'")
    det = pd.DataFrame(detections)
    for col in ("x", "y") + (("score",) if by == "score" else ()):
        if col not in det.columns:
            raise DetectionError(f"detections need a {col!r} column; got {list(det.columns)}")
    if isinstance(boxes, pd.DataFrame):
        missing = [c for c in ("x", "y", "w", "h") if c not in boxes.columns]
        if missing:
            raise DetectionError(f"boxes need columns x, y, w, h; missing {missing}")
        b = boxes[["x", "y", "w", "h"]].to_numpy(dtype=np.float64)
    else:
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if len(boxes) else np.zeros((0, 4))
    px = det["x"].to_numpy(dtype=np.float64)
    py = det["y"].to_numpy(dtype=np.float64)
    inside = (
        (px[:, None] >= b[None, :, 0])
        & (px[:, None] <= b[None, :, 0] + b[None, :, 2])
        & (py[:, None] >= b[None, :, 1])
        & (py[:, None] <= b[None, :, 1] + b[None, :, 3])
    )
    di, bi = np.nonzero(inside)
    if by == "distance":
        cx = b[bi, 0] + b[bi, 2] / 2
        cy = b[bi, 1] + b[bi, 3] / 2
        order = np.argsort(np.hypot(px[di] - cx, py[di] - cy), kind="stable")
    else:
        order = np.argsort(-det["score"].to_numpy(dtype=np.float64)[di], kind="stable")
    used_d, used_b, pairs = set(), set(), []
    for k in order:
        i, j = int(di[k]), int(bi[k])
        if i in used_d or j in used_b:
            continue
        used_d.add(i)
        used_b.add(j)
        pairs.append((i, j))
    tp = len(pairs)
    return {**detection_scores(tp, len(det) - tp, len(b) - tp), "pairs": sorted(pairs)}


def dedupe_boxes(boxes: pd.DataFrame, iou: float = 0.5) -> pd.DataFrame:
    """Ground-truth boxes with each cell boxed once: of boxes overlapping by IoU ≥ ``iou``, the first.

    Annotators sometimes box one cell twice (two boxes overlapping by an
    intersection over union of 0.5-0.75 on one cell, as in TXL-BCD); no
    detector can find a cell twice, so scores count such a pair once. Two
    different cells' boxes overlap far less. ``boxes`` has columns ``x, y,
    w, h``; the index is reset.
    """
    b = boxes[["x", "y", "w", "h"]].to_numpy(dtype=np.float64).reshape(-1, 4)
    x0, y0 = b[:, 0], b[:, 1]
    x1, y1 = x0 + b[:, 2], y0 + b[:, 3]
    iw = np.clip(np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None]), 0, None)
    ih = np.clip(np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None]), 0, None)
    inter = iw * ih
    area = b[:, 2] * b[:, 3]
    union = area[:, None] + area[None] - inter
    overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0) >= iou
    keep: list[int] = []
    for i in range(len(b)):
        if not any(overlap[i, j] for j in keep):
            keep.append(i)
    return boxes.iloc[keep].reset_index(drop=True)


def detection_scores(tp: int, fp: int, fn: int) -> dict:
    """``tp``, ``fp``, ``fn`` with precision, recall and F1 (1.0 when nothing to find/found)."""
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1}
