"""The image's own scale ruler: how many pixels a red cell spans.

Red cells fill every smear and are about 7.5 µm across in every healthy
patient, so their size in pixels tells the magnification when the file does
not. Everything size-dependent in detection is expressed in red-cell diameters
and converted with this estimate.

Method: stained regions (the optical density in green, which red cells absorb
whether they stain pink, brownish or bluish grey, and glass does not) are
thresholded with Otsu's method and their holes (the pale centres) filled;
nuclei (:func:`napari_wbc.pixels.nuclear_density` above the window's own
:func:`napari_wbc.pixels.nuclear_threshold`) are cut out so that white cells
leave only thin rings. In the distance transform of that mask every red cell,
even one overlapping its neighbours, holds a regional maximum, because the
union of cells contains each whole cell. A watershed from those maxima splits
touching cells along their necks, and each region's bounding box gives its
diameter (the mean of its sides: like a person drawing a box around the cell,
it neither shrinks for oval cells nor for the cut a neighbour's overlap makes).
Regions cut by the window's edge are left out. The estimate is the median of
those diameters weighted by area, which discounts the small regions of noise
and of crescent-shaped pieces. Large cells are measured on a downsampled copy (a
first coarse look picks the resolution), keeping them at least 64 px across.

The estimate reads at most ``max_windows`` windows of a fixed grid on the
image, never its dask chunks, so it does not depend on how the image is
chunked and never loads a whole slide.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .errors import ScaleError
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

log = logging.getLogger(__name__)

__all__ = [
    "RBC_DIAMETER_UM",
    "Scale",
    "ScaleError",
    "ScaleEstimate",
    "estimate_rbc_diameter",
    "folder_scales",
    "iter_estimate_rbc_diameter",
    "iter_resolve_scale",
    "resolve_scale",
]

#: Diameter of a normal red cell (µm), the ruler.
RBC_DIAMETER_UM = 7.5

#: In a folder of fields, an image keeps its own measured scale only when it
#: differs from the folder's median by more than this share (a different
#: objective: 40×, 60× and 100× differ by 1.5× at least) ...
FOLDER_OWN_SCALE_DIFFERENCE = 0.4
#: ... and was measured on at least this many red cells. Fields with fewer
#: are often off by 25 % or more (benchmarks/bench_detection.py).
FOLDER_OWN_SCALE_CELLS = 10

#: Smallest regional maximum of the distance transform (px) taken as a cell.
_MIN_RADIUS_PX = 3.0
#: Regional maxima must stand this many pixels above their surroundings.
_PEAK_HEIGHT_PX = 2.0
#: A window whose red signal varies less than this holds no cells.
_MIN_CONTRAST = 0.03
#: Downsampling of the first, coarse look, and the red-cell size (px) kept
#: when measuring for real.
_COARSE_FACTOR = 4
_WORKING_DIAMETER_PX = 64.0


@dataclass(frozen=True)
class ScaleEstimate:
    """A measured red-cell diameter.

    Attributes
    ----------
    rbc_diameter_px : float
        Median red-cell diameter in full-resolution pixels.
    n_cells : int
        Red cells measured between 0.6 and 1.5 times the estimate.
    method : str
        How it was measured ("distance-transform" or "pixel-size").
    um_per_px : float
        Implied pixel size, assuming red cells of :data:`RBC_DIAMETER_UM`.
    """

    rbc_diameter_px: float
    n_cells: int
    method: str
    um_per_px: float


# ----------------------------------------------------------------- helpers


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """Median of ``values`` under non-negative ``weights``."""
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, cum[-1] / 2)])


def _window_radii(rgb: np.ndarray, factor: int = 1) -> np.ndarray:
    """Radii (full-resolution px) of the red cells in one window, measured at 1/``factor``."""
    from skimage.filters import threshold_otsu
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    if min(rgb.shape[:2]) < 16 * factor:
        return np.zeros(0)
    rgb = downsample(rgb, factor)
    bg = background_of(rgb)
    density = optical_density(rgb, bg)
    red = ndi.gaussian_filter(density[..., 1], 1.0)
    sample = red[::2, ::2].ravel()
    lo, hi = np.percentile(sample, [10, 90])
    if hi - lo < _MIN_CONTRAST:
        return np.zeros(0)
    # Clipping at the 90th percentile keeps a few strongly red objects
    # (eosinophil granules) from pulling the threshold above the red cells.
    threshold = threshold_otsu(np.clip(sample, None, hi))
    mask = ndi.binary_fill_holes(red > threshold)
    # White cells' cytoplasm is stained too: their nuclei become holes, so
    # what is left of them are thin rings with small distance maxima.
    nuclei = ndi.gaussian_filter(nuclear_density(rgb, bg), 1.0)
    nuclear = nuclei > nuclear_threshold(nuclei, density.sum(axis=-1) > STAINED_DENSITY)
    mask = ndi.binary_opening(mask & ~nuclear, iterations=2)
    dist = ndi.distance_transform_edt(mask)
    peaks, n_peaks = ndi.label(h_maxima(dist, _PEAK_HEIGHT_PX))
    if n_peaks == 0:
        return np.zeros(0)
    # Split touching cells along the necks between their distance maxima and
    # measure each by its bounding box, which (unlike the inscribed circle or
    # the area) shrinks neither for the oval cells of a thick or badly dried
    # smear nor for the part the watershed gives to an overlapping neighbour.
    regions = watershed(-dist, peaks, mask=mask)
    boxes = ndi.find_objects(regions, n_peaks)
    sides = np.array(
        [(b[0].stop - b[0].start + b[1].stop - b[1].start) / 2 if b else 0 for b in boxes]
    )
    # A region on the window's edge belongs to a cell cut by it.
    cut = np.unique(np.concatenate([regions[[0, -1], :].ravel(), regions[:, [0, -1]].ravel()]))
    keep = sides > 0
    keep[cut[cut > 0] - 1] = False
    radii = sides[keep] / 2 * factor
    return radii[radii >= _MIN_RADIUS_PX * factor]


def _count_near(radii: np.ndarray) -> int:
    """How many radii lie between 0.6 and 1.5 times their area-weighted median."""
    if len(radii) == 0:
        return 0
    radius = weighted_median(radii, radii**2)
    return int(np.count_nonzero((radii > 0.6 * radius) & (radii < 1.5 * radius)))


def _iter_radii(rgb, boxes, first: np.ndarray, factor: int) -> ProgressGen[np.ndarray]:
    """Red-cell radii of every window (the first one already read), with progress."""
    radii = []
    for i, box in enumerate(boxes):
        pixels = first if i == 0 else read_window(rgb, box)
        radii.append(_window_radii(pixels, factor))
        yield Progress("scale", i + 1, len(boxes), "measuring red cells")
    return np.concatenate(radii)


# -------------------------------------------------------------- public API


def iter_estimate_rbc_diameter(
    image,
    window: int = 1024,
    max_windows: int = 16,
    min_cells: int = 3,
) -> ProgressGen[ScaleEstimate]:
    """Measure the median red-cell diameter, yielding progress per window read.

    Generator form of :func:`estimate_rbc_diameter` (same parameters); drive it
    with :func:`napari_wbc.progress.run`.
    """
    rgb = as_rgb_image(image)
    if window < 64:
        raise ScaleError(f"window={window} px is too small; use at least 64 (default 1024)")
    if max_windows < 1:
        raise ScaleError(f"max_windows={max_windows} must be at least 1")
    boxes = grid_windows(rgb.shape, window, max_windows)
    first = read_window(rgb, boxes[0])
    # A coarse look at one window picks a resolution that keeps red cells at
    # least 64 px across: as exact, and much faster for large cells.
    factor = 1
    coarse = _window_radii(first, _COARSE_FACTOR)
    if len(coarse) >= min_cells:
        rough = 2 * weighted_median(coarse, coarse**2)
        factor = max(1, int(rough // _WORKING_DIAMETER_PX))
    radii = yield from _iter_radii(rgb, boxes, first, factor)
    if factor > 1 and _count_near(radii) < min_cells:
        # The coarse look misjudged the size; measure at full resolution.
        radii = yield from _iter_radii(rgb, boxes, first, 1)
    if len(radii) == 0:
        raise ScaleError(
            "no red cells found to measure the scale; the image may be blank or not a "
            "stained blood smear. Give the pixel size (µm/px) or the red-cell diameter instead."
        )
    # Area weighting: a cell's share grows with its size, noise maxima count little.
    radius = weighted_median(radii, radii**2)
    n_cells = _count_near(radii)
    if n_cells < min_cells:
        raise ScaleError(
            f"only {n_cells} red cells could be measured (need {min_cells}); the image holds "
            "too few separate red cells. Give the pixel size (µm/px) or the red-cell "
            "diameter instead."
        )
    diameter = 2.0 * radius
    log.info("red cells measure %.1f px across (%d cells)", diameter, n_cells)
    return ScaleEstimate(
        rbc_diameter_px=diameter,
        n_cells=n_cells,
        method="distance-transform",
        um_per_px=RBC_DIAMETER_UM / diameter,
    )


def estimate_rbc_diameter(
    image,
    window: int = 1024,
    max_windows: int = 16,
    min_cells: int = 3,
) -> ScaleEstimate:
    """Measure the median red-cell diameter in pixels from the image itself.

    Parameters
    ----------
    image : array-like, dask.array.Array or Smear
        ``(Y, X, 3)`` RGB smear (other layouts are converted as by
        :func:`napari_wbc.images.as_rgb8`). Dask arrays are read window by
        window, never whole.
    window : int
        Edge (px) of the windows read; they lie on a fixed grid of the image.
    max_windows : int
        Most windows read, spread evenly over the grid.
    min_cells : int
        Fewest red cells of about the estimated size needed to trust it.

    Returns
    -------
    ScaleEstimate

    Raises
    ------
    ScaleError
        When too few red cells can be measured (blank or unstained image).
    """
    return run(iter_estimate_rbc_diameter(image, window, max_windows, min_cells))


@dataclass(frozen=True)
class Scale:
    """How many pixels a red cell spans in one image, and where that number came from.

    Attributes
    ----------
    rbc_diameter_px : float
        Red-cell diameter in full-resolution pixels.
    pixel_size_um : float or None
        Micrometres per pixel when a pixel size was given (by the user or the
        file); None when the scale was measured or given as a red-cell
        diameter. Positions in µm are written only when this is known.
    source : {"rbc_diameter", "user", "file", "measured"}
        Which rule of :func:`iter_resolve_scale` decided.
    note : str
        The same, for people ("pixel size 0.1 µm from the file").
    """

    rbc_diameter_px: float
    pixel_size_um: float | None
    source: str
    note: str


def _pixel_size(value, where: str) -> float:
    """A pixel size as a positive finite float, or a ScaleError saying what is wrong."""
    try:
        size = float(value)
    except (TypeError, ValueError):
        raise ScaleError(f"{where} must be a number (µm/px); got {value!r}") from None
    if not math.isfinite(size) or size <= 0:
        raise ScaleError(f"{where} must be a positive number of µm/px; got {value!r}")
    return size


def iter_resolve_scale(
    image=None,
    pixel_size_um: float | None = None,
    file_pixel_size_um: float | None = None,
    rbc_diameter_px: float | None = None,
    max_windows: int = 16,
) -> ProgressGen[Scale]:
    """The one rule that decides an image's scale; yields progress while measuring.

    Precedence: a red-cell diameter given in pixels, then the pixel size the
    user gives, then the pixel size in the file's metadata, then the red
    cells measured in the image (:func:`iter_estimate_rbc_diameter`). Every
    caller (the CLI, the smear pipeline, the widgets, detection, export)
    goes through here, so one result never mixes two scales.

    Parameters
    ----------
    image : array-like, dask array or Smear, optional
        The smear, measured when no size is given.
    pixel_size_um : float, optional
        The user's pixel size (µm/px).
    file_pixel_size_um : float, optional
        The pixel size read from the file (``Smear.pixel_size_um``).
    rbc_diameter_px : float, optional
        The user's red-cell diameter in pixels.
    max_windows : int
        Most windows read when measuring.

    Returns
    -------
    Scale

    Raises
    ------
    ScaleError
        When a given size is not a positive number, or nothing is given and
        the image is missing or holds too few red cells.
    """
    if rbc_diameter_px:
        d = float(rbc_diameter_px)
        if not math.isfinite(d) or d <= 0:
            raise ScaleError(f"the red-cell diameter must be a positive number of pixels; got {d}")
        return Scale(d, None, "rbc_diameter", "given red-cell diameter")
    if pixel_size_um is not None:
        size = _pixel_size(pixel_size_um, "pixel size")
        return Scale(RBC_DIAMETER_UM / size, size, "user", f"pixel size {size:g} µm")
    if file_pixel_size_um is not None:
        size = _pixel_size(file_pixel_size_um, "the pixel size in the file")
        note = f"pixel size {size:g} µm from the file"
        return Scale(RBC_DIAMETER_UM / size, size, "file", note)
    if image is None:
        raise ScaleError("give the pixel size (µm/px) or an image to measure red cells in")
    estimate = yield from iter_estimate_rbc_diameter(image, max_windows=max_windows)
    return Scale(
        float(estimate.rbc_diameter_px),
        None,
        "measured",
        f"estimated from {estimate.n_cells} red cells",
    )


def folder_scales(estimates: Mapping) -> dict:
    """One scale per image of a folder of fields from one microscope.

    A field's own red cells give a noisy ruler: with under ten red cells
    measured, a quarter of real fields are off by 25 % or more, and sizes in
    detection and classification follow that error. Fields in one folder
    nearly always share a microscope and camera, so every image takes the
    folder's median measured diameter, except one measured on at least
    :data:`FOLDER_OWN_SCALE_CELLS` red cells that differs from the median by
    more than :data:`FOLDER_OWN_SCALE_DIFFERENCE` (another magnification),
    which keeps its own. An image that could not be measured (``None``)
    takes the median too.

    Parameters
    ----------
    estimates : mapping
        Image key → :class:`ScaleEstimate`, or None where it failed.

    Returns
    -------
    dict
        Image key → :class:`Scale` (``source`` "measured"), for every key
        when at least one image was measured; empty otherwise.
    """
    measured = {k: e for k, e in estimates.items() if e is not None}
    if not measured:
        return {}
    median = float(np.median([e.rbc_diameter_px for e in measured.values()]))
    n = len(measured)
    common = f"the median of {n} measured image{'s' if n != 1 else ''} in the folder"
    out = {}
    for key, est in estimates.items():
        if est is None:
            out[key] = Scale(median, None, "measured", f"{common} (too few red cells here)")
            continue
        own = float(est.rbc_diameter_px)
        off = own / median - 1
        if est.n_cells >= FOLDER_OWN_SCALE_CELLS and abs(off) > FOLDER_OWN_SCALE_DIFFERENCE:
            note = (
                f"estimated from {est.n_cells} red cells ({off:+.0%} from the folder's "
                "median: another magnification)"
            )
            out[key] = Scale(own, None, "measured", note)
        elif n == 1:
            out[key] = Scale(own, None, "measured", f"estimated from {est.n_cells} red cells")
        else:
            note = f"{common} (this image alone: {own:.0f} px from {est.n_cells} red cells)"
            out[key] = Scale(median, None, "measured", note)
    return out


def resolve_scale(pixel_size_um: float | None = None, image=None) -> float:
    """Red-cell diameter in pixels, from the pixel size when known, else measured.

    Shortcut for :func:`iter_resolve_scale` with a user pixel size.

    Raises
    ------
    ScaleError
        When the pixel size is not a positive number, or neither it nor an
        image is given, or the image cannot be measured.
    """
    return run(iter_resolve_scale(image, pixel_size_um=pixel_size_um)).rbc_diameter_px
