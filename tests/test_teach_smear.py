"""Teaching from a classified smear: its cells cut as classification cut them, a new model file."""

import json

import numpy as np
import pytest

from napari_wbc.inference import load_any, predict_crops
from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear
from napari_wbc.progress import run
from napari_wbc.synthetic import make_sample_smear
from napari_wbc.teach import (
    TeachConfig,
    TeachError,
    free_model_path,
    iter_cut_smear_cells,
    iter_teach_smear,
)


@pytest.fixture(scope="module")
def classified(tiny_model_path):
    image = make_sample_smear()
    ensemble = load_any(tiny_model_path, tta="none")
    config = ClassifyConfig(device="cpu", exhaustive=True, adapt=False)
    cells = run(iter_classify_smear(np.asarray(image), ensemble, config))
    return np.asarray(image), ensemble, cells


def test_cells_are_cut_as_the_classification_cut_them(classified):
    image, ensemble, cells = classified
    assert len(cells) >= 3
    crops = run(
        iter_cut_smear_cells(
            image,
            ensemble,
            cells[["y", "x"]].to_numpy(),
            cells.attrs["rbc_diameter_px"],
            cells.attrs["stain_normalized"],
        )
    )
    assert crops.shape[:3] == (len(cells), cells.attrs["crop_px"], cells.attrs["crop_px"])
    probs = predict_crops(ensemble, crops, tta="none")["probs"]
    expected = cells[[f"p_{c}" for c in ensemble.classes]].to_numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-4)


def test_a_smear_teaches_a_new_model_file_with_provenance(classified, tiny_model_path, tmp_path):
    image, _ensemble, cells = classified
    labels = ["neutrophil", "lymphocyte", "neutrophil"]
    out = free_model_path(tmp_path, "smear-taught")
    assert out == tmp_path / "smear-taught.json"
    path = run(
        iter_teach_smear(
            image,
            cells[["y", "x"]].to_numpy()[:3],
            labels,
            tiny_model_path,
            cells.attrs["rbc_diameter_px"],
            cells.attrs["stain_normalized"],
            config=TeachConfig(steps=5),
            source="synthetic smear",
            save_to=out,
        )
    )
    assert path == out and path.is_file()
    taught = json.loads(path.read_text())["metrics"]["taught"]
    assert taught["cells"] == {"lymphocyte": 1, "neutrophil": 2}
    assert "synthetic smear" in taught["source"]
    # The name is taken now: the next one gets a suffix, nothing is overwritten.
    assert free_model_path(tmp_path, "smear-taught") == tmp_path / "smear-taught-2.json"
    with pytest.raises(TeachError):
        run(iter_teach_smear(image, np.zeros((2, 2)), ["neutrophil"], tiny_model_path, 40.0))


def test_taught_model_names_are_plain_file_names(tmp_path):
    path = free_model_path(tmp_path, "Real smear fields (BCCD)-taught")
    assert path == tmp_path / "Real-smear-fields-BCCD-taught.json"
    (tmp_path / "Real-smear-fields-BCCD-taught-0.safetensors").touch()  # a member file left
    assert free_model_path(tmp_path, "Real smear fields (BCCD)-taught").name == (
        "Real-smear-fields-BCCD-taught-2.json"
    )
