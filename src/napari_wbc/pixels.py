"""Pixel helpers shared by scale estimation, detection and the smear pipeline.

Reading windows of an image of any size (numpy, dask or a Smear), the glass
colour, a nuclear-stain signal and block-mean downsampling. None of them knows
about red cells or models; :mod:`napari_wbc.scale` (the ruler) and
:mod:`napari_wbc.detection` build on them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .errors import ScaleError
from .lazy import is_dask

if TYPE_CHECKING:
    import dask.array as da


__all__ = [
    "as_dask_rgb",
    "as_rgb_image",
    "background_of",
    "downsample",
    "estimate_background",
    "grid_windows",
    "nuclear_density",
    "nuclear_signal",
    "nuclear_threshold",
    "optical_density",
    "read_window",
]


def as_rgb_image(image, name: str = "image"):
    """The (Y, X, 3) uint8 array behind ``image`` (numpy, dask or a Smear), not computed."""
    if hasattr(image, "levels"):  # a napari_wbc.images.Smear
        image = image.data
    if not (isinstance(image, np.ndarray) or is_dask(image)):
        image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8:
        if 0 in image.shape:
            raise ScaleError(f"{name} is empty (shape {image.shape})")
        return image
    from .images import as_rgb8

    out, _ = as_rgb8(image, name)
    return out


def as_dask_rgb(image, chunk: int = 2048) -> da.Array:
    """An 8-bit RGB (Y, X, 3) image as a dask array (numpy input is wrapped, not copied).

    Raises
    ------
    WBCError
        When the image is not 8-bit RGB.
    """
    from .errors import WBCError

    if hasattr(image, "levels"):  # a napari_wbc.images.Smear
        image = image.data
    if is_dask(image):
        return image
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise WBCError(f"expected an 8-bit RGB image (Y, X, 3), got {arr.dtype} {arr.shape}")
    import dask.array as da

    return da.from_array(arr, chunks=(chunk, chunk, 3))


def grid_windows(
    shape, window: int = 1024, max_windows: int = 16
) -> list[tuple[int, int, int, int]]:
    """Up to ``max_windows`` windows ``(y0, y1, x0, x1)`` spread evenly over a fixed grid.

    Windows are full-sized where the image allows (the last row and column are
    shifted inwards), and depend only on the image shape.
    """
    height, width = int(shape[0]), int(shape[1])

    def starts(n: int) -> list[int]:
        if n <= window:
            return [0]
        return sorted({min(s, n - window) for s in range(0, n, window)})

    corners = [(y, x) for y in starts(height) for x in starts(width)]
    if len(corners) > max_windows:
        picks = np.unique(np.linspace(0, len(corners) - 1, max_windows).round().astype(int))
        corners = [corners[i] for i in picks]
    return [(y, min(y + window, height), x, min(x + window, width)) for y, x in corners]


def read_window(image, box) -> np.ndarray:
    """Pixels of ``image`` inside ``box = (y0, y1, x0, x1)`` as a numpy array."""
    y0, y1, x0, x1 = box
    block = image[y0:y1, x0:x1]
    if is_dask(block):
        block = block.compute()
    return np.asarray(block)


def estimate_background(pixels: np.ndarray) -> np.ndarray:
    """Per-channel intensity of bare glass: the median of the brightest 10% of pixels.

    Microscopes and scanners light the glass differently (PBC's is cream,
    BCCD's grey), so Macenko's fixed 240 for every channel would count bare
    glass as stain on some of them.
    """
    pixels = np.asarray(pixels).reshape(-1, 3)
    brightness = pixels.astype(np.int32).sum(axis=1)
    bright = pixels[brightness >= np.percentile(brightness, 90)]
    return np.median(bright, axis=0).astype(np.float64)


def background_of(pixels: np.ndarray) -> np.ndarray:
    """Per-channel intensity of glass: median of the brightest 10% of (subsampled) pixels."""
    step = max(1, int(math.sqrt(pixels.shape[0] * pixels.shape[1] / 250_000)))
    bg = estimate_background(pixels[::step, ::step])
    # A window with no glass at all still needs a positive reference.
    return np.maximum(bg, 1.0)


def nuclear_signal(rgb: np.ndarray, background) -> np.ndarray:
    """Blue-violet nuclear stain: ``B / B0 - R / R0`` (float32, about 0.3-0.5 on nuclei).

    Nuclei absorb red light far more than blue, red cells absorb both about
    equally and glass neither, so the signal is near 0 on glass and red cells,
    whatever the stain's tint and the lamp's colour.
    """
    rgb = np.asarray(rgb, dtype=np.float32)
    bg = np.asarray(background, dtype=np.float32)
    return rgb[..., 2] / bg[2] - rgb[..., 0] / bg[0]


#: Total optical density (summed over R, G, B) above which a pixel is stained
#: (a cell), not glass.
STAINED_DENSITY = 0.25


def optical_density(rgb: np.ndarray, background) -> np.ndarray:
    """Optical density ``log(I0 / I)`` per channel against the glass (float32, 0 on glass)."""
    rgb = np.asarray(rgb, dtype=np.float32)
    bg = np.asarray(background, dtype=np.float32)
    return np.log((bg + 1.0) / (rgb + 1.0))


def nuclear_density(rgb: np.ndarray, background) -> np.ndarray:
    """Nuclear stain of any hue: optical density in green minus that in blue (float32).

    Nuclei, whether they stain blue-violet (May-Grünwald-Giemsa, Wright) or
    magenta, absorb green light far more than blue; red cells absorb them
    much more evenly, whether they look pink or bluish grey, and glass
    absorbs neither. Unlike :func:`nuclear_signal`, which needs nuclei bluer
    than red cells, this holds on smears whose red cells are the bluer of
    the two. Its level differs from lab to lab: threshold it with
    :func:`nuclear_threshold`, from the image's own statistics.
    """
    od = optical_density(rgb, background)
    return od[..., 1] - od[..., 2]


def nuclear_threshold(
    signal: np.ndarray, stained: np.ndarray | None = None, floor_spreads: float = 2.5
) -> float:
    """Threshold between nuclei and everything else, from one image's own statistics.

    Among the stained pixels (``stained``, a mask like ``signal``; all when
    None), red cells are the majority: their median ``m`` and its distance
    to their 10th percentile (the spread) describe them. Otsu's threshold
    among the pixels above ``m`` then falls between red cells' strongest
    pixels and nuclei. It is kept at least ``floor_spreads`` spreads above
    ``m``, so that an image without white cells does not get a threshold
    inside its red cells.
    """
    from skimage.filters import threshold_otsu

    values = np.asarray(signal, dtype=np.float32)
    if stained is not None and np.count_nonzero(stained) > 50:
        values = values[np.asarray(stained, bool)]
    values = values.ravel()
    middle = float(np.median(values))
    spread = max(middle - float(np.percentile(values, 10)), 0.02)
    floor = middle + floor_spreads * spread
    upper = values[values > middle]
    if upper.size < 50 or np.ptp(upper) <= 0:
        return floor
    return max(float(threshold_otsu(upper)), floor)


def downsample(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` × ``factor`` blocks (float32); a partial block repeats its edge."""
    arr = np.asarray(rgb)
    if arr.dtype == np.uint8 and 1 < factor <= 16:
        # 8-bit input: exact integer sums of strided slices (no reduction over
        # small axes, about 10x faster), then the same float32 division.
        h, w = arr.shape[:2]
        ph, pw = -h % factor, -w % factor
        if ph or pw:
            arr = np.pad(arr, ((0, ph), (0, pw), (0, 0)), mode="edge")
        rows = arr[0::factor].astype(np.uint16)
        for i in range(1, factor):
            rows += arr[i::factor]
        sums = rows[:, 0::factor].copy()
        for j in range(1, factor):
            sums += rows[:, j::factor]
        return sums.astype(np.float32) / np.float32(factor * factor)
    rgb = np.asarray(arr, dtype=np.float32)
    if factor == 1:
        return rgb
    h, w = rgb.shape[:2]
    ph, pw = -h % factor, -w % factor
    if ph or pw:
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="edge")
    hh, ww = rgb.shape[0] // factor, rgb.shape[1] // factor
    return rgb.reshape(hh, factor, ww, factor, 3).mean(axis=(1, 3), dtype=np.float32)
