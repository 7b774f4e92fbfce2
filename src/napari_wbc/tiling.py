"""One block grid for every pass over a large image: blocks, halos and ownership.

Detection and the smear pipeline both walk an image on a fixed grid of
blocks. Each block is read with a halo (a margin wide enough that anything
whose centre lies in the block is seen whole) and reports only the objects it
*owns*. The ownership rule is defined here once:

    a tile owns an object when the pixel holding the object's centre lies in
    the tile's block; pixel ``i`` spans ``[i - 0.5, i + 0.5)``, so that is
    ``floor(y + 0.5)``. Blocks on the image's edge also own whatever lies
    beyond that edge.

So every object is reported by exactly one tile, whatever the block size,
the halo or the image's dask chunks, and the result of a tiled pass equals
the result on the whole image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["Tile", "tile_grid"]


@dataclass(frozen=True)
class Tile:
    """One block of the grid and the window read for it.

    Attributes
    ----------
    index : int
        Position in the grid, row by row.
    block : (y0, y1, x0, x1)
        The part of the image this tile owns (end exclusive).
    window : (y0, y1, x0, x1)
        The block with its halo, clipped to the image: what is read.
    limits : (y0, y1, x0, x1) floats
        The block's bounds for ownership, infinite on the image's edges.
    """

    index: int
    block: tuple[int, int, int, int]
    window: tuple[int, int, int, int]
    limits: tuple[float, float, float, float]

    @property
    def origin(self) -> tuple[int, int]:
        """Top-left pixel (y, x) of the window in the whole image."""
        return self.window[0], self.window[2]

    def owns(self, y, x) -> np.ndarray:
        """Whether this tile owns objects centred at (``y``, ``x``) (image pixels)."""
        py = np.floor(np.asarray(y, dtype=np.float64) + 0.5)
        px = np.floor(np.asarray(x, dtype=np.float64) + 0.5)
        y0, y1, x0, x1 = self.limits
        return (py >= y0) & (py < y1) & (px >= x0) & (px < x1)

    def select(self, table: pd.DataFrame) -> pd.DataFrame:
        """The rows of a table with ``y``, ``x`` columns that this tile owns."""
        return table[self.owns(table["y"].to_numpy(), table["x"].to_numpy())]


def tile_grid(shape, block: int, halo: int = 0, align: int = 1) -> list[Tile]:
    """Tiles of a fixed grid of ``block``-pixel blocks covering an image of ``shape``.

    Parameters
    ----------
    shape : sequence of int
        Image shape; the first two numbers are height and width.
    block : int
        Edge of the blocks in pixels (the last row and column may be smaller).
    halo : int
        Margin read around each block, in pixels.
    align : int
        Window origins are rounded down to multiples of this (a detector that
        works on a downsampled copy needs every window on the same grid).

    Returns
    -------
    list of Tile
        Row by row. The grid depends only on the shape and the arguments,
        never on how the image is chunked.
    """
    height, width = int(shape[0]), int(shape[1])
    block, halo, align = int(block), int(halo), max(int(align), 1)
    if block < 1:
        raise ValueError(f"block must be a positive number of pixels, got {block}")
    if halo < 0:
        raise ValueError(f"halo must be >= 0, got {halo}")
    tiles = []
    for y in range(0, height, block):
        for x in range(0, width, block):
            y1, x1 = min(y + block, height), min(x + block, width)
            wy0, wx0 = max(y - halo, 0), max(x - halo, 0)
            window = (
                wy0 - wy0 % align,
                min(y1 + halo, height),
                wx0 - wx0 % align,
                min(x1 + halo, width),
            )
            limits = (
                -math.inf if y == 0 else float(y),
                math.inf if y1 >= height else float(y1),
                -math.inf if x == 0 else float(x),
                math.inf if x1 >= width else float(x1),
            )
            tiles.append(Tile(len(tiles), (y, y1, x, x1), window, limits))
    return tiles
