"""The scale of a set of single-cell crops, and bringing crops to a model's field of view.

Crops arrive at any magnification and any field of view: 360 px around a
cell with a ring of red cells (PBC), 224 px (LISC), or a tight box around the
cell alone. A model was trained at one field of view (``fov_px /
rbc_diameter_px`` red-cell diameters), so every crop must first be brought to
it: resized so that a red cell has the model's size in pixels, then cut or
padded (with the crop's glass colour) to the model's field of view.

:func:`measure_crop_scale` finds the red-cell diameter of a crop set:

1. **Whole red cells** (preferred): the red cells of each of up to
   ``max_crops`` crops are segmented as by
   :func:`napari_wbc.scale.estimate_rbc_diameter`, but only whole, single
   ones are kept (:func:`_whole_red_cells`: not touching a nucleus, i.e. the
   crop's white cell, nor the crop's edge or padding, nor another region, and
   convex); pooled over the crops, the median of those within 0.6-1.5× their
   area-weighted median is the scale, if there are at least
   :data:`MIN_WHOLE_CELLS`. A crop holds a handful of red cells and a white
   cell about twice their size, so an area-weighted median per crop is pulled
   up by the white cell's cytoplasm and by clumps (+10 to +25 % on Raabin,
   BCCD and TXL crops; benchmarks/bench_crop_scale.py).
2. **Red cells per crop**: where too few whole cells are found, the median of
   each crop's :func:`napari_wbc.scale.estimate_rbc_diameter`, as before,
   marked unsure.
   Either red-cell figure is used only if it agrees within :data:`AGREEMENT`
   with the white-cell ruler below, when that ruler is reliable (in a tight
   crop the "red cells" found are fragments cut by the border).
3. **White cells** (fallback, for tight crops with few whole red cells): the
   equivalent diameter of the dark, blue nuclear region around each crop's
   centre, median over the set, divided by :data:`NUCLEUS_PER_RBC`, the same
   median measured on PBC crops of the five common classes (known scale). The
   ratio depends on the class mix (a set of lymphocytes has small nuclei; a
   set of basophils measured +150 %), so the result is always marked
   ``unsure``.

White padding (crops cut past a field's border) is painted with the crop's
glass colour first: against it, real glass looked stained.

Within ±8 % of a hand-checked red-cell size on PBC, LISC, Raabin, crops cut
around BCCD and TXL boxes, and PBC resized ×0.5 and ×2
(benchmarks/bench_crop_scale.py, docs/results.md "Crop scale across labs").

A single crop set is assumed to come from one microscope and magnification.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from napari_wbc.errors import WBCError
from napari_wbc.scale import weighted_median
from napari_wbc.threads import thread_map

log = logging.getLogger(__name__)

__all__ = [
    "AGREEMENT",
    "MIN_RBC_CROPS",
    "NUCLEUS_PER_RBC",
    "CropScale",
    "CropScaleError",
    "measure_crop_scale",
    "measure_nucleus_diameter",
    "to_field_of_view",
]

#: Fewest crops with a red-cell estimate for the red-cell method to be used.
MIN_RBC_CROPS = 5
#: Median diameter of the central nuclear region (with the bluish cytoplasm
#: around it) over the red-cell diameter, measured by
#: ``scripts/calibrate_crop_scale.py`` on 200 PBC crops (40 per class of
#: basophil, eosinophil, lymphocyte, monocyte, neutrophil; red cell 75 px).
NUCLEUS_PER_RBC = 1.365
#: The red-cell estimate is used only when the white-cell one is within this
#: factor of it (the white-cell ratio varies with the class mix by about 1.4x).
AGREEMENT = 1.6
#: Red cells measured smaller than this (px) are measured again on crops
#: enlarged to about this size: the red-cell filters work in whole pixels,
#: which makes small cells measure large (PBC crops at twice their field of
#: view, red cells 37 px: +5 to +9 % before, within 2 % after).
SMALL_RBC_PX = 64.0
#: Regions less convex than this are overlapping cells, not one red cell.
RBC_SOLIDITY = 0.9
#: Fewest whole red cells (pooled over the crops) for them to give the scale,
#: and fewer than this many makes the figure unsure.
MIN_WHOLE_CELLS = 8
SURE_WHOLE_CELLS = 12
#: Whole red cells are measured on crops downsampled while they stay at least
#: this size (px; from the white cells' rough size): PBC crops at half size,
#: red cells 37 px, measure within 2 % of the full-size ones.
WHOLE_MIN_PX = 32.0
#: Interquartile range over median of the whole red cells above which the
#: figure is unsure.
RBC_MAX_SPREAD = 0.35
#: Nuclei more spread than this (IQR over median) are not reliably white
#: cells (magenta nuclei that the blue-minus-red signal misses: Raabin).
NUCLEUS_MAX_SPREAD = 0.8
#: Red cells and reliable nuclei further apart than this make the figure unsure.
SURE_AGREEMENT = 1.3


class CropScaleError(WBCError, ValueError):
    """The scale of a crop set cannot be measured."""


@dataclass(frozen=True)
class CropScale:
    """Red-cell diameter of a crop set.

    Attributes
    ----------
    rbc_diameter_px : float
        Median red-cell diameter in the crops' pixels.
    method : str
        "red-cells", "white-cells" or "pixel-size".
    n_crops : int
        Crops that contributed.
    n_cells : int
        Whole red cells measured (0 when the red cells were not used).
    spread : float or None
        Interquartile range over median of the measurements used (red cells,
        or nuclei for "white-cells"); None when unknown.
    unsure : bool
        The figure may be off by more than about 15 %: few whole red cells,
        widely spread sizes, red cells and nuclei that disagree, or the
        white-cell ruler (its ratio depends on the class mix). Classify at
        several scales, or give the scale, rather than trust it.
    note : str
        Why it is unsure, for people ("" when sure).
    """

    rbc_diameter_px: float
    method: str
    n_crops: int
    n_cells: int = 0
    spread: float | None = None
    unsure: bool = False
    note: str = ""


def _glass(rgb: np.ndarray) -> np.ndarray:
    """Glass colour: per-channel median of the brightest 10 % of pixels (at least 1)."""
    pixels = np.asarray(rgb).reshape(-1, 3)
    brightness = pixels.astype(np.int32).sum(1)
    bright = pixels[brightness >= np.percentile(brightness, 90)]
    return np.maximum(np.median(bright, axis=0).astype(np.float32), 1.0)


def measure_nucleus_diameter(crop: np.ndarray) -> float | None:
    """Equivalent diameter (px) of the nuclear region nearest the crop's centre, or None."""
    from skimage.filters import threshold_otsu

    rgb = np.asarray(crop)
    bg = _glass(rgb)
    # Nuclei absorb red light far more than blue; red cells and glass do not.
    rgb = rgb.astype(np.float32)
    signal = ndi.gaussian_filter(rgb[..., 2] / bg[2] - rgb[..., 0] / bg[0], 1.0)
    if not np.isfinite(signal).all() or signal.max() - signal.min() < 0.05:
        return None
    mask = signal > max(threshold_otsu(signal), 0.1)
    mask = ndi.binary_opening(mask, iterations=1)
    # Lobes of a segmented nucleus are separate blobs: join them by closing,
    # then keep the component nearest the centre.
    joined = ndi.binary_closing(mask, iterations=max(2, rgb.shape[0] // 40))
    labels, n = ndi.label(joined)
    if n == 0:
        return None
    h, w = mask.shape
    centres = ndi.center_of_mass(joined, labels, range(1, n + 1))
    dist = [np.hypot(cy - h / 2, cx - w / 2) for cy, cx in centres]
    best = int(np.argmin(dist)) + 1
    if dist[best - 1] > 0.35 * min(h, w):
        return None
    area = float(np.count_nonzero(mask & (labels == best)))
    return 2.0 * np.sqrt(area / np.pi) if area > 0 else None


def _padding(crop: np.ndarray) -> np.ndarray:
    """Mask of the rows and columns at a crop's edges that are all white or all black."""
    grey = np.asarray(crop).astype(np.int16).sum(-1)
    mask = np.zeros(grey.shape, bool)
    for axis in (0, 1):
        lines = grey if axis == 0 else grey.T
        out = mask if axis == 0 else mask.T
        padded = (lines.min(1) >= 3 * 252) | (lines.max(1) <= 3 * 3)
        for order in (range(len(lines)), range(len(lines) - 1, -1, -1)):
            for i in order:
                if not padded[i]:
                    break
                out[i] = True
    return mask


def _glass_filled(crop: np.ndarray) -> np.ndarray:
    """The crop with its padding (:func:`_padding`) painted with the glass colour of the rest.

    White padding would otherwise be the brightest "glass", and the real glass
    would look stained against it.
    """
    crop = np.asarray(crop)
    pad = _padding(crop)
    if not pad.any() or pad.all():
        return crop
    out = crop.copy()
    out[pad] = np.round(_glass(crop[~pad][:, None, :])).astype(np.uint8)
    return out


def _whole_red_cells(crop: np.ndarray, factor: int = 1) -> np.ndarray:
    """Bounding-box sides (px) of the whole, single red cells of one crop, measured at 1/``factor``.

    The regions are those of :func:`napari_wbc.scale.estimate_rbc_diameter`
    (stained, holes filled, nuclei cut out, split by a watershed of the
    distance transform), but in a crop they are few, so the crop's white cell
    and the clumps weigh on an area-weighted median: left out here are the
    regions that cover the crop's centre or touch a nucleus (the white cell), the crop's edge
    or its padding (cells cut short), and those that are not convex (solidity
    below :data:`RBC_SOLIDITY`: overlapping cells the watershed did not split).
    """
    from skimage.filters import threshold_otsu
    from skimage.measure import regionprops
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    from napari_wbc.pixels import (
        STAINED_DENSITY,
        background_of,
        downsample,
        nuclear_density,
        nuclear_threshold,
        optical_density,
    )

    crop = np.asarray(crop)
    # Padding (cut_square's white past a field's border, black bars of crops
    # cut at a border) is whole flat rows or columns at the crop's edge: a
    # cell touching it was cut short.
    flat = _padding(crop)
    crop = _glass_filled(crop)
    rgb = downsample(crop, factor) if factor > 1 else crop.astype(np.float32)
    if factor > 1:
        flat = downsample(flat[..., None].astype(np.uint8) * 255, factor)[..., 0] > 0
    if min(rgb.shape[:2]) < 16:
        return np.zeros(0)
    bg = background_of(rgb)
    density = optical_density(rgb, bg)
    red = ndi.gaussian_filter(density[..., 1], 1.0)
    sample = red[::2, ::2].ravel()
    lo, hi = np.percentile(sample, [10, 90])
    if hi - lo < 0.03:
        return np.zeros(0)
    mask = ndi.binary_fill_holes(red > threshold_otsu(np.clip(sample, None, hi)))
    nuclei = ndi.gaussian_filter(nuclear_density(rgb, bg), 1.0)
    nuclear = nuclei > nuclear_threshold(nuclei, density.sum(axis=-1) > STAINED_DENSITY)
    mask = ndi.binary_opening(mask & ~nuclear & ~flat, iterations=2)
    dist = ndi.distance_transform_edt(mask)
    peaks, n_peaks = ndi.label(h_maxima(dist, 2.0))
    if n_peaks == 0:
        return np.zeros(0)
    regions = watershed(-dist, peaks, mask=mask)
    # Nuclear specks of a few pixels (platelets, noise) do not make a white cell.
    nuclear = ndi.binary_opening(nuclear, iterations=2)
    touch = ndi.binary_dilation(nuclear | flat, iterations=3)
    touch[[0, -1], :] = touch[:, [0, -1]] = True
    bad = set(np.unique(regions[touch]).tolist())
    # The crop is centred on its white cell: what covers the centre is that cell, even
    # where no nucleus was found in it (a pale or unusual stain), never a red cell.
    h, w = regions.shape
    bad.update(np.unique(regions[h // 2 - 1 : h // 2 + 2, w // 2 - 1 : w // 2 + 2]).tolist())
    # A region that meets another was split from it by the watershed: two
    # overlapping cells cut along a line give two convex halves, too small.
    for a, b in ((regions[:, :-1], regions[:, 1:]), (regions[:-1, :], regions[1:, :])):
        meet = (a != b) & (a > 0) & (b > 0)
        bad.update(np.unique(a[meet]).tolist())
        bad.update(np.unique(b[meet]).tolist())
    sides = []
    for r in regionprops(regions):
        if r.label in bad or r.solidity < RBC_SOLIDITY:
            continue
        y0, x0, y1, x1 = r.bbox
        side = (y1 - y0 + x1 - x0) / 2
        # Specks: a crop spans a few red cells, never more than about 15.
        if side * factor >= max(6.0, min(crop.shape[:2]) / 15):
            sides.append(side * factor)
    return np.asarray(sides, dtype=float)


def _pooled_red_cells(sample, rough: float) -> list[np.ndarray]:
    """:func:`_whole_red_cells` of every crop, downsampled while red cells stay :data:`WHOLE_MIN_PX` or more."""
    factor = max(1, int(rough // WHOLE_MIN_PX)) if rough and np.isfinite(rough) else 1
    return thread_map(lambda c: _whole_red_cells(c, factor), sample)


def _red_cell_diameters(crops, enlarge: int = 1) -> list[float]:
    """Red-cell diameter (px) of each crop where one can be measured, on crops enlarged ``enlarge``×."""
    from PIL import Image

    from napari_wbc.scale import ScaleError, estimate_rbc_diameter

    def measure(crop) -> float | None:
        if enlarge > 1:
            h, w = crop.shape[:2]
            crop = np.asarray(
                Image.fromarray(np.ascontiguousarray(crop)).resize(
                    (w * enlarge, h * enlarge), Image.Resampling.BILINEAR
                )
            )
        try:
            est = estimate_rbc_diameter(crop, window=max(64, max(crop.shape[:2])), min_cells=2)
        except ScaleError:
            return None
        return est.rbc_diameter_px / enlarge

    return [d for d in thread_map(measure, crops) if d is not None]


def _iqr_ratio(values) -> float:
    """Interquartile range over median (0 for fewer than 2 values)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return 0.0
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return float((q3 - q1) / med) if med > 0 else float("inf")


def measure_crop_scale(
    crops: Sequence[np.ndarray], max_crops: int = 24, seed: int = 0
) -> CropScale:
    """Median red-cell diameter (px) of a set of crops from one source.

    Parameters
    ----------
    crops : sequence of (Y, X, 3) uint8 arrays
        Crops centred on white cells, all at the same magnification.
    max_crops : int
        Most crops measured (a seeded sample).
    seed : int
        Seed of the sample.

    Returns
    -------
    CropScale
        With ``unsure`` set (and ``note`` saying why) when the figure should
        not be trusted alone.

    Raises
    ------
    CropScaleError
        When neither red cells nor white-cell nuclei can be measured; give the
        pixel size instead.
    """
    found = _measure_crop_scale(crops, max_crops, seed)
    if found.unsure:
        log.warning(
            "the crops' scale (red cell %.0f px, %s) is unsure: %s",
            found.rbc_diameter_px,
            found.method,
            found.note,
        )
    return found


def _measure_crop_scale(crops: Sequence[np.ndarray], max_crops: int, seed: int) -> CropScale:
    """:func:`measure_crop_scale` without the warning."""
    if len(crops) == 0:
        raise CropScaleError("no crops to measure the scale of")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(crops), size=min(max_crops, len(crops)), replace=False)
    raw = [np.asarray(crops[i]) for i in sorted(pick)]
    sample = [_glass_filled(c) for c in raw]
    nuclei = [v for v in thread_map(measure_nucleus_diameter, sample) if v]
    from_wbc = float(np.median(nuclei)) / NUCLEUS_PER_RBC if nuclei else None
    # Nuclei found in fewer than half the crops, or of widely spread sizes,
    # are not white cells reliably found (magenta nuclei, pale smears): they
    # neither veto the red cells nor stand alone without a warning.
    wbc_spread = _iqr_ratio(nuclei)
    wbc_reliable = (
        from_wbc is not None
        and len(nuclei) >= max(1, len(sample) // 2)
        and wbc_spread <= NUCLEUS_MAX_SPREAD
    )
    veto = from_wbc if wbc_reliable else None
    # Whole single red cells pooled over the crops (the white cell, clumps and
    # cells cut by the border left out): preferred where there are enough.
    # Large cells are measured downsampled; the white cells tell roughly how
    # large (the smallest size they allow, so as not to lose small cells).
    per_crop = _pooled_red_cells(raw, from_wbc / AGREEMENT if from_wbc else 0.0)
    cells = np.concatenate(per_crop) if per_crop else np.zeros(0)
    whole = np.zeros(0)
    if len(cells):
        weighted = weighted_median(cells, cells**2)
        whole = cells[(cells > 0.6 * weighted) & (cells < 1.5 * weighted)]
    whole_crops = (
        sum(int(np.any((c > 0.6 * weighted) & (c < 1.5 * weighted))) for c in per_crop if len(c))
        if len(cells)
        else 0
    )
    if len(whole) >= MIN_WHOLE_CELLS and whole_crops >= min(3, len(sample)):
        d = float(np.median(whole))
        if veto is None or 1 / AGREEMENT <= veto / d <= AGREEMENT:
            spread = _iqr_ratio(whole)
            notes = []
            if len(whole) < SURE_WHOLE_CELLS:
                notes.append(f"only {len(whole)} whole red cells")
            if spread > RBC_MAX_SPREAD:
                notes.append(f"red-cell sizes widely spread (IQR {spread:.0%} of the median)")
            if veto is not None and not 1 / SURE_AGREEMENT <= veto / d <= SURE_AGREEMENT:
                notes.append(f"white-cell nuclei suggest {veto:.0f} px")
            log.info("crop scale from %d whole red cells: %.1f px", len(whole), d)
            return CropScale(
                d,
                "red-cells",
                whole_crops,
                len(whole),
                round(spread, 3),
                bool(notes),
                "; ".join(notes),
            )
        log.info("whole red cells (%.1f px) disagree with white cells (%.1f px)", d, veto)
    rbc = _red_cell_diameters(sample)
    if rbc and np.median(rbc) < SMALL_RBC_PX:
        rough = float(np.median(rbc))
        # Small red cells, if they are red cells (the white cells agree):
        # measured again, enlarged, where whole-pixel filters matter less.
        if from_wbc is None or 1 / AGREEMENT <= from_wbc / rough <= AGREEMENT:
            rbc = _red_cell_diameters(sample, min(4, math.ceil(SMALL_RBC_PX / rough)))
    need = min(MIN_RBC_CROPS, len(sample))
    if len(rbc) >= need and len(rbc) >= max(2, len(sample) // 3):
        d = float(np.median(rbc))
        # In a tight crop the only "red cells" are fragments cut by the border
        # and noise; the white cell is always there. Trust the red cells only
        # when the two rulers agree (closely: with few whole cells these
        # estimates run low, on fragments; PBC crops at 0.7x their field of
        # view, red cell 106 px: 70 px, nuclei 98).
        if veto is None or 1 / SURE_AGREEMENT <= veto / d <= SURE_AGREEMENT:
            log.info("crop scale from red cells: %.1f px (%d crops)", d, len(rbc))
            return CropScale(
                d,
                "red-cells",
                len(rbc),
                0,
                round(_iqr_ratio(rbc), 3),
                True,
                f"few whole red cells ({len(whole)}); per-crop estimates",
            )
        log.info("red cells (%.1f px) disagree with white cells (%.1f px)", d, veto)
    if from_wbc is not None and len(nuclei) >= max(1, len(sample) // 2):
        log.info("crop scale from white-cell nuclei: %.1f px (%d crops)", from_wbc, len(nuclei))
        note = "from white-cell nuclei (their size depends on the class mix)"
        if not wbc_reliable:
            note += f"; nuclei widely spread (IQR {wbc_spread:.0%} of the median)"
        return CropScale(from_wbc, "white-cells", len(nuclei), 0, round(wbc_spread, 3), True, note)
    raise CropScaleError(
        f"could not measure red cells ({len(rbc)} of {len(sample)} crops) nor white-cell "
        "nuclei in these crops; give the pixel size (µm/px) instead"
    )


#: Pillow filter that brings crops to a model's field of view. Bicubic keeps
#: more of a cell's detail than bilinear where the resize factor is near 1
#: (crops from a lower magnification), and did better at every scale but
#: 0.5x on PBC crops that neither trained the specialist nor belong to the
#: split the results report (scripts/resample_study.py; macro-F1, no TTA,
#: 548 crops, bilinear -> bicubic: 0.946 -> 0.956 at 1x, 0.921 -> 0.946 at
#: 2x, 0.930 -> 0.924 at 0.5x).
FOV_RESAMPLE = "BICUBIC"


def to_field_of_view(
    crop: np.ndarray,
    rbc_diameter_px: float,
    fov_rbc: float,
    out_size: int,
    resample: str = FOV_RESAMPLE,
) -> np.ndarray:
    """Bring a crop to a model's field of view, as ``(out_size, out_size, 3)`` uint8.

    The crop is resized (Pillow's ``resample`` filter, antialiased when it
    shrinks) so that a red cell spans ``out_size / fov_rbc`` px, then its
    centre square of ``out_size`` px is kept; a crop showing less than the
    field of view is padded with its own glass colour.
    """
    from PIL import Image

    crop = np.asarray(crop)
    if rbc_diameter_px <= 0 or fov_rbc <= 0:
        raise CropScaleError(f"scale must be positive; got {rbc_diameter_px} px, {fov_rbc} RBC")
    factor = out_size / (fov_rbc * rbc_diameter_px)
    h, w = crop.shape[:2]
    nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
    resized = np.asarray(Image.fromarray(crop).resize((nw, nh), Image.Resampling[resample]))
    out = np.empty((out_size, out_size, 3), np.uint8)
    if nh < out_size or nw < out_size:  # the crop shows less than the field of view
        out[:] = np.round(_glass(crop)).astype(np.uint8)
    y0, x0 = (nh - out_size) // 2, (nw - out_size) // 2
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + out_size, nh), min(x0 + out_size, nw)
    out[ys - y0 : ye - y0, xs - x0 : xe - x0] = resized[ys:ye, xs:xe]
    return out
