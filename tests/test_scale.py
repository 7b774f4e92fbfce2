"""Red-cell size as the image's own ruler."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest

from napari_wbc.errors import ImageReadError, WBCError
from napari_wbc.progress import Progress
from napari_wbc.scale import (
    RBC_DIAMETER_UM,
    ScaleError,
    ScaleEstimate,
    estimate_rbc_diameter,
    folder_scales,
    iter_estimate_rbc_diameter,
    resolve_scale,
)
from napari_wbc.synthetic import lazy_smear, make_smear, smear_truth


@pytest.mark.parametrize(("diameter", "seed"), [(60, 1), (75, 2), (105, 3)])
def test_recovers_synthetic_red_cell_diameter(diameter, seed):
    shape = (1024, 1024)
    image = make_smear(shape, seed, rbc_diameter=diameter)
    truth = smear_truth(shape, seed, rbc_diameter=diameter)
    true_median = truth.loc[truth.kind == "rbc", "diameter"].median()
    est = estimate_rbc_diameter(image)
    assert est.rbc_diameter_px == pytest.approx(true_median, rel=0.10)
    assert est.um_per_px == pytest.approx(RBC_DIAMETER_UM / est.rbc_diameter_px)
    assert est.n_cells >= 10
    assert est.method == "distance-transform"


def test_estimate_does_not_depend_on_chunking():
    shape = (1400, 1100)
    a = estimate_rbc_diameter(lazy_smear(shape, seed=5, chunks=(300, 700)), window=512)
    b = estimate_rbc_diameter(lazy_smear(shape, seed=5, chunks=(1400, 333)), window=512)
    c = estimate_rbc_diameter(make_smear(shape, seed=5), window=512)
    assert a == b == c


def test_iter_estimate_reports_progress_and_returns_estimate():
    image = make_smear((900, 1300), seed=4)
    gen = iter_estimate_rbc_diameter(image, window=512, max_windows=3)
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert events and all(isinstance(e, Progress) and e.stage == "scale" for e in events)
    assert events[-1].done == events[-1].total == 3
    assert result == estimate_rbc_diameter(image, window=512, max_windows=3)


def test_blank_image_raises_clear_error():
    blank = np.full((600, 600, 3), 230, np.uint8)
    with pytest.raises(ScaleError, match="pixel size"):
        estimate_rbc_diameter(blank)
    assert issubclass(ScaleError, WBCError)


def test_image_without_red_cells_raises():
    image = make_smear((512, 512), seed=0, rbc_coverage=0.0, wbc_per_mpx=0.0)
    with pytest.raises(ScaleError):
        estimate_rbc_diameter(image)


def test_bad_inputs_are_refused():
    with pytest.raises(ImageReadError):
        estimate_rbc_diameter(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(ScaleError, match="window"):
        estimate_rbc_diameter(np.zeros((64, 64, 3), np.uint8), window=8)


def test_resolve_scale_prefers_pixel_size():
    assert resolve_scale(pixel_size_um=0.1) == pytest.approx(75.0)
    image = make_smear((768, 768), seed=6, rbc_diameter=90)
    assert resolve_scale(pixel_size_um=0.25, image=image) == pytest.approx(30.0)
    assert resolve_scale(image=image) == pytest.approx(90, rel=0.10)
    for bad in (0, -1, float("nan"), "x"):
        with pytest.raises(ScaleError, match="pixel size"):
            resolve_scale(pixel_size_um=bad)
    with pytest.raises(ScaleError, match="pixel size"):
        resolve_scale()


def test_grayscale_dask_input_is_converted():
    image = make_smear((700, 700), seed=7)
    truth = smear_truth((700, 700), seed=7)
    grey = da.from_array(image.mean(axis=-1).astype(np.uint8), chunks=256)
    # Red cells are found by how much light they absorb, not by their hue, so
    # a greyscale smear (converted to RGB) is still measured.
    est = estimate_rbc_diameter(grey)
    true_median = truth.loc[truth.kind == "rbc", "diameter"].median()
    assert est.rbc_diameter_px == pytest.approx(true_median, rel=0.10)


@pytest.mark.realdata
def test_bccd_red_cell_scale_matches_box_sizes(data_dir):
    from PIL import Image

    bccd = data_dir / "bccd"
    if not (bccd / "boxes.csv").exists():
        pytest.skip(f"BCCD data not found under {bccd}")
    boxes = pd.read_csv(bccd / "boxes.csv")
    paths = sorted(boxes.path.unique())[::12][:30]
    estimates = []
    for path in paths:
        image = np.asarray(Image.open(bccd / path).convert("RGB"))
        try:
            estimates.append(estimate_rbc_diameter(image).rbc_diameter_px)
        except ScaleError:
            continue  # a field with too few separate red cells
    assert len(estimates) >= 25
    median = float(np.median(estimates))
    rbc = boxes[(boxes.label == "RBC") & boxes.path.isin(paths)]
    # Boxes cut by the image edge do not show a whole cell.
    whole = rbc[(rbc.x > 2) & (rbc.y > 2) & (rbc.x + rbc.w < 638) & (rbc.y + rbc.h < 478)]
    box_median = float(np.median(np.sqrt(whole.w * whole.h)))
    assert 90 <= median <= 125
    assert median == pytest.approx(box_median, rel=0.15)


def _est(px, cells):
    return ScaleEstimate(px, cells, "distance-transform", RBC_DIAMETER_UM / px)


def test_folder_scales_share_the_median_and_keep_another_magnification():
    estimates = {
        "a": _est(70.0, 12),
        "b": _est(80.0, 4),  # noisy: few red cells
        "c": _est(75.0, 15),
        "d": _est(45.0, 3),  # far off, but from 3 cells: noise, takes the median
        "e": _est(150.0, 14),  # 2x, from many cells: another objective
        "f": None,  # could not be measured
    }
    scales = folder_scales(estimates)
    median = float(np.median([70, 80, 75, 45, 150]))
    assert set(scales) == set(estimates)
    for key in "abcdf":
        assert scales[key].rbc_diameter_px == pytest.approx(median)
        assert scales[key].source == "measured"
    assert scales["e"].rbc_diameter_px == pytest.approx(150.0)
    assert "another magnification" in scales["e"].note
    assert "too few red cells here" in scales["f"].note
    assert "70 px from 12 red cells" in scales["a"].note


def test_folder_scales_of_one_image_or_none_measured():
    one = folder_scales({"x": _est(60.0, 2)})
    assert one["x"].rbc_diameter_px == pytest.approx(60.0)
    assert one["x"].note == "estimated from 2 red cells"
    assert folder_scales({"x": None, "y": None}) == {}
