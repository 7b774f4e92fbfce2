"""Export of labelled cells."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from napari_wbc.errors import WBCError
from napari_wbc.export import cells_to_csv, cells_to_geojson, class_colour, iter_export_crops
from napari_wbc.progress import run


@pytest.fixture
def cells():
    return pd.DataFrame(
        {
            "x": [10.0, 50.5, 90.0],
            "y": [20.0, 60.0, 5.0],
            "class": ["neutrophil", "lymphocyte", "neutrophil"],
            "confidence": [0.9, 0.55, 0.99],
            "needs_review": [False, True, False],
            "diameter": [12.0, np.nan, 10.0],
            "p_neutrophil": [0.9, 0.45, 0.99],
            "p_lymphocyte": [0.1, 0.55, 0.01],
        }
    )


def test_csv_has_pixels_microns_and_probabilities(tmp_path, cells):
    path = cells_to_csv(cells, tmp_path / "cells.csv", pixel_size_um=0.25)
    table = pd.read_csv(path)
    assert list(table["class"]) == list(cells["class"])
    np.testing.assert_allclose(table["x_um"], cells["x"] * 0.25)
    np.testing.assert_allclose(table["y_um"], cells["y"] * 0.25)
    np.testing.assert_allclose(table["p_lymphocyte"], cells["p_lymphocyte"])
    assert table["needs_review"].tolist() == [False, True, False]
    assert [p.name for p in tmp_path.iterdir()] == ["cells.csv"]


def test_geojson_is_what_qupath_reads(tmp_path, cells):
    path = tmp_path / "cells.geojson"
    collection = cells_to_geojson(cells, path)
    assert json.loads(path.read_text()) == collection
    assert collection["type"] == "FeatureCollection"
    feats = collection["features"]
    assert len(feats) == 3
    for feat, (_, row) in zip(feats, cells.iterrows(), strict=True):
        assert feat["type"] == "Feature"
        props = feat["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == row["class"]
        assert props["classification"]["color"] == list(class_colour(row["class"]))
        geom = feat["geometry"]
        assert geom["type"] in ("Point", "Polygon")
        if geom["type"] == "Polygon":
            ring = np.asarray(geom["coordinates"][0])
            assert (ring[0] == ring[-1]).all() and len(ring) >= 4
            centre = ring[:-1].mean(axis=0)
            np.testing.assert_allclose(centre, [row["x"], row["y"]], atol=0.05)
            radius = np.linalg.norm(ring[:-1] - centre, axis=1)
            np.testing.assert_allclose(radius, row["diameter"] / 2, atol=0.05)
        else:
            assert geom["coordinates"] == [row["x"], row["y"]]
    assert feats[1]["properties"]["needs_review"] is True
    assert feats[0]["properties"]["measurements"]["p_neutrophil"] == pytest.approx(0.9)


def test_crops_go_to_a_folder_per_class(tmp_path, cells):
    image = np.zeros((100, 120, 3), np.uint8)
    image[:, :, 0] = np.arange(120)[None, :]
    written = run(iter_export_crops(image, cells, tmp_path / "crops", crop_px=16))
    assert len(written) == 3
    assert sorted(p.parent.name for p in written) == ["lymphocyte", "neutrophil", "neutrophil"]
    crop = np.asarray(Image.open(written[0]))
    assert crop.shape == (16, 16, 3)
    # Centred on x=10: red channel encodes the column.
    assert crop[8, 8, 0] == 10
    # The cell at y=5 reaches past the top border: padded with white glass.
    top = np.asarray(Image.open(written[2]))
    assert (top[0] == 255).all()


def test_missing_columns_are_refused(tmp_path):
    with pytest.raises(WBCError, match="class"):
        cells_to_csv(pd.DataFrame({"x": [1], "y": [2]}), tmp_path / "a.csv")


def test_unknown_classes_get_stable_colours():
    assert class_colour("blast") == class_colour("blast")
    assert class_colour("neutrophil") != class_colour("lymphocyte")


def test_exported_crops_are_the_pipelines_crops_padded_with_glass(tmp_path):
    import dask.array as da

    from napari_wbc.images import cut_square

    rng = np.random.default_rng(0)
    image = rng.integers(0, 200, (60, 80, 3), dtype=np.uint8)
    lazy = da.from_array(image, chunks=(16, 16, 3))
    # One cell inside, one whose crop reaches past the top-left corner.
    cells = pd.DataFrame({"y": [30.4, 3.0], "x": [40.6, 2.0], "class": ["a", "b"]})
    paths = run(iter_export_crops(lazy, cells, tmp_path, 21))
    inside = np.asarray(Image.open(paths[0]))
    assert np.array_equal(inside, image[20:41, 31:52])
    assert np.array_equal(inside, cut_square(image, 30.4, 40.6, 21))
    corner = np.asarray(Image.open(paths[1]))
    assert np.array_equal(corner, cut_square(lazy, 3.0, 2.0, 21))
    assert (corner[:7] == 255).all() and (corner[:, :8] == 255).all()
    assert np.array_equal(corner[7:, 8:], image[:14, :13])
