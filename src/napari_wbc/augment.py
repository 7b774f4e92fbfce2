"""Domain randomization of white-cell crops, batch by batch, for cross-lab training.

A network trained on one lab's crops learns that lab's look (stain, camera,
blur, magnification, how much is around the cell) as much as the cell's
morphology. Here every training crop is shown under a random "other lab":

* **Stain**: the crop's optical densities are unmixed into haematoxylin and
  eosin concentrations with its own lab's Macenko stain vectors, the
  concentrations are scaled, and re-mixed with another lab's stain vectors and
  rendered under that lab's glass colour. The other labs' statistics are
  measured on unlabelled images (``txl/`` of the shared data) by
  :func:`measure_stain_pool`, so no labelled test lab is ever looked at.
* **Optics**: background tint (white balance), gamma, brightness, contrast,
  saturation (sometimes grey), defocus blur, resolution loss, sensor noise, JPEG.
* **Geometry**: any rotation, flips, a wide zoom (scale jitter), a small shift;
  regions brought into view from outside the crop take the crop's glass
  colour, not mirrored cells.
* **Context**: sometimes everything farther than a random radius from the
  centre is replaced by glass, as in a tight crop padded to the field of view.

Everything is drawn from a seeded :class:`numpy.random.Generator`, so a batch's
augmentation is reproducible. The module is pure torch/numpy (no Qt).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from napari_wbc.errors import DataError

__all__ = [
    "DomainRandomization",
    "StainStats",
    "measure_stain_pool",
    "measure_stain_stats",
    "randomize_batch",
]


@dataclass(frozen=True)
class StainStats:
    """Stain vectors, concentration scale and glass colour of one image or lab.

    Attributes
    ----------
    matrix : numpy.ndarray
        3×2 unit optical-density vectors of haematoxylin and eosin (columns).
    max_concentrations : numpy.ndarray
        99th percentile of each stain's concentration.
    background : numpy.ndarray
        Glass intensity per channel (0-255).
    """

    matrix: np.ndarray
    max_concentrations: np.ndarray
    background: np.ndarray


def measure_stain_stats(image: np.ndarray, beta: float = 0.15) -> StainStats:
    """Macenko statistics (Macenko et al. 2009) of one uint8 RGB image or pixel list.

    Glass is the median of the brightest 10 % of pixels; pixels with an optical
    density of at least ``beta`` in every channel are "stained". Their two
    principal directions span the stain plane, and the 1st and 99th percentile
    angles in it are the two stain vectors; haematoxylin is the one absorbing
    relatively more blue light (against green).

    Raises
    ------
    DataError
        When fewer than 500 pixels are stained or the fit is degenerate.
    """
    pixels = np.asarray(image).reshape(-1, 3)
    if pixels.dtype != np.uint8:
        raise DataError(f"stain statistics need uint8 RGB pixels, got {pixels.dtype}")
    brightness = pixels.astype(np.int32).sum(1)
    background = np.median(pixels[brightness >= np.percentile(brightness, 90)], axis=0)
    background = np.maximum(background.astype(np.float64), 1.0)
    od = -np.log((pixels.astype(np.float64) + 1.0) / (background + 1.0))
    od = od[np.all(od >= beta, axis=1)]
    if len(od) < 500:
        raise DataError(f"only {len(od)} stained pixels; need 500 to measure stain statistics")
    _, vectors = np.linalg.eigh(np.cov(od.T))
    plane = vectors[:, 1:3]
    plane = plane * np.where(plane.sum(0) < 0, -1.0, 1.0)
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [1, 99])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    matrix = np.stack([v1, v2], axis=1)
    matrix = matrix * np.where(matrix.sum(0) < 0, -1.0, 1.0)
    # The nuclear stain (haematoxylin, azure) absorbs blue relatively more than
    # eosin, which stains red cells: order by blue/green (red/green, used by
    # torchstain, mislabels BCCD's and LISC's stains).
    if matrix[2, 0] / max(matrix[1, 0], 1e-6) < matrix[2, 1] / max(matrix[1, 1], 1e-6):
        matrix = matrix[:, ::-1]
    matrix = np.clip(matrix, 1e-3, None)
    matrix = matrix / np.linalg.norm(matrix, axis=0, keepdims=True)
    conc = np.linalg.lstsq(matrix, od.T, rcond=None)[0]
    max_c = np.percentile(conc, 99, axis=1)
    if not np.all(np.isfinite(max_c)) or np.any(max_c <= 1e-3):
        raise DataError("degenerate stain fit: one stain has no concentration")
    return StainStats(
        matrix.astype(np.float32), max_c.astype(np.float32), background.astype(np.float32)
    )


def measure_stain_pool(images: Sequence[np.ndarray]) -> list[StainStats]:
    """Statistics of every image that has enough stain; images that fail are skipped.

    Raises
    ------
    DataError
        When no image could be measured.
    """
    pool = []
    for image in images:
        try:
            pool.append(measure_stain_stats(image))
        except DataError:
            continue
    if not pool:
        raise DataError("no image had enough stained pixels to measure stain statistics")
    return pool


@dataclass(frozen=True)
class DomainRandomization:
    """Strengths of :func:`randomize_batch` (probabilities ``p_*`` per crop).

    The defaults are "strong"; :meth:`mild` gives the flips, rotations and
    small zoom of the single-lab models.
    """

    zoom: tuple[float, float] = (0.7, 1.45)
    translate: float = 0.06
    any_angle: bool = True
    p_context: float = 0.25
    context_radius: tuple[float, float] = (0.22, 0.42)
    p_stain_swap: float = 0.5
    concentration_scale: tuple[float, float] = (0.6, 1.5)
    stain_vector_jitter: float = 0.08
    p_tint: float = 0.5
    tint: float = 0.1
    gamma: tuple[float, float] = (0.75, 1.35)
    brightness: float = 0.15
    contrast: float = 0.25
    saturation: tuple[float, float] = (0.6, 1.4)
    p_gray: float = 0.05
    p_blur: float = 0.35
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    p_lowres: float = 0.25
    lowres: tuple[float, float] = (1.2, 2.0)
    noise: tuple[float, float] = (0.0, 0.04)
    p_jpeg: float = 0.3
    jpeg_quality: tuple[int, int] = (35, 90)

    @classmethod
    def mild(cls) -> DomainRandomization:
        """Geometry only plus faint colour jitter (the single-lab recipe)."""
        return cls(
            zoom=(0.85, 1.15),
            translate=0.05,
            p_context=0.0,
            p_stain_swap=0.0,
            concentration_scale=(0.95, 1.05),
            stain_vector_jitter=0.0,
            p_tint=0.0,
            gamma=(1.0, 1.0),
            brightness=0.1,
            contrast=0.1,
            saturation=(0.9, 1.1),
            p_gray=0.0,
            p_blur=0.0,
            p_lowres=0.0,
            noise=(0.0, 0.0),
            p_jpeg=0.0,
        )


def _background(x: torch.Tensor) -> torch.Tensor:
    """Glass colour of each crop (B×3): median of the brightest 10 % of its pixels."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    brightness = flat.sum(1)
    k = max(1, (h * w) // 10)
    idx = brightness.topk(k, dim=1).indices
    bright = torch.gather(flat, 2, idx[:, None, :].expand(b, c, k))
    return bright.median(dim=2).values


def _geometry(x, rng, aug: DomainRandomization, out_size: int, bg: torch.Tensor):
    """Rotate, flip, zoom and shift every crop; uncovered parts take the crop's glass colour."""
    b = x.shape[0]
    lo, hi = aug.zoom
    zoom = np.exp(rng.uniform(math.log(lo), math.log(hi), size=b))
    if aug.any_angle:
        angle = rng.uniform(0, 2 * math.pi, size=b)
    else:
        angle = math.pi / 2 * rng.integers(4, size=b) + np.radians(rng.uniform(-10, 10, size=b))
    flip = rng.choice([-1.0, 1.0], size=b)
    shift = rng.uniform(-2 * aug.translate, 2 * aug.translate, size=(b, 2))
    c, s = np.cos(angle), np.sin(angle)
    theta = np.zeros((b, 2, 3), np.float32)
    theta[:, 0, 0] = c * flip / zoom
    theta[:, 0, 1] = -s / zoom
    theta[:, 1, 0] = s * flip / zoom
    theta[:, 1, 1] = c / zoom
    theta[:, :, 2] = shift
    # Antialias first when the crop is much larger than the output.
    need = math.ceil(out_size * hi)
    if x.shape[-1] > need * 1.25:
        x = F.interpolate(
            x, size=(need, need), mode="bilinear", antialias=True, align_corners=False
        )
    grid = F.affine_grid(torch.from_numpy(theta), [b, 3, out_size, out_size], align_corners=False)
    centred = x - bg[:, :, None, None]
    out = F.grid_sample(centred, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + bg[:, :, None, None]


def _remove_context(x, rng, aug: DomainRandomization, bg: torch.Tensor) -> torch.Tensor:
    """Replace everything beyond a random radius from the centre by glass, for some crops."""
    b, _, h, w = x.shape
    chosen = rng.random(b) < aug.p_context
    if not chosen.any():
        return x
    yy, xx = torch.meshgrid(
        torch.linspace(-0.5, 0.5, h), torch.linspace(-0.5, 0.5, w), indexing="ij"
    )
    r = torch.sqrt(yy**2 + xx**2)
    radius = torch.from_numpy(rng.uniform(*aug.context_radius, size=b).astype(np.float32))
    white = torch.from_numpy(rng.random(b) < 0.5)
    fill = torch.where(white[:, None], torch.ones_like(bg), bg)
    mask = torch.sigmoid((radius[:, None, None] - r[None]) / 0.01)[:, None]
    keep = torch.from_numpy(~chosen)[:, None, None, None]
    mask = torch.where(keep, torch.ones_like(mask), mask)
    return x * mask + fill[:, :, None, None] * (1 - mask)


def _stain(x, rng, aug, sources: Sequence[StainStats], pool: Sequence[StainStats]):
    """Unmix with each crop's lab's stain vectors, rescale, remix with a random lab's."""
    b = x.shape[0]
    swap = (rng.random(b) < aug.p_stain_swap) if pool else np.zeros(b, bool)
    targets = [pool[int(rng.integers(len(pool)))] if swap[i] else sources[i] for i in range(b)]
    m_src = torch.from_numpy(np.stack([s.matrix for s in sources]))  # B,3,2
    c_src = torch.from_numpy(np.stack([s.max_concentrations for s in sources]))  # B,2
    i0 = (
        torch.from_numpy(np.stack([s.background for s in sources]) / 255.0).float().clamp_min(1e-3)
    )
    tm = np.stack([t.matrix for t in targets])
    tm = tm + rng.normal(0, aug.stain_vector_jitter, size=tm.shape).astype(np.float32)
    tm = np.clip(tm, 0.02, None)
    m_tgt = torch.from_numpy(tm / np.linalg.norm(tm, axis=1, keepdims=True)).float()
    scale = rng.uniform(*aug.concentration_scale, size=(b, 2)).astype(np.float32)
    c_tgt = torch.from_numpy(np.stack([t.max_concentrations for t in targets]) * scale)
    t0 = torch.from_numpy(np.stack([t.background for t in targets]) / 255.0).float()
    flat = x.reshape(b, 3, -1)
    od = -torch.log((flat.clamp_min(1.0 / 255) / i0[:, :, None]).clamp_max(1.0))
    conc = torch.linalg.pinv(m_src) @ od  # B,2,N
    residual = od - m_src @ conc
    conc = conc * (c_tgt / c_src)[:, :, None]
    new_od = m_tgt @ conc + residual
    return (t0[:, :, None] * torch.exp(-new_od)).reshape(x.shape).clamp(0, 1)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2.5 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of B×3×H×W images with reflected borders."""
    k = _gaussian_kernel(sigma)
    pad = len(k) // 2
    x = F.pad(img, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)


def _jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    arr = (img.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        back = np.asarray(im.convert("RGB"))
    return torch.from_numpy(back.copy()).permute(2, 0, 1).float() / 255.0


def _per(values, b: int) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, np.float32)).view(b, *([1] * 3))


def _optics(x, rng, aug: DomainRandomization) -> torch.Tensor:
    """Tint, gamma, brightness, contrast, saturation, blur, resolution loss, noise, JPEG."""
    b, _, h, w = x.shape
    tint = rng.uniform(1 - aug.tint, 1 + aug.tint, size=(b, 3)).astype(np.float32)
    tint[rng.random(b) >= aug.p_tint] = 1.0
    tint = torch.from_numpy(tint / tint.max(1, keepdims=True))[:, :, None, None]
    x = x * tint
    gamma = np.exp(rng.uniform(math.log(aug.gamma[0]), math.log(aug.gamma[1]), size=b))
    x = x.clamp_min(1e-6) ** _per(gamma, b)
    x = x * _per(rng.uniform(1 - aug.brightness, 1 + aug.brightness, size=b), b)
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    mean = grey.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * _per(rng.uniform(1 - aug.contrast, 1 + aug.contrast, size=b), b) + mean
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    sat = rng.uniform(*aug.saturation, size=b)
    sat[rng.random(b) < aug.p_gray] = 0.0
    x = (grey + (x - grey) * _per(sat, b)).clamp(0, 1)
    # Blur and resolution loss in a few fixed strengths, so each is one batched op.
    blur = rng.random(b) < aug.p_blur
    sigmas = np.linspace(*aug.blur_sigma, 3)
    level = rng.integers(3, size=b)
    for k, sigma in enumerate(sigmas):
        chosen = torch.from_numpy(np.flatnonzero(blur & (level == k)))
        if len(chosen):
            x[chosen] = _blur(x[chosen], float(sigma))
    low = rng.random(b) < aug.p_lowres
    factors = np.linspace(*aug.lowres, 3)
    level = rng.integers(3, size=b)
    for k, f in enumerate(factors):
        chosen = torch.from_numpy(np.flatnonzero(low & (level == k)))
        if len(chosen):
            small = max(8, round(h / f))
            y = F.interpolate(x[chosen], size=(small, small), mode="bilinear", antialias=True)
            x[chosen] = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
    sigma = rng.uniform(*aug.noise, size=b).astype(np.float32)
    if sigma.max() > 0:
        x = x + torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32)) * _per(sigma, b)
    x = x.clamp(0, 1)
    for i in np.flatnonzero(rng.random(b) < aug.p_jpeg):
        x[i] = _jpeg(x[i], int(rng.integers(aug.jpeg_quality[0], aug.jpeg_quality[1] + 1)))
    return x


def randomize_batch(
    crops: np.ndarray | torch.Tensor,
    rng: np.random.Generator,
    out_size: int,
    aug: DomainRandomization | None = None,
    sources: Sequence[StainStats] | None = None,
    pool: Sequence[StainStats] = (),
) -> torch.Tensor:
    """Augment a batch of uint8 crops into float images in [0, 1].

    Parameters
    ----------
    crops : array
        ``(B, S, S, 3)`` uint8 crops centred on their cell, at the model's field
        of view.
    rng : numpy.random.Generator
        Source of every random choice (seed it for reproducibility).
    out_size : int
        Side of the output (the network input).
    aug : DomainRandomization, optional
        Strengths; default ``DomainRandomization()`` (strong).
    sources : sequence of StainStats, optional
        Stain statistics of each crop's own lab (one per crop); needed for the
        stain change, which is skipped without them.
    pool : sequence of StainStats
        Statistics of other labs to draw target stains from.

    Returns
    -------
    torch.Tensor
        ``(B, 3, out_size, out_size)`` float32 in [0, 1].
    """
    aug = aug or DomainRandomization()
    x = torch.as_tensor(np.asarray(crops))
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise DataError(f"expected (B, S, S, 3) uint8 crops, got {tuple(x.shape)} {x.dtype}")
    x = x.permute(0, 3, 1, 2).float() / 255.0
    if sources is not None and len(sources) != x.shape[0]:
        raise DataError(f"{len(sources)} stain sources for {x.shape[0]} crops")
    bg = _background(x)
    x = _geometry(x, rng, aug, out_size, bg)
    x = _remove_context(x, rng, aug, bg)
    if sources is not None:
        x = _stain(x, rng, aug, sources, pool)
    return _optics(x, rng, aug)
