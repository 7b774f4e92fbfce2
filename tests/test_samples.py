"""The built-in samples: real cells with their truth, offline, writable from the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_wbc.errors import WBCError
from napari_wbc.images import read_smear
from napari_wbc.samples import load_sample, sample_names, write_sample

#: Agreement of the built-in model with the truth (no TTA, stain normalization
#: as the model was trained), recorded in docs/results.md; floors the current
#: model meets, to be raised by a better one.
#: Measured 2026-11-30 with the three-lab wbc-lite: gallery 22/24 (PBC
#: validation cells; the PBC-only model got 24/24), BCCD 6/6 (all of BCCD is
#: in its training data, so this checks the files, not transfer). Since
#: wbc-lite classifies at 0.85x its training field of view (better on labs it
#: never saw, docs/results.md), the gallery gives 19/24: the cost on PBC's own
#: cells, which go to the PBC specialist by default (--model auto).
GALLERY_FLOOR = 18 / 24
BCCD_FLOOR = 5 / 6


def test_samples_are_listed_with_their_licences():
    assert sample_names() == ("smear", "bccd", "gallery")
    for name in ("bccd", "gallery"):
        sample = load_sample(name)
        assert "licen" in sample.info.licence.lower() or "CC BY" in sample.info.licence


def test_real_smear_sample_has_a_typed_cell_in_each_of_six_fields():
    sample = load_sample("bccd")
    assert sample.image.shape == (960, 1920, 3) and sample.image.dtype == np.uint8
    assert sample.pixel_size_um is None  # measured on the red cells when classifying
    truth = sample.truth
    assert len(truth) == 6
    assert set(truth["class"]) == {
        "neutrophil",
        "eosinophil",
        "lymphocyte",
        "monocyte",
        "basophil",
    }
    # One cell per 640×480 field, inside its own field.
    field = (truth["y"] // 480).astype(int) * 3 + (truth["x"] // 640).astype(int)
    assert sorted(field) == list(range(6))
    # A white cell is darker than the glass around it: the truth sits on a cell.
    for y, x in zip(truth["y"], truth["x"], strict=True):
        centre = sample.image[int(y) - 5 : int(y) + 5, int(x) - 5 : int(x) + 5].mean()
        assert centre < np.percentile(sample.image, 75)


def test_gallery_has_three_cells_per_class_centred_in_their_tiles():
    sample = load_sample("gallery")
    assert sample.pixel_size_um == pytest.approx(0.2)
    truth = sample.truth
    assert truth["class"].value_counts().to_dict() == {
        c: 3
        for c in (
            "basophil",
            "eosinophil",
            "erythroblast",
            "ig",
            "lymphocyte",
            "monocyte",
            "neutrophil",
            "platelet",
        )
    }
    assert set((truth["x"] - 90) % 180) == {0} and set((truth["y"] - 90) % 180) == {0}


def test_unknown_sample_names_the_choices():
    with pytest.raises(WBCError, match="smear, bccd, gallery"):
        load_sample("nope")


@pytest.mark.parametrize("name", ["gallery", "bccd"])
def test_write_sample_as_tiff_keeps_pixel_size_and_truth(name, tmp_path):
    image_path, truth_path = write_sample(name, tmp_path / "s.tif")
    smear = read_smear(image_path)
    sample = load_sample(name)
    assert np.array_equal(np.asarray(smear.levels[0]), sample.image)
    if sample.pixel_size_um:
        assert smear.pixel_size_um == pytest.approx(sample.pixel_size_um, rel=1e-4)
    else:
        assert smear.pixel_size_um is None
    assert truth_path.name == "s-truth.csv"
    pd.testing.assert_frame_equal(pd.read_csv(truth_path), sample.truth)


def test_cli_writes_a_sample_and_refuses_an_unknown_one(tmp_path, capsys):
    from napari_wbc.cli import main

    assert main(["sample", "gallery", "-o", str(tmp_path / "g.tif")]) == 0
    assert "CC BY 4.0" in capsys.readouterr().out
    assert read_smear(tmp_path / "g.tif").pixel_size_um == pytest.approx(0.2, rel=1e-4)
    assert (tmp_path / "g-truth.csv").exists()
    with pytest.raises(SystemExit):
        main(["sample", "nope", "-o", str(tmp_path / "n.tif")])
    assert "invalid choice" in capsys.readouterr().err


def test_write_sample_refuses_an_unknown_format(tmp_path):
    with pytest.raises(WBCError, match=r"\.tif, \.png or \.jpg"):
        write_sample("gallery", tmp_path / "s.bmpx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize(("name", "floor"), [("gallery", GALLERY_FLOOR), ("bccd", BCCD_FLOOR)])
def test_built_in_model_agrees_with_the_truth(name, floor):
    from napari_wbc.inference import load_any
    from napari_wbc.models.files import default_model_path
    from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear
    from napari_wbc.progress import run

    sample = load_sample(name)
    centres = sample.truth[["y", "x"]].to_numpy(float)
    config = ClassifyConfig(pixel_size_um=sample.pixel_size_um, tta="none")
    cells = run(
        iter_classify_smear(sample.image, load_any(default_model_path()), config, points=centres)
    )
    # Every truth cell is classified exactly once, at its own position.
    assert len(cells) == len(centres)
    nearest = [
        int(np.argmin(np.hypot(cells["y"].to_numpy() - y, cells["x"].to_numpy() - x)))
        for y, x in centres
    ]
    assert sorted(nearest) == list(range(len(centres)))
    agreement = float(
        np.mean(cells["class"].to_numpy()[nearest] == sample.truth["class"].to_numpy())
    )
    print(f"{name}: agreement {agreement:.3f}")
    assert agreement >= floor


@pytest.mark.gui
@pytest.mark.parametrize("key", ["bccd", "gallery"])
def test_open_sample_gives_image_and_truth_layers(make_napari_viewer, key):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-wbc", key)
    image, truth = viewer.layers
    assert image.rgb
    assert truth.name.endswith("truth")
    assert len(truth.data) == len(load_sample(key).truth)
    assert "class" in truth.features.columns
    # Truth and image share a scale, so the points sit on their cells.
    assert tuple(truth.scale) == tuple(image.scale)


@pytest.mark.gui
def test_both_real_samples_open_together_in_um_side_by_side(make_napari_viewer):
    """Issue #33: no "Inconsistent units across layers", and BCCD does not hide the gallery."""
    import warnings

    viewer = make_napari_viewer()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # napari's inconsistent-units warning
        viewer.open_sample("napari-wbc", "gallery")
        viewer.open_sample("napari-wbc", "bccd")
        viewer.open_sample("napari-wbc", "smear")
    images = [layer for layer in viewer.layers if getattr(layer, "rgb", False)]
    assert len(images) == 3
    # What napari checks before it shows "Inconsistent units across layers".
    assert viewer.layers.extent.units is not None
    assert {tuple(str(u) for u in layer.units) for layer in viewer.layers} == {
        ("micrometer", "micrometer")
    }
    # Their footprints in the world do not overlap.
    boxes = [layer.extent.world[:, -2:] for layer in images]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            apart = (a[1] <= b[0]).any() or (b[1] <= a[0]).any()
            assert apart, (a, b)
    # BCCD's pixel size is measured when classifying, not taken from the display scale.
    bccd = next(layer for layer in images if "BCCD" in layer.name)
    assert bccd.metadata["pixel_size_um"] is None
