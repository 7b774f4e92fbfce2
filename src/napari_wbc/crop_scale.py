"""The scale of a set of single-cell crops, and bringing crops to a model's field of view.

Crops arrive at any magnification and any field of view: 360 px around a
cell with a ring of red cells (PBC), 224 px (LISC), or a tight box around the
cell alone. A model was trained at one field of view (``fov_px /
rbc_diameter_px`` red-cell diameters), so every crop must first be brought to
it: resized so that a red cell has the model's size in pixels, then cut or
padded (with the crop's glass colour) to the model's field of view.

:func:`measure_crop_scale` finds the red-cell diameter of a crop set:

1. **Red cells** (preferred): the red-cell diameter of each of up to
   ``max_crops`` crops is measured by :func:`napari_wbc.scale.estimate_rbc_diameter`
   (a crop holds only a few red cells, so single estimates are noisy); the
   median over the crops that could be measured is the set's scale, if at least
   :data:`MIN_RBC_CROPS` crops gave one and it agrees within
   :data:`AGREEMENT` with the white-cell ruler below (in a tight crop the
   "red cells" found are fragments cut by the border).
2. **White cells** (fallback, for tight crops with few whole red cells): the
   equivalent diameter of the dark, blue nuclear region around each crop's
   centre, median over the set, divided by :data:`NUCLEUS_PER_RBC`, the same
   median measured on PBC crops of the five common classes (known scale). The
   ratio depends on the class mix (a set of lymphocytes has small nuclei), so
   this is coarser, and the estimate says so (``method``).

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
    """

    rbc_diameter_px: float
    method: str
    n_crops: int


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

    Raises
    ------
    CropScaleError
        When neither red cells nor white-cell nuclei can be measured; give the
        pixel size instead.
    """
    if len(crops) == 0:
        raise CropScaleError("no crops to measure the scale of")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(crops), size=min(max_crops, len(crops)), replace=False)
    sample = [np.asarray(crops[i]) for i in sorted(pick)]
    rbc = _red_cell_diameters(sample)
    nuclei = [v for v in thread_map(measure_nucleus_diameter, sample) if v]
    from_wbc = float(np.median(nuclei)) / NUCLEUS_PER_RBC if nuclei else None
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
        # when the two rulers roughly agree.
        if from_wbc is None or 1 / AGREEMENT <= from_wbc / d <= AGREEMENT:
            log.info("crop scale from red cells: %.1f px (%d crops)", d, len(rbc))
            return CropScale(d, "red-cells", len(rbc))
        log.info("red cells (%.1f px) disagree with white cells (%.1f px)", d, from_wbc)
    if from_wbc is not None and len(nuclei) >= max(1, len(sample) // 2):
        log.info("crop scale from white-cell nuclei: %.1f px (%d crops)", from_wbc, len(nuclei))
        return CropScale(from_wbc, "white-cells", len(nuclei))
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
