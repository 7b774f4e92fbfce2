"""Whole-smear classification: detection → crops → stain → ensemble, block by block."""

import math
import threading
from typing import ClassVar

import dask.array as da
import numpy as np
import pandas as pd
import pytest

from napari_wbc.detection import Detector
from napari_wbc.errors import WBCError
from napari_wbc.inference import load_any
from napari_wbc.pipeline import ClassifyConfig, differential_count, iter_classify_smear
from napari_wbc.progress import Progress, run
from napari_wbc.synthetic import make_sample_smear, sample_smear_truth


@pytest.fixture(scope="module")
def sample():
    return make_sample_smear(), sample_smear_truth()


@pytest.fixture
def ensemble(tiny_model_path):
    return load_any(tiny_model_path, tta="none")


def _check_found(cells, truth, shape):
    """Every true white cell is found once; extra finds are only cells cut by the border.

    The generator draws cells centred just outside the image; its truth lists only those inside.
    """
    d = np.hypot(
        cells.x.to_numpy()[:, None] - truth.x.to_numpy()[None],
        cells.y.to_numpy()[:, None] - truth.y.to_numpy()[None],
    )
    tol = 0.5 * truth.diameter.min()
    assert (d.min(axis=0) < tol).all(), "a white cell was missed"
    assert ((d < tol).sum(axis=0) == 1).all(), "a white cell was reported twice"
    extra = cells[d.min(axis=1) >= tol]
    margin = truth.diameter.max() / 2
    near_border = (
        (extra.x < margin)
        | (extra.y < margin)
        | (extra.x > shape[1] - margin)
        | (extra.y > shape[0] - margin)
    )
    assert near_border.all(), "a false detection away from the border"


def test_classifies_every_white_cell_of_the_sample(sample, ensemble):
    image, truth = sample
    wbc = truth[truth.kind == "wbc"]
    events = []
    cells = run(
        iter_classify_smear(image, ensemble, ClassifyConfig(pixel_size_um=0.1)), events.append
    )
    _check_found(cells, wbc, image.shape)
    probs = cells[[f"p_{c}" for c in ensemble.classes]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert set(cells["class"]) <= set(ensemble.classes)
    np.testing.assert_allclose(cells.confidence, probs.max(axis=1), atol=1e-6)
    assert cells.needs_review.dtype == bool
    assert cells.attrs["rbc_diameter_px"] == pytest.approx(75.0)
    assert cells.attrs["stain_normalized"]
    block_events = [e for e in events if e.stage == "blocks"]
    assert block_events[-1].done == block_events[-1].total
    assert sum(block_events[-1].info["counts"].values()) == len(cells)


def test_blocks_do_not_change_the_result(sample, ensemble):
    image, _ = sample
    config = ClassifyConfig(pixel_size_um=0.1, block=4096)
    whole = run(iter_classify_smear(image, ensemble, config))
    small = ClassifyConfig(pixel_size_um=0.1, block=400)
    tiled = run(iter_classify_smear(da.from_array(image, chunks=(300, 500, 3)), ensemble, small))
    key = ["y", "x"]
    whole, tiled = (
        whole.sort_values(key).reset_index(drop=True),
        tiled.sort_values(key).reset_index(drop=True),
    )
    assert len(whole) == len(tiled)
    np.testing.assert_allclose(tiled[key], whole[key], atol=1.0)
    assert (tiled["class"] == whole["class"]).mean() >= 0.9


def test_scale_is_estimated_when_unknown(sample, ensemble):
    image, truth = sample
    cells = run(iter_classify_smear(image, ensemble, ClassifyConfig(stain_normalize=False)))
    assert 65 <= cells.attrs["rbc_diameter_px"] <= 85
    assert "estimated" in cells.attrs["scale"]
    assert not cells.attrs["stain_normalized"]
    _check_found(cells, truth[truth.kind == "wbc"], image.shape)


def test_user_points_are_classified_as_given(sample, ensemble):
    image, _ = sample
    points = np.array([[100.0, 200.0], [700.0, 900.5], [5000.0, 5.0]])  # last one is outside
    cells = run(
        iter_classify_smear(image, ensemble, ClassifyConfig(pixel_size_um=0.1), points=points)
    )
    assert len(cells) == 2
    np.testing.assert_allclose(cells[["y", "x"]].to_numpy(), points[:2])


def test_label_image_cells(sample, ensemble):
    image, _ = sample
    labels = np.zeros(image.shape[:2], np.int32)
    labels[100:140, 200:260] = 1
    labels[800:820, 1500:1530] = 7
    cells = run(
        iter_classify_smear(image, ensemble, ClassifyConfig(pixel_size_um=0.1), labels=labels)
    )
    assert sorted(np.round(cells.y).tolist()) == [120.0, 810.0]
    with pytest.raises(WBCError, match="same size"):
        run(
            iter_classify_smear(
                image, ensemble, ClassifyConfig(pixel_size_um=0.1), labels=labels[:10]
            )
        )


def test_blank_image_gives_an_empty_table(ensemble):
    blank = np.full((600, 800, 3), 250, np.uint8)
    cells = run(
        iter_classify_smear(
            blank, ensemble, ClassifyConfig(pixel_size_um=0.1, stain_normalize=False)
        )
    )
    assert len(cells) == 0
    assert {"x", "y", "class", "confidence"} <= set(cells.columns)


def test_differential_count():
    cells = pd.DataFrame(
        {"class": ["a", "b", "a", "a"], "needs_review": [True, False, False, True]}
    )
    table = differential_count(cells, ["a", "b", "c"])
    assert table["count"].tolist() == [3, 1, 0, 4]
    np.testing.assert_allclose(table["percent"], [75, 25, 0, 100])
    assert table["needs_review"].tolist() == [2, 0, 0, 2]


class NucleusBlobs(Detector):
    """A stand-in for a learned detector: connected blobs of nuclear stain, nothing shared."""

    returned: ClassVar[list[int]] = []  # rows returned per window, over all instances

    def __init__(self, rbc_diameter_px: float | None = None):
        self.rbc = rbc_diameter_px

    def iter_prepare(self, image, rbc_diameter_px):
        yield Progress("prepare", 1, 1, "blob detector ready")
        return NucleusBlobs(rbc_diameter_px)

    @property
    def halo(self) -> int:
        return math.ceil(2 * self.rbc)

    def detect(self, window, origin):
        from scipy import ndimage as ndi

        from napari_wbc.pixels import nuclear_signal

        labels, n = ndi.label(nuclear_signal(window, (235, 230, 235)) > 0.15)
        index = np.arange(1, n + 1)
        area = ndi.sum_labels(np.ones(labels.shape), labels, index)
        centres = np.array(ndi.center_of_mass(np.ones(labels.shape), labels, index)).reshape(-1, 2)
        keep = area >= 0.005 * self.rbc**2
        table = pd.DataFrame(
            {
                "y": centres[keep, 0] + origin[0],
                "x": centres[keep, 1] + origin[1],
                "diameter": np.sqrt(4 * area[keep] / np.pi),
                "kind": "wbc",
            }
        )
        NucleusBlobs.returned.append(len(table))
        return table


def test_a_new_detector_runs_tiled_with_ownership_like_on_the_whole_image(sample, ensemble):
    image, _ = sample
    NucleusBlobs.returned = []
    events = []
    whole = run(
        iter_classify_smear(
            image, ensemble, ClassifyConfig(pixel_size_um=0.1, block=4096), detector=NucleusBlobs()
        ),
        events.append,
    )
    assert sum(NucleusBlobs.returned) == len(whole) > 10
    assert [e.stage for e in events].count("prepare") == 1
    NucleusBlobs.returned = []
    lazy = da.from_array(
        image, chunks=((300, 77, image.shape[0] - 377), (640, 3, image.shape[1] - 643), 3)
    )
    tiled = run(
        iter_classify_smear(
            lazy, ensemble, ClassifyConfig(pixel_size_um=0.1, block=300), detector=NucleusBlobs()
        )
    )
    # Several windows saw the same blobs; ownership kept each once.
    assert len(NucleusBlobs.returned) > 4 and sum(NucleusBlobs.returned) > len(tiled)
    key = ["y", "x"]
    whole = whole.sort_values(key).reset_index(drop=True)
    tiled = tiled.sort_values(key).reset_index(drop=True)
    np.testing.assert_allclose(tiled[key], whole[key], atol=1e-6)
    np.testing.assert_allclose(tiled["diameter"], whole["diameter"])
    probs = [f"p_{c}" for c in ensemble.classes]
    np.testing.assert_allclose(tiled[probs], whole[probs], atol=1e-4)
    top2 = np.sort(whole[probs].to_numpy(), axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3
    assert (tiled["class"][clear] == whole["class"][clear]).all()


def test_user_pixel_size_wins_over_the_file_and_is_recorded(sample, ensemble):
    image, _ = sample
    points = np.array([[300.0, 400.0]])
    config = ClassifyConfig(pixel_size_um=0.1)
    cells = run(
        iter_classify_smear(image, ensemble, config, points=points, file_pixel_size_um=0.5)
    )
    assert cells.attrs["pixel_size_um"] == 0.1 and cells.attrs["scale_source"] == "user"
    assert cells.attrs["rbc_diameter_px"] == pytest.approx(75.0)
    from_file = run(
        iter_classify_smear(
            image, ensemble, ClassifyConfig(), points=points, file_pixel_size_um=0.125
        )
    )
    assert from_file.attrs["pixel_size_um"] == 0.125 and from_file.attrs["scale_source"] == "file"
    assert from_file.attrs["rbc_diameter_px"] == pytest.approx(60.0)


def test_seconds_per_stage_are_recorded_and_add_up_to_at_most_the_run(sample, tiny_model_path):
    import time

    image, _ = sample
    ensemble = load_any(tiny_model_path, tta="d4")
    start = time.perf_counter()
    cells = run(iter_classify_smear(image, ensemble, ClassifyConfig(block=768)))
    wall = time.perf_counter() - start
    stages = cells.attrs["seconds"]
    # The scale is measured, the detector set up, and every block classified
    # on this thread; every block read, searched and cut on the background
    # thread, overlapped with the classification.
    for stage in ("scale", "detector setup", "stain fit", "waiting for blocks"):
        assert stage in stages
    assert {"classify", "table"} <= set(stages)
    background = cells.attrs["seconds_background"]
    assert set(background) == {"read", "detect", "cut crops"}
    assert all(v >= 0 for v in [*stages.values(), *background.values()])
    assert 0.5 * wall <= sum(stages.values()) <= wall
    assert set(cells["passes"]) <= {1, 4}  # one member, its four rotations if in doubt


def test_crops_of_many_blocks_classified_together_give_each_block_its_own_cells(
    sample, tiny_model_path, monkeypatch
):
    import napari_wbc.pipeline as pipeline

    image, _ = sample
    ensemble = load_any(tiny_model_path, tta="d4")
    config = ClassifyConfig(pixel_size_um=0.1, block=512)
    events = []
    together = run(iter_classify_smear(image, ensemble, config), events.append)
    blocks = [e for e in events if e.stage == "blocks"]
    assert len(blocks) == blocks[-1].total > 4  # one event per block, as before
    # Classification reports its own progress in between (Cancel works there).
    assert any(e.stage == "classify" for e in events)
    monkeypatch.setattr(pipeline, "CROSS_BLOCK_CELLS", 1)  # every block on its own
    alone = run(iter_classify_smear(image, ensemble, config))
    assert list(together["class"]) == list(alone["class"])
    np.testing.assert_allclose(together[["y", "x"]], alone[["y", "x"]])
    np.testing.assert_allclose(together["confidence"], alone["confidence"], atol=1e-5)
    np.testing.assert_array_equal(together["passes"], alone["passes"])


def test_a_run_stops_cleanly_in_the_middle_of_classifying(sample, tiny_model_path):
    # Cancel closes the generator: inside a batch of cells, between passes.
    image, _ = sample
    ensemble = load_any(tiny_model_path, tta="d4")
    steps = iter_classify_smear(image, ensemble, ClassifyConfig(pixel_size_um=0.1, block=512))
    for event in steps:
        if event.stage == "classify":
            break
    else:
        raise AssertionError("no classification progress before the end")
    steps.close()
    with pytest.raises(StopIteration):
        next(steps)
    # The thread that reads and cuts the blocks ahead is gone with it.
    assert not [t for t in threading.enumerate() if t.name.startswith("napari-wbc-prefetch")]


def test_the_detector_reads_its_own_halo_and_finds_what_the_whole_window_gives(
    sample, ensemble, monkeypatch
):
    from napari_wbc import pipeline
    from napari_wbc.detection import ClassicalDetector

    image, _ = sample
    config = ClassifyConfig(pixel_size_um=0.1, block=600)
    seen: list[tuple[int, int, int]] = []  # window height, width; the detector's halo
    real = ClassicalDetector.detect

    def spy(self, window, origin):
        seen.append((*window.shape[:2], self.halo))
        return real(self, window, origin)

    monkeypatch.setattr(ClassicalDetector, "detect", spy)
    narrow = run(iter_classify_smear(image, ensemble, config))
    narrow_px = sum(h * w for h, w, _ in seen)
    assert max(max(h, w) - 2 * halo for h, w, halo in seen) <= 600
    seen.clear()
    # As before: the detector was handed the whole window cut for the crops.
    monkeypatch.setattr(
        pipeline, "_detector_window", lambda window, tile, d: (window, tile.origin)
    )
    whole = run(iter_classify_smear(image, ensemble, config))
    assert narrow_px < 0.8 * sum(h * w for h, w, _ in seen)
    pd.testing.assert_frame_equal(narrow, whole)
