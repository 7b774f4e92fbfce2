"""Seam-free stain normalization."""

import dask.array as da
import numpy as np
import pytest

from napari_wbc.errors import StainError
from napari_wbc.progress import run
from napari_wbc.stain import (
    DEFAULT_METHOD,
    StainNormalizer,
    StainReference,
    default_reference,
    fit_stain_reference,
    iter_fit_stain_reference,
    iter_normalize,
    normalize,
    normalize_array,
    segment_pixels,
)
from napari_wbc.synthetic import make_sample_smear, sample_smear_truth

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


@pytest.mark.parametrize("method", ["macenko", "reinhard", "regions"])
def test_tiled_equals_whole_with_uneven_chunks(make_stained, method):
    if method == "regions":  # needs nuclei and red cells: a smear, onto the built-in reference
        img, target = make_sample_smear()[120:323, 690:1001].copy(), None  # round a lymphocyte
    else:
        img = make_stained(SRC, shape=(203, 311), seed=3)
        target = fit_stain_reference(make_stained(TGT, shape=(300, 300), seed=4))
    whole = normalize(img, method, target)
    lazy = normalize(
        da.from_array(img, chunks=((50, 100, 53), (7, 150, 154), (3,))), method, target
    )
    assert isinstance(lazy, da.Array)
    tiled = lazy.compute()
    assert tiled.dtype == np.uint8 and tiled.shape == img.shape
    assert np.abs(tiled.astype(int) - whole.astype(int)).max() <= 1
    assert not np.array_equal(whole, img)


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
    bad["methods"]["macenko"]["stain_matrix"] = [[1, 2]]
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


# ------------------------------------------------- fits that see the right pixels


@pytest.fixture(scope="module")
def sample():
    return make_sample_smear(), sample_smear_truth()


def _wbc_mask(shape, truth):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = np.zeros(shape[:2], bool)
    for c in truth[truth.kind == "wbc"].itertuples():
        mask |= (yy - c.y) ** 2 + (xx - c.x) ** 2 < (c.diameter / 2) ** 2
    return mask.reshape(-1)


def _region_delta_e(before, after, masks):
    from skimage.color import deltaE_ciede2000, rgb2lab

    out = {}
    for name, m in masks.items():
        a = rgb2lab(before.reshape(-1, 3)[m][None] / 255.0)
        b = rgb2lab(after.reshape(-1, 3)[m][None] / 255.0)
        out[name] = float(deltaE_ciede2000(a, b).mean())
    return out


def test_segmentation_finds_nuclei_inside_white_cells_and_red_cells_outside(sample):
    image, truth = sample
    regions = segment_pixels(image.reshape(-1, 3))
    wbc = _wbc_mask(image.shape, truth)
    assert regions.nucleus.sum() > 5000
    assert (
        regions.nucleus & wbc
    ).sum() / regions.nucleus.sum() > 0.9  # others: cells cut by the border
    assert regions.rbc.sum() > 20 * regions.nucleus.sum()
    assert (regions.rbc & ~wbc).sum() / regions.rbc.sum() > 0.95
    assert not (regions.glass & regions.stained).any()
    balanced = regions.balanced(per_region=3000)
    assert regions.nucleus[balanced].sum() == regions.rbc[balanced].sum() == 3000


def test_sample_onto_built_in_reference_is_near_identity(sample):
    """A PBC-like image normalized onto the PBC reference keeps its colours."""
    image, truth = sample
    out = normalize(image, DEFAULT_METHOD)
    regions = segment_pixels(image.reshape(-1, 3))
    wbc = _wbc_mask(image.shape, truth)
    de = _region_delta_e(image, out, {"rbc": regions.rbc & ~wbc, "nucleus": regions.nucleus & wbc})
    assert de["rbc"] <= 5 and de["nucleus"] <= 8, de
    glass = regions.glass
    np.testing.assert_array_equal(out.reshape(-1, 3)[glass], image.reshape(-1, 3)[glass])


def _restain(image, matrix):
    """The same smear as another lab's stain and lamp would show it (Beer–Lambert)."""
    bg = np.array([255.0, 232.0, 206.0])
    od = -np.log((image.astype(float) + 1) / (bg + 1))
    lamp = np.array([205.0, 208.0, 206.0])  # grey glass
    return np.clip(np.rint(lamp * np.exp(-od @ matrix.T)), 0, 255).astype(np.uint8)


def test_other_lab_moves_towards_the_reference_colours(sample):
    """A bluer stain under a grey lamp: nuclei come back purple, red cells pink."""
    from skimage.color import deltaE_ciede2000, rgb2lab

    image, truth = sample
    bluer = np.array([[1.25, 0.15, 0.0], [0.0, 0.7, 0.0], [0.0, 0.25, 0.55]])
    other = _restain(image, bluer)
    regions = segment_pixels(image.reshape(-1, 3))
    wbc = _wbc_mask(image.shape, truth)
    masks = {"rbc": regions.rbc & ~wbc, "nucleus": regions.nucleus & wbc}
    out = normalize(other, DEFAULT_METHOD)

    def mean_lab(img, m):
        return rgb2lab(img.reshape(-1, 3)[m][None] / 255.0)[0].mean(axis=0)

    for name, m in masks.items():
        ref = mean_lab(image, m)
        before = deltaE_ciede2000(mean_lab(other, m), ref)
        after = deltaE_ciede2000(mean_lab(out, m), ref)
        assert after < 0.5 * before and after < 6, (name, before, after)
    nucleus = mean_lab(out, masks["nucleus"])
    assert 280 <= np.degrees(np.arctan2(nucleus[2], nucleus[1])) % 360 <= 350  # purple-violet


def test_red_cells_only_are_refused_with_a_reason_and_fall_back(sample, caplog):
    image, _ = sample
    regions = segment_pixels(image.reshape(-1, 3))
    keep = (regions.rbc | regions.glass).reshape(image.shape[:2])
    no_wbc = np.where(keep[..., None], image, image[0, 0])  # only red cells and glass left
    ref = fit_stain_reference(no_wbc)
    assert "regions" not in ref.stats
    assert "nucleus" in ref.refused["regions"]
    with caplog.at_level("WARNING", logger="napari_wbc.stain"):
        norm = StainNormalizer("regions", ref, default_reference())
    assert norm.requested == "regions" and norm.method == "none"
    assert "nucleus" in norm.fallback_reason and "refused" in caplog.text
    np.testing.assert_array_equal(norm(no_wbc[:64, :64]), no_wbc[:64, :64])


def test_implausible_stain_statistics_are_refused():
    from napari_wbc.stain import StainFitError, get_stain_method

    regions = get_stain_method("regions")
    good = default_reference().stats["regions"]
    with pytest.raises(StainFitError, match="same hue"):
        regions.validate({**good, "nucleus_od": [2 * v for v in good["rbc_od"]]})
    with pytest.raises(StainFitError, match="darker"):
        regions.validate({**good, "nucleus_od": [0.1, 0.2, 0.02]})
    with pytest.raises(StainFitError, match="purple"):
        regions.validate({**good, "nucleus_od": [0.2, 1.2, 1.5]})  # a yellow "nucleus"
    with pytest.raises(StainFitError, match="purple"):
        regions.validate({**good, "nucleus_od": [1.4, 0.5, 1.2]})  # a green "nucleus"
    with pytest.raises(StainFitError, match="grey or black"):
        regions.validate({**good, "nucleus_od": [3.0, 3.3, 2.9]})  # black padding
    with pytest.raises(StainFitError, match="collinear"):
        get_stain_method("macenko").validate(
            {"stain_matrix": [[0.6, 0.61], [0.7, 0.7], [0.3, 0.3]], "max_concentrations": [1, 1]}
        )


def test_legacy_references_are_read():
    legacy = {
        "stain_matrix": TGT.tolist(),
        "max_concentrations": [1.2, 2.5],
        "lab_mean": [60.0, 20.0, -5.0],
        "lab_std": [15.0, 10.0, 18.0],
        "background": [255.0, 230.0, 204.0],
        "description": "an old sidecar",
    }
    ref = StainReference.from_dict(legacy)
    assert set(ref.stats) == {"macenko", "reinhard"}
    np.testing.assert_allclose(ref.matrix, TGT)
    # Without region statistics, "regions" falls back instead of failing.
    assert StainNormalizer("regions", ref, default_reference()).method == "none"
    # The built-in reference as model files of format 1 embed it: today's built-in one.
    builtin = {
        **legacy,
        "description": "PBC (Acevedo et al. 2020), 320 crops, 40 per class, seed 0",
    }
    assert StainReference.from_dict(builtin) == default_reference()


def test_built_in_reference_has_every_built_in_method():
    ref = default_reference()
    assert {"regions", "macenko", "reinhard"} <= set(ref.stats)
    assert not ref.refused
    assert ref.to_dict()["format_version"] == 2


@pytest.mark.realdata
def test_other_labs_nuclei_turn_purple_and_red_cells_pink(data_dir):
    """BCCD fields (a bluer stain under a grey lamp) come out like PBC."""
    import pandas as pd
    from PIL import Image
    from skimage.color import deltaE_ciede2000, rgb2lab

    boxes = pd.read_csv(data_dir / "bccd" / "boxes.csv")
    wbc = boxes[boxes.label == "WBC"]
    ref = {"rbc": np.array([73.0, 14.0, 5.0]), "nucleus": np.array([33.0, 39.0, -41.0])}
    for path in sorted(wbc.path.unique())[:6]:
        img = np.asarray(Image.open(data_dir / "bccd" / path).convert("RGB"))
        inside = np.zeros(img.shape[:2], bool)
        for b in wbc[wbc.path == path].itertuples():
            inside[b.y : b.y + b.h, b.x : b.x + b.w] = True
        regions = segment_pixels(img.reshape(-1, 3))
        masks = {"rbc": regions.rbc & ~inside.ravel(), "nucleus": regions.nucleus & inside.ravel()}
        out = normalize(img, DEFAULT_METHOD)
        for name, m in masks.items():
            before = rgb2lab(img.reshape(-1, 3)[m][None] / 255.0)[0].mean(axis=0)
            after = rgb2lab(out.reshape(-1, 3)[m][None] / 255.0)[0].mean(axis=0)
            assert deltaE_ciede2000(after, ref[name]) < deltaE_ciede2000(before, ref[name]), path
            hue = np.degrees(np.arctan2(after[2], after[1])) % 360
            if name == "nucleus":
                assert 280 <= hue <= 350, (path, hue)
            else:
                assert hue >= 345 or hue <= 60, (path, hue)


@pytest.mark.parametrize("method", ["regions", "macenko", "reinhard"])
def test_colour_table_gives_exactly_the_arithmetic(method):
    image = make_sample_smear()
    source = fit_stain_reference(image)
    norm = StainNormalizer(method, source, default_reference())
    rng = np.random.default_rng(0)
    # Every kind of colour: random ones and the smear's own.
    tile = np.concatenate(
        [rng.integers(0, 256, (64, 256, 3), dtype=np.uint8), image[:64, :256]], axis=0
    )
    arithmetic = norm._transform(tile.reshape(-1, 3)).reshape(tile.shape)
    first = norm(tile)  # fills the table with the tile's colours
    assert norm._known.sum() == len(np.unique(tile.reshape(-1, 3), axis=0))
    again = norm(tile)  # looked up
    assert again.dtype == np.uint8 and again.shape == tile.shape
    np.testing.assert_array_equal(first, arithmetic)
    np.testing.assert_array_equal(again, arithmetic)
    assert not np.array_equal(arithmetic, tile)  # the transform did change colours
