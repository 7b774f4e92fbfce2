"""Streaming a (lazy) image to a tiled, pyramidal TIFF, tile row by tile row.

Level 0 is computed one strip of tiles at a time and written straight to
disk; each strip's 2× downsampled copy goes to a temporary zarr array on disk,
which is the source of the next level. Memory stays at a few strips whatever
the image size. The file is written under a temporary name and renamed at the
end, so a crash or a cancel never leaves a half-written TIFF at the target.
"""

from __future__ import annotations

import json
import os
import queue
import tempfile
import threading
from pathlib import Path

import dask.array as da
import numpy as np

from .atomic import publish, temporary_beside
from .errors import WBCError
from .progress import Progress, ProgressGen

TILE = 512


def pyramid_shapes(shape: tuple[int, int], min_size: int = 1024) -> list[tuple[int, int]]:
    """(Y, X) of each level, halving until the larger side is at most ``min_size``."""
    shapes = [tuple(shape)]
    while max(shapes[-1]) > min_size:
        y, x = shapes[-1]
        shapes.append(((y + 1) // 2, (x + 1) // 2))
    return shapes


def _downsample2(strip: np.ndarray) -> np.ndarray:
    """2×2 mean (edges padded by replication), rounded to uint8."""
    h, w = strip.shape[:2]
    if h % 2 or w % 2:
        strip = np.pad(strip, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    s = strip.astype(np.uint16)
    out = (s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2] + 2) // 4
    return out.astype(np.uint8)


class _Abort(Exception):
    """Tells the writer thread to stop."""


_ABORT = object()


def iter_write_pyramid_tiff(
    path: str | Path,
    image: da.Array | np.ndarray,
    pixel_size_um: float | None = None,
    tile: int = TILE,
    min_size: int = 1024,
    compression: str = "zlib",
    metadata: dict | None = None,
) -> ProgressGen[Path]:
    """Write ``image`` (Y, X, 3 uint8) as a tiled pyramidal BigTIFF, streaming.

    ``metadata`` (JSON-serialisable) is stored as the first page's
    ImageDescription. Yields one :class:`Progress` per strip of tiles (so closing the generator
    cancels within one strip); returns the path written. Reduced levels are
    sub-IFDs of the first page, the layout that QuPath and tifffile read as a
    pyramid.
    """
    import tifffile
    import zarr

    path = Path(path)
    arr = image if isinstance(image, da.Array) else da.from_array(image, chunks=(tile, tile, -1))
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise WBCError(f"expected a (Y, X, 3) uint8 image to write, got {arr.shape} {arr.dtype}")
    shapes = pyramid_shapes(arr.shape[:2], min_size)
    # Strips as tall as the input's chunks (in whole tiles), so no chunk is
    # computed twice; reduced levels come from zarr in tile-high strips.
    first = -(-arr.chunks[0][0] // tile) * tile
    strip_heights = [min(max(first, tile), 8 * tile)] + [tile] * (len(shapes) - 1)
    n_strips = [-(-h // sh) for (h, _), sh in zip(shapes, strip_heights, strict=True)]
    n_tiles = [-(-h // tile) * -(-w // tile) for h, w in shapes]
    description = json.dumps(metadata) if metadata else None
    tmp_name = str(temporary_beside(path))
    scratch = tempfile.TemporaryDirectory(prefix="napari-wbc-pyramid-")
    options = {
        "photometric": "rgb",
        "compression": compression,
        "tile": (tile, tile),
        # Fast deflate: the pixels are worth more than a few percent of size.
        "compressionargs": {"level": 1} if compression in ("zlib", "deflate") else None,
    }
    if pixel_size_um:
        per_cm = 1e4 / pixel_size_um
        options.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")

    # tifffile pulls tiles from an iterator inside write(); a thread runs the
    # writer so that this generator can compute strips and yield progress.
    tiles: queue.Queue = queue.Queue(maxsize=2 * max(-(-w // tile) for _, w in shapes))
    failure: list[BaseException] = []

    def pull(count: int):
        for _ in range(count):
            item = tiles.get()
            if item is _ABORT:
                raise _Abort
            yield item

    def write_all() -> None:
        try:
            with tifffile.TiffWriter(tmp_name, bigtiff=True) as writer:
                for level, (height, width) in enumerate(shapes):
                    # Our metadata goes into the first page's description as
                    # plain JSON: tifffile's "shaped" metadata on a page with
                    # sub-IFDs reads back as a corrupt series (a warning on
                    # every open).
                    extra = (
                        {"subifds": len(shapes) - 1, "description": description}
                        if level == 0
                        else {"subfiletype": 1}
                    )
                    writer.write(
                        pull(n_tiles[level]),
                        shape=(height, width, 3),
                        dtype=np.uint8,
                        metadata=None,
                        **options,
                        **extra,
                    )
        except BaseException as exc:  # relayed to the generator below
            failure.append(exc)

    def put(item) -> None:
        while True:
            if failure:
                raise WBCError(f"writing {path.name} failed: {failure[0]}") from failure[0]
            try:
                tiles.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    thread = threading.Thread(target=write_all, name="napari-wbc-tiff-writer", daemon=True)
    thread.start()
    finished = False
    try:
        source = arr
        done, total = 0, sum(n_strips)
        for level, (height, width) in enumerate(shapes):
            nxt = None
            if level + 1 < len(shapes):
                ny, nx = shapes[level + 1]
                nxt = zarr.open_array(
                    os.path.join(scratch.name, f"level{level + 1}.zarr"),
                    mode="w",
                    shape=(ny, nx, 3),
                    chunks=(tile // 2, min(nx, 4096), 3),
                    dtype=np.uint8,
                )
            step = strip_heights[level]
            for y0 in range(0, height, step):
                strip = np.asarray(source[y0 : y0 + step].compute(), dtype=np.uint8)
                for ty in range(0, len(strip), tile):
                    for x0 in range(0, width, tile):
                        put(strip[ty : ty + tile, x0 : x0 + tile])
                if nxt is not None:
                    small = _downsample2(strip)
                    nxt[y0 // 2 : y0 // 2 + small.shape[0]] = small
                done += 1
                rows = f"level {level}: rows {y0}–{y0 + len(strip)}"
                yield Progress("write", done, total, rows)
            source = da.from_zarr(nxt) if nxt is not None else None
        thread.join()
        if failure:
            raise WBCError(f"writing {path.name} failed: {failure[0]}") from failure[0]
        publish(tmp_name, path)
        finished = True
    finally:
        if thread.is_alive():
            # Cancelled or failed: unblock the writer and let it drop the file.
            while thread.is_alive():
                try:
                    tiles.put_nowait(_ABORT)
                except queue.Full:
                    try:
                        tiles.get_nowait()
                    except queue.Empty:
                        pass
                thread.join(timeout=0.1)
        scratch.cleanup()
        if not finished and os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path
