"""Pixel helpers: windows on a fixed grid, reading them from numpy or dask, signals."""

from __future__ import annotations

import dask.array as da
import numpy as np

from napari_wbc.pixels import as_dask_rgb, downsample, grid_windows, read_window


def test_grid_windows_depend_on_shape_only_and_stay_inside():
    boxes = grid_windows((5000, 3000), window=1024, max_windows=6)
    assert len(boxes) == 6
    assert boxes == grid_windows((5000, 3000), window=1024, max_windows=6)
    for y0, y1, x0, x1 in boxes:
        assert 0 <= y0 < y1 <= 5000 and 0 <= x0 < x1 <= 3000
        assert (y1 - y0, x1 - x0) == (1024, 1024)
    # A small image is one window of its own size.
    assert grid_windows((480, 640)) == [(0, 480, 0, 640)]


def test_read_window_is_the_same_from_numpy_and_uneven_dask_chunks():
    image = np.random.default_rng(0).integers(0, 256, (300, 410, 3), dtype=np.uint8)
    lazy = da.from_array(image, chunks=((100, 37, 163), (200, 11, 199), 3))
    for box in [(0, 300, 0, 410), (90, 140, 190, 220), (299, 300, 0, 1)]:
        np.testing.assert_array_equal(read_window(lazy, box), read_window(image, box))
    assert as_dask_rgb(lazy) is lazy
    np.testing.assert_array_equal(as_dask_rgb(image).compute(), image)


def test_downsample_means_blocks_and_repeats_the_edge():
    rgb = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    out = downsample(rgb, 2)
    assert out.shape == (3, 2, 3)
    np.testing.assert_allclose(out[0, 0], rgb[:2, :2].mean(axis=(0, 1)))
    np.testing.assert_allclose(out[2, 1], rgb[4, 2:4].mean(axis=0))


def test_downsample_of_8_bit_images_equals_the_float_block_mean():
    rng = np.random.default_rng(0)
    for shape, factor in [((64, 96, 3), 3), ((37, 50, 3), 16), ((101, 77, 3), 4)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        fast = downsample(image, factor)  # the 8-bit path
        reference = downsample(image.astype(np.float64), factor)  # the float path
        assert fast.dtype == np.float32
        np.testing.assert_array_equal(fast, reference)
