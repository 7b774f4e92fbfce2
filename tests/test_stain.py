"""Seam-free stain normalization."""

import dask.array as da
import numpy as np
import pytest

from napari_wbc.errors import StainError
from napari_wbc.progress import run
from napari_wbc.stain import (
    StainNormalizer,
    StainReference,
    default_reference,
    fit_stain_reference,
    iter_fit_stain_reference,
    iter_normalize,
    normalize,
    normalize_array,
)

# Unit optical-density vectors of two made-up stains per "lab".
SRC = np.array([[0.30, 0.20], [0.80, 0.90], [0.52, 0.39]])
TGT = np.array([[0.72, 0.42], [0.66, 0.90], [0.21, 0.08]])
SRC /= np.linalg.norm(SRC, axis=0)
TGT /= np.linalg.norm(TGT, axis=0)


def _angle(a, b):
    a, b = np.asarray(a), np.asarray(b)
    cos = np.sum(a * b, axis=0) / np.linalg.norm(a, axis=0) / np.linalg.norm(b, axis=0)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))


def test_fit_recovers_the_stain_vectors(make_stained):
    img = make_stained(TGT, shape=(300, 300))
    ref = fit_stain_reference(img)
    assert np.all(_angle(ref.matrix, TGT) < 6), _angle(ref.matrix, TGT)
    np.testing.assert_allclose(ref.background, (240, 235, 238), atol=3)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_tiled_equals_whole_with_uneven_chunks(make_stained, method):
    img = make_stained(SRC, shape=(203, 311), seed=3)
    target = fit_stain_reference(make_stained(TGT, shape=(300, 300), seed=4))
    whole = normalize(img, method, target)
    lazy = normalize(da.from_array(img, chunks=((50, 100, 53), (7, 150, 154), (3,))), method, target)
    assert isinstance(lazy, da.Array)
    tiled = lazy.compute()
    assert tiled.dtype == np.uint8 and tiled.shape == img.shape
    assert np.abs(tiled.astype(int) - whole.astype(int)).max() <= 1


def test_no_seams_across_tile_borders(make_stained):
    # A smooth gradient of stain across the image must stay smooth after
    # tiled normalization: the jump at a tile border is no bigger than inside.
    h, w = 64, 256
    conc = np.linspace(0.2, 1.2, w)[None, :].repeat(h, 0)
    od = np.einsum("c,hw->hwc", SRC[:, 0], conc) + np.einsum("c,hw->hwc", SRC[:, 1], conc / 2)
    img = np.clip(np.rint(240 * np.exp(-od)), 0, 255).astype(np.uint8)
    source = fit_stain_reference(make_stained(SRC, shape=(300, 300)))
    norm = StainNormalizer("macenko", source, default_reference())
    out = normalize_array(da.from_array(img, chunks=(32, 64, 3)), norm).compute().astype(int)
    steps = np.abs(np.diff(out, axis=1)).max(axis=(0, 2))
    border_steps = steps[63::64][:3]
    assert border_steps.max() <= np.median(steps) + 1


def test_blank_tiles_pass_through_unchanged(make_stained):
    img = make_stained(SRC, shape=(128, 256), seed=1)
    img[:, :64] = 250  # glass-only tiles on the left
    img[:64, 64:128] = 255
    out = normalize(da.from_array(img, chunks=(64, 64, 3)), "macenko").compute()
    np.testing.assert_array_equal(out[:, :64], img[:, :64])
    np.testing.assert_array_equal(out[:64, 64:128], img[:64, 64:128])
    assert not np.array_equal(out, img)  # stained parts did change


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalized_image_moves_towards_reference(make_stained, method):
    target = fit_stain_reference(make_stained(TGT, shape=(300, 300), seed=5))
    img = make_stained(SRC, shape=(300, 300), seed=6)
    before = fit_stain_reference(img)
    after = fit_stain_reference(normalize(img, method, target))
    if method == "macenko":
        assert _angle(after.matrix, target.matrix).max() < 6
        assert _angle(before.matrix, target.matrix).min() > 15
        np.testing.assert_allclose(after.max_concentrations, target.max_concentrations, rtol=0.15)
        return
    dist_before = np.abs(np.subtract(before.lab_mean, target.lab_mean)).sum()
    dist_after = np.abs(np.subtract(after.lab_mean, target.lab_mean)).sum()
    assert dist_after < 0.5 * dist_before


def test_none_method_is_identity(make_stained):
    img = make_stained(SRC)
    np.testing.assert_array_equal(normalize(img, "none"), img)


def test_all_white_or_blank_image_gets_a_clear_error():
    with pytest.raises(StainError, match="looks blank"):
        fit_stain_reference(np.full((100, 100, 3), 255, np.uint8))
    with pytest.raises(StainError, match="cannot normalize this image"):
        normalize(np.full((100, 100, 3), 240, np.uint8), "macenko")
    with pytest.raises(StainError, match="empty"):
        fit_stain_reference(np.zeros((0, 3), np.uint8))


def test_dark_image_without_glass_is_refused():
    with pytest.raises(StainError, match="bare glass"):
        fit_stain_reference(np.full((50, 50, 3), 20, np.uint8))


def test_unknown_method_and_wrong_dtype():
    with pytest.raises(StainError, match="unknown stain method"):
        normalize(np.zeros((4, 4, 3), np.uint8), "vahadane2")
    norm = StainNormalizer("none", None, None)
    with pytest.raises(StainError, match="8-bit RGB"):
        norm(np.zeros((4, 4, 3), np.float32))


def test_reference_round_trip_and_validation():
    ref = default_reference()
    assert StainReference.from_dict(ref.to_dict()) == ref
    bad = ref.to_dict()
    bad["stain_matrix"] = [[1, 2]]
    with pytest.raises(StainError, match="3×2"):
        StainReference.from_dict(bad)
    with pytest.raises(StainError, match="invalid stain reference"):
        StainReference.from_dict({"lab_mean": [1, 2, 3]})


def test_default_reference_is_a_pbc_like_stain():
    ref = default_reference()
    # Hematoxylin absorbs red relatively more than eosin; PBC's glass is cream.
    h, e = ref.matrix[:, 0], ref.matrix[:, 1]
    assert h[0] / h[1] > e[0] / e[1]
    assert ref.background[0] > ref.background[2]
    assert "PBC" in ref.description


def test_fit_on_lazy_image_is_chunking_independent_and_reads_few_windows(make_stained):
    img = np.tile(make_stained(SRC, shape=(300, 300), seed=2), (7, 7, 1))  # 9 windows of 1024
    events = []
    ref = run(
        iter_fit_stain_reference(da.from_array(img, chunks=(50, 70, 3)), max_pixels=20_000),
        events.append,
    )
    assert isinstance(ref, StainReference)
    sample_events = [e for e in events if e.stage == "sample"]
    assert sample_events[-1].done == sample_events[-1].total == 9
    assert events[-1].stage == "fit"
    same = run(iter_fit_stain_reference(img, max_pixels=20_000))
    assert same == ref
    from napari_wbc.stain import iter_sample_pixels

    few = run(iter_sample_pixels(img, max_pixels=1000, max_windows=3))
    assert len(few) <= 1000


def test_iter_normalize_keeps_levels_lazy(make_stained):
    img = make_stained(SRC, shape=(256, 256))
    levels = [da.from_array(img, chunks=64), da.from_array(img[::2, ::2], chunks=64)]
    out = run(iter_normalize(levels, "macenko"))
    assert all(isinstance(o, da.Array) for o in out)
    assert [o.shape for o in out] == [lvl.shape for lvl in levels]
