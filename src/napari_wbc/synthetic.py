"""Synthetic May-Grünwald-Giemsa blood smears, seeded and renderable block by block.

The smear is an infinite plane of objects (red cells, platelets, white cells);
an image is a window ``[0, H) x [0, W)`` onto it. Every object is derived from
the seed and its global position only:

- red cells sit on a jittered hexagonal lattice whose per-site parameters come
  from an integer hash of (seed, site row, site column);
- platelets and white cells are drawn per 256 px grid cell from a generator
  seeded by (seed, grid row, grid column); white cells are thinned so that no
  two of them overlap (Matérn type II: a candidate survives when no candidate
  with a lower mark lies within the hard-core distance), which only needs the
  candidates of neighbouring grid cells.

A block renders every object whose footprint overlaps it, so blocks can be
rendered independently and put together without seams. Rendering is exact, not
just close: each object multiplies a per-pixel transmittance by
``1 - density * (1 - colour / background)`` and every per-pixel operation is
an exactly rounded one (+, -, *, /, sqrt, floor, clip, integer hashing), done
in a fixed global object order, so a pixel's value never depends on the block
it was rendered in. Noise comes from a hash of the global pixel coordinates and
illumination from a smooth interpolation of a coarse seeded grid, for the same
reason. Soft object edges stand in for optical blur.

Sizes follow the PBC data set (CellaVision, about 75 px per red cell); every
length scales with ``rbc_diameter / 75``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from napari_wbc.errors import WBCError

logger = logging.getLogger(__name__)

__all__ = [
    "SAMPLE_SEED",
    "SAMPLE_SHAPE",
    "WBC_CLASSES",
    "SmearParams",
    "SmearParamsError",
    "lazy_smear",
    "make_sample_smear",
    "make_smear",
    "sample_smear_truth",
    "smear_truth",
]


class SmearParamsError(WBCError, ValueError):
    """Parameters of a synthetic smear are out of range."""


#: White-cell classes, in the order used for class weights.
WBC_CLASSES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")

#: Diameter range (px) of each white-cell class when a red cell is 75 px across.
_WBC_DIAMETERS = {
    "neutrophil": (110.0, 130.0),
    "lymphocyte": (80.0, 95.0),
    "monocyte": (130.0, 150.0),
    "eosinophil": (115.0, 130.0),
    "basophil": (100.0, 115.0),
}
_PLATELET_DIAMETER = (12.0, 20.0)
_REFERENCE_RBC = 75.0

#: Shape of the built-in sample and a seed that shows all five classes well inside.
SAMPLE_SHAPE = (1536, 2048)
SAMPLE_SEED = 109

_GRID = 256  # grid cell (px) for platelets and white cells
_ILLUM_SPACING = 512  # node spacing (px) of the smooth illumination field
_RBC_JITTER = 0.6  # fraction of the lattice spacing a red cell may move
_RBC_SIZE_SD = 0.06
_RBC_MAX_ECC = 0.10
_WBC_GAP = 4.0  # px kept between neighbouring white cells (at scale 1)
# Shape randomness is bounded so that every object stays inside a known radius:
# the scene uses the same bound to decide which blocks draw an object.
_WBC_ECC = {"monocyte": 0.06}  # largest axis stretch, default 0.04
_WBC_RIPPLE = {"monocyte": 0.03}  # largest 3-fold ripple coefficient, default 0.015
_WBC_OUTER = 1.11  # >= (1 + ecc) * (1 + sqrt(2) * ripple) for every class
_PLT_STRETCH = 1.1
_PLT_RIPPLE = 0.06
_PLT_OUTER = 1.2  # >= stretch * (1 + sqrt(2) * ripple)
_TILE = 1024  # rendering works in tiles of this size (cache, memory)

# Salts keep the random streams of different object kinds apart.
_SALT_RBC = 0x52424331
_SALT_PLT = 0x504C5431
_SALT_WBC = 0x57424331
_SALT_NOISE = 0x4E4F4953
_SALT_ILLUM = 0x494C4C55
_SALT_TEX = 0x54455854


def _default_class_weights() -> dict[str, float]:
    """Class mix: neutrophils most common, rare classes boosted so they show up."""
    return {
        "neutrophil": 0.45,
        "lymphocyte": 0.25,
        "monocyte": 0.12,
        "eosinophil": 0.10,
        "basophil": 0.08,
    }


@dataclass(frozen=True)
class SmearParams:
    """Parameters of a synthetic smear.

    Parameters
    ----------
    rbc_diameter : float
        Mean red-cell diameter in pixels (PBC scale: 75). Every other length
        (white cells, platelets, granules) scales with ``rbc_diameter / 75``.
    rbc_coverage : float
        Expected summed red-cell area per unit area, before red cells next to
        white cells are pushed away (overlaps count twice). 0 gives no red cells.
    wbc_per_mpx : float
        Expected white cells per megapixel. The default gives about 3-6 in a
        1024 x 1024 field. White cells never overlap each other, which caps
        this at about 12 per megapixel at the default scale.
    platelets_per_mpx : float
        Expected platelets per megapixel.
    class_weights : mapping of str to float
        Relative frequency of each class in :data:`WBC_CLASSES` (missing
        classes get weight 0; weights are normalised).
    band_fraction : float
        Fraction of neutrophils drawn as band (rather than segmented) cells.
    noise : float
        Standard deviation of the pixel noise, in 8-bit grey levels.
    illumination : float
        Relative amplitude of the smooth illumination variation.
    edge_width : float
        Width (px) of the soft object edges that stand in for optical blur.
    background : tuple of 3 float
        RGB of the empty glass (PBC images: about (254, 228, 202)).
    """

    rbc_diameter: float = 75.0
    rbc_coverage: float = 0.5
    wbc_per_mpx: float = 4.5
    platelets_per_mpx: float = 10.0
    class_weights: Mapping[str, float] = field(default_factory=_default_class_weights)
    band_fraction: float = 0.2
    noise: float = 1.5
    illumination: float = 0.025
    edge_width: float = 1.6
    background: tuple[float, float, float] = (251.0, 228.0, 204.0)

    def __post_init__(self):
        # Own copies, so that changing the caller's dict cannot change the smear.
        object.__setattr__(self, "class_weights", dict(self.class_weights))
        object.__setattr__(self, "background", tuple(float(v) for v in self.background))
        if not 10.0 <= self.rbc_diameter <= 500.0:
            raise SmearParamsError(
                f"rbc_diameter={self.rbc_diameter} px is out of range; use 10-500 "
                "(75 matches the PBC data set)"
            )
        if not 0.0 <= self.rbc_coverage <= 1.2:
            raise SmearParamsError(
                f"rbc_coverage={self.rbc_coverage} is out of range; use 0-1.2 "
                "(0.35-0.5 looks like a monolayer)"
            )
        for name in ("wbc_per_mpx", "platelets_per_mpx", "noise", "illumination"):
            if getattr(self, name) < 0:
                raise SmearParamsError(f"{name}={getattr(self, name)} must not be negative")
        if not 0.0 <= self.band_fraction <= 1.0:
            raise SmearParamsError(f"band_fraction={self.band_fraction} must lie in [0, 1]")
        if self.illumination >= 0.5:
            raise SmearParamsError(f"illumination={self.illumination} must be below 0.5")
        if not 0.3 <= self.edge_width <= 10.0:
            raise SmearParamsError(f"edge_width={self.edge_width} px must lie in [0.3, 10]")
        unknown = set(self.class_weights) - set(WBC_CLASSES)
        if unknown:
            raise SmearParamsError(
                f"unknown white-cell classes in class_weights: {sorted(unknown)}; "
                f"expected some of {list(WBC_CLASSES)}"
            )
        weights = [float(self.class_weights.get(c, 0.0)) for c in WBC_CLASSES]
        if min(weights) < 0 or sum(weights) <= 0:
            raise SmearParamsError(
                "class_weights must be non-negative and not all zero; got "
                f"{dict(self.class_weights)}"
            )
        if len(self.background) != 3 or not all(1 <= v <= 255 for v in self.background):
            raise SmearParamsError(
                f"background={self.background} must be three values in [1, 255]"
            )
        limit = self.max_wbc_per_mpx
        if self.wbc_per_mpx > limit:
            raise SmearParamsError(
                f"wbc_per_mpx={self.wbc_per_mpx} is too dense for non-overlapping white "
                f"cells at rbc_diameter={self.rbc_diameter}; use at most {limit:.1f}"
            )

    @property
    def scale(self) -> float:
        """Lengths relative to the PBC scale (red cell 75 px)."""
        return self.rbc_diameter / _REFERENCE_RBC

    @property
    def wbc_hard_core(self) -> float:
        """Smallest distance (px) between two white-cell centres."""
        largest = max(hi for _, hi in _WBC_DIAMETERS.values())
        return (largest * _WBC_OUTER + _WBC_GAP) * self.scale

    @property
    def max_wbc_per_mpx(self) -> float:
        """Densest white-cell layout the non-overlap thinning can reach."""
        return 0.9e6 / (math.pi * self.wbc_hard_core**2)

    def weights(self) -> np.ndarray:
        """Normalised class weights in :data:`WBC_CLASSES` order."""
        w = np.array([float(self.class_weights.get(c, 0.0)) for c in WBC_CLASSES])
        return w / w.sum()

    def __hash__(self):
        return hash(self.key())

    def key(self) -> tuple:
        """Hashable summary of every parameter (for dask names)."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping):
                value = tuple(sorted((k, float(v)) for k, v in value.items()))
            elif isinstance(value, tuple):
                value = tuple(float(v) for v in value)
            out.append((f.name, value))
        return tuple(out)


def _resolve_params(params: SmearParams | None, overrides: dict) -> SmearParams:
    """Merge a params object with keyword overrides, naming unknown keywords."""
    known = {f.name for f in fields(SmearParams)}
    unknown = set(overrides) - known
    if unknown:
        raise SmearParamsError(
            f"unknown smear parameters {sorted(unknown)}; valid names are {sorted(known)}"
        )
    if params is None:
        return SmearParams(**overrides)
    if not isinstance(params, SmearParams):
        raise SmearParamsError(f"params must be a SmearParams, not {type(params).__name__}")
    if not overrides:
        return params
    merged = {f.name: getattr(params, f.name) for f in fields(SmearParams)}
    merged.update(overrides)
    return SmearParams(**merged)


def _check_shape(shape) -> tuple[int, int]:
    """Validate an image shape (H, W)."""
    try:
        h, w = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise SmearParamsError(f"shape must be (height, width); got {shape!r}") from None
    if h <= 0 or w <= 0:
        raise SmearParamsError(f"shape must be positive; got {shape!r}")
    return h, w


def _check_seed(seed) -> int:
    """Validate a seed (a non-negative integer)."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise SmearParamsError(f"seed must be a non-negative integer; got {seed!r}")
    return int(seed)


# --------------------------------------------------------------------------
# Hashing: integer arithmetic wraps identically whatever the array shape, which
# is what makes noise and textures independent of the chunking.


def _mix32(h: np.ndarray) -> np.ndarray:
    """Murmur3 finaliser on a uint32 array (returns a new array)."""
    h = h ^ (h >> np.uint32(16))
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def _u32(values) -> np.ndarray:
    """Integers (possibly negative) as wrapped uint32."""
    return (np.asarray(values, dtype=np.int64) & 0xFFFFFFFF).astype(np.uint32)


def _hash(seed: int, salt: int, *keys) -> np.ndarray:
    """Hash of (seed, salt, keys...) broadcast over the key arrays, uint32."""
    h = _mix32(_u32([(seed & 0xFFFFFFFF) ^ salt]))
    h = _mix32(h ^ _u32([(seed >> 32) & 0xFFFFFFFF]))[0]
    for k in keys:
        h = _mix32((h ^ _u32(k)) * np.uint32(0x27D4EB2F) + np.uint32(0x165667B1))
    return h


def _uniform(h: np.ndarray) -> np.ndarray:
    """uint32 hash to float64 in [0, 1)."""
    return (h >> np.uint32(8)).astype(np.float64) * (1.0 / (1 << 24))


def _zigzag(n: int) -> int:
    """Map any integer to a non-negative one (for SeedSequence entropy)."""
    return 2 * n if n >= 0 else -2 * n - 1


def _cell_rng(seed: int, salt: int, row: int, col: int) -> np.random.Generator:
    """Generator for one grid cell, seeded by (seed, kind, row, col)."""
    return np.random.default_rng([seed, salt, _zigzag(row), _zigzag(col)])


# --------------------------------------------------------------------------
# The scene: which objects exist near a region.


@dataclass
class _Scene:
    """Objects that may be drawn in a region, in global drawing order."""

    rbc: dict  # arrays named in _RBC_FIELDS
    platelets: list  # tuples (cy, cx, diameter, shape_seed)
    wbc: list  # tuples (cy, cx, diameter, label, subtype, shape_seed)


def _rbc_lattice(p: SmearParams) -> tuple[float, float] | None:
    """Row and column spacing of the red-cell lattice (None when there are none)."""
    if p.rbc_coverage <= 0:
        return None
    radius = p.rbc_diameter / 2
    density = p.rbc_coverage / (math.pi * radius * radius * (1 + _RBC_SIZE_SD**2))
    sx = math.sqrt(2.0 / (math.sqrt(3.0) * density))
    return sx * math.sqrt(3.0) / 2.0, sx


def _rbc_max_extent(p: SmearParams) -> float:
    """Largest distance from a red-cell centre to its drawn footprint's edge."""
    return p.rbc_diameter / 2 * (1 + 3.5 * _RBC_SIZE_SD) * (1 + _RBC_MAX_ECC) + 3 * p.edge_width


_RBC_FIELDS = ("cy", "cx", "a", "b", "angle", "depth", "pallor", "dens", "ext")


def _wbc_extent(radius: float, p: SmearParams) -> float:
    """Distance from a white-cell centre beyond which it draws nothing."""
    # Soft edge plus the membrane outline, which reaches 3 px (scaled) outside.
    return radius * _WBC_OUTER + 3 * p.edge_width + 4 * p.scale


def _platelet_extent(radius: float, p: SmearParams) -> float:
    """Distance from a platelet centre beyond which it draws nothing."""
    return radius * _PLT_OUTER + 3 * p.edge_width


def _rbc_sites(seed: int, p: SmearParams, y0: float, y1: float, x0: float, x1: float) -> dict:
    """Red cells whose footprint may overlap [y0, y1) x [x0, x1)."""
    lattice = _rbc_lattice(p)
    if lattice is None:
        return {k: np.empty(0) for k in _RBC_FIELDS}
    sy, sx = lattice
    m = _rbc_max_extent(p) + _RBC_JITTER * max(sx, sy) / 2 + sx
    i = np.arange(math.floor((y0 - m) / sy), math.ceil((y1 + m) / sy) + 1)
    j = np.arange(math.floor((x0 - m) / sx), math.ceil((x1 + m) / sx) + 1)
    ii, jj = (a.ravel() for a in np.meshgrid(i, j, indexing="ij"))
    u = [_uniform(_hash(seed, _SALT_RBC, ii, jj, k)) for k in range(9)]
    cy = (ii + 0.5 + _RBC_JITTER * (u[0] - 0.5)) * sy
    cx = (jj + 0.5 + 0.5 * (ii & 1) + _RBC_JITTER * (u[1] - 0.5)) * sx
    # Sum of three uniforms: a bounded, roughly normal size spread.
    size = 1 + _RBC_SIZE_SD * 2 * (u[2] + u[3] + u[4] - 1.5)
    radius = p.rbc_diameter / 2 * size
    ecc = _RBC_MAX_ECC * u[5] ** 2
    angle = math.pi * u[6]
    a = radius * (1 + ecc)
    b = radius / (1 + ecc)
    ext = a + 3 * p.edge_width
    keep = (cy + ext > y0) & (cy - ext < y1) & (cx + ext > x0) & (cx - ext < x1)
    return {
        "cy": cy[keep],
        "cx": cx[keep],
        "a": a[keep],
        "b": b[keep],
        "angle": angle[keep],
        "depth": (0.38 + 0.17 * u[7])[keep],
        "pallor": (0.72 + 0.1 * u[8])[keep],
        "dens": (0.92 + 0.16 * u[2])[keep],
        "ext": ext[keep],
    }


def _grid_range(lo: float, hi: float) -> range:
    """Grid cells covering [lo, hi)."""
    return range(math.floor(lo / _GRID), math.floor(hi / _GRID) + 1)


def _wbc_candidates(seed, p, y0, y1, x0, x1) -> list:
    """White-cell candidates of every grid cell touching [y0, y1) x [x0, x1)."""
    if p.wbc_per_mpx <= 0:
        return []
    # Ask for more candidates than wanted so that the thinning keeps wbc_per_mpx.
    area = math.pi * p.wbc_hard_core**2
    density = -math.log1p(-p.wbc_per_mpx * 1e-6 * area) / area
    lam = density * _GRID * _GRID
    weights = p.weights()
    scale = p.scale
    out = []
    for r in _grid_range(y0, y1):
        for c in _grid_range(x0, x1):
            rng = _cell_rng(seed, _SALT_WBC, r, c)
            n = int(rng.poisson(lam))
            if n == 0:
                continue
            ys = (r + rng.random(n)) * _GRID
            xs = (c + rng.random(n)) * _GRID
            marks = rng.random(n)
            classes = rng.choice(len(WBC_CLASSES), size=n, p=weights)
            band = rng.random(n) < p.band_fraction
            sizes = rng.random(n)
            shape_seeds = rng.integers(0, 2**63, size=n)
            for k in range(n):
                label = WBC_CLASSES[classes[k]]
                lo, hi = _WBC_DIAMETERS[label]
                if label == "neutrophil":
                    subtype = "band_neutrophil" if band[k] else "segmented_neutrophil"
                else:
                    subtype = label
                diameter = (lo + (hi - lo) * sizes[k]) * scale
                out.append(
                    (
                        float(ys[k]),
                        float(xs[k]),
                        float(marks[k]),
                        diameter,
                        label,
                        subtype,
                        int(shape_seeds[k]),
                    )
                )
    return out


def _close_pairs(ay, ax, by, bx, limit) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) of points a[i], b[j] that may lie closer than ``limit``."""
    if len(ay) == 0 or len(by) == 0:
        return np.empty(0, np.intp), np.empty(0, np.intp)
    # The tree only shortlists; callers decide with their own exact arithmetic.
    tree_a = cKDTree(np.column_stack([ay, ax]))
    tree_b = cKDTree(np.column_stack([by, bx]))
    pairs = tree_a.sparse_distance_matrix(tree_b, limit * (1 + 1e-9) + 1e-6, output_type="ndarray")
    return pairs["i"].astype(np.intp), pairs["j"].astype(np.intp)


def _wbc_survivors(seed, p, y0, y1, x0, x1) -> list:
    """Non-overlapping white cells with centres in [y0, y1) x [x0, x1)."""
    d = p.wbc_hard_core
    cands = _wbc_candidates(seed, p, y0 - d, y1 + d, x0 - d, x1 + d)
    if not cands:
        return []
    cy = np.array([c[0] for c in cands])
    cx = np.array([c[1] for c in cands])
    mark = np.array([c[2] for c in cands])
    i, j = _close_pairs(cy, cx, cy, cx, d)
    close = (i != j) & ((cy[i] - cy[j]) ** 2 + (cx[i] - cx[j]) ** 2 < d * d)
    i, j = i[close], j[close]
    # Matérn II: of two candidates closer than d, the one with the higher mark goes.
    beaten = np.zeros(len(cands), bool)
    beaten[i[mark[i] > mark[j]]] = True
    inside = (cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1) & ~beaten
    return [
        (c[0], c[1], c[3], c[4], c[5], c[6])
        for c, keep in zip(cands, inside.tolist(), strict=True)
        if keep
    ]


def _platelets(seed, p, y0, y1, x0, x1) -> list:
    """Platelets with centres in [y0, y1) x [x0, x1) (before exclusion by white cells)."""
    if p.platelets_per_mpx <= 0:
        return []
    lam = p.platelets_per_mpx * 1e-6 * _GRID * _GRID
    lo, hi = _PLATELET_DIAMETER
    out = []
    for r in _grid_range(y0, y1):
        for c in _grid_range(x0, x1):
            rng = _cell_rng(seed, _SALT_PLT, r, c)
            n = int(rng.poisson(lam))
            if n == 0:
                continue
            ys = (r + rng.random(n)) * _GRID
            xs = (c + rng.random(n)) * _GRID
            sizes = rng.random(n)
            shape_seeds = rng.integers(0, 2**63, size=n)
            for k in range(n):
                if y0 <= ys[k] < y1 and x0 <= xs[k] < x1:
                    diameter = (lo + (hi - lo) * sizes[k]) * p.scale
                    out.append((float(ys[k]), float(xs[k]), diameter, int(shape_seeds[k])))
    return out


def _overlaps(cy, cx, ext, y0, y1, x0, x1) -> bool:
    """Whether the square of half-size ext around (cy, cx) meets [y0, y1) x [x0, x1)."""
    return cy + ext > y0 - 1 and cy - ext < y1 and cx + ext > x0 - 1 and cx - ext < x1


def _scene(seed: int, p: SmearParams, y0: float, y1: float, x0: float, x1: float) -> _Scene:
    """Every object whose footprint may overlap [y0, y1) x [x0, x1)."""
    wbc_r = max(hi for _, hi in _WBC_DIAMETERS.values()) * p.scale / 2
    plt_r = _PLATELET_DIAMETER[1] * p.scale / 2
    rbc_m = _rbc_max_extent(p)
    plt_m = _platelet_extent(plt_r, p)
    # White cells that we draw, or that push away red cells and platelets we draw.
    reach = max(_wbc_extent(wbc_r, p), rbc_m + wbc_r + 0.75 * rbc_m, plt_m + plt_r + wbc_r + 2)
    reach += 1
    wbcs = _wbc_survivors(seed, p, y0 - reach, y1 + reach, x0 - reach, x1 + reach)

    rbc = _rbc_sites(seed, p, y0, y1, x0, x1)
    plts = _platelets(seed, p, y0 - plt_m, y1 + plt_m, x0 - plt_m, x1 + plt_m)
    if wbcs:
        wy = np.array([w[0] for w in wbcs])
        wx = np.array([w[1] for w in wbcs])
        wr = np.array([w[2] / 2 for w in wbcs])
        # Red cells are pushed aside by white cells but may tuck a little under them.
        rr = np.sqrt(rbc["a"] * rbc["b"])
        limit = wr.max() + 0.75 * rr.max() if len(rr) else 0.0
        i, j = _close_pairs(rbc["cy"], rbc["cx"], wy, wx, limit)
        gap = wr[j] + 0.75 * rr[i]
        hit = (rbc["cy"][i] - wy[j]) ** 2 + (rbc["cx"][i] - wx[j]) ** 2 < gap * gap
        keep = np.ones(len(rr), bool)
        keep[i[hit]] = False
        rbc = {k: v[keep] for k, v in rbc.items()}
        if plts:
            py = np.array([q[0] for q in plts])
            px = np.array([q[1] for q in plts])
            pr = np.array([q[2] / 2 for q in plts])
            i, j = _close_pairs(py, px, wy, wx, wr.max() + pr.max() + 2)
            gap = wr[j] + pr[i] + 2
            hit = (py[i] - wy[j]) ** 2 + (px[i] - wx[j]) ** 2 < gap * gap
            gone = set(i[hit].tolist())
            plts = [q for k, q in enumerate(plts) if k not in gone]
    wbcs = [w for w in wbcs if _overlaps(w[0], w[1], _wbc_extent(w[2] / 2, p), y0, y1, x0, x1)]
    return _Scene(rbc=rbc, platelets=plts, wbc=wbcs)


# --------------------------------------------------------------------------
# Drawing. Colours are targets as seen over the background; each becomes an
# absorption k = 1 - colour / underlying colour, and an object multiplies the
# transmittance by 1 - density * k.

_F = np.float32

# Calibrated on PBC crops (median colours of each part); the red-cell colour is
# its rim, the pale centre comes from a lower density.
_RBC_RGB = (198.0, 154.0, 158.0)
# name: (cytoplasm, nucleus, granules or None)
_WBC_RGB = {
    "neutrophil": ((218.0, 186.0, 194.0), (62.0, 22.0, 128.0), (150.0, 96.0, 156.0)),
    "lymphocyte": ((160.0, 146.0, 190.0), (62.0, 22.0, 124.0), None),
    "monocyte": ((192.0, 172.0, 186.0), (76.0, 32.0, 132.0), None),
    "eosinophil": ((214.0, 182.0, 188.0), (66.0, 24.0, 128.0), (196.0, 112.0, 106.0)),
    "basophil": ((176.0, 140.0, 180.0), (70.0, 28.0, 128.0), (52.0, 16.0, 104.0)),
}
_PLATELET_RGB = ((196.0, 160.0, 196.0), (120.0, 66.0, 150.0))


def _absorb(rgb, under) -> np.ndarray:
    """Absorption that turns colour ``under`` into ``rgb`` (float32, clipped)."""
    k = 1.0 - np.asarray(rgb, float) / np.asarray(under, float)
    return np.clip(k, -0.1, 0.97).astype(_F)


class _Patch:
    """The part of a transmittance buffer an object covers, with local coordinates."""

    def __init__(self, T, y0, x0, cy, cx, ext):
        h, w = T.shape[:2]
        self.iy0 = max(math.floor(cy - ext), y0)
        self.iy1 = min(math.ceil(cy + ext) + 1, y0 + h)
        self.ix0 = max(math.floor(cx - ext), x0)
        self.ix1 = min(math.ceil(cx + ext) + 1, x0 + w)
        self.empty = self.iy0 >= self.iy1 or self.ix0 >= self.ix1
        if self.empty:
            return
        self.view = T[self.iy0 - y0 : self.iy1 - y0, self.ix0 - x0 : self.ix1 - x0]
        # Global integer coordinates are exact in float32, so local offsets are
        # identical whichever block computes them.
        self.dy = np.arange(self.iy0, self.iy1).astype(_F)[:, None] - _F(cy)
        self.dx = np.arange(self.ix0, self.ix1).astype(_F)[None, :] - _F(cx)

    def apply(self, density: np.ndarray, k: np.ndarray) -> None:
        """Multiply the transmittance by ``1 - density * k`` (k per channel)."""
        factor = 1 - density[..., None] * k
        np.maximum(factor, _F(0.0), out=factor)
        self.view *= factor


def _edge(dist: np.ndarray, width: float) -> np.ndarray:
    """Soft coverage from a signed distance (positive inside), in [0, 1]."""
    cov = dist * _F(1.0 / width) + _F(0.5)
    return np.clip(cov, _F(0.0), _F(1.0), out=cov)


def _rim(dist: np.ndarray, width: float) -> np.ndarray:
    """A band of the given width just inside an edge (1 at the edge, 0 deeper in)."""
    band = _F(1.0) - np.abs(dist) * _F(1.0 / width)
    return np.clip(band, _F(0.0), _F(1.0), out=band)


def _ellipse_dist(dx, dy, oy, ox, a, b, angle, wobble=None):
    """Approximate signed distance (px, positive inside) to a rotated ellipse.

    ``wobble`` = (c3, s3) adds a three-fold boundary ripple of that relative size.
    """
    c, s = math.cos(angle), math.sin(angle)
    ex = dx - _F(ox)
    ey = dy - _F(oy)
    u = ex * _F(c / a) + ey * _F(s / a)
    v = ey * _F(c / b) - ex * _F(s / b)
    rho = np.sqrt(u * u + v * v)
    edge = _F(1.0)
    if wobble is not None:
        c3, s3 = wobble
        # cos(3t) and sin(3t) times rho**3, as polynomials (no trigonometry per pixel).
        uu, vv = u * u, v * v
        ripple = (u * (uu - 3 * vv) * _F(c3) + v * (3 * uu - vv) * _F(s3)) / (
            rho * rho * rho + _F(1e-6)
        )
        edge = ripple + _F(1.0)
    return (edge - rho) * _F(math.sqrt(a * b))


def _capsule_dist(dx, dy, p0, p1, r):
    """Signed distance (px, positive inside) to a segment p0-p1 of radius r; p = (y, x)."""
    (y0, x0), (y1, x1) = p0, p1
    vy, vx = y1 - y0, x1 - x0
    ll = vy * vy + vx * vx
    ey = dy - _F(y0)
    ex = dx - _F(x0)
    if ll < 1e-9:
        return _F(r) - np.sqrt(ey * ey + ex * ex)
    t = (ey * _F(vy / ll) + ex * _F(vx / ll)).clip(_F(0.0), _F(1.0))
    qy = ey - t * _F(vy)
    qx = ex - t * _F(vx)
    return _F(r) - np.sqrt(qy * qy + qx * qx)


def _lattice_blobs(dy, dx, spacing, radius, presence, key, sharpness=1.8):
    """Soft round blobs, at most one anywhere in each cell of a square lattice.

    Blobs are at most half a cell across, so a pixel can only be reached from
    the 2 x 2 cells nearest to it; values are in [0, 1].
    """
    gy = dy * _F(1.0 / spacing)
    gx = dx * _F(1.0 / spacing)
    # Lower-left cell of the 2 x 2 block around the pixel.
    by = np.floor(gy - _F(0.5))
    bx = np.floor(gx - _F(0.5))
    iy = by.astype(np.int32)
    ix = bx.astype(np.int32)
    scale2 = _F((spacing / min(radius, spacing / 2)) ** 2)
    threshold = np.uint32(min(255, int(presence * 256)))
    out = None
    for oy in (0, 1):
        for ox in (0, 1):
            h = _hash(key & 0xFFFFFFFF, _SALT_TEX, iy + oy, ix + ox)
            qy = gy - by - _F(oy) - (h & np.uint32(255)).astype(_F) * _F(1 / 256)
            qx = gx - bx - _F(ox) - ((h >> np.uint32(8)) & np.uint32(255)).astype(_F) * _F(1 / 256)
            # Top byte: blob size between 60% and 100% of radius.
            size = (h >> np.uint32(24)).astype(_F) * _F(0.4 / 255) + _F(0.6)
            val = _F(1.0) - (qy * qy + qx * qx) * scale2 / (size * size)
            # Above 1: flat-topped with a soft rim, so a blob looks as large as its radius.
            val *= _F(sharpness)
            np.clip(val, _F(0.0), _F(1.0), out=val)
            val *= ((h >> np.uint32(16)) & np.uint32(255)) < threshold
            out = val if out is None else np.maximum(out, val, out=out)
    return out


def _granules(dx, dy, spacing, radius, presence, key, sharpness=1.8):
    """Texture of soft granules of random size, values in [0, 1].

    Two lattices at an odd angle and spacing are overlaid so that no regular
    pattern shows.
    """
    a = _lattice_blobs(dy, dx, spacing, radius, presence, key, sharpness)
    c, s = _F(0.8), _F(0.6)  # a 36.9 degree rotation
    ry = dy * c + dx * s
    rx = dx * c - dy * s
    b = _lattice_blobs(
        ry, rx, spacing * 1.17, radius * 1.1, presence * 0.8, key ^ 0x6A09E667, sharpness
    )
    return np.maximum(a, b)


def _draw_rbcs(T, y0, x0, rbc, p) -> None:
    """Draw the red cells: a pink disc with a pale centre (central pallor)."""
    k = _absorb(_RBC_RGB, p.background)
    w = p.edge_width
    cols = [rbc[n].tolist() for n in _RBC_FIELDS]
    for cy, cx, a, b, angle, depth, pallor, dens, ext in zip(*cols, strict=True):
        patch = _Patch(T, y0, x0, cy, cx, ext)
        if patch.empty:
            continue
        # Scalar math, not numpy: vectorised trigonometry may round differently
        # depending on array length, and the same cell must render identically
        # in every block.
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = patch.dx, patch.dy
        u = dx * _F(c / a) + dy * _F(s / a)
        v = dy * _F(c / b) - dx * _F(s / b)
        rho2 = u * u + v * v
        dist = (_F(1.0) - np.sqrt(rho2)) * _F(math.sqrt(a * b))
        cov = _edge(dist, w)
        # The biconcave centre: a flat pale middle up to radius 0.35, rising
        # smoothly to full density at ``pallor``, which leaves a darker rim.
        t = (_F(pallor * pallor) - rho2) * _F(1.0 / (pallor * pallor - 0.35**2))
        np.clip(t, _F(0.0), _F(1.0), out=t)
        bump = t * t * (_F(3.0) - _F(2.0) * t)
        density = cov * (_F(dens) - _F(depth * dens) * bump)
        patch.apply(density, k)


def _draw_platelet(T, y0, x0, plt, p) -> None:
    """Draw one platelet: a small pale-purple body with a dark granular centre."""
    cy, cx, diameter, shape_seed = plt
    rng = np.random.default_rng(shape_seed)
    r = diameter / 2
    patch = _Patch(T, y0, x0, cy, cx, _platelet_extent(r, p))
    if patch.empty:
        return
    body_rgb, gran_rgb = _PLATELET_RGB
    wob = tuple(rng.uniform(-_PLT_RIPPLE, _PLT_RIPPLE, 2))
    angle = rng.uniform(0, math.pi)
    body = _edge(
        _ellipse_dist(patch.dx, patch.dy, 0, 0, r * _PLT_STRETCH, r / _PLT_STRETCH, angle, wob),
        p.edge_width,
    )
    patch.apply(body, _absorb(body_rgb, p.background))
    core = _edge(_ellipse_dist(patch.dx, patch.dy, 0, 0, r * 0.7, r * 0.6, angle), 1.2)
    tex = _granules(patch.dx, patch.dy, 2.6 * p.scale, 1.3 * p.scale, 0.8, shape_seed)
    under = np.asarray(body_rgb)
    patch.apply(core * (_F(0.45) + _F(0.7) * tex), _absorb(gran_rgb, under))


def _centred(pts):
    """Shift points (y, x) so that their mean is the origin."""
    my = sum(q[0] for q in pts) / len(pts)
    mx = sum(q[1] for q in pts) / len(pts)
    return [(y - my, x - mx) for y, x in pts]


# Nucleus geometry uses Python's math on scalars (not numpy arrays) so that it
# is bit-for-bit the same whichever block draws the cell.


def _arc_points(rng, cell_r, n, radius_frac, span_deg):
    """n points along a random arc, centred on the cell (a nucleus centre line)."""
    rho = cell_r * radius_frac
    span = math.radians(span_deg)
    start = rng.uniform(0, 2 * math.pi) - span / 2
    angles = [start + span * k / (n - 1) for k in range(n)]
    return _centred([(rho * math.sin(t), rho * math.cos(t)) for t in angles])


def _lobe_chain(rng, cell_r, n, step, reach):
    """Centres of n lobes as a bent chain that fits within ``reach`` of the centre."""
    for _ in range(30):
        heading = rng.uniform(0, 2 * math.pi)
        turn = rng.choice([-1.0, 1.0])
        pts = [(0.0, 0.0)]
        for _k in range(n - 1):
            heading += turn * rng.uniform(0.5, 1.2)
            length = step * rng.uniform(0.85, 1.15)
            y, x = pts[-1]
            pts.append((y + length * math.sin(heading), x + length * math.cos(heading)))
        pts = _centred(pts)
        if max(math.hypot(y, x) for y, x in pts) <= reach:
            break
        step *= 0.95
    return pts


def _union(parts):
    """Union of shapes given as signed distances."""
    out = parts[0]
    for d in parts[1:]:
        out = np.maximum(out, d)
    return out


def _nucleus_distance(label, subtype, rng, dx, dy, r):
    """Signed distance (px, positive inside) to the nucleus of a white cell of radius r."""
    if subtype == "band_neutrophil":
        # A curved sausage: tapered capsules along a C-shaped centre line.
        pts = _arc_points(rng, r, 9, rng.uniform(0.42, 0.5), rng.uniform(200, 270))
        width = r * rng.uniform(0.22, 0.27)
        return _union(
            [
                _capsule_dist(
                    dx,
                    dy,
                    pts[k],
                    pts[k + 1],
                    width * (0.8 + 0.25 * math.sin(math.pi * (k + 0.5) / 8)),
                )
                for k in range(8)
            ]
        )
    if label == "neutrophil":
        # Three or four irregular lobes joined by thin chromatin strands.
        n = int(rng.choice([3, 4], p=[0.6, 0.4]))
        pts = _lobe_chain(rng, r, n, r * rng.uniform(0.52, 0.66), r * 0.48)
        strand = max(1.5, 0.035 * r)
        parts = [_capsule_dist(dx, dy, pts[k], pts[k + 1], strand) for k in range(n - 1)]
        for py, px in pts:
            a = r * rng.uniform(0.3, 0.36)
            parts.append(
                _ellipse_dist(
                    dx,
                    dy,
                    py,
                    px,
                    a,
                    a * rng.uniform(0.68, 0.82),
                    rng.uniform(0, math.pi),
                    tuple(rng.normal(0, 0.06, 2)),
                )
            )
        return _union(parts)
    if label == "lymphocyte":
        # Large round nucleus filling most of the cell, slightly off-centre.
        off = r * rng.uniform(0.04, 0.1)
        ang = rng.uniform(0, 2 * math.pi)
        a = r * rng.uniform(0.82, 0.88)
        return _ellipse_dist(
            dx,
            dy,
            off * math.sin(ang),
            off * math.cos(ang),
            a,
            a * rng.uniform(0.9, 1.0),
            rng.uniform(0, math.pi),
            tuple(rng.normal(0, 0.025, 2)),
        )
    if label == "monocyte":
        # Kidney-shaped: a broad irregular ellipse with a notch cut into one side.
        ang = rng.uniform(0, 2 * math.pi)
        ca, sa = math.cos(ang), math.sin(ang)
        a, b = r * rng.uniform(0.66, 0.74), r * rng.uniform(0.52, 0.58)
        body = _ellipse_dist(
            dx,
            dy,
            0.1 * r * sa,
            0.1 * r * ca,
            a,
            b,
            ang + math.pi / 2,
            tuple(rng.normal(0, 0.05, 2)),
        )
        nr = r * rng.uniform(0.22, 0.3)
        reach = b + 0.1 * r + 0.35 * nr
        ny, nx = dy - _F(reach * sa), dx - _F(reach * ca)
        notch = np.sqrt(ny * ny + nx * nx) - _F(nr)
        return np.minimum(body, notch)
    if label == "eosinophil":
        # Two lobes (spectacles) joined by a short band.
        ang = rng.uniform(0, 2 * math.pi)
        sep = r * rng.uniform(0.36, 0.42)
        lobes, parts = [], []
        for side in (-1, 1):
            py = side * sep * math.sin(ang) + rng.normal(0, 0.03 * r)
            px = side * sep * math.cos(ang) + rng.normal(0, 0.03 * r)
            lobes.append((py, px))
            parts.append(
                _ellipse_dist(
                    dx,
                    dy,
                    py,
                    px,
                    r * rng.uniform(0.38, 0.44),
                    r * rng.uniform(0.28, 0.33),
                    ang + math.pi / 2 + rng.normal(0, 0.3),
                    tuple(rng.normal(0, 0.04, 2)),
                )
            )
        parts.append(_capsule_dist(dx, dy, lobes[0], lobes[1], 0.08 * r))
        return _union(parts)
    # Basophil: an irregular, partly lobed nucleus, mostly hidden by granules.
    ang = rng.uniform(0, 2 * math.pi)
    return _union(
        [
            _ellipse_dist(
                dx,
                dy,
                0.1 * r * math.sin(ang),
                0.1 * r * math.cos(ang),
                r * 0.5,
                r * 0.4,
                ang,
                tuple(rng.normal(0, 0.08, 2)),
            ),
            _ellipse_dist(
                dx,
                dy,
                -0.28 * r * math.sin(ang),
                -0.28 * r * math.cos(ang),
                r * 0.34,
                r * 0.28,
                ang + 1.0,
            ),
        ]
    )


def _draw_wbc(T, y0, x0, wbc, p) -> None:
    """Draw one white cell: cytoplasm, nucleus with chromatin, then granules."""
    cy, cx, diameter, label, subtype, shape_seed = wbc
    rng = np.random.default_rng(shape_seed)
    r = diameter / 2
    s = p.scale
    w = p.edge_width
    patch = _Patch(T, y0, x0, cy, cx, _wbc_extent(r, p))
    if patch.empty:
        return
    dx, dy = patch.dx, patch.dy
    cyto_rgb, nuc_rgb, gran_rgb = _WBC_RGB[label]
    # Stain intensity differs a little from cell to cell.
    stain = rng.uniform(0.92, 1.06)

    ecc = rng.uniform(0.0, _WBC_ECC.get(label, 0.04))
    ripple = _WBC_RIPPLE.get(label, 0.015)
    cell_dist = _ellipse_dist(
        dx,
        dy,
        0,
        0,
        r * (1 + ecc),
        r / (1 + ecc),
        rng.uniform(0, math.pi),
        tuple(rng.uniform(-ripple, ripple, 2)),
    )
    cell = _edge(cell_dist, w)
    k_cyto = _absorb(cyto_rgb, p.background)
    # The membrane shows as a slightly darker outline.
    outline = _rim(cell_dist, 3.0 * s)
    cyto = cell * _F(stain) + _F(0.25) * outline
    if label == "monocyte":
        # Vacuoles: a few pale round holes in the cytoplasm.
        holes = _granules(dx, dy, 14.0 * s, 4.0 * s, 0.12, shape_seed ^ 0x5A5A)
        cyto = cyto * (_F(1.0) - _F(0.35) * holes)
    patch.apply(cyto, k_cyto)

    under = np.asarray(p.background) * (1 - k_cyto)
    nuc_dist = _nucleus_distance(label, subtype, rng, dx, dy, r)
    nuc = _edge(nuc_dist, w * 0.8) * cell
    spacing = {"lymphocyte": 6.0, "monocyte": 5.0}.get(label, 7.0) * s
    light = _granules(dx, dy, spacing, spacing * 0.5, 0.5, shape_seed ^ 0xC0FFEE, 1.0)
    # Dense chromatin with paler patches between the clumps, and a dark membrane.
    nuc_dens = _F(0.92 * stain) - _F(0.28) * light + _F(0.2) * _rim(nuc_dist, 3.0 * s)
    np.minimum(nuc_dens, _F(1.0), out=nuc_dens)
    patch.apply(nuc * nuc_dens, _absorb(nuc_rgb, under))

    if gran_rgb is None:
        return
    if label == "neutrophil":
        tex = _granules(dx, dy, 4.0 * s, 1.5 * s, 0.45, shape_seed ^ 0x1234)
        dens = cell * (_F(1.0) - nuc) * tex * _F(0.6)
    elif label == "eosinophil":
        tex = _granules(dx, dy, 4.2 * s, 2.1 * s, 1.0, shape_seed ^ 0x1234)
        dens = cell * (_F(1.0) - _F(0.85) * nuc) * (_F(0.4) + _F(0.7) * tex)
    else:
        tex = _granules(dx, dy, 6.0 * s, 3.0 * s, 0.9, shape_seed ^ 0x1234)
        dens = cell * (_F(0.3) + _F(0.85) * tex)
    patch.apply(dens * _F(stain), _absorb(gran_rgb, under))


def _illumination(seed, p, y0, y1, x0, x1) -> np.ndarray:
    """Smooth multiplicative illumination on [y0, y1) x [x0, x1), float32 (h, w)."""
    if p.illumination == 0:
        return np.ones((y1 - y0, x1 - x0), _F)
    sp = _ILLUM_SPACING
    ny0, ny1 = y0 // sp, (y1 - 1) // sp + 1
    nx0, nx1 = x0 // sp, (x1 - 1) // sp + 1
    ni = np.arange(ny0, ny1 + 1)[:, None]
    nj = np.arange(nx0, nx1 + 1)[None, :]
    nodes = (1 + p.illumination * (2 * _uniform(_hash(seed, _SALT_ILLUM, ni, nj)) - 1)).astype(_F)

    def weights(lo, hi, n0):
        pos = np.arange(lo, hi)
        idx = pos // sp
        t = ((pos - idx * sp).astype(_F) + _F(0.5)) * _F(1.0 / sp)
        # Smoothstep: no creases along the node lines.
        return idx - n0, t * t * (_F(3.0) - _F(2.0) * t)

    iy, ty = weights(y0, y1, ny0)
    ix, tx = weights(x0, x1, nx0)
    # Interpolate along x for every node row first (cheap), then along y per pixel.
    rows = nodes[:, ix] * (_F(1.0) - tx) + nodes[:, ix + 1] * tx
    ty = ty[:, None]
    return rows[iy] * (_F(1.0) - ty) + rows[iy + 1] * ty


def _noise(seed, p, y0, y1, x0, x1) -> np.ndarray:
    """Pixel noise from a hash of global coordinates, float32 (h, w), sd = p.noise."""
    ys = np.arange(y0, y1, dtype=np.uint32)
    xs = np.arange(x0, x1, dtype=np.uint32)
    hy = _hash(seed, _SALT_NOISE, ys)
    h = _mix32(hy[:, None] + xs[None, :] * np.uint32(0x9E3779B1))
    # Sum of two 16-bit uniforms: triangular, mean 65535, sd 65535 / sqrt(6).
    tri = (h & np.uint32(0xFFFF)) + (h >> np.uint32(16))
    out = tri.astype(_F)
    out -= _F(65535.0)
    out *= _F(p.noise * math.sqrt(6.0) / 65535.0)
    return out


def _render_region(seed: int, p: SmearParams, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Render the window [y0, y1) x [x0, x1) of the smear as uint8 RGB."""
    scene = _scene(seed, p, y0, y1, x0, x1)
    T = np.ones((y1 - y0, x1 - x0, 3), _F)
    _draw_rbcs(T, y0, x0, scene.rbc, p)
    for plt in scene.platelets:
        _draw_platelet(T, y0, x0, plt, p)
    for wbc in scene.wbc:
        _draw_wbc(T, y0, x0, wbc, p)
    light = _illumination(seed, p, y0, y1, x0, x1)
    T *= np.asarray(p.background, _F)
    T *= light[..., None]
    if p.noise > 0:
        T += _noise(seed, p, y0, y1, x0, x1)[..., None]
    T += _F(0.5)
    np.clip(T, _F(0.0), _F(255.0), out=T)
    return T.astype(np.uint8)


def _render_tiled(seed: int, p: SmearParams, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Render [y0, y1) x [x0, x1) tile by tile; the result does not depend on the tiles."""
    out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
    # Small tiles keep the float buffers in cache and bound memory.
    for ty in range(y0, y1, _TILE):
        for tx in range(x0, x1, _TILE):
            ty1, tx1 = min(ty + _TILE, y1), min(tx + _TILE, x1)
            out[ty - y0 : ty1 - y0, tx - x0 : tx1 - x0] = _render_region(seed, p, ty, ty1, tx, tx1)
    return out


def _render_block(seed: int, p: SmearParams, block_info=None) -> np.ndarray:
    """dask block function: render the block at its array location."""
    (y0, y1), (x0, x1), _ = block_info[None]["array-location"]
    return _render_tiled(seed, p, y0, y1, x0, x1)


# --------------------------------------------------------------------------
# Public API


def make_smear(
    shape: tuple[int, int] = (1024, 1024),
    seed: int = 0,
    params: SmearParams | None = None,
    **overrides,
) -> np.ndarray:
    """Render a synthetic May-Grünwald-Giemsa blood smear.

    Parameters
    ----------
    shape : (int, int)
        Image height and width in pixels.
    seed : int
        Non-negative seed; the same seed and parameters give the same image.
    params : SmearParams, optional
        Smear parameters; defaults to ``SmearParams()``.
    **overrides
        Any :class:`SmearParams` field, e.g. ``rbc_diameter=100``.

    Returns
    -------
    numpy.ndarray
        (H, W, 3) uint8 RGB image, identical to ``lazy_smear(...).compute()``.

    Raises
    ------
    SmearParamsError
        If the shape, seed or a parameter is invalid.
    """
    h, w = _check_shape(shape)
    seed = _check_seed(seed)
    p = _resolve_params(params, overrides)
    logger.debug("rendering a %d x %d synthetic smear, seed %d", h, w, seed)
    return _render_tiled(seed, p, 0, h, 0, w)


def lazy_smear(
    shape: tuple[int, int] = (1024, 1024),
    seed: int = 0,
    chunks=2048,
    params: SmearParams | None = None,
    **overrides,
):
    """A synthetic smear as a dask array, rendered block by block on demand.

    Parameters
    ----------
    shape : (int, int)
        Image height and width in pixels (any size: nothing is held in memory).
    seed : int
        Non-negative seed.
    chunks : int, tuple or dask chunk spec
        Chunking over (y, x): an int, an (int, int) pair, or explicit block
        sizes per axis. The channel axis is always one chunk.
    params : SmearParams, optional
        Smear parameters; defaults to ``SmearParams()``.
    **overrides
        Any :class:`SmearParams` field.

    Returns
    -------
    dask.array.Array
        (H, W, 3) uint8 array whose computed value equals
        ``make_smear(shape, seed, ...)`` exactly, whatever the chunking.
    """
    import dask.array as da
    from dask.base import tokenize

    h, w = _check_shape(shape)
    seed = _check_seed(seed)
    p = _resolve_params(params, overrides)
    if isinstance(chunks, int | np.integer):
        chunks = (int(chunks), int(chunks))
    try:
        cy, cx = chunks
    except (TypeError, ValueError):
        raise SmearParamsError(f"chunks must be an int or a (y, x) pair; got {chunks!r}") from None
    try:
        norm = da.core.normalize_chunks((cy, cx, 3), shape=(h, w, 3), dtype=np.uint8)
    except ValueError as err:
        raise SmearParamsError(f"chunks {chunks!r} do not fit shape {(h, w)}: {err}") from None
    name = "synthetic-smear-" + tokenize(h, w, seed, p.key(), norm)
    return da.map_blocks(
        _render_block,
        seed,
        p,
        chunks=norm,
        dtype=np.uint8,
        meta=np.empty((0, 0, 0), np.uint8),
        name=name,
    )


def smear_truth(
    shape: tuple[int, int] = (1024, 1024),
    seed: int = 0,
    params: SmearParams | None = None,
    **overrides,
) -> pd.DataFrame:
    """Ground truth of a synthetic smear: one row per object centred in the image.

    Parameters
    ----------
    shape, seed, params, **overrides
        As for :func:`make_smear`.

    Returns
    -------
    pandas.DataFrame
        Columns ``x``, ``y`` (centre in pixels, x is the column), ``diameter``
        (px), ``kind`` ("wbc", "rbc" or "platelet"), ``label`` (the white-cell
        class, or the kind) and ``subtype`` ("segmented_neutrophil" or
        "band_neutrophil" for neutrophils, else the label). White cells come
        first, then platelets, then red cells. Objects whose centre lies
        outside the image are left out even when part of them shows.
    """
    h, w = _check_shape(shape)
    seed = _check_seed(seed)
    p = _resolve_params(params, overrides)
    scene = _scene(seed, p, 0, h, 0, w)
    rows = []
    for cy, cx, diameter, label, subtype, _ in scene.wbc:
        rows.append((cx, cy, diameter, "wbc", label, subtype))
    for cy, cx, diameter, _ in scene.platelets:
        rows.append((cx, cy, diameter, "platelet", "platelet", "platelet"))
    rbc = scene.rbc
    diam = 2 * np.sqrt(rbc["a"] * rbc["b"])
    for cy, cx, d in zip(rbc["cy"].tolist(), rbc["cx"].tolist(), diam.tolist(), strict=True):
        rows.append((cx, cy, d, "rbc", "rbc", "rbc"))
    df = pd.DataFrame(rows, columns=["x", "y", "diameter", "kind", "label", "subtype"])
    inside = (df.x >= -0.5) & (df.x < w - 0.5) & (df.y >= -0.5) & (df.y < h - 0.5)
    df = df[inside].reset_index(drop=True)
    return df.astype({"x": float, "y": float, "diameter": float})


def _sample_params() -> SmearParams:
    """Parameters of the built-in sample."""
    return SmearParams()


def make_sample_smear() -> np.ndarray:
    """The built-in sample smear (napari sample data).

    Returns
    -------
    numpy.ndarray
        (1536, 2048, 3) uint8 RGB field with at least one neutrophil,
        lymphocyte, monocyte, eosinophil and basophil well inside the image;
        its ground truth is :func:`sample_smear_truth`.
    """
    return make_smear(SAMPLE_SHAPE, SAMPLE_SEED, _sample_params())


def sample_smear_truth() -> pd.DataFrame:
    """Ground truth of :func:`make_sample_smear` (see :func:`smear_truth`)."""
    return smear_truth(SAMPLE_SHAPE, SAMPLE_SEED, _sample_params())
