"""Tests of the synthetic smear generator (napari_wbc.synthetic)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_wbc.errors import WBCError
from napari_wbc.synthetic import (
    SAMPLE_SHAPE,
    WBC_CLASSES,
    SmearParams,
    SmearParamsError,
    lazy_smear,
    make_sample_smear,
    make_smear,
    sample_smear_truth,
    smear_truth,
)

# A field with many white cells of every class, rendered once for several tests.
DENSE = {"wbc_per_mpx": 9.0, "class_weights": dict.fromkeys(WBC_CLASSES, 1.0)}
FIELD_SHAPE = (700, 1500)  # wider than tall, so swapping x and y would show
FIELD_SEED = 11


@pytest.fixture(scope="module")
def field():
    image = make_smear(FIELD_SHAPE, FIELD_SEED, **DENSE)
    truth = smear_truth(FIELD_SHAPE, FIELD_SEED, **DENSE)
    return image, truth


def _disc(shape, y, x, radius):
    """Boolean mask of a disc."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - y) ** 2 + (xx - x) ** 2 <= radius**2


def _interior(shape, margin=80):
    """Pixels farther than ``margin`` from the border.

    Objects centred outside the image show near its border but are not in the
    truth table, so checks of "nothing here" stay away from the border.
    """
    mask = np.zeros(shape, bool)
    mask[margin:-margin, margin:-margin] = True
    return mask


def _object_mask(shape, truth, grow):
    """Pixels within (radius + grow) of any object in the truth table."""
    mask = np.zeros(shape, bool)
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    for row in truth.itertuples():
        r = row.diameter / 2 + grow
        y0, y1 = max(int(row.y - r), 0), min(int(row.y + r) + 2, shape[0])
        x0, x1 = max(int(row.x - r), 0), min(int(row.x + r) + 2, shape[1])
        if y0 >= y1 or x0 >= x1:
            continue
        mask[y0:y1, x0:x1] |= (yy[y0:y1] - row.y) ** 2 + (xx[:, x0:x1] - row.x) ** 2 <= r * r
    return mask


def test_shape_and_dtype():
    image = make_smear((97, 131), seed=3)
    assert image.shape == (97, 131, 3)
    assert image.dtype == np.uint8
    assert make_smear((1, 1)).shape == (1, 1, 3)


def test_same_seed_same_image_and_other_seed_differs():
    a = make_smear((256, 320), seed=5)
    b = make_smear((256, 320), seed=5)
    c = make_smear((256, 320), seed=6)
    np.testing.assert_array_equal(a, b)
    # Not just different noise: the red cells moved.
    assert np.mean(np.abs(a.astype(int) - c.astype(int)).sum(-1) > 30) > 0.1


def test_image_is_a_window_onto_one_plane():
    # A smaller image is the top-left corner of a larger one: objects, noise and
    # illumination depend on global position only.
    small = make_smear((300, 410), seed=2)
    large = make_smear((1100, 1300), seed=2)
    np.testing.assert_array_equal(small, large[:300, :410])


@pytest.mark.parametrize(
    "chunks",
    [
        ((300, 451, 349), (1, 640, 599, 60)),  # uneven, including a 1-px block
        257,
        (173, 1300),
    ],
)
def test_lazy_equals_eager_exactly(chunks):
    shape = (1100, 1300)
    eager = make_smear(shape, seed=4, **DENSE)
    lazy = lazy_smear(shape, seed=4, chunks=chunks, **DENSE)
    assert lazy.dtype == np.uint8
    assert lazy.shape == (*shape, 3)
    assert lazy.chunks[2] == (3,)
    assert isinstance(lazy._meta, np.ndarray)
    np.testing.assert_array_equal(lazy.compute(), eager)


@pytest.mark.parametrize("seed", [0, 3])
def test_small_blocks_have_no_seams_at_object_edges(seed):
    # Many block borders through big, irregular monocytes and many platelets:
    # an object that pokes into a block must be drawn there too.
    params = {
        "wbc_per_mpx": 9.0,
        "class_weights": {"monocyte": 1.0},
        "platelets_per_mpx": 200.0,
    }
    shape = (600, 900)
    eager = make_smear(shape, seed, **params)
    lazy = lazy_smear(shape, seed, chunks=(37, 83), **params)
    np.testing.assert_array_equal(lazy.compute(), eager)


def test_objects_draw_only_within_the_extent_blocks_assume():
    # Seam-free blocks rest on this: a block draws every object whose declared
    # extent reaches it, so nothing may be drawn beyond that extent.
    from napari_wbc import synthetic as syn

    p = SmearParams()
    for k in range(100):
        label = WBC_CLASSES[k % 5]
        r = 75.0 if label == "monocyte" else 65.0
        T = np.ones((400, 400, 3), np.float32)
        syn._draw_wbc(T, 0, 0, (200.3, 199.6, 2 * r, label, label, k), p)
        ys, xs = np.nonzero((T != 1).any(-1))
        reach = np.maximum(np.abs(ys - 200.3), np.abs(xs - 199.6)).max()
        assert r < reach <= syn._wbc_extent(r, p), (label, k)
        T = np.ones((60, 60, 3), np.float32)
        syn._draw_platelet(T, 0, 0, (30.2, 29.7, 20.0, k), p)
        ys, xs = np.nonzero((T != 1).any(-1))
        reach = np.maximum(np.abs(ys - 30.2), np.abs(xs - 29.7)).max()
        assert reach <= syn._platelet_extent(10.0, p), k


def test_far_window_of_huge_lazy_smear_is_chunking_independent():
    # Far from the origin (large coordinates) and without rendering the rest.
    lazy = lazy_smear((30000, 30000), seed=1, chunks=1024)
    assert lazy.shape == (30000, 30000, 3)
    window = lazy[20100:20300, 15000:15150].compute()
    assert window.shape == (200, 150, 3)
    assert window[..., 1].min() < 212 < window[..., 1].max()  # cells and glass
    other = lazy_smear((30000, 30000), seed=1, chunks=(700, 333))
    np.testing.assert_array_equal(window, other[20100:20300, 15000:15150].compute())


def test_truth_columns_and_kinds(field):
    _, truth = field
    assert list(truth.columns) == ["x", "y", "diameter", "kind", "label", "subtype"]
    assert set(truth.kind) == {"wbc", "rbc", "platelet"}
    h, w = FIELD_SHAPE
    assert truth.x.between(-0.5, w - 0.5).all() and truth.y.between(-0.5, h - 0.5).all()
    wbc = truth[truth.kind == "wbc"]
    assert set(wbc.label) <= set(WBC_CLASSES)
    neutro = wbc[wbc.label == "neutrophil"]
    assert set(neutro.subtype) <= {"segmented_neutrophil", "band_neutrophil"}
    others = wbc[wbc.label != "neutrophil"]
    assert (others.subtype == others.label).all()
    rest = truth[truth.kind != "wbc"]
    assert (rest.label == rest.kind).all()


def test_truth_sizes_match_pbc_scale(field):
    _, truth = field
    rbc = truth[truth.kind == "rbc"].diameter
    assert 70 <= rbc.mean() <= 80
    plt = truth[truth.kind == "platelet"].diameter
    assert plt.between(12, 20).all()
    ranges = {
        "neutrophil": (110, 130),
        "lymphocyte": (80, 95),
        "monocyte": (130, 150),
        "eosinophil": (115, 130),
        "basophil": (100, 115),
    }
    for row in truth[truth.kind == "wbc"].itertuples():
        lo, hi = ranges[row.label]
        assert lo <= row.diameter <= hi, row


def test_white_cells_are_where_truth_says(field):
    image, truth = field
    img = image.astype(float)
    glass = ~_object_mask(FIELD_SHAPE, truth, 6) & _interior(FIELD_SHAPE)
    background = np.median(img[glass], axis=0)
    wbc = truth[truth.kind == "wbc"]
    assert len(wbc) >= 5
    for row in wbc.itertuples():
        inner = _disc(FIELD_SHAPE, row.y, row.x, 0.3 * row.diameter)
        if inner.sum() < 100:  # mostly outside the image
            continue
        pixels = img[inner]
        mean = pixels.mean(axis=0)
        # Darker than glass and bluer than red cells or glass (B > G).
        assert mean.sum() < 0.75 * background.sum(), row
        assert mean[2] > mean[1] + 15, row
        # The darkest tenth is nucleus or basophil granules: dark blue-purple.
        dark = pixels[pixels.sum(axis=1) <= np.quantile(pixels.sum(axis=1), 0.1)].mean(0)
        assert dark[1] < 90 and dark[2] > dark[0] > dark[1], row


def test_no_nucleus_coloured_pixels_away_from_truth(field):
    image, truth = field
    img = image.astype(int)
    nucleus_like = (img[..., 1] < 80) & (img[..., 2] - img[..., 1] > 60)
    assert nucleus_like.sum() > 1000
    allowed = _object_mask(FIELD_SHAPE, truth[truth.kind != "rbc"], 4)
    assert not nucleus_like[~allowed & _interior(FIELD_SHAPE)].any()


def test_red_cells_are_where_truth_says(field):
    image, truth = field
    g = image[..., 1].astype(int)
    rbc = truth[truth.kind == "rbc"]
    ys = np.clip(np.round(rbc.y).astype(int), 0, FIELD_SHAPE[0] - 1)
    xs = np.clip(np.round(rbc.x).astype(int), 0, FIELD_SHAPE[1] - 1)
    # Even the pale centre of a red cell is clearly darker than the glass...
    assert np.mean(g[ys, xs] < 212) > 0.97
    # ...and glass far from every object is bright.
    empty = ~_object_mask(FIELD_SHAPE, truth, 4) & _interior(FIELD_SHAPE)
    assert empty.mean() > 0.15
    assert np.mean(g[empty] > 212) > 0.99


def test_colour_sanity(field):
    image, truth = field
    img = image.astype(float)
    glass = img[~_object_mask(FIELD_SHAPE, truth, 6) & _interior(FIELD_SHAPE)]
    r, g, b = np.median(glass, axis=0)
    assert min(r, g, b) > 190  # bright
    assert r > g > b  # cream, as in the PBC images
    rbc = img[(img[..., 1] < 190) & (img[..., 1] > 130)]
    assert np.median(rbc[:, 0]) > np.median(rbc[:, 2])  # red cells pink-red


def test_red_cell_count_follows_coverage():
    shape = (1500, 1500)
    for coverage in (0.3, 0.5):
        truth = smear_truth(shape, 0, rbc_coverage=coverage, wbc_per_mpx=0)
        n = (truth.kind == "rbc").sum()
        expected = coverage * shape[0] * shape[1] / (np.pi * 37.5**2)
        assert 0.85 * expected < n < 1.15 * expected
        image = make_smear(shape, 0, rbc_coverage=coverage, wbc_per_mpx=0)
        covered = np.mean(image[..., 1] < 212)
        # Overlaps count once in the image, so the covered area is a bit lower.
        assert 0.7 * coverage < covered < 1.05 * coverage
    assert (smear_truth(shape, 0, rbc_coverage=0).kind == "rbc").sum() == 0


def test_white_cell_density_and_no_overlap():
    shape = (6000, 6000)
    truth = smear_truth(shape, 3)
    wbc = truth[truth.kind == "wbc"]
    expected = SmearParams().wbc_per_mpx * 36
    assert 0.8 * expected < len(wbc) < 1.2 * expected
    dense = smear_truth((3000, 3000), 3, wbc_per_mpx=9.5)
    w = dense[dense.kind == "wbc"][["y", "x", "diameter"]].to_numpy()
    assert len(w) > 60
    dist = np.hypot(w[:, None, 0] - w[None, :, 0], w[:, None, 1] - w[None, :, 1])
    reach = (w[:, None, 2] + w[None, :, 2]) / 2
    np.fill_diagonal(dist, np.inf)
    assert (dist >= reach).all()


def test_default_field_shows_a_few_white_cells():
    counts = [(smear_truth((1024, 1024), seed).kind == "wbc").sum() for seed in range(30)]
    assert 3 <= np.mean(counts) <= 6


def test_class_weights_and_band_fraction():
    truth = smear_truth((3000, 3000), 8, class_weights={"lymphocyte": 1.0})
    wbc = truth[truth.kind == "wbc"]
    assert len(wbc) > 10 and set(wbc.label) == {"lymphocyte"}
    truth = smear_truth((3000, 3000), 8, class_weights={"neutrophil": 1}, band_fraction=1.0)
    assert set(truth[truth.kind == "wbc"].subtype) == {"band_neutrophil"}


def test_rbc_diameter_scales_everything():
    dense = {**DENSE, "wbc_per_mpx": 5.0}
    truth = smear_truth((2500, 2500), 4, rbc_diameter=105, **dense)
    assert 100 <= truth[truth.kind == "rbc"].diameter.mean() <= 110
    wbc = truth[truth.kind == "wbc"]
    lym = wbc[wbc.label == "lymphocyte"].diameter
    assert len(lym) and lym.between(80 * 1.4, 95 * 1.4).all()


def test_sample_shows_every_class_well_inside():
    image = make_sample_smear()
    assert image.shape == (*SAMPLE_SHAPE, 3) and image.dtype == np.uint8
    truth = sample_smear_truth()
    wbc = truth[truth.kind == "wbc"]
    h, w = SAMPLE_SHAPE
    m = wbc.diameter
    inside = wbc[(wbc.x > m) & (wbc.x < w - m) & (wbc.y > m) & (wbc.y < h - m)]
    assert set(inside.label) == set(WBC_CLASSES)
    assert {"segmented_neutrophil", "band_neutrophil"} <= set(inside.subtype)
    # Every white cell of the sample is really drawn: dark and blue at its centre.
    img = image.astype(float)
    for row in inside.itertuples():
        px = img[_disc(SAMPLE_SHAPE, row.y, row.x, 0.3 * row.diameter)].mean(0)
        assert px[2] > px[1] + 15 and px.sum() < 500, row


def test_params_object_and_overrides_agree():
    p = SmearParams(rbc_diameter=60, noise=0.0)
    a = make_smear((200, 260), 1, params=p)
    b = make_smear((200, 260), 1, rbc_diameter=60, noise=0.0)
    np.testing.assert_array_equal(a, b)
    c = make_smear((200, 260), 1, params=p, noise=3.0)
    assert not np.array_equal(a, c)
    # Parameters compare and hash by value, and own their class weights.
    weights = {"lymphocyte": 1.0}
    q = SmearParams(class_weights=weights)
    weights["basophil"] = 1.0
    assert q == SmearParams(class_weights={"lymphocyte": 1.0})
    assert hash(q) == hash(SmearParams(class_weights={"lymphocyte": 1.0}))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: make_smear((10, 10), bogus=1), "unknown smear parameters"),
        (lambda: make_smear((10, 10), seed=-1), "non-negative"),
        (lambda: make_smear((0, 10)), "positive"),
        (lambda: make_smear((10,)), "height, width"),
        (lambda: smear_truth((10, 10), wbc_per_mpx=100), "at most"),
        (lambda: SmearParams(class_weights={"neutrophil": 0}), "not all zero"),
        (lambda: SmearParams(class_weights={"blast": 1}), "unknown white-cell"),
        (lambda: SmearParams(rbc_diameter=2), "rbc_diameter"),
        (lambda: lazy_smear((10, 10), chunks="x"), "chunks"),
    ],
)
def test_invalid_input_raises_actionable_error(call, message):
    with pytest.raises(SmearParamsError, match=message) as info:
        call()
    assert isinstance(info.value, WBCError)
