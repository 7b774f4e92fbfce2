"""Stain colour normalization that works tile by tile without seams.

Macenko (the paper's choice) and Reinhard normalization, fitted **once** and
then applied as a fixed per-pixel transform to every tile. Because the
transform depends only on the pixel (not on the tile around it), normalizing a
slide tile by tile gives the same result as normalizing it whole: no seams.

torchstain's ``normalize()`` re-estimates the source stains on every call; used
per tile it colours each tile differently, crashes on tiles without stain and
returns int32. Here torchstain's Macenko estimator is used for *fitting* (on a
reference, and once on the source image), and the application is ours.

Pixels with almost no stain (glass, background) are left as they are, blending
smoothly into the normalized colours as optical density rises, so blank tiles
pass through unchanged.
"""

from __future__ import annotations

import json
import logging
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import dask.array as da
import numpy as np

from .errors import StainError
from .progress import Progress, ProgressGen, run

log = logging.getLogger(__name__)

METHODS = ("macenko", "reinhard", "none")

#: Optical-density threshold for "stained" pixels (Macenko et al. 2009) and the
#: percentile of stain angles taken as the extreme stain directions.
BETA = 0.15
ALPHA = 1.0
#: Fewest stained pixels a fit accepts.
MIN_STAINED_PIXELS = 500


def _od_lut(background) -> np.ndarray:
    """256×3 table of optical densities −log((I + 1) / (I0 + 1)) per channel."""
    values = np.arange(256, dtype=np.float64)[:, None] + 1.0
    i0 = np.asarray(background, dtype=np.float64)[None, :] + 1.0
    return -np.log(values / i0).astype(np.float32)


def optical_density(pixels: np.ndarray, background) -> np.ndarray:
    """Optical densities (N×3 float32) of uint8 pixels (N×3) against a per-channel background."""
    return _od_lut(background)[pixels, np.arange(3)]


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


@dataclass(frozen=True)
class StainReference:
    """Stain statistics of an image, used as a target or as a source.

    Attributes
    ----------
    stain_matrix : tuple
        3×2 optical-density vectors of hematoxylin (column 0) and eosin
        (column 1), Macenko's estimate.
    max_concentrations : tuple
        99th percentile of each stain's concentration.
    lab_mean, lab_std : tuple
        CIE-Lab mean and standard deviation of the stained pixels (Reinhard).
    background : tuple
        Per-channel intensity of bare glass (I0 of the optical densities).
    description : str
        Where these numbers came from.
    """

    stain_matrix: tuple[tuple[float, float], ...]
    max_concentrations: tuple[float, float]
    lab_mean: tuple[float, float, float]
    lab_std: tuple[float, float, float]
    background: tuple[float, float, float] = (255.0, 255.0, 255.0)
    description: str = ""
    n_pixels: int = field(default=0, compare=False)

    def __post_init__(self):
        m = np.asarray(self.stain_matrix, dtype=float)
        if m.shape != (3, 2) or not np.all(np.isfinite(m)):
            raise StainError(f"stain_matrix must be 3×2 finite numbers, got shape {m.shape}")
        for name, n in (
            ("max_concentrations", 2),
            ("lab_mean", 3),
            ("lab_std", 3),
            ("background", 3),
        ):
            v = np.asarray(getattr(self, name), dtype=float)
            if v.shape != (n,) or not np.all(np.isfinite(v)):
                raise StainError(f"{name} must be {n} finite numbers")
        if np.any(np.asarray(self.max_concentrations) <= 0) or np.any(np.asarray(self.lab_std) <= 0):
            raise StainError("stain reference has non-positive concentrations or spreads")

    @property
    def matrix(self) -> np.ndarray:
        return np.asarray(self.stain_matrix, dtype=np.float64)

    def to_dict(self) -> dict:
        """JSON-able form (stored in model files and sidecars)."""
        return {
            "stain_matrix": [list(map(float, row)) for row in self.stain_matrix],
            "max_concentrations": list(map(float, self.max_concentrations)),
            "lab_mean": list(map(float, self.lab_mean)),
            "lab_std": list(map(float, self.lab_std)),
            "background": list(map(float, self.background)),
            "description": self.description,
            "n_pixels": int(self.n_pixels),
        }

    @classmethod
    def from_dict(cls, d: dict) -> StainReference:
        """Inverse of :meth:`to_dict`, validating the numbers."""
        try:
            return cls(
                stain_matrix=tuple(tuple(float(v) for v in row) for row in d["stain_matrix"]),
                max_concentrations=tuple(float(v) for v in d["max_concentrations"]),
                lab_mean=tuple(float(v) for v in d["lab_mean"]),
                lab_std=tuple(float(v) for v in d["lab_std"]),
                background=tuple(float(v) for v in d.get("background", (255.0,) * 3)),
                description=str(d.get("description", "")),
                n_pixels=int(d.get("n_pixels", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StainError(f"invalid stain reference: {exc!r}") from exc


@lru_cache(maxsize=1)
def default_reference() -> StainReference:
    """The built-in reference, measured on the PBC data set (see scripts/fit_default_reference.py)."""
    text = resources.files("napari_wbc").joinpath("resources/pbc_stain_reference.json").read_text()
    return StainReference.from_dict(json.loads(text))


# ------------------------------------------------------------------- fitting


def stained_mask(pixels: np.ndarray, background=None, beta: float = BETA) -> np.ndarray:
    """Pixels (N×3 uint8) whose optical density is at least ``beta`` in every channel.

    ``background`` defaults to the one estimated from ``pixels`` themselves.
    """
    pixels = np.asarray(pixels).reshape(-1, 3)
    if background is None:
        background = estimate_background(pixels)
    return np.all(optical_density(pixels, background) >= beta, axis=-1)


def fit_stain_reference(
    image: np.ndarray, description: str = "", background=None, beta: float = BETA
) -> StainReference:
    """Fit Macenko and Reinhard statistics on an RGB image or a pixel list.

    Parameters
    ----------
    image : ndarray
        ``(Y, X, 3)`` image or ``(N, 3)`` pixels, uint8.
    description : str
        Stored with the reference.
    background : sequence of 3 floats, optional
        Intensity of bare glass per channel; estimated from the pixels when
        omitted (they should then include some glass).
    beta : float
        Optical density above which a pixel counts as stained.

    Raises
    ------
    StainError
        When the image holds too few stained pixels (blank glass, an all-white
        image, a region without cells).
    """
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.shape[-1] != 3:
        raise StainError(
            f"stain fitting needs 8-bit RGB pixels, got {pixels.dtype} with shape {pixels.shape}"
        )
    pixels = pixels.reshape(-1, 3)
    if len(pixels) == 0:
        raise StainError("cannot fit stain statistics on an empty image")
    background = estimate_background(pixels) if background is None else np.asarray(background)
    if np.any(background < 64):
        raise StainError(
            f"the brightest part of this image is dark ({background.round().tolist()}); "
            "a smear needs some bare glass to measure stain against"
        )
    mask = stained_mask(pixels, background, beta)
    n_stained = int(mask.sum())
    if n_stained < MIN_STAINED_PIXELS:
        raise StainError(
            f"only {n_stained} stained pixels found (need {MIN_STAINED_PIXELS}); the image or "
            "region looks blank. Choose a reference region that contains cells."
        )
    import torchstain

    macenko = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    try:
        with np.errstate(all="ignore"):
            # torchstain takes one scalar light intensity: rescale each channel so
            # that its glass sits at 240 and the per-channel background applies.
            scaled = pixels[mask].astype(np.float64) * (240.0 / (background + 1.0))
            macenko.fit(scaled[:, None, :], Io=240.0, alpha=ALPHA, beta=beta)
    except (np.linalg.LinAlgError, ValueError, IndexError) as exc:
        raise StainError(f"Macenko stain estimation failed on this image: {exc}") from exc
    he = np.asarray(macenko.HERef, dtype=np.float64)
    max_c = np.asarray(macenko.maxCRef, dtype=np.float64)
    if not np.all(np.isfinite(he)) or not np.all(max_c > 0):
        raise StainError(
            "Macenko stain estimation gave no usable stain vectors; the image may hold a "
            "single stain only. Try Reinhard normalization or another reference."
        )
    # Hematoxylin (nuclei) absorbs red light relatively more than eosin does;
    # torchstain's ordering looks at the red component alone.
    if he[0, 0] / he[1, 0] < he[0, 1] / he[1, 1]:
        he, max_c = he[:, ::-1], max_c[::-1]
    from skimage.color import rgb2lab

    lab = rgb2lab(pixels[mask][None].astype(np.float32) / 255.0)[0]
    return StainReference(
        stain_matrix=tuple(tuple(row) for row in he.tolist()),
        max_concentrations=tuple(max_c.tolist()),
        lab_mean=tuple(lab.mean(axis=0).tolist()),
        lab_std=tuple(np.maximum(lab.std(axis=0), 1e-3).tolist()),
        background=tuple(float(v) for v in background),
        description=description,
        n_pixels=n_stained,
    )


def iter_sample_pixels(
    image: np.ndarray | da.Array,
    max_pixels: int = 1_000_000,
    max_windows: int = 64,
    window: int = 1024,
    seed: int = 0,
) -> ProgressGen[np.ndarray]:
    """Sample pixels from random windows of a (lazy) image.

    Windows lie on a fixed grid of the image (not on its dask chunks), so the
    sample, and the fit made from it, does not depend on how the image is
    chunked. Reads at most ``max_windows`` windows, taking an equal share of
    random pixels from each: fitting a whole slide reads a small part of it.
    Yields one :class:`Progress` per window and returns an N×3 uint8 array.
    """
    arr = image if isinstance(image, da.Array) else da.from_array(image, chunks=(window, window, -1))
    rng = np.random.default_rng(seed)
    height, width = arr.shape[:2]
    corners = [(y, x) for y in range(0, height, window) for x in range(0, width, window)]
    order = rng.permutation(len(corners))[:max_windows]
    quota = max(max_pixels // max(len(order), 1), 1)
    samples: list[np.ndarray] = []
    for i, k in enumerate(order):
        y, x = corners[k]
        block = np.asarray(arr[y : y + window, x : x + window].compute()).reshape(-1, 3)
        if len(block) > quota:
            block = block[rng.choice(len(block), quota, replace=False)]
        samples.append(block)
        yield Progress("sample", i + 1, len(order), "reading pixels to fit stain statistics")
    if not samples:
        return np.zeros((0, 3), np.uint8)
    return np.concatenate(samples)


def iter_fit_stain_reference(
    image: np.ndarray | da.Array,
    description: str = "",
    max_pixels: int = 1_000_000,
    seed: int = 0,
) -> ProgressGen[StainReference]:
    """Fit a :class:`StainReference` on a (possibly huge, lazy) image, with progress."""
    pixels = yield from iter_sample_pixels(image, max_pixels=max_pixels, seed=seed)
    yield Progress("fit", 0, 1, "estimating stain vectors")
    ref = fit_stain_reference(pixels, description=description)
    yield Progress("fit", 1, 1, "stain vectors estimated")
    return ref


# ---------------------------------------------------------------- applying


class StainNormalizer:
    """A fixed per-pixel transform from a source's stains to a target's.

    Call it on any ``(..., 3)`` uint8 tile; it returns a uint8 tile of the same
    shape. The transform does not look at neighbouring pixels, so tiling never
    changes the result.

    Parameters
    ----------
    method : {"macenko", "reinhard", "none"}
    source : StainReference
        Statistics of the image being normalized (fit once on the whole image).
    target : StainReference
        The reference to map onto.
    """

    def __init__(self, method: str, source: StainReference | None, target: StainReference | None):
        method = method.lower()
        if method not in METHODS:
            raise StainError(f"unknown stain method {method!r}; choose one of {', '.join(METHODS)}")
        if method != "none" and (source is None or target is None):
            raise StainError(f"{method} normalization needs a source and a target reference")
        self.method = method
        self.source = source
        self.target = target
        if method == "macenko":
            # Concentrations by least squares (pseudo-inverse), rescaled so the
            # source's 99th percentile lands on the target's, then re-mixed with
            # the target's stain vectors: one 3×3 map in optical-density space.
            pinv = np.linalg.pinv(source.matrix)  # 2×3
            scale = np.asarray(target.max_concentrations) / np.asarray(source.max_concentrations)
            self._od_map = (target.matrix @ (scale[:, None] * pinv)).T.astype(np.float32)
        elif method == "reinhard":
            self._lab_scale = (np.asarray(target.lab_std) / np.asarray(source.lab_std)).astype(
                np.float32
            )
            self._lab_shift = (
                np.asarray(target.lab_mean) - np.asarray(source.lab_mean) * self._lab_scale
            ).astype(np.float32)
        self._lock = threading.Lock()
        self._table = None
        self._seen = 0
        if method != "none":
            self._lut = _od_lut(source.background)
            self._i0 = np.asarray(source.background, dtype=np.float32) + 1.0

    #: Tiles at least this large (pixels) switch to the colour table.
    TABLE_AFTER_PIXELS = 8_000_000

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        tile = np.asarray(tile)
        if tile.dtype != np.uint8 or tile.shape[-1] != 3:
            raise StainError(
                f"stain normalization needs 8-bit RGB tiles, got {tile.dtype} {tile.shape}"
            )
        if self.method == "none" or tile.size == 0:
            return tile.copy()
        pixels = tile.reshape(-1, 3)
        with self._lock:
            self._seen += len(pixels)
            use_table = self._table is not None or self._seen >= self.TABLE_AFTER_PIXELS
        if use_table:
            table = self._colour_table()
            index = (pixels[:, 0].astype(np.uint32) << 16) | (pixels[:, 1].astype(np.uint32) << 8)
            index |= pixels[:, 2]
            return table[index].reshape(tile.shape)
        return self._transform(pixels).reshape(tile.shape)

    def _colour_table(self) -> np.ndarray:
        """The transform of every 8-bit colour (2^24 × 3 bytes), built once.

        The transform is a function of the colour alone, so after a few
        megapixels a lookup is far cheaper than the arithmetic, and it gives
        exactly the same values.
        """
        with self._lock:
            if self._table is None:
                table = np.empty((1 << 24, 3), np.uint8)
                step = 1 << 20
                for start in range(0, 1 << 24, step):
                    codes = np.arange(start, start + step, dtype=np.uint32)
                    colours = np.stack(
                        [(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], axis=1
                    ).astype(np.uint8)
                    table[start : start + step] = self._transform(colours)
                self._table = table
            return self._table

    def __getstate__(self):
        # Ship the small matrices to dask workers, not the 48 MB table.
        state = self.__dict__.copy()
        state["_table"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _transform(self, pixels: np.ndarray) -> np.ndarray:
        """Normalize N×3 uint8 pixels with the arithmetic."""
        od = self._lut[pixels, np.arange(3)]  # N×3 float32
        weight = np.clip((od.max(axis=1) - BETA / 2) / (BETA / 2), 0.0, 1.0)
        active = weight > 0
        out = pixels.copy()
        if not active.any():
            return out
        if self.method == "macenko":
            # Rendered under the source's own illumination: stain changes, glass does not.
            normed = self._i0 * np.exp(-(od[active] @ self._od_map)) - 1.0
        else:
            normed = self._reinhard(pixels[active])
        w = weight[active, None]
        blended = w * normed + (1.0 - w) * pixels[active]
        out[active] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        return out

    def _reinhard(self, pixels: np.ndarray) -> np.ndarray:
        from skimage.color import lab2rgb, rgb2lab

        lab = rgb2lab(pixels[None].astype(np.float32) / 255.0)[0]
        lab = lab * self._lab_scale + self._lab_shift
        with warnings.catch_warnings():
            # Out-of-gamut colours are clipped, which is what we want.
            warnings.simplefilter("ignore", UserWarning)
            return lab2rgb(lab[None])[0] * 255.0


def normalize_array(image, normalizer: StainNormalizer):
    """Apply a normalizer to a numpy array (eagerly) or a dask array (lazily, per block)."""
    if isinstance(image, da.Array):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise StainError(f"expected a (Y, X, 3) RGB image, got shape {image.shape}")
        image = image.rechunk({2: -1})
        return image.map_blocks(normalizer, dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8))
    return normalizer(np.asarray(image))


def iter_prepare_normalizer(
    levels: Sequence[np.ndarray | da.Array],
    method: str = "macenko",
    reference: StainReference | None = None,
    source: StainReference | None = None,
    max_pixels: int = 1_000_000,
    seed: int = 0,
) -> ProgressGen[StainNormalizer]:
    """Fit the source statistics once (on a coarse level) and build the normalizer."""
    method = method.lower()
    if method not in METHODS:
        raise StainError(f"unknown stain method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "none":
        return StainNormalizer("none", None, None)
    target = reference or default_reference()
    if source is None:
        fit_level = _fit_level(levels, max_pixels)
        try:
            source = yield from iter_fit_stain_reference(
                fit_level, description="source image", max_pixels=max_pixels, seed=seed
            )
        except StainError as exc:
            raise StainError(f"cannot normalize this image: {exc}") from exc
    return StainNormalizer(method, source, target)


def iter_normalize(
    levels: Sequence[np.ndarray | da.Array] | np.ndarray | da.Array,
    method: str = "macenko",
    reference: StainReference | None = None,
    source: StainReference | None = None,
    max_pixels: int = 1_000_000,
    seed: int = 0,
) -> ProgressGen[list]:
    """Normalize an image (one array or a list of pyramid levels), lazily.

    Fits the source's stain statistics once, then returns the levels wrapped
    in the fixed transform: dask arrays stay lazy (nothing is computed beyond the
    fit), numpy arrays are computed.

    Returns
    -------
    list
        Normalized levels, in the same order and of the same kinds as the input.
    """
    if isinstance(levels, np.ndarray | da.Array):
        levels = [levels]
    normalizer = yield from iter_prepare_normalizer(
        levels, method, reference, source, max_pixels=max_pixels, seed=seed
    )
    return [normalize_array(level, normalizer) for level in levels]


def normalize(image, method: str = "macenko", reference: StainReference | None = None):
    """Normalize one image (numpy → numpy, dask → lazy dask) to ``reference`` (default PBC)."""
    (out,) = run(iter_normalize([image], method, reference))
    return out


def _fit_level(levels: Sequence, max_pixels: int):
    """Coarsest level that still holds enough pixels to fit on."""
    for level in reversed(list(levels)):
        if level.shape[0] * level.shape[1] >= 4 * max_pixels:
            return level
    return levels[0]
