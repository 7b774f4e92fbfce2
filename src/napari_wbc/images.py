"""Reading smear images of any size as lazy, multiscale, RGB dask arrays.

A whole slide is never loaded into memory: TIFF files (plain, OME, pyramidal
SVS-like) are opened through tifffile's zarr interface and wrapped in dask
arrays; small formats (JPEG, PNG, BMP) are decoded once.

Every image comes out as ``uint8`` RGB with the channel axis last. Documented
conversions:

- grayscale → RGB by repeating the channel;
- RGBA → RGB by compositing over a white background (transparent = glass);
- 16-bit → 8-bit by scaling the full 0–65535 range to 0–255;
- float → 8-bit when values lie in 0–1 (scaled by 255) or 0–255 (rounded).

Anything else (two channels, several Z/T planes, signed or complex pixels,
float values outside 0–255) is refused with an :class:`ImageReadError`.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import DataError, ImageReadError

if TYPE_CHECKING:
    import dask.array as da

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff", ".btf", ".tf8")
PLAIN_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
SUPPORTED_SUFFIXES = TIFF_SUFFIXES + PLAIN_SUFFIXES

#: Plausible microscope pixel sizes; resolution tags outside this range (such
#: as the 72 dpi that cameras write) say nothing about the specimen.
PLAUSIBLE_UM_PER_PX = (0.02, 10.0)

#: Add lazily downsampled levels to single-level images larger than this.
PYRAMID_THRESHOLD = 8192


@dataclass
class Smear:
    """A smear image opened lazily.

    Attributes
    ----------
    levels : list of dask.array.Array
        Resolution levels, full resolution first, each ``(Y, X, 3)`` uint8.
    pixel_size_um : float or None
        Micrometres per pixel at full resolution, when the file says so.
    path : Path or None
        Where the image came from.
    conversions : list of str
        What was done to make it 8-bit RGB, for the user to see.
    """

    levels: list[da.Array]
    pixel_size_um: float | None = None
    path: Path | None = None
    conversions: list[str] = field(default_factory=list)
    _handles: list = field(default_factory=list, repr=False)

    @property
    def data(self) -> da.Array:
        """Full-resolution level."""
        return self.levels[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.levels[0].shape)

    @property
    def multiscale(self) -> bool:
        return len(self.levels) > 1

    def close(self) -> None:
        """Close file handles held for lazy reading."""
        for handle in self._handles:
            handle.close()
        self._handles.clear()


def is_supported(path: str | Path) -> bool:
    """True when the file name has an extension napari-wbc reads."""
    return str(path).lower().endswith(SUPPORTED_SUFFIXES)


def list_image_files(
    items, recursive: bool = False, suffixes: tuple[str, ...] = SUPPORTED_SUFFIXES
) -> list[Path]:
    """Image files named in ``items``: files as given, folders searched (sorted).

    Parameters
    ----------
    items : iterable of path-like
        Files and folders.
    recursive : bool
        Search folders recursively (crop trees) or only their top level (smears).
    suffixes : tuple of str
        File name endings (lower case) that count as images in folders;
        hidden files are skipped.

    Raises
    ------
    DataError
        When an item does not exist or nothing is found.
    """
    items = [Path(item) for item in items]
    out: list[Path] = []
    for item in items:
        if item.is_dir():
            found = item.rglob("*") if recursive else item.iterdir()
            out += sorted(
                p
                for p in found
                if p.is_file() and p.name.lower().endswith(suffixes) and not p.name.startswith(".")
            )
        elif item.is_file():
            out.append(item)
        else:
            raise DataError(f"{item} does not exist")
    if not out:
        raise DataError(f"no images ({', '.join(suffixes)}) found in {', '.join(map(str, items))}")
    return out


def read_smear(path: str | Path, chunk: int = 1024) -> Smear:
    """Open a smear image lazily as 8-bit RGB.

    Parameters
    ----------
    path : str or Path
        A TIFF/OME-TIFF/SVS-like pyramidal TIFF, JPEG, PNG or BMP file.
    chunk : int
        Dask chunk edge (pixels) for images that are not tiled on disk.

    Returns
    -------
    Smear

    Raises
    ------
    ImageReadError
        When the file is missing, empty, corrupt, truncated, not an image, or
        cannot be converted to RGB (the message says which and what to do).
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"{path}: no such file")
    if path.is_dir():
        raise ImageReadError(f"{path} is a folder; choose an image file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path} is an empty file (0 bytes)")
    name = path.name.lower()
    if name.endswith(TIFF_SUFFIXES):
        smear = _read_tiff(path, chunk)
    elif name.endswith(PLAIN_SUFFIXES):
        smear = _read_plain(path, chunk)
    else:
        raise ImageReadError(
            f"{path.name}: unsupported file type; napari-wbc reads "
            + ", ".join(SUPPORTED_SUFFIXES)
        )
    smear.path = path
    if len(smear.levels) == 1 and max(smear.shape[:2]) > PYRAMID_THRESHOLD:
        smear.levels = build_pyramid(smear.levels[0])
    for note in smear.conversions:
        # Shown at the default verbosity: a converted image (16-bit, grey,
        # RGBA, palette) should not change colour without a word.
        log.warning("%s: %s", path.name, note)
    return smear


def cut_square(image, cy: float, cx: float, side: int) -> np.ndarray:
    """A ``side`` × ``side`` uint8 crop of a (Y, X, 3) image centred on (``cy``, ``cx``).

    ``image`` may be a numpy or dask array; only the window is read. Parts
    past the image border are white (glass). The smear pipeline and the crop
    export both cut through here, so training crops match classified ones.
    """
    half = side // 2
    y0, x0 = round(cy) - half, round(cx) - half
    h, w = image.shape[:2]
    crop = np.full((side, side, 3), 255, np.uint8)
    ys0, xs0 = max(y0, 0), max(x0, 0)
    ys1, xs1 = min(y0 + side, h), min(x0 + side, w)
    if ys1 > ys0 and xs1 > xs0:
        crop[ys0 - y0 : ys1 - y0, xs0 - x0 : xs1 - x0] = np.asarray(image[ys0:ys1, xs0:xs1])
    return crop


def build_pyramid(level0: da.Array, min_size: int = 1024) -> list[da.Array]:
    """Lazily add 2× downsampled levels (by striding) until the image fits ``min_size``."""
    levels = [level0]
    while max(levels[-1].shape[:2]) > min_size:
        levels.append(levels[-1][::2, ::2])
    return levels


# --------------------------------------------------------------------------- TIFF


def _zarr_levels(series) -> list:
    """A tifffile series' levels as zarr arrays, full resolution first."""
    import zarr

    node = zarr.open(series.aszarr(), mode="r")
    if isinstance(node, zarr.Array):
        return [node]
    return [node[str(i)] for i in range(len(series.levels))]


_REOPENED: dict = {}
_REOPEN_LOCK = threading.Lock()


def _open_tiff_base(path: str, max_bytes: int) -> CachedChunks:
    """A TIFF's full-resolution level as :class:`CachedChunks`, opened once per process.

    How a pickled :class:`CachedChunks` comes back in another process: the
    file stays open there as long as the process runs (a dask worker reads
    many blocks of the same slide).
    """
    import os

    import tifffile

    key = (path, os.stat(path).st_mtime_ns, int(max_bytes))
    with _REOPEN_LOCK:
        hit = _REOPENED.get(key)
        if hit is None:
            array = _zarr_levels(tifffile.TiffFile(path).series[0])[0]
            hit = _REOPENED[key] = CachedChunks(array, max_bytes, source=path)
    return hit


#: Bytes of decoded full-resolution TIFF tiles kept (least recently read
#: dropped first). A classification reads each block with a halo, so a tile
#: near a block's edge is read by two to four blocks; the next row of blocks
#: finds its upper halo here if a whole row's windows fit (about 220 MB for a
#: 20,000 px wide slide in 512 px tiles). On the 20,000² slide benchmark:
#: reading 6.4 s without, 4.7 s with 192 MB, 3.8 s with this.
TILE_CACHE_BYTES = 320 * 2**20


class CachedChunks:
    """An array read by chunk-aligned slices, the most recently read kept.

    Wraps a zarr array (tifffile's store decodes a tile on every read) for
    :func:`dask.array.from_array`: a read of exactly one chunk's slices is
    kept, up to ``max_bytes`` in all, and handed out read-only (so no caller
    can change what the next one gets); any other read goes straight through.
    Thread-safe. With ``source`` (a TIFF file's path) it can be pickled: in
    another process (a dask worker) it opens the file again, once per
    process, so dask graphs over a slide can run on a cluster.
    """

    def __init__(self, array, max_bytes: int, source: str | None = None):
        from collections import OrderedDict

        self.source = source
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.max_bytes = int(max_bytes)
        self._kept: OrderedDict = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.reads = 0  # reads that went to the array (for tests and benchmarks)

    def __getitem__(self, key):
        k = self._key(key)
        if k is not None:
            with self._lock:
                hit = self._kept.get(k)
                if hit is not None:
                    self._kept.move_to_end(k)
                    return hit
        value = np.asarray(self.array[key])
        self.reads += 1
        if k is not None and value.nbytes <= self.max_bytes:
            value.flags.writeable = False
            with self._lock:
                if k not in self._kept:
                    self._kept[k] = value
                    self._bytes += value.nbytes
                while self._bytes > self.max_bytes:
                    _, old = self._kept.popitem(last=False)
                    self._bytes -= old.nbytes
        return value

    def __reduce__(self):
        if self.source is None:
            raise TypeError("this array is read from an open file and cannot leave its process")
        return _open_tiff_base, (self.source, self.max_bytes)

    def _key(self, key) -> tuple | None:
        """``((start, stop), ...)`` for a tuple of plain slices, else None (not kept)."""
        if not isinstance(key, tuple) or len(key) != self.ndim:
            return None
        out = []
        for k, n in zip(key, self.shape, strict=True):
            if not isinstance(k, slice) or k.step not in (None, 1):
                return None
            out.append(k.indices(n)[:2])
        return tuple(out)


def _read_tiff(path: Path, chunk: int) -> Smear:
    import dask.array as da
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises many types for bad files
        raise ImageReadError(
            f"{path.name} is not a readable TIFF file (corrupt or not a TIFF: {exc})"
        ) from exc
    try:
        if not tif.series:
            raise ImageReadError(
                f"{path.name}: the TIFF file holds no readable image; it may be corrupt"
            )
        series = tif.series[0]
        axes = series.axes
        arrays = _zarr_levels(series)
        # Full resolution through a tile cache: neighbouring blocks' halos
        # overlap, and a tile read for one block is read again by the next.
        from dask.base import tokenize

        token = f"{path.resolve()}-{path.stat().st_mtime_ns}"
        levels = [
            da.from_array(
                CachedChunks(arrays[0], TILE_CACHE_BYTES, source=str(path.resolve())),
                chunks=arrays[0].chunks,
                name=f"napari-wbc-tiff-{tokenize(token)}",
            )
        ] + [da.from_zarr(a) for a in arrays[1:]]
        conversions: list[str] = []
        levels = [_to_yxc(level, axes, path.name, conversions) for level in levels]
        # Tile-sized chunks for untiled TIFFs read as one strip.
        levels = [_rechunk(level, chunk) for level in levels]
        levels = _to_rgb8(levels, path.name, conversions)
        pixel_size = _tiff_pixel_size(tif)
        _check_tiff_complete(tif, series, path)
    except ImageReadError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise ImageReadError(f"{path.name}: cannot read the TIFF image ({exc})") from exc
    # Touch one block so a truncated file fails now, not deep inside napari.
    try:
        # (here, whatever the default scheduler: one pixel is not worth a cluster)
        levels[-1][:1, :1].compute(scheduler="sync")
    except Exception as exc:
        tif.close()
        raise ImageReadError(
            f"{path.name}: the image data cannot be decoded; the file is truncated or "
            f"corrupt ({exc})"
        ) from exc
    return Smear(levels, pixel_size, path, _dedupe(conversions), [tif])


def _check_tiff_complete(tif, series, path: Path) -> None:
    """Refuse a file whose pixel data runs past its end (a cut-off copy or download)."""
    size = path.stat().st_size
    for level in series.levels:
        for page in level.pages:
            if page is None:
                continue
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            if len(offsets) and int((offsets + counts).max()) > size:
                raise ImageReadError(
                    f"{path.name} is truncated: its pixel data runs past the end of the file "
                    f"({size} bytes). Copy or export the file again."
                )


def _to_yxc(arr: da.Array, axes: str, name: str, conversions: list[str]) -> da.Array:
    """Reorder a TIFF series to (Y, X, C), dropping singleton extra axes."""
    import dask.array as da

    axes = axes.upper()
    index = []
    kept = []
    for ax, size in zip(axes, arr.shape, strict=True):
        if ax in "YX" or ax in "SC":
            index.append(slice(None))
            kept.append(ax)
        elif size == 1:
            index.append(0)
        else:
            raise ImageReadError(
                f"{name} has {size} planes along axis {ax!r} (axes {axes}); "
                "napari-wbc expects one 2-D RGB smear. Save a single plane and try again."
            )
    arr = arr[tuple(index)]
    channel_axes = [i for i, ax in enumerate(kept) if ax in "SC"]
    if len(channel_axes) > 1:
        raise ImageReadError(f"{name}: cannot interpret axes {axes} as an RGB image")
    if not channel_axes:
        return arr[..., None]
    return da.moveaxis(arr, channel_axes[0], -1)


def _tiff_pixel_size(tif) -> float | None:
    """Micrometres per pixel from OME, SVS (MPP) or resolution tags, if plausible."""
    lo, hi = PLAUSIBLE_UM_PER_PX
    candidates: list[float] = []
    if tif.is_ome and tif.ome_metadata:
        match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
        if match:
            value = float(match.group(1))
            scale = {"nm": 1e-3, "mm": 1e3, "m": 1e6, "cm": 1e4}.get(
                unit.group(1) if unit else "µm", 1.0
            )
            candidates.append(value * scale)
    page = tif.pages.first
    desc = page.description or ""
    match = re.search(r"MPP\s*=\s*([0-9.]+)", desc)
    if match:
        candidates.append(float(match.group(1)))
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if num and den:
            per_unit = num / den
            if unit == 3:  # centimetre
                candidates.append(1e4 / per_unit)
            elif unit == 2:  # inch
                candidates.append(25400.0 / per_unit)
    for value in candidates:
        if lo <= value <= hi:
            return float(value)
    return None


# ------------------------------------------------------------------ JPEG/PNG/BMP


def _read_plain(path: Path, chunk: int) -> Smear:
    import dask.array as da
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            dpi = im.info.get("dpi")
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            arr = np.asarray(im)
    except UnidentifiedImageError as exc:
        raise ImageReadError(
            f"{path.name} is not an image napari-wbc can read (is it really a "
            f"{path.suffix.lstrip('.').upper()} file?)"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(
            f"{path.name}: the image cannot be decoded; the file is truncated or corrupt ({exc})"
        ) from exc
    if arr.ndim == 2:
        arr = arr[..., None]
    levels = [da.from_array(arr, chunks=(chunk, chunk, -1))]
    conversions: list[str] = []
    if mode == "P":
        conversions.append("palette image expanded to RGB")
    levels = _to_rgb8(levels, path.name, conversions)
    pixel_size = None
    if dpi and dpi[0]:
        value = 25400.0 / float(dpi[0])
        if PLAUSIBLE_UM_PER_PX[0] <= value <= PLAUSIBLE_UM_PER_PX[1]:
            pixel_size = value
    return Smear(levels, pixel_size, path, _dedupe(conversions))


# --------------------------------------------------------------- conversions


def as_rgb8(image, name: str = "image") -> tuple[da.Array | np.ndarray, list[str]]:
    """Convert one array (numpy or dask, ``(Y, X)`` or ``(Y, X, C)``) to 8-bit RGB.

    Returns the converted array (same kind as the input) and the list of
    conversions made. Raises :class:`ImageReadError` for unusable inputs.
    """
    import dask.array as da

    is_numpy = isinstance(image, np.ndarray)
    arr = da.asarray(image) if is_numpy else image
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ImageReadError(
            f"{name} has {arr.ndim} dimensions; expected a 2-D image (Y, X) or (Y, X, channels)"
        )
    conversions: list[str] = []
    (out,) = _to_rgb8([arr], name, conversions)
    if is_numpy:
        out = out.compute()
    return out, conversions


def _to_rgb8(levels: list[da.Array], name: str, conversions: list[str]) -> list[da.Array]:
    """Apply the documented conversions to every level, or refuse."""
    import dask.array as da

    first = levels[0]
    if first.ndim != 3:
        raise ImageReadError(f"{name}: expected a 2-D image, got shape {first.shape}")
    if 0 in first.shape:
        raise ImageReadError(f"{name} is empty (shape {first.shape})")
    channels = first.shape[-1]
    if channels not in (1, 3, 4):
        raise ImageReadError(
            f"{name} has {channels} channels; expected RGB (3), RGBA (4) or grayscale (1)"
        )
    dtype = np.dtype(first.dtype)
    scale = _dtype_scale(dtype, levels[-1], name, conversions)
    out = []
    for level in levels:
        level = level.rechunk({2: -1})
        if scale is not None:
            level = level.map_blocks(
                _scale_block, scale, dtype=np.uint8, meta=np.empty((0, 0, 0), np.uint8)
            )
        if channels == 4:
            level = level.map_blocks(
                _composite_on_white,
                chunks=(*level.chunks[:2], (3,)),
                dtype=np.uint8,
                meta=np.empty((0, 0, 0), np.uint8),
            )
        elif channels == 1:
            level = da.concatenate([level] * 3, axis=2)
        out.append(level)
    if channels == 4:
        conversions.append("RGBA converted to RGB by compositing over white")
    elif channels == 1:
        conversions.append("grayscale converted to RGB (channel repeated)")
    return out


def _dtype_scale(dtype: np.dtype, smallest: da.Array, name: str, conversions: list[str]):
    """Factor that maps the pixel type to 0–255, or None for uint8."""
    import dask.array as da

    if dtype == np.uint8:
        return None
    if dtype == np.uint16:
        conversions.append("16-bit converted to 8-bit (0–65535 scaled to 0–255)")
        return 255.0 / 65535.0
    if dtype == np.bool_:
        raise ImageReadError(f"{name} is a binary mask, not a smear image")
    if np.issubdtype(dtype, np.floating):
        # Decide the range from the smallest level: cheap even for a slide.
        vmin, vmax = da.compute(smallest.min(), smallest.max())
        if not (np.isfinite(vmin) and np.isfinite(vmax)):
            raise ImageReadError(f"{name} holds NaN or infinite values")
        if vmin >= 0 and vmax <= 1.0:
            conversions.append("float image in 0–1 scaled to 8-bit")
            return 255.0
        if vmin >= 0 and vmax <= 255.0:
            conversions.append("float image in 0–255 rounded to 8-bit")
            return 1.0
        raise ImageReadError(
            f"{name} is a float image with values {vmin:g}..{vmax:g}; expected 0–1 or 0–255. "
            "Rescale it to 8-bit RGB first."
        )
    raise ImageReadError(
        f"{name} has pixel type {dtype}; expected 8-bit or 16-bit unsigned integers or float"
    )


def _scale_block(block: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.rint(block.astype(np.float32) * scale), 0, 255).astype(np.uint8)


def _composite_on_white(block: np.ndarray) -> np.ndarray:
    rgb = block[..., :3].astype(np.float32)
    alpha = block[..., 3:4].astype(np.float32) / 255.0
    return np.clip(np.rint(rgb * alpha + 255.0 * (1.0 - alpha)), 0, 255).astype(np.uint8)


def _rechunk(level: da.Array, chunk: int) -> da.Array:
    ys, xs = level.chunks[0], level.chunks[1]
    if max(ys) > 4 * chunk or max(xs) > 4 * chunk:
        return level.rechunk((chunk, chunk, -1))
    return level


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
