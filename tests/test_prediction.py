"""A model prepares its own input: the Preprocessor an ensemble owns, and crop-file listing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")

from napari_wbc.errors import DataError, WBCError
from napari_wbc.images import list_image_files
from napari_wbc.inference import load_any
from napari_wbc.prediction import list_crop_files
from napari_wbc.preprocess import Preprocessor, crop_side
from napari_wbc.progress import run
from napari_wbc.stain import default_reference
from napari_wbc.synthetic import make_sample_smear


@pytest.fixture
def ensemble(tiny_model_path):
    return load_any(tiny_model_path, tta="none")


def test_the_ensemble_knows_its_stain_method_reference_and_field_of_view(ensemble):
    prep = ensemble.preprocessor
    config = ensemble.members[0].config
    assert prep.stain_method == ensemble.stain_method == "macenko"
    assert prep.stain_target == config.stain == default_reference().to_dict()
    assert prep.fov_rbc == pytest.approx(config.spec.fov_rbc)
    assert prep.input_size == config.spec.input_size
    assert prep.cache_size == round(config.spec.input_size * 1.25)
    # The crop side the pipeline and fine-tuning from annotations both use.
    assert prep.crop_side(75.0) == crop_side(config.spec.fov_rbc, 75.0) == 360
    assert crop_side(0.1, 3.0) == 8  # never below 8 px


def test_smear_input_cuts_normalised_crops_in_image_coordinates(ensemble):
    image = make_sample_smear()
    raw = run(ensemble.preprocessor.iter_prepare_smear([image], 75.0, stain_normalize=False))
    assert raw.normalizer is None and raw.side == 360
    norm = run(ensemble.preprocessor.iter_prepare_smear([image], 75.0))
    assert norm.normalizer is not None
    # A window of the image with its origin gives the crops of the whole image.
    window = image[200:1200, 300:1500]
    ys, xs = np.array([600.0, 700.5]), np.array([800.0, 900.0])
    whole = raw.crops(image, (0, 0), ys, xs)
    part = raw.crops(window, (200, 300), ys, xs)
    assert whole.shape == (2, 360, 360, 3) and whole.dtype == np.uint8
    np.testing.assert_array_equal(part, whole)
    np.testing.assert_array_equal(norm.crops(image, (0, 0), ys, xs), norm.normalizer(whole))
    assert raw.crops(image, (0, 0), [], []).shape == (0, 360, 360, 3)


def test_stain_rule_from_the_model_config():
    from napari_wbc.models.files import ModelConfig
    from napari_wbc.models.registry import get_spec

    spec = get_spec("tiny-resnet")
    reference = default_reference().to_dict()
    plain = Preprocessor.from_configs([ModelConfig(spec=spec)])
    assert plain.stain_target is None and plain.training_normalizer() is None
    assert plain.crop_normalizer(lambda i: None, 5) is None  # raw colours: nothing to do
    legacy = Preprocessor.from_configs([ModelConfig(spec=spec, stain=reference)])
    assert legacy.stain_method == "macenko"  # files that predate the recorded method
    trained = Preprocessor.from_configs(
        [
            ModelConfig(
                spec=spec,
                stain=reference,
                training={"stain_method": "reinhard", "stain_source": reference},
            )
        ]
    )
    assert trained.stain_method == "reinhard"
    normalizer = trained.training_normalizer()
    assert normalizer is not None and normalizer.requested == "reinhard"
    with pytest.raises(WBCError, match="stain_source"):
        trained.crop_normalizer(lambda i: None, 5, "guess")
    with pytest.raises(WBCError, match="training stain statistics"):
        legacy.crop_normalizer(lambda i: None, 5, "training")


def test_crop_files_are_listed_recursively_and_smears_are_not(tmp_path):
    crops = tmp_path / "crops"
    (crops / "a" / "deep").mkdir(parents=True)
    for name in ("a/1.png", "a/deep/2.jpg", "3.png", ".hidden.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(crops / name)
    (crops / "notes.txt").write_text("not an image")
    assert [p.name for p in list_crop_files([crops])] == ["3.png", "1.png", "2.jpg"]
    assert [p.name for p in list_image_files([crops])] == ["3.png"]
    with pytest.raises(DataError, match="does not exist"):
        list_crop_files([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        list_image_files([tmp_path / "empty"])


def test_a_tighter_field_of_view_is_the_measured_scale_times_it(ensemble, tmp_path):
    # What the leave-one-lab-out benchmark measured (cutting at k x the
    # measured red cell) is what an ensemble file's fov_scale does.
    import dataclasses

    from napari_wbc.prediction import iter_predict_crop_files
    from napari_wbc.synthetic import sample_smear_truth

    image = make_sample_smear()
    truth = sample_smear_truth()
    inside = truth[(truth["y"].between(200, image.shape[0] - 200))]
    inside = inside[inside["x"].between(200, image.shape[1] - 200)].head(6)
    paths = []
    for i, (y, x) in enumerate(zip(inside["y"].astype(int), inside["x"].astype(int), strict=True)):
        paths.append(tmp_path / f"crop{i}.png")
        Image.fromarray(image[y - 200 : y + 200, x - 200 : x + 200]).save(paths[-1])
    tight = dataclasses.replace(ensemble, fov_scale=0.8)
    a = run(iter_predict_crop_files(tight, paths, scale=60.0, exhaustive=True))
    b = run(iter_predict_crop_files(ensemble, paths, scale=60.0 * 0.8, exhaustive=True))
    c = run(iter_predict_crop_files(ensemble, paths, scale=60.0, exhaustive=True))
    np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-6)
    assert not np.allclose(a["probs"], c["probs"], atol=1e-4)
    # Crops taken as they are span the training field of view: a tighter one
    # cuts their centre (here 400 px crops: 0.8 x 400 px of them).
    as_is = run(iter_predict_crop_files(tight, paths, scale="as-is", exhaustive=True))
    given = run(
        iter_predict_crop_files(tight, paths, scale=400 / ensemble.fov_rbc, exhaustive=True)
    )
    np.testing.assert_allclose(as_is["probs"], given["probs"], atol=1e-6)
    plain = run(iter_predict_crop_files(ensemble, paths, scale="as-is", exhaustive=True))
    assert not np.allclose(as_is["probs"], plain["probs"], atol=1e-4)


def test_crop_table_flags_crops_unlike_the_training_cells():
    """predict's table carries the review rule's columns, as classify's cells do."""
    from napari_wbc.prediction import crop_table

    result = {
        "classes": ("a", "b"),
        "paths": ["x.png", "y.png"],
        "pred": np.array([0, 1]),
        "confidence": np.array([0.9, 0.55]),
        "needs_review": np.array([True, True]),
        "out_of_distribution": np.array([True, False]),
        "ood_score": np.array([1.7, 0.2]),
        "passes": np.array([1, 4]),
        "probs": np.array([[0.9, 0.1], [0.45, 0.55]]),
        "warning": "most cells look unlike the training cells",
        "tta": "d4",
    }
    table = crop_table(result)
    assert list(table.columns) == [
        "path", "class", "confidence", "needs_review", "out_of_distribution", "ood_score",
        "passes", "a", "b",
    ]  # fmt: skip
    assert table["class"].tolist() == ["a", "b"]
    assert table["out_of_distribution"].tolist() == [True, False]
    assert table.attrs["warning"].startswith("most cells")
    del result["out_of_distribution"], result["ood_score"], result["warning"]
    assert "ood_score" not in crop_table(result) and "warning" not in crop_table(result).attrs


@pytest.mark.realdata
@pytest.mark.slow
def test_predict_says_when_crops_come_from_a_lab_unlike_the_training_cells(data_dir):
    from napari_wbc.prediction import crop_table, iter_predict_crop_files

    def flagged(files):
        result = run(iter_predict_crop_files("wbc-pbc", files, tta="none", device="cpu"))
        return crop_table(result)

    other = flagged(sorted((data_dir / "lisc" / "images" / "neutrophil").glob("*.jpg"))[:16])
    own = flagged(sorted((data_dir / "pbc" / "images" / "neutrophil").glob("*.jpg"))[:16])
    # the PBC specialist on LISC's crops: most unlike its training cells, and it says so
    assert other["out_of_distribution"].mean() > 0.5
    assert other["needs_review"][other["out_of_distribution"]].all()
    assert "warning" in other.attrs
    # on PBC's own crops: few, and no warning
    assert own["out_of_distribution"].mean() < 0.2
    assert "warning" not in own.attrs
