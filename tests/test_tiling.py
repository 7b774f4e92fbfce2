"""The one block grid: every object owned exactly once, windows with their halo."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest

from napari_wbc.pixels import read_window
from napari_wbc.tiling import tile_grid


@pytest.mark.parametrize(
    "block, halo, align", [(100, 0, 1), (64, 17, 1), (90, 30, 4), (1000, 5, 3)]
)
def test_every_point_is_owned_by_exactly_one_tile(block, halo, align):
    shape = (250, 333)
    tiles = tile_grid(shape, block, halo, align)
    rng = np.random.default_rng(0)
    # Random points, points on every half-pixel boundary, and points just outside the image.
    ys = np.concatenate(
        [rng.uniform(-0.49, 249.49, 500), np.arange(-0.5, 250, 0.5), [-0.4, 249.9]]
    )
    xs = np.concatenate(
        [rng.uniform(-0.49, 332.49, 500), np.arange(-0.5, 250, 0.5), [332.9, -0.5]]
    )
    owners = np.stack([tile.owns(ys, xs) for tile in tiles])
    assert (owners.sum(axis=0) == 1).all()
    # The owner is the tile whose block holds the pixel of the centre.
    for k in rng.choice(len(ys), 50):
        tile = tiles[int(np.argmax(owners[:, k]))]
        y0, y1, x0, x1 = tile.block
        py, px = np.floor(ys[k] + 0.5), np.floor(xs[k] + 0.5)
        assert (y0 <= py < y1 or py < 0 or py >= shape[0]) and (
            x0 <= px < x1 or px < 0 or px >= shape[1]
        )


def test_windows_hold_block_and_halo_inside_the_image_on_the_grid():
    shape = (250, 333)
    tiles = tile_grid(shape, 90, 30, align=4)
    assert [t.index for t in tiles] == list(range(len(tiles))) and len(tiles) == 3 * 4
    covered = np.zeros(shape, int)
    for t in tiles:
        y0, y1, x0, x1 = t.block
        wy0, wy1, wx0, wx1 = t.window
        covered[y0:y1, x0:x1] += 1
        assert wy0 % 4 == 0 and wx0 % 4 == 0
        assert 0 <= wy0 <= max(y0 - 30, 0) and min(y1 + 30, shape[0]) == wy1
        assert 0 <= wx0 <= max(x0 - 30, 0) and min(x1 + 30, shape[1]) == wx1
        assert t.origin == (wy0, wx0)
    assert (covered == 1).all()


def test_grid_does_not_depend_on_chunks_and_windows_read_the_same_pixels():
    image = np.random.default_rng(1).integers(0, 256, (250, 333, 3), dtype=np.uint8)
    uneven = da.from_array(image, chunks=((70, 13, 167), (100, 1, 232), 3))
    tiles = tile_grid(uneven.shape, 64, 20)
    assert tiles == tile_grid(image.shape, 64, 20)
    for t in tiles:
        np.testing.assert_array_equal(read_window(uneven, t.window), read_window(image, t.window))


def test_select_keeps_the_owned_rows():
    tiles = tile_grid((100, 100), 50, 10)
    table = pd.DataFrame(
        {"y": [10.0, 49.4, 49.5, 99.9], "x": [10.0, 10.0, 10.0, 60.0], "id": range(4)}
    )
    assert tiles[0].select(table)["id"].tolist() == [0, 1]
    assert tiles[2].select(table)["id"].tolist() == [2]
    assert tiles[3].select(table)["id"].tolist() == [3]


def test_bad_grids_are_refused():
    with pytest.raises(ValueError, match="block"):
        tile_grid((10, 10), 0)
    with pytest.raises(ValueError, match="halo"):
        tile_grid((10, 10), 5, -1)
