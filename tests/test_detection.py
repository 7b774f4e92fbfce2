"""White-cell detection: synthetic truth, tiling, scale, errors, and BCCD."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest

import napari_wbc.detection as detection
from napari_wbc.detection import (
    COLUMNS,
    DetectionError,
    detect_cells,
    iter_detect_cells,
    match_detections,
)
from napari_wbc.errors import ImageReadError
from napari_wbc.progress import run
from napari_wbc.scale import ScaleError
from napari_wbc.synthetic import make_sample_smear, make_smear, sample_smear_truth, smear_truth


def _cropped_smear(shape, seed, margin, **params):
    """A smear window and the truth of a larger window around it, in the crop's coordinates.

    The synthetic truth leaves out cells centred outside the image even when
    part of them shows; rendering a margin around the image puts those in the
    truth too, so a detection of a cut-off cell can be told from a false one.
    """
    h, w = shape
    big = (h + 2 * margin, w + 2 * margin)
    image = make_smear(big, seed, **params)[margin : margin + h, margin : margin + w]
    truth = smear_truth(big, seed, **params)
    truth["x"] -= margin
    truth["y"] -= margin
    return image, truth


def _assert_exact_wbcs(det: pd.DataFrame, truth: pd.DataFrame, shape) -> None:
    """Every white cell centred in the image found once; every detection a white cell."""
    h, w = shape
    wbc = truth[truth.kind == "wbc"].reset_index(drop=True)
    found = det[det.kind == "wbc"]
    assert len(found), "no white cells detected"
    dy = found.y.to_numpy()[:, None] - wbc.y.to_numpy()[None, :]
    dx = found.x.to_numpy()[:, None] - wbc.x.to_numpy()[None, :]
    dist = np.hypot(dy, dx)
    nearest = dist.argmin(axis=1)
    close = dist[np.arange(len(found)), nearest] < 0.5 * wbc.diameter.to_numpy()[nearest]
    assert close.all(), f"false positives at {found[~close][['y', 'x']].round().values.tolist()}"
    assert len(set(nearest)) == len(nearest), "a white cell was reported twice"
    inside = (wbc.x >= -0.5) & (wbc.x < w - 0.5) & (wbc.y >= -0.5) & (wbc.y < h - 0.5)
    missed = sorted(set(np.nonzero(inside.to_numpy())[0]) - set(nearest))
    assert not missed, f"missed white cells {wbc.loc[missed, ['y', 'x', 'label']].values.tolist()}"


@pytest.fixture(scope="module")
def sample():
    return make_sample_smear(), sample_smear_truth()


@pytest.fixture(scope="module")
def sample_detections(sample):
    return detect_cells(sample[0], include_platelets=True)


def test_sample_smear_all_white_cells_found(sample, sample_detections):
    image, truth = sample
    det = sample_detections
    assert list(det.columns) == COLUMNS
    wbc = truth[truth.kind == "wbc"]
    found = det[det.kind == "wbc"]
    dist = np.hypot(
        found.y.to_numpy()[:, None] - wbc.y.to_numpy()[None, :],
        found.x.to_numpy()[:, None] - wbc.x.to_numpy()[None, :],
    )
    matched = dist < 0.5 * wbc.diameter.to_numpy()[None, :]
    assert matched.any(axis=0).all(), "recall below 1 on the sample smear"
    assert (matched.sum(axis=0) == 1).all(), "a white cell was reported twice"
    # The sample's truth lists cells centred inside it only; the one allowed
    # extra is a cell cut by the image edge (centre outside), seen partly.
    h, w = image.shape[:2]
    extra = found[~matched.any(axis=1)]
    at_edge = (
        (extra.bbox_y0 == 0) | (extra.bbox_x0 == 0) | (extra.bbox_y1 == h) | (extra.bbox_x1 == w)
    )
    assert at_edge.all()
    assert (extra.nucleus_area < found[matched.any(axis=1)].nucleus_area.median()).all()


def test_sample_smear_platelets_and_red_cells_are_not_white_cells(sample, sample_detections):
    _, truth = sample
    det = sample_detections
    wbc = det[det.kind == "wbc"]
    for kind in ("platelet", "rbc"):
        objects = truth[truth.kind == kind]
        dist = np.hypot(
            wbc.y.to_numpy()[:, None] - objects.y.to_numpy()[None, :],
            wbc.x.to_numpy()[:, None] - objects.x.to_numpy()[None, :],
        )
        # No white-cell detection sits on a platelet or red cell that is not
        # itself next to a white cell.
        wbc_truth = truth[truth.kind == "wbc"]
        near_wbc = (
            np.hypot(
                objects.y.to_numpy()[:, None] - wbc_truth.y.to_numpy()[None, :],
                objects.x.to_numpy()[:, None] - wbc_truth.x.to_numpy()[None, :],
            ).min(axis=1)
            < 1.5 * 75
        )
        hits = (dist < 0.3 * 75) & ~near_wbc[None, :]
        assert not hits.any(), f"a {kind} was reported as a white cell"
    # Platelets are reported as platelets when asked for.
    plt_truth = truth[truth.kind == "platelet"]
    plt = det[det.kind == "platelet"]
    dist = np.hypot(
        plt.y.to_numpy()[:, None] - plt_truth.y.to_numpy()[None, :],
        plt.x.to_numpy()[:, None] - plt_truth.x.to_numpy()[None, :],
    )
    assert (dist.min(axis=0) < 10).mean() >= 0.8
    assert (det.kind == "platelet").sum() >= 0.8 * len(plt_truth)


@pytest.mark.parametrize("seed", [11, 12])
def test_seeded_smears_exact(seed):
    shape = (1024, 1280)
    image, truth = _cropped_smear(shape, seed, margin=200, wbc_per_mpx=8.0)
    det = detect_cells(image)
    _assert_exact_wbcs(det, truth, shape)
    assert set(det.kind) == {"wbc"}  # platelets only when asked for


def test_smear_without_white_cells_reports_none():
    image = make_smear((1024, 1024), seed=13, wbc_per_mpx=0.0, platelets_per_mpx=40.0)
    det = detect_cells(image, include_platelets=True)
    assert (det.kind != "wbc").all()
    assert (det.kind == "platelet").sum() >= 20


def test_scale_relative_detection_with_estimated_scale():
    shape = (1280, 1280)
    image, truth = _cropped_smear(shape, 14, margin=280, rbc_diameter=105, wbc_per_mpx=5.0)
    det = detect_cells(image)  # scale measured from the image
    _assert_exact_wbcs(det, truth, shape)
    # The same cells, seen at 75 px per red cell, have proportionally smaller footprints.
    wbc = det[det.kind == "wbc"]
    assert wbc.diameter.median() > 105


def test_tiled_equals_whole_with_uneven_chunks():
    shape = (1100, 1300)
    image = make_smear(shape, seed=15, wbc_per_mpx=9.0)
    whole = detect_cells(image, rbc_diameter_px=75.0, block=4096, include_platelets=True)
    lazy = da.from_array(image, chunks=((300, 517, 283), (640, 111, 549), 3))
    block = 330
    tiled = detect_cells(lazy, rbc_diameter_px=75.0, block=block, include_platelets=True)
    pd.testing.assert_frame_equal(whole, tiled)
    # The test means something only if cells straddle block borders.
    wbc = whole[whole.kind == "wbc"]
    straddle = (wbc.bbox_y0 // block != (wbc.bbox_y1 - 1) // block) | (
        wbc.bbox_x0 // block != (wbc.bbox_x1 - 1) // block
    )
    assert straddle.sum() >= 3


def test_tiled_equals_whole_with_estimated_scale():
    image = make_smear((900, 1000), seed=16, wbc_per_mpx=9.0)
    whole = detect_cells(image)
    tiled = detect_cells(da.from_array(image, chunks=(256, 384, 3)), block=256)
    pd.testing.assert_frame_equal(whole, tiled)


def test_dask_input_is_read_block_by_block(monkeypatch):
    image = make_smear((1500, 1500), seed=17)
    reads = []
    original = detection.read_window

    def spy(img, box):
        reads.append(box)
        return original(img, box)

    monkeypatch.setattr(detection, "read_window", spy)
    events = []
    det = run(
        iter_detect_cells(da.from_array(image, chunks=300), rbc_diameter_px=75.0, block=300),
        events.append,
    )
    assert len(det) > 0
    # Setup reads 1024 px windows (moved onto the working grid), detection
    # blocks with their halo: never the whole image.
    largest = max((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in reads)
    assert largest <= 1030 * 1030 < image.shape[0] * image.shape[1] // 2
    blocks = [e for e in events if e.stage == "detect"]
    assert len(blocks) == blocks[-1].total == 25


def test_blank_image_gives_empty_table():
    blank = np.full((700, 500, 3), 235, np.uint8)
    det = detect_cells(blank, rbc_diameter_px=75.0)
    assert det.empty
    assert list(det.columns) == COLUMNS
    assert det.dtypes["y"] == np.float64 and det.dtypes["bbox_x1"] == np.int64
    # Without a scale a blank image cannot be measured: a clear error, no crash.
    with pytest.raises(ScaleError, match="pixel size"):
        detect_cells(blank)


def test_pixel_size_gives_the_same_as_red_cell_diameter(sample):
    image = sample[0][:768, :1024]
    a = detect_cells(image, pixel_size_um=0.1)
    b = detect_cells(image, rbc_diameter_px=75.0)
    pd.testing.assert_frame_equal(a, b)


def test_bad_inputs_are_refused():
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(DetectionError, match="rbc_diameter_px"):
        detect_cells(image, rbc_diameter_px=-5)
    with pytest.raises(DetectionError, match="rbc_diameter_px"):
        detect_cells(image, rbc_diameter_px="big")
    with pytest.raises(DetectionError, match="block"):
        detect_cells(image, rbc_diameter_px=75, block=8)
    with pytest.raises(DetectionError, match="threshold_bounds"):
        detect_cells(image, rbc_diameter_px=75, threshold_bounds=(0.3, 0.1))
    with pytest.raises(ScaleError, match="pixel size"):
        detect_cells(image, pixel_size_um=0)
    with pytest.raises(ImageReadError):
        detect_cells(np.zeros((3, 8, 8, 3), np.uint8), rbc_diameter_px=75)


# ------------------------------------------------------------ match_detections


def test_match_detections_counts():
    boxes = pd.DataFrame(
        {"x": [0, 100, 300], "y": [0, 0, 0], "w": [50, 50, 50], "h": [50, 50, 50]}
    )
    det = pd.DataFrame(
        {
            "x": [25, 30, 120, 500],  # two in the first box, one in the second, one nowhere
            "y": [25, 20, 10, 10],
            "score": [0.3, 0.5, 0.4, 0.9],
        }
    )
    m = match_detections(det, boxes)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 2, 1)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    # By distance the detection at the box centre wins; by score the higher one.
    assert (0, 0) in m["pairs"] and (2, 1) in m["pairs"]
    assert (1, 0) in match_detections(det, boxes, by="score")["pairs"]


def test_match_detections_edge_cases():
    empty = pd.DataFrame({"x": [], "y": []})
    m = match_detections(empty, np.zeros((0, 4)))
    assert (m["tp"], m["fp"], m["fn"], m["precision"], m["recall"]) == (0, 0, 0, 1.0, 1.0)
    m = match_detections(empty, [[0, 0, 10, 10]])
    assert (m["tp"], m["fn"], m["recall"]) == (0, 1, 0.0)
    with pytest.raises(DetectionError, match="'x'"):
        match_detections(pd.DataFrame({"y": [1.0]}), [[0, 0, 10, 10]])
    with pytest.raises(DetectionError, match="by="):
        match_detections(empty, [[0, 0, 10, 10]], by="iou")


# ------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_bccd_detection_recall_and_precision(data_dir):
    from PIL import Image

    from napari_wbc.scale import estimate_rbc_diameter

    bccd = data_dir / "bccd"
    if not (bccd / "wbc.csv").exists():
        pytest.skip(f"BCCD data not found under {bccd}")
    boxes = pd.read_csv(bccd / "wbc.csv")
    paths = sorted(boxes.path.unique())

    def load(path):
        return np.asarray(Image.open(bccd / path).convert("RGB"))

    # One microscope, one scale: measured on a sample of fields, as a user
    # would for a batch (some single fields hold too few whole red cells).
    estimates = []
    for path in paths[::12]:
        try:
            estimates.append(estimate_rbc_diameter(load(path)).rbc_diameter_px)
        except ScaleError:
            pass
    rbc_diameter = float(np.median(estimates))
    assert 90 <= rbc_diameter <= 125
    tp = fp = fn = 0
    for path in paths:
        det = detect_cells(load(path), rbc_diameter_px=rbc_diameter)
        m = match_detections(det[det.kind == "wbc"], boxes[boxes.path == path])
        tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
    recall = tp / (tp + fn)
    precision = tp / (tp + fp)
    assert recall >= 0.95, f"recall {recall:.3f} (tp {tp}, fn {fn})"
    assert precision >= 0.90, f"precision {precision:.3f} (tp {tp}, fp {fp})"


def test_dedupe_boxes_counts_a_cell_boxed_twice_once():
    from napari_wbc.detection import dedupe_boxes

    boxes = pd.DataFrame(
        {
            "x": [10, 14, 200, 60],
            "y": [10, 12, 200, 10],
            "w": [100, 100, 50, 100],
            "h": [100, 96, 50, 100],
            "label": ["a", "b", "c", "d"],
        }
    )
    # 0 and 1 box one cell (IoU 0.88); 3 touches 0 (IoU 0.33): another cell.
    kept = dedupe_boxes(boxes)
    assert kept["label"].tolist() == ["a", "c", "d"]
    assert dedupe_boxes(boxes.iloc[:0]).empty
