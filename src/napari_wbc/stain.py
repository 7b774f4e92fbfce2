"""Stain colour normalization that works tile by tile without seams.

A stain method is fitted **once** per image and then applied as a fixed
per-pixel transform to every tile. Because the transform depends only on the
pixel (not on the tile around it), normalizing a slide tile by tile gives the
same result as normalizing it whole: no seams.

Fitting looks at the right pixels. A smear field is mostly red cells and glass
with a few white-cell nuclei, so statistics of "all stained pixels" describe
red cells and miss the nuclear stain (Macenko then finds a red-cell plane and
turns nuclei green). :func:`segment_pixels` splits the pixels into glass, red
cells and white-cell nuclei by colour and darkness, and every method fits on a
sample that holds nuclei, red cells and other stained pixels in fixed
proportions, the same way for the reference and for the user's image.

Methods live in one registry (:func:`register_stain_method`); the CLI, the
widgets and training read their choices from :func:`stain_methods`:

- ``"regions"`` (the default): a region-matched transfer. The mean optical
  densities of the image's nuclei and red cells are mapped onto the
  reference's colours by one 3×3 matrix in optical-density space; glass
  stays as it is.
- ``"macenko"``: the paper's two-stain model (Macenko et al. 2009), stain
  vectors estimated by torchstain on the balanced sample.
- ``"reinhard"``: CIE-Lab mean and spread of the balanced stained sample.
- ``"none"``: no change.

A fit that is implausible for a Romanowsky stain (too few nuclei or red cells,
nuclei not darker and bluer than red cells, stain vectors nearly collinear, a
stain plane that does not explain the nuclei) is refused with a reason, and the
normalizer falls back along the method's documented ``fallback`` chain
(macenko → regions → none) with a warning, rather than produce false colours.

Pixels with almost no stain (glass, background) are left as they are, blending
smoothly into the normalized colours as optical density rises, so blank tiles
pass through unchanged.
"""

from __future__ import annotations

import json
import logging
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from .errors import StainError
from .lazy import is_dask as _is_dask
from .pixels import estimate_background
from .progress import Progress, ProgressGen, run

if TYPE_CHECKING:
    import dask.array as da


log = logging.getLogger(__name__)

#: Optical-density threshold for "stained" pixels (Macenko et al. 2009) and the
#: percentile of stain angles taken as the extreme stain directions.
BETA = 0.15
ALPHA = 1.0
#: Fewest stained pixels a fit accepts.
MIN_STAINED_PIXELS = 500
#: Fewest white-cell nucleus and red-cell pixels a region-based fit accepts.
MIN_NUCLEUS_PIXELS = 200
MIN_RBC_PIXELS = 500
#: Pixels per region (nuclei, red cells, other stained) in the balanced sample.
SAMPLE_PER_REGION = 30_000
#: Segmentation: a nucleus pixel's optical density leaves the red-cell
#: direction by at least this much (OD units) and is at least this many times
#: as dense as the median stained pixel; a red-cell pixel stays within
#: ``RBC_RESIDUAL`` of the red-cell direction.
NUCLEUS_RESIDUAL = 0.2
NUCLEUS_DENSITY = 1.2
RBC_RESIDUAL = 0.15
#: Pixels whose channels' optical densities differ by less than this fraction
#: of their sum are grey or black (padding bars, dust, clipped pixels): no stain.
NEUTRAL_SPREAD = 0.12
#: Fewest nucleus pixels Macenko's two-stain fit accepts (a small nucleus at
#: PBC's scale holds several hundred): without the nuclear stain its second
#: vector is noise.
MACENKO_MIN_NUCLEUS_PIXELS = 100
#: Smallest angle (degrees) between two stain vectors a fit accepts.
MIN_STAIN_ANGLE = 8.0
#: Version of :meth:`StainReference.to_dict`'s layout.
FORMAT_VERSION = 2
#: Descriptions of built-in references saved before format 2 (model files of
#: that time embed them); they are read as the current built-in reference.
LEGACY_BUILTIN_DESCRIPTIONS = ("PBC (Acevedo et al. 2020), 320 crops, 40 per class, seed 0",)


class BlankImageError(StainError):
    """Too few stained pixels to fit stains on: the image or region is (nearly) bare glass."""


class StainFitError(StainError):
    """A method's statistics could not be fitted, or are implausible for a blood smear."""


def _od_lut(background) -> np.ndarray:
    """256×3 table of optical densities −log((I + 1) / (I0 + 1)) per channel."""
    values = np.arange(256, dtype=np.float64)[:, None] + 1.0
    i0 = np.asarray(background, dtype=np.float64)[None, :] + 1.0
    return -np.log(values / i0).astype(np.float32)


def optical_density(pixels: np.ndarray, background) -> np.ndarray:
    """Optical densities (N×3 float32) of uint8 pixels (N×3) against a per-channel background."""
    return _od_lut(background)[pixels, np.arange(3)]


def _rgb_to_lab(pixels: np.ndarray) -> np.ndarray:
    """CIE-Lab (N×3 float) of uint8 or 0-255 float RGB pixels (N×3)."""
    from skimage.color import rgb2lab

    return rgb2lab(np.asarray(pixels, np.float32)[None] / 255.0)[0]


def _lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """0-255 float RGB of CIE-Lab pixels (N×3); out-of-gamut colours are clipped."""
    from skimage.color import lab2rgb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return lab2rgb(np.asarray(lab, np.float32)[None])[0] * 255.0


# ------------------------------------------------------------ segmentation


@dataclass(frozen=True)
class PixelRegions:
    """A pixel sample split into glass, red cells and white-cell nuclei.

    Attributes
    ----------
    pixels : ndarray
        N×3 uint8 pixels.
    background : ndarray
        Per-channel intensity of bare glass.
    od : ndarray
        N×3 optical densities against ``background``.
    glass, stained, rbc, nucleus : ndarray
        Boolean masks of length N; ``rbc`` and ``nucleus`` are disjoint parts
        of ``stained``.
    """

    pixels: np.ndarray
    background: np.ndarray
    od: np.ndarray
    glass: np.ndarray
    stained: np.ndarray
    rbc: np.ndarray
    nucleus: np.ndarray

    @property
    def other(self) -> np.ndarray:
        """Stained pixels that are neither red cell nor nucleus (cytoplasm, granules, edges)."""
        return self.stained & ~self.rbc & ~self.nucleus

    def balanced(self, per_region: int = SAMPLE_PER_REGION, seed: int = 0) -> np.ndarray:
        """Indices of nuclei, red cells and other stained pixels in equal numbers.

        Each region gives as many pixels as the scarcer of nuclei and red cells
        (at most ``per_region``), so a field that is mostly red cells weighs
        like a crop that is mostly nucleus.
        """
        rng = np.random.default_rng(seed)
        n = min(per_region, int(self.nucleus.sum()), int(self.rbc.sum()))
        if n == 0:
            n = per_region
        picks = []
        for mask in (self.nucleus, self.rbc, self.other):
            idx = np.flatnonzero(mask)
            if len(idx) > n:
                idx = np.sort(rng.choice(idx, n, replace=False))
            picks.append(idx)
        return np.concatenate(picks)


def segment_pixels(pixels: np.ndarray, background=None, beta: float = BETA) -> PixelRegions:
    """Split smear pixels into glass, red cells and white-cell nuclei by colour alone.

    Red cells are the bulk of the stained pixels, so the median direction of
    their optical-density vectors is the red-cell stain. Nuclei leave that
    direction (they absorb red light relatively more than red cells in every
    lab seen, or take a different hue) and are denser than a typical stained
    pixel; overlapping red cells are denser too but keep the red-cell
    direction. Grey and black pixels (padding bars, dust) are neither. Glass
    has almost no optical density.

    Parameters
    ----------
    pixels : ndarray
        N×3 (or ``(..., 3)``) uint8 pixels, including some glass when
        ``background`` is omitted.
    background : sequence of 3 floats, optional
        Intensity of bare glass per channel; estimated when omitted.
    beta : float
        Optical density above which a pixel counts as stained.
    """
    pixels = np.asarray(pixels).reshape(-1, 3)
    if background is None:
        background = estimate_background(pixels)
    background = np.asarray(background, dtype=np.float64)
    od = optical_density(pixels, background)
    peak = od.max(axis=1)
    stained = peak >= beta
    glass = peak < beta / 2
    nucleus = np.zeros(len(pixels), bool)
    rbc = np.zeros(len(pixels), bool)
    if stained.sum() >= MIN_STAINED_PIXELS:
        od_s = od[stained]
        norm = np.maximum(np.linalg.norm(od_s, axis=1, keepdims=True), 1e-6)
        direction = np.median(od_s / norm, axis=0)
        direction /= np.linalg.norm(direction)
        residual = np.linalg.norm(od_s - (od_s @ direction)[:, None] * direction, axis=1)
        density = od_s.sum(axis=1)
        coloured = od_s.max(axis=1) - od_s.min(axis=1) >= NEUTRAL_SPREAD * density
        is_nucleus = (
            (residual >= NUCLEUS_RESIDUAL)
            & (density >= NUCLEUS_DENSITY * np.median(density))
            & coloured
        )
        nucleus[stained] = is_nucleus
        rbc[stained] = (residual < RBC_RESIDUAL) & ~is_nucleus & coloured
    return PixelRegions(pixels, background, od, glass, stained, rbc, nucleus)


# ----------------------------------------------------------------- registry


class StainMethod:
    """One stain normalization method: fit statistics, check them, build a transform.

    Subclass, set ``name`` (and optionally ``label`` and ``fallback``), and
    decorate with :func:`register_stain_method`; the CLI, the Stain
    normalization widget and training then offer it.

    Attributes
    ----------
    name : str
        Registry key (used on the command line and stored in model configs).
    label : str
        One line for help texts.
    fallback : str or None
        Method used instead when this one's fit on an image is refused.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    fallback: ClassVar[str | None] = "none"
    #: Pixels whose peak optical density is below this stay (almost) as they
    #: are: the transform fades in between half of it and all of it.
    fade_od: ClassVar[float] = BETA

    def fit(self, regions: PixelRegions, balanced: np.ndarray) -> dict:
        """JSON-able statistics of an image; raise :class:`StainFitError` when implausible.

        ``balanced`` indexes the pixels of ``regions`` in fixed region proportions.
        """
        raise NotImplementedError

    def validate(self, stats: Mapping) -> dict:
        """Checked copy of statistics read from a file; raise :class:`StainError` if invalid."""
        return dict(stats)

    def transform(
        self, source: StainReference, target: StainReference
    ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """A function ``(pixels N×3 uint8, od N×3) -> RGB N×3 float`` from source to target."""
        raise NotImplementedError


_REGISTRY: dict[str, StainMethod] = {}


def register_stain_method(cls: type[StainMethod]) -> type[StainMethod]:
    """Class decorator: make a :class:`StainMethod` available everywhere by its ``name``."""
    name = getattr(cls, "name", "")
    if not name or not name.isidentifier() or name != name.lower():
        raise StainError(f"a stain method needs a lower-case identifier as name, got {name!r}")
    _REGISTRY[name] = cls()
    return cls


def unregister_stain_method(name: str) -> None:
    """Remove a method from the registry (for tests and plugins that unload)."""
    _REGISTRY.pop(name, None)


def stain_methods() -> tuple[str, ...]:
    """Names of the registered methods, the default first and ``"none"`` last."""
    names = [n for n in _REGISTRY if n != "none"]
    names.sort(key=lambda n: n != DEFAULT_METHOD)
    return (*names, "none") if "none" in _REGISTRY else tuple(names)


def get_stain_method(name: str) -> StainMethod:
    """The registered method called ``name`` (case-insensitive)."""
    method = _REGISTRY.get(str(name).lower())
    if method is None:
        raise StainError(
            f"unknown stain method {name!r}; choose one of {', '.join(stain_methods())}"
        )
    return method


def _finite(value, shape: tuple[int, ...], what: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != shape or not np.all(np.isfinite(arr)):
        raise StainError(
            f"{what} must be {'×'.join(map(str, shape))} finite numbers, got shape {arr.shape}"
        )
    return arr


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


@register_stain_method
class NoNormalization(StainMethod):
    """Leave the image as it is."""

    name = "none"
    label = "no normalization"
    fallback = None

    def fit(self, regions, balanced):
        return {}


@register_stain_method
class RegionTransfer(StainMethod):
    """Map the image's nucleus and red-cell colours onto the reference's.

    Fitted statistics are the mean optical densities of the segmented nuclei
    and red cells. The transform is one 3×3 matrix in optical-density space
    taking the source's nucleus and red-cell densities to the target's (and the
    unit normal of their plane to the target's), so every colour between and
    beyond them follows smoothly and glass (zero density) stays glass. The
    target's densities are taken against the source's glass colour, so the
    mean nucleus and red cell come out in the reference's colours (RGB), not
    merely its stain amounts.
    """

    name = "regions"
    label = "match nuclei and red cells to the reference (default)"
    fallback = "none"

    def fit(self, regions, balanced):
        n_nuc, n_rbc = int(regions.nucleus.sum()), int(regions.rbc.sum())
        if n_nuc < MIN_NUCLEUS_PIXELS:
            raise StainFitError(
                f"only {n_nuc} white-cell nucleus pixels found (need {MIN_NUCLEUS_PIXELS}); "
                "fit on an image or region that contains white cells"
            )
        if n_rbc < MIN_RBC_PIXELS:
            raise StainFitError(f"only {n_rbc} red-cell pixels found (need {MIN_RBC_PIXELS})")
        nucleus = regions.od[regions.nucleus].mean(axis=0).astype(np.float64)
        rbc = regions.od[regions.rbc].mean(axis=0).astype(np.float64)
        stats = {
            "nucleus_od": nucleus.tolist(),
            "rbc_od": rbc.tolist(),
            "n_nucleus": n_nuc,
            "n_rbc": n_rbc,
        }
        return self.validate(stats)

    def validate(self, stats):
        nucleus = _finite(stats.get("nucleus_od"), (3,), "nucleus_od")
        rbc = _finite(stats.get("rbc_od"), (3,), "rbc_od")
        _check_romanowsky(nucleus, rbc, "the mean nucleus and red-cell colours")
        return {
            "nucleus_od": nucleus.tolist(),
            "rbc_od": rbc.tolist(),
            "n_nucleus": int(stats.get("n_nucleus", 0)),
            "n_rbc": int(stats.get("n_rbc", 0)),
        }

    @staticmethod
    def _frame(stats: Mapping) -> np.ndarray:
        """3×3 columns: nucleus density, red-cell density, unit normal of their plane."""
        nucleus, rbc = np.asarray(stats["nucleus_od"]), np.asarray(stats["rbc_od"])
        normal = np.cross(nucleus, rbc)
        return np.stack([nucleus, rbc, normal / np.linalg.norm(normal)], axis=1)

    def transform(self, source, target):
        src, tgt = dict(source.stats[self.name]), dict(target.stats[self.name])
        # The target's colours seen under the source's glass light: the same
        # RGB, so glass (density 0) stays the source's glass and the mean
        # nucleus and red cell come out in the reference's colours exactly.
        shift = np.log(
            (np.asarray(source.background) + 1.0) / (np.asarray(target.background) + 1.0)
        )
        for key in ("nucleus_od", "rbc_od"):
            tgt[key] = (np.asarray(tgt[key]) + shift).tolist()
        od_map = (self._frame(tgt) @ np.linalg.inv(self._frame(src))).T.astype(np.float32)
        i0 = np.asarray(source.background, np.float32) + 1.0

        def apply(pixels: np.ndarray, od: np.ndarray) -> np.ndarray:
            return i0 * np.exp(-(od @ od_map)) - 1.0

        return apply


def _check_romanowsky(nucleus: np.ndarray, rbc: np.ndarray, what: str) -> None:
    """Refuse nucleus/red-cell densities that a Romanowsky stain cannot give."""
    angle = _angle_deg(nucleus, rbc)
    if angle < MIN_STAIN_ANGLE:
        raise StainFitError(
            f"{what} are nearly the same hue ({angle:.1f}° apart); the nuclear stain was not found"
        )
    if nucleus.sum() < NUCLEUS_DENSITY * rbc.sum():
        raise StainFitError(f"{what}: the 'nuclear' colour is not darker than the red cells")
    if nucleus.max() - nucleus.min() < NEUTRAL_SPREAD * nucleus.sum():
        raise StainFitError(f"{what}: the 'nuclear' colour is grey or black, not a stain")
    # Purple, violet, magenta and blue nuclei (the azure dye) absorb red or
    # green light most; a "nucleus" that absorbs blue most is yellow or brown,
    # one that absorbs green least is green.
    if nucleus[2] >= max(nucleus[0], nucleus[1]) or nucleus[1] <= min(nucleus[0], nucleus[2]):
        raise StainFitError(f"{what}: the 'nuclear' colour is not purple, violet or blue")


@register_stain_method
class Macenko(StainMethod):
    """Macenko et al. (2009): two stain vectors and their concentration maxima.

    Estimated by torchstain on the balanced sample (so the nuclear stain is
    there to be found); applied as one 3×3 map in optical-density space,
    rendered under the source's own glass colour.
    """

    name = "macenko"
    label = "Macenko two-stain model (the paper's method)"
    fallback = "regions"

    def fit(self, regions, balanced):
        import torchstain

        background = regions.background
        pixels = regions.pixels[balanced]
        pixels = pixels[regions.stained[balanced]]
        if len(pixels) < MIN_STAINED_PIXELS:
            raise StainFitError(f"only {len(pixels)} stained pixels to fit stain vectors on")
        n_nuc = int(regions.nucleus.sum())
        if n_nuc < MACENKO_MIN_NUCLEUS_PIXELS:
            # Two stain vectors need both stains: on red cells alone the second
            # vector is noise, and nuclei elsewhere would take a false colour.
            raise StainFitError(
                f"only {n_nuc} white-cell nucleus pixels found (need "
                f"{MACENKO_MIN_NUCLEUS_PIXELS}); Macenko's two-stain fit needs the nuclear stain"
            )
        macenko = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        try:
            with np.errstate(all="ignore"):
                # torchstain takes one scalar light intensity: rescale each channel so
                # that its glass sits at 240 and the per-channel background applies.
                scaled = pixels.astype(np.float64) * (240.0 / (background + 1.0))
                macenko.fit(scaled[:, None, :], Io=240.0, alpha=ALPHA, beta=BETA)
        except (np.linalg.LinAlgError, ValueError, IndexError) as exc:
            raise StainFitError(f"Macenko stain estimation failed on this image: {exc}") from exc
        he = np.asarray(macenko.HERef, dtype=np.float64)
        max_c = np.asarray(macenko.maxCRef, dtype=np.float64)
        if not np.all(np.isfinite(he)) or not np.all(max_c > 0):
            raise StainFitError(
                "Macenko stain estimation gave no usable stain vectors; the image may hold a "
                "single stain only"
            )
        # Hematoxylin (nuclei) absorbs red light relatively more than eosin does;
        # torchstain's ordering looks at the red component alone.
        if he[0, 0] / he[1, 0] < he[0, 1] / he[1, 1]:
            he, max_c = he[:, ::-1], max_c[::-1]
        stats = self.validate({"stain_matrix": he.tolist(), "max_concentrations": max_c.tolist()})
        # The two-stain plane must explain the nuclei; on a whole field it
        # can lie through red cells and glass only.
        nucleus = regions.od[regions.nucleus].mean(axis=0)
        conc, *_ = np.linalg.lstsq(he, nucleus, rcond=None)
        missed = np.linalg.norm(nucleus - he @ conc) / np.linalg.norm(nucleus)
        if missed > 0.25:
            raise StainFitError(
                f"the Macenko stain plane misses {missed:.0%} of the nuclear colour"
            )
        if conc[0] <= 0:
            raise StainFitError("the Macenko 'nuclear' vector does not stain the nuclei")
        return stats

    def validate(self, stats):
        m = _finite(stats.get("stain_matrix"), (3, 2), "stain_matrix")
        c = _finite(stats.get("max_concentrations"), (2,), "max_concentrations")
        if np.any(c <= 0):
            raise StainError("stain reference has non-positive concentrations")
        angle = _angle_deg(m[:, 0], m[:, 1])
        if angle < MIN_STAIN_ANGLE:
            raise StainFitError(
                f"the two Macenko stain vectors are nearly collinear ({angle:.1f}°)"
            )
        return {"stain_matrix": m.tolist(), "max_concentrations": c.tolist()}

    def transform(self, source, target):
        src, tgt = source.stats[self.name], target.stats[self.name]
        # Concentrations by least squares (pseudo-inverse), rescaled so the
        # source's 99th percentile lands on the target's, then re-mixed with
        # the target's stain vectors: one 3×3 map in optical-density space.
        # (The part of a colour off the source's two-stain plane is dropped,
        # as in Macenko et al.; the built-in models were trained this way.)
        pinv = np.linalg.pinv(np.asarray(src["stain_matrix"]))  # 2×3
        scale = np.asarray(tgt["max_concentrations"]) / np.asarray(src["max_concentrations"])
        od_map = (np.asarray(tgt["stain_matrix"]) @ (scale[:, None] * pinv)).T.astype(np.float32)
        i0 = np.asarray(source.background, np.float32) + 1.0

        def apply(pixels: np.ndarray, od: np.ndarray) -> np.ndarray:
            # Rendered under the source's own illumination: stain changes, glass does not.
            return i0 * np.exp(-(od @ od_map)) - 1.0

        return apply


@register_stain_method
class Reinhard(StainMethod):
    """Reinhard et al. (2001) on stained pixels: match CIE-Lab mean and spread."""

    name = "reinhard"
    label = "Reinhard colour transfer on stained pixels"
    fallback = "none"

    def fit(self, regions, balanced):
        pixels = regions.pixels[balanced][regions.stained[balanced]]
        if len(pixels) < MIN_STAINED_PIXELS:
            raise StainFitError(f"only {len(pixels)} stained pixels to measure colours on")
        lab = _rgb_to_lab(pixels)
        return self.validate(
            {"lab_mean": lab.mean(axis=0).tolist(), "lab_std": lab.std(axis=0).tolist()}
        )

    def validate(self, stats):
        mean = _finite(stats.get("lab_mean"), (3,), "lab_mean")
        std = np.maximum(_finite(stats.get("lab_std"), (3,), "lab_std"), 1e-3)
        return {"lab_mean": mean.tolist(), "lab_std": std.tolist()}

    def transform(self, source, target):
        src, tgt = source.stats[self.name], target.stats[self.name]
        scale = (np.asarray(tgt["lab_std"]) / np.asarray(src["lab_std"])).astype(np.float32)
        shift = (np.asarray(tgt["lab_mean"]) - np.asarray(src["lab_mean"]) * scale).astype(
            np.float32
        )

        def apply(pixels: np.ndarray, od: np.ndarray) -> np.ndarray:
            return _lab_to_rgb(_rgb_to_lab(pixels) * scale + shift)

        return apply


#: The method used when none is chosen: see docs/results.md ("Stain
#: normalization across labs") for the measurement that chose it.
DEFAULT_METHOD = "regions"

#: Names of the built-in methods (the registry may hold more).
METHODS = stain_methods()


# ---------------------------------------------------------------- reference


@dataclass(frozen=True)
class StainReference:
    """Stain statistics of an image, used as a target or as a source.

    Attributes
    ----------
    background : tuple
        Per-channel intensity of bare glass (I0 of the optical densities).
    stats : dict
        Per method name, that method's fitted statistics (JSON-able).
    refused : dict
        Per method name, why its fit was refused on this image.
    description : str
        Where these numbers came from.
    n_pixels : int
        Stained pixels the fit saw.
    """

    background: tuple[float, float, float] = (255.0, 255.0, 255.0)
    stats: Mapping[str, dict] = field(default_factory=dict)
    refused: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    n_pixels: int = field(default=0, compare=False)

    def __post_init__(self):
        bg = np.asarray(self.background, dtype=float)
        if bg.shape != (3,) or not np.all(np.isfinite(bg)):
            raise StainError("background must be 3 finite numbers")

    def method_stats(self, method: str) -> dict:
        """This reference's statistics for ``method``; StainFitError says why there are none."""
        if method in self.stats:
            return self.stats[method]
        reason = self.refused.get(method, "it was fitted before this method existed")
        raise StainFitError(
            f"no {method} statistics for {self.description or 'this image'}: {reason}"
        )

    @property
    def matrix(self) -> np.ndarray:
        """Macenko stain vectors (3×2; column 0 nuclear)."""
        return np.asarray(self.method_stats("macenko")["stain_matrix"], dtype=np.float64)

    @property
    def max_concentrations(self) -> tuple[float, float]:
        return tuple(self.method_stats("macenko")["max_concentrations"])

    @property
    def lab_mean(self) -> tuple[float, float, float]:
        return tuple(self.method_stats("reinhard")["lab_mean"])

    def to_dict(self) -> dict:
        """JSON-able form (stored in model files and sidecars)."""
        return {
            "format_version": FORMAT_VERSION,
            "background": [float(v) for v in self.background],
            "methods": {name: dict(stats) for name, stats in self.stats.items()},
            "refused": dict(self.refused),
            "description": self.description,
            "n_pixels": int(self.n_pixels),
        }

    @classmethod
    def from_dict(cls, d: dict) -> StainReference:
        """Inverse of :meth:`to_dict`, validating the numbers.

        Also reads the format before version 2 (Macenko and Reinhard fields
        at the top level); such a dict describing the built-in PBC reference
        is read as the current built-in reference.
        """
        if not isinstance(d, Mapping):
            raise StainError(
                f"invalid stain reference: expected a mapping, got {type(d).__name__}"
            )
        try:
            if "methods" not in d:
                if d.get("description") in LEGACY_BUILTIN_DESCRIPTIONS:
                    return default_reference()
                methods = {
                    "macenko": {
                        "stain_matrix": d["stain_matrix"],
                        "max_concentrations": d["max_concentrations"],
                    },
                    "reinhard": {"lab_mean": d["lab_mean"], "lab_std": d["lab_std"]},
                }
            else:
                methods = dict(d["methods"])
            stats = {}
            for name, values in methods.items():
                known = _REGISTRY.get(name)
                stats[name] = known.validate(values) if known is not None else dict(values)
            return cls(
                background=tuple(float(v) for v in d.get("background", (255.0,) * 3)),
                stats=stats,
                refused={str(k): str(v) for k, v in dict(d.get("refused", {})).items()},
                description=str(d.get("description", "")),
                n_pixels=int(d.get("n_pixels", 0)),
            )
        except StainError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StainError(f"invalid stain reference: {exc!r}") from exc


@lru_cache(maxsize=1)
def default_reference() -> StainReference:
    """The built-in reference, measured on PBC (see scripts/fit_default_reference.py)."""
    text = resources.files("napari_wbc").joinpath("resources/pbc_stain_reference.json").read_text()
    return StainReference.from_dict(json.loads(text))


# ------------------------------------------------------------------- fitting


def stained_mask(pixels: np.ndarray, background=None, beta: float = BETA) -> np.ndarray:
    """Pixels (N×3 uint8) whose optical density reaches ``beta`` in some channel.

    ``background`` defaults to the one estimated from ``pixels`` themselves.
    """
    pixels = np.asarray(pixels).reshape(-1, 3)
    if background is None:
        background = estimate_background(pixels)
    return optical_density(pixels, background).max(axis=-1) >= beta


def fit_stain_reference(
    image: np.ndarray,
    description: str = "",
    background=None,
    beta: float = BETA,
    methods: Sequence[str] | None = None,
) -> StainReference:
    """Fit every registered method's statistics on an RGB image or a pixel list.

    The pixels are segmented into glass, red cells and white-cell nuclei
    (:func:`segment_pixels`) and each method fits on a sample holding nuclei,
    red cells and other stained pixels in equal numbers. A method whose fit
    is implausible is recorded in ``refused`` with the reason.

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
    methods : sequence of str, optional
        Methods to fit; all registered ones by default.

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
    regions = segment_pixels(pixels, background, beta)
    n_stained = int(regions.stained.sum())
    if n_stained < MIN_STAINED_PIXELS:
        raise BlankImageError(
            f"only {n_stained} stained pixels found (need {MIN_STAINED_PIXELS}); the image or "
            "region looks blank. Choose a reference region that contains cells."
        )
    balanced = regions.balanced()
    stats, refused = {}, {}
    for name in methods if methods is not None else [n for n in _REGISTRY if n != "none"]:
        try:
            stats[name] = get_stain_method(name).fit(regions, balanced)
        except StainFitError as exc:
            refused[name] = str(exc)
    return StainReference(
        background=tuple(float(v) for v in background),
        stats=stats,
        refused=refused,
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
    if _is_dask(image):
        arr = image
    else:
        import dask.array as da

        arr = da.from_array(image, chunks=(window, window, -1))
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
    yield Progress("fit", 0, 1, "estimating stain statistics")
    ref = fit_stain_reference(pixels, description=description)
    yield Progress("fit", 1, 1, "stain statistics estimated")
    return ref


# ---------------------------------------------------------------- applying


def _check_output_colours(method: str, source, target) -> None:
    """Refuse a transform that turns the image's nuclei and red cells into false colours.

    A fit can pass every check and still swap the stains on an image (a
    BCCD field under Macenko: red cells violet, nuclei mint green). The
    source's mean nucleus and red-cell colours (its "regions" statistics)
    are put through the transform: the nucleus must stay darker than the
    red cell and purple, violet or blue.
    """
    stats = source.stats.get("regions")
    if method in ("none", "regions") or not stats:
        return  # "regions" maps those two colours onto the reference's by construction
    probe = StainNormalizer("none", None, None)
    probe.method, probe.source, probe.target = method, source, target
    impl = get_stain_method(method)
    probe._apply = impl.transform(source, target)
    probe._fade = np.float32(impl.fade_od)
    probe._lut = _od_lut(source.background)
    od = np.array([stats["nucleus_od"], stats["rbc_od"]], np.float64)
    i0 = np.asarray(source.background, np.float64) + 1.0
    colours = np.clip(np.rint(i0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)
    nucleus, rbc = optical_density(probe._transform(colours), source.background).astype(float)
    what = f"{method} turns this image's nuclei and red cells into false colours"
    if nucleus.sum() < NUCLEUS_DENSITY * rbc.sum():
        raise StainFitError(f"{what} (the nuclei come out lighter than the red cells)")
    if nucleus[2] >= max(nucleus[0], nucleus[1]) or nucleus[1] <= min(nucleus[0], nucleus[2]):
        raise StainFitError(f"{what} (the nuclei are no longer purple, violet or blue)")


class StainNormalizer:
    """A fixed per-pixel transform from a source's stains to a target's.

    Call it on any ``(..., 3)`` uint8 tile; it returns a uint8 tile of the same
    shape. The transform does not look at neighbouring pixels, so tiling never
    changes the result.

    When the source (or target) has no usable statistics for ``method`` (its
    fit was refused as implausible), the method's ``fallback`` chain is
    followed with a warning; ``method`` then names the method in use,
    ``requested`` the one asked for and ``fallback_reason`` says why.

    Parameters
    ----------
    method : str
        One of :func:`stain_methods`.
    source : StainReference
        Statistics of the image being normalized (fit once on the whole image).
    target : StainReference
        The reference to map onto.
    check_colours : bool
        Also refuse a method whose transform turns the source's mean nucleus
        and red cell into false colours (:func:`_check_output_colours`), and
        fall back. Off by default: models were validated without it.
    """

    def __init__(
        self,
        method: str,
        source: StainReference | None,
        target: StainReference | None,
        check_colours: bool = False,
    ):
        requested = get_stain_method(method).name
        if requested != "none" and (source is None or target is None):
            raise StainError(f"{requested} normalization needs a source and a target reference")
        self.requested = requested
        self.fallback_reason = ""
        name: str | None = requested
        seen = set()
        while name not in (None, "none") and name not in seen:
            seen.add(name)
            try:
                source.method_stats(name)
                target.method_stats(name)
                if check_colours:
                    _check_output_colours(name, source, target)
                break
            except StainFitError as exc:
                nxt = get_stain_method(name).fallback or "none"
                log.warning("%s normalization refused (%s); using %s instead", name, exc, nxt)
                self.fallback_reason = self.fallback_reason or str(exc)
                name = nxt
        self.method = name or "none"
        self.source = source
        self.target = target
        self._lock = threading.Lock()
        self._table = None  # 2^24 packed colours (R, G, B, 0), filled as colours appear
        self._known = None  # which entries of the table are filled
        if self.method != "none":
            impl = get_stain_method(self.method)
            self._apply = impl.transform(source, target)
            self._fade = np.float32(impl.fade_od)
            self._lut = _od_lut(source.background)

    @property
    def cache_key(self) -> str:
        """Stable name of this transform (for caches of normalized crops)."""
        if self.method == "none":
            return "none"
        payload = json.dumps(
            [self.method, self.source.to_dict(), self.target.to_dict()], sort_keys=True
        )
        import hashlib

        return f"{self.method}-{hashlib.sha1(payload.encode()).hexdigest()[:12]}"

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        tile = np.asarray(tile)
        if tile.dtype != np.uint8 or tile.shape[-1] != 3:
            raise StainError(
                f"stain normalization needs 8-bit RGB tiles, got {tile.dtype} {tile.shape}"
            )
        if self.method == "none" or tile.size == 0:
            return tile.copy()
        pixels = tile.reshape(-1, 3)
        index = pixels[:, 0].astype(np.uint32) << 16
        index |= pixels[:, 1].astype(np.uint32) << 8
        index |= pixels[:, 2]
        table, known = self._colour_table()
        missing = ~known[index]
        if missing.any():
            self._fill(np.unique(index[missing]))
        # One aligned 4-byte gather per pixel.
        packed = np.take(table, index)
        return packed.view(np.uint8).reshape(-1, 4)[:, :3].reshape(tile.shape)

    def _colour_table(self) -> tuple[np.ndarray, np.ndarray]:
        """The table of every 8-bit colour's result, packed in uint32, and which are filled.

        The transform is a function of the colour alone, and a smear holds
        far fewer colours than pixels, so each colour is computed once, the
        first time it appears (:meth:`_fill`), and looked up after that:
        exactly the arithmetic's values, at the cost of a lookup. Both
        arrays start zeroed, so only the pages of colours met take memory
        (at most 64 + 16 MB).
        """
        with self._lock:
            if self._table is None:
                self._table = np.zeros(1 << 24, np.uint32)
                self._known = np.zeros(1 << 24, bool)
            return self._table, self._known

    def _fill(self, codes: np.ndarray) -> None:
        """Compute the colours ``codes`` (sorted, unique uint32 RGB codes) into the table."""
        colours = np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], axis=1)
        result = self._transform(colours.astype(np.uint8))
        packed = np.zeros((len(codes), 4), np.uint8)
        packed[:, :3] = result
        with self._lock:
            # Values first, then the flags: a reader that sees a flag sees its value.
            self._table[codes] = packed.view(np.uint32).ravel()
            self._known[codes] = True

    def __getstate__(self):
        # Ship the small matrices to dask workers, not the 64 MB table.
        state = self.__dict__.copy()
        state["_table"] = None
        state["_known"] = None
        state["_lock"] = None
        state.pop("_apply", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        if self.method != "none":
            self._apply = get_stain_method(self.method).transform(self.source, self.target)

    def _transform(self, pixels: np.ndarray) -> np.ndarray:
        """Normalize N×3 uint8 pixels with the arithmetic."""
        od = self._lut[pixels, np.arange(3)]  # N×3 float32
        weight = np.clip((od.max(axis=1) - self._fade / 2) / (self._fade / 2), 0.0, 1.0)
        active = weight > 0
        out = pixels.copy()
        if not active.any():
            return out
        normed = self._apply(pixels[active], od[active])
        w = weight[active, None]
        blended = w * normed + (1.0 - w) * pixels[active]
        out[active] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        return out


def normalize_array(image, normalizer: StainNormalizer):
    """Apply a normalizer to a numpy array (eagerly) or a dask array (lazily, per block)."""
    if _is_dask(image):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise StainError(f"expected a (Y, X, 3) RGB image, got shape {image.shape}")
        image = image.rechunk({2: -1})
        return image.map_blocks(normalizer, dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8))
    return normalizer(np.asarray(image))


def iter_prepare_normalizer(
    levels: Sequence[np.ndarray | da.Array],
    method: str = DEFAULT_METHOD,
    reference: StainReference | None = None,
    source: StainReference | None = None,
    max_pixels: int = 1_000_000,
    seed: int = 0,
    check_colours: bool = False,
) -> ProgressGen[StainNormalizer]:
    """Fit the source statistics once (on a coarse level) and build the normalizer.

    ``check_colours``: also refuse a method whose transform turns the image's
    mean nucleus and red cell into false colours, and fall back (what a user
    viewing the normalized image needs; models keep the behaviour they were
    validated with).
    """
    method = get_stain_method(method).name
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
            raise type(exc)(f"cannot normalize this image: {exc}") from exc
    return StainNormalizer(method, source, target, check_colours=check_colours)


def iter_normalize(
    levels: Sequence[np.ndarray | da.Array] | np.ndarray | da.Array,
    method: str = DEFAULT_METHOD,
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
    if isinstance(levels, np.ndarray) or _is_dask(levels):
        levels = [levels]
    normalizer = yield from iter_prepare_normalizer(
        levels, method, reference, source, max_pixels=max_pixels, seed=seed
    )
    return [normalize_array(level, normalizer) for level in levels]


def normalize(image, method: str = DEFAULT_METHOD, reference: StainReference | None = None):
    """Normalize one image (numpy → numpy, dask → lazy dask) to ``reference`` (default PBC)."""
    (out,) = run(iter_normalize([image], method, reference))
    return out


def _fit_level(levels: Sequence, max_pixels: int):
    """Coarsest level that still holds enough pixels to fit on."""
    for level in reversed(list(levels)):
        if level.shape[0] * level.shape[1] >= 4 * max_pixels:
            return level
    return levels[0]
