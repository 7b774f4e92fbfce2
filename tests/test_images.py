"""Reading smears lazily, the documented conversions, and refusals."""

import dask.array as da
import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_wbc._napari import get_reader
from napari_wbc.errors import ImageReadError
from napari_wbc.images import as_rgb8, read_smear


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif"])
def test_lossless_formats_round_trip(tmp_path, rgb, suffix):
    path = tmp_path / f"img{suffix}"
    if suffix == ".tif":
        tifffile.imwrite(path, rgb, photometric="rgb")
    else:
        Image.fromarray(rgb).save(path)
    smear = read_smear(path)
    assert isinstance(smear.data, da.Array)
    np.testing.assert_array_equal(smear.data.compute(), rgb)
    assert smear.conversions == []


def test_jpeg_reads_as_rgb(tmp_path, rgb):
    path = tmp_path / "img.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    out = read_smear(path).data.compute()
    assert out.shape == rgb.shape and out.dtype == np.uint8


def test_pyramidal_tiff_is_lazy_multiscale_with_pixel_size(tmp_path):
    base = np.random.default_rng(1).integers(0, 256, (1024, 768, 3), dtype=np.uint8)
    path = tmp_path / "pyr.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        opts = dict(tile=(256, 256), photometric="rgb")
        tw.write(
            base,
            subifds=2,
            resolution=(1e4 / 0.25, 1e4 / 0.25),
            resolutionunit="CENTIMETER",
            **opts,
        )
        tw.write(base[::2, ::2], subfiletype=1, **opts)
        tw.write(base[::4, ::4], subfiletype=1, **opts)
    smear = read_smear(path)
    assert [lvl.shape for lvl in smear.levels] == [(1024, 768, 3), (512, 384, 3), (256, 192, 3)]
    assert smear.pixel_size_um == pytest.approx(0.25)
    # Lazy: chunks follow the file's tiles instead of one big array.
    assert smear.levels[0].chunksize[:2] == (256, 256)
    np.testing.assert_array_equal(smear.levels[1].compute(), base[::2, ::2])
    layers = get_reader(str(path))(str(path))
    _data, kwargs, kind = layers[0]
    assert kind == "image" and kwargs["multiscale"] and kwargs["rgb"]
    assert kwargs["scale"] == pytest.approx((0.25, 0.25))


def test_ome_pixel_size(tmp_path, rgb):
    path = tmp_path / "img.ome.tif"
    tifffile.imwrite(
        path,
        rgb,
        photometric="rgb",
        metadata={"axes": "YXS", "PhysicalSizeX": 0.12, "PhysicalSizeY": 0.12},
    )
    assert read_smear(path).pixel_size_um == pytest.approx(0.12)


def test_camera_dpi_is_not_taken_as_pixel_size(tmp_path, rgb):
    path = tmp_path / "img.jpg"
    Image.fromarray(rgb).save(path, dpi=(72, 72))
    assert read_smear(path).pixel_size_um is None


def test_large_single_level_image_gets_lazy_pyramid(tmp_path):
    path = tmp_path / "big.tif"
    tifffile.imwrite(
        path, shape=(9000, 300, 3), dtype=np.uint8, photometric="rgb", tile=(512, 512)
    )
    smear = read_smear(path)
    assert smear.multiscale
    assert max(smear.levels[-1].shape[:2]) <= 1024


def test_grayscale_is_repeated_to_rgb(tmp_path):
    gray = np.arange(64 * 80, dtype=np.uint8).reshape(64, 80)
    path = tmp_path / "gray.png"
    Image.fromarray(gray).save(path)
    smear = read_smear(path)
    out = smear.data.compute()
    assert out.shape == (64, 80, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)
    assert any("grayscale" in c for c in smear.conversions)


def test_rgba_is_composited_on_white(tmp_path, rgb):
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, :45] = 255  # left half opaque, right half transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([rgb, alpha])).save(path)
    out = read_smear(path).data.compute()
    np.testing.assert_array_equal(out[:, :45], rgb[:, :45])
    assert (out[:, 45:] == 255).all()


def test_16bit_is_scaled_to_8bit(tmp_path):
    img16 = np.zeros((32, 32, 3), np.uint16)
    img16[0, 0] = 65535
    img16[0, 1] = 32896  # half range
    path = tmp_path / "img16.tif"
    tifffile.imwrite(path, img16, photometric="rgb")
    smear = read_smear(path)
    out = smear.data.compute()
    assert out.dtype == np.uint8
    assert out[0, 0, 0] == 255 and out[0, 1, 0] == 128 and out[1, 1, 0] == 0
    assert any("16-bit" in c for c in smear.conversions)


def test_float_in_unit_range_is_scaled():
    img = np.full((10, 10, 3), 0.5, np.float32)
    out, notes = as_rgb8(img)
    assert out.dtype == np.uint8 and (out == 128).all()
    assert notes


def test_float_out_of_range_is_refused():
    with pytest.raises(ImageReadError, match="expected 0–1 or 0–255"):
        as_rgb8(np.full((10, 10, 3), 1000.0))


@pytest.mark.parametrize(
    "shape, match",
    [((10, 10, 2), "2 channels"), ((10, 10, 5), "5 channels"), ((0, 10, 3), "empty")],
)
def test_bad_shapes_are_refused(shape, match):
    with pytest.raises(ImageReadError, match=match):
        as_rgb8(np.zeros(shape, np.uint8))


def test_z_stack_is_refused(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(
        path, np.zeros((4, 32, 32), np.uint8), photometric="minisblack", metadata={"axes": "ZYX"}
    )
    with pytest.raises(ImageReadError, match="4 planes"):
        read_smear(path)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty file"):
        read_smear(path)


def test_non_image_file_is_refused(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are my notes, not a picture\n" * 20)
    with pytest.raises(ImageReadError, match="not an image"):
        read_smear(path)


def test_corrupt_tiff_is_refused(tmp_path):
    path = tmp_path / "bad.tif"
    path.write_bytes(b"II*\x00" + b"\x07" * 200)
    with pytest.raises(ImageReadError, match=r"not a readable TIFF|no readable image|cannot read"):
        read_smear(path)


def test_truncated_jpeg_is_refused(tmp_path, rgb):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.tile(rgb, (4, 4, 1))).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        read_smear(path)


def test_truncated_tiff_is_refused(tmp_path, rgb):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, np.tile(rgb, (8, 8, 1)), photometric="rgb", compression="zlib")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError):
        read_smear(path)


def test_unsupported_extension_and_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_smear(tmp_path / "nope.png")
    other = tmp_path / "table.csv"
    other.write_text("a,b\n")
    with pytest.raises(ImageReadError, match="unsupported file type"):
        read_smear(other)
    assert get_reader(str(other)) is None


def test_overlapping_windows_of_a_tiled_tiff_decode_each_tile_once(tmp_path):
    from napari_wbc.images import CachedChunks

    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb", compression="zlib")
    smear = read_smear(path)
    try:
        cache = next(
            v for v in smear.data.dask.values() if isinstance(v, CachedChunks)
        )  # the full-resolution level's store, wrapped
        start = cache.reads  # opening the file touched one pixel
        # Blocks of 128 px with a 40 px halo, in raster order, as the pipeline reads them.
        for y0 in (0, 128):
            for x0 in (0, 128):
                ys, xs = slice(max(y0 - 40, 0), y0 + 168), slice(max(x0 - 40, 0), x0 + 168)
                window = np.asarray(smear.data[ys, xs].compute())
                np.testing.assert_array_equal(window, image[ys, xs])
        # Each of the 4 x 4 tiles at most once (36 tile reads without the cache).
        assert cache.reads - start <= 16
        tile = cache[(slice(0, 64), slice(0, 64), slice(0, 3))]
        with pytest.raises(ValueError):
            tile[0, 0, 0] = 1  # what is kept cannot be changed by a caller
    finally:
        smear.close()


def test_tile_cache_keeps_at_most_its_bytes():
    from napari_wbc.images import CachedChunks

    data = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    cache = CachedChunks(data, max_bytes=2 * 16 * 16)
    for y in range(0, 64, 16):
        np.testing.assert_array_equal(
            cache[(slice(y, y + 16), slice(0, 16))], data[y : y + 16, :16]
        )
    assert cache.reads == 4 and cache._bytes <= 2 * 16 * 16
    cache[(slice(48, 64), slice(0, 16))]  # the most recent: kept
    assert cache.reads == 4
    cache[(slice(0, 16), slice(0, 16))]  # the oldest: read again
    assert cache.reads == 5
    # Anything but plain slices goes straight through.
    np.testing.assert_array_equal(cache[(slice(0, 8, 2), 3)], data[0:8:2, 3])


def test_tiff_tiles_can_travel_to_another_process(tmp_path):
    import pickle

    from napari_wbc.images import CachedChunks

    image = np.random.default_rng(5).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb")
    smear = read_smear(path)
    try:
        cache = next(v for v in smear.data.dask.values() if isinstance(v, CachedChunks))
        back = pickle.loads(pickle.dumps(cache))  # as a dask worker receives it
        np.testing.assert_array_equal(
            back[(slice(64, 128), slice(0, 64), slice(0, 3))], image[64:, :64]
        )
        assert pickle.loads(pickle.dumps(cache)) is back  # the file is opened once
    finally:
        smear.close()
    with pytest.raises(TypeError, match="cannot leave its process"):
        pickle.dumps(CachedChunks(np.zeros((4, 4)), 100))


@pytest.mark.slow
def test_a_tiff_is_read_in_a_session_whose_default_scheduler_is_a_cluster(tmp_path):
    from dask.distributed import Client, LocalCluster

    image = np.random.default_rng(6).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    path = tmp_path / "tiled.tif"
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb", compression="zlib")
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster),
    ):  # the default scheduler from here on
        smear = read_smear(path)
        try:
            window = smear.data[40:200, 10:170].compute()
        finally:
            smear.close()
    np.testing.assert_array_equal(np.asarray(window), image[40:200, 10:170])
