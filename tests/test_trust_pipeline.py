"""Trust statistics in use: stored in the ensemble file, applied when classifying, reported."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from napari_wbc.cli import main
from napari_wbc.errors import ModelFileError
from napari_wbc.features import member_outputs
from napari_wbc.inference import load_any, predict_crops
from napari_wbc.models.files import read_ensemble, save_ensemble
from napari_wbc.synthetic import make_smear
from napari_wbc.trust import TrustStats, fit_trust_stats

SHAPE = (700, 900)


def _discs(n: int, colour, seed: int, size: int = 64) -> np.ndarray:
    """Crops of one stained disc on cream glass."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = np.empty((size, size, 3))
        img[:] = (238, 228, 222)
        r = size * rng.uniform(0.2, 0.35)
        img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r] = colour
        img += rng.normal(0, 5, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def trusted_ensemble(tiny_model_path, tmp_path_factory):
    """The tiny model as an ensemble file whose trust statistics were fitted on purple discs."""
    folder = tmp_path_factory.mktemp("trusted")
    plain = folder / "plain.json"
    save_ensemble(plain, [tiny_model_path], tta="none")
    ens = load_any(plain)
    fit_crops = _discs(60, (110, 40, 140), seed=1)
    val_crops = _discs(60, (110, 40, 140), seed=2)
    fit = member_outputs(ens, fit_crops)
    val = member_outputs(ens, val_crops)
    # A random model has no truth to be calibrated against: its own predictions serve.
    stats = fit_trust_stats(
        fit["logits"],
        fit["features"],
        fit["logits"][0].argmax(1),
        val["logits"],
        val["features"],
        val["logits"][0].argmax(1),
    )
    path = folder / "trusted.json"
    save_ensemble(path, [tiny_model_path], tta="none", trust=stats.to_dict())
    return path, stats


def test_trust_statistics_round_trip_through_the_ensemble_file(trusted_ensemble, tmp_path):
    path, stats = trusted_ensemble
    stored = read_ensemble(path).trust
    back = TrustStats.from_dict(stored)
    assert back.temperature == pytest.approx(stats.temperature)
    assert back.ood_threshold == pytest.approx(stats.ood_threshold)
    assert len(back.features) == 1
    ens = load_any(path)
    assert ens.trust is not None and ens.trust.temperature == pytest.approx(stats.temperature)
    # Statistics for another number of members are refused with the fix.
    data = json.loads(path.read_text())
    data["trust"]["features"] *= 2
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({**data, "members": [{"path": str(read_ensemble(path).members[0].path)}]})
    )
    with pytest.raises(ModelFileError, match=r"describe 2 members.*fit_trust"):
        read_ensemble(bad)


def test_prediction_reports_feature_distance_and_calibrates(trusted_ensemble, tiny_model_path):
    path, stats = trusted_ensemble
    ens = load_any(path)
    seen = predict_crops(ens, _discs(30, (110, 40, 140), seed=3))
    foreign = predict_crops(ens, _discs(30, (40, 160, 60), seed=4))  # green: no stain does that
    assert seen["calibrated"] and "ood_distance" in seen
    assert np.median(foreign["ood_distance"]) > 2 * np.median(seen["ood_distance"])
    assert (foreign["ood_distance"] > stats.ood_threshold).mean() > 0.9
    assert (seen["ood_distance"] > stats.ood_threshold).mean() < 0.2
    # Calibration divides the logits by the temperature; without trust, plain softmax.
    plain = predict_crops(load_any(tiny_model_path, tta="none"), _discs(30, (110, 40, 140), 3))
    assert "ood_distance" not in plain
    logits = seen["member_logits"][0]
    z = logits / stats.temperature
    expected = np.exp(z - z.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(seen["probs"], expected, atol=1e-5)


def test_cells_unlike_the_training_cells_are_flagged_and_the_image_warned(
    trusted_ensemble, tmp_path, capsys
):
    path, _ = trusted_ensemble
    data = json.loads(path.read_text())
    data["trust"]["ood_threshold"] = 1e-9  # every cell is "unlike the training cells"
    data["members"][0]["path"] = str(read_ensemble(path).members[0].path)
    strict = tmp_path / "strict.json"
    strict.write_text(json.dumps(data))
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(make_smear(SHAPE, seed=3, wbc_per_mpx=8)).save(folder / "field.png")
    out = tmp_path / "out"
    args = ["classify", str(folder), "--model", str(strict), "-o", str(out), "-q"]
    assert main([*args, "--pixel-size", "0.1"]) == 0
    err = capsys.readouterr().err
    assert "field.png" in err and "unlike the model's training data" in err
    cells = pd.read_csv(out / "field.csv")
    assert len(cells) > 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary.loc[0, "unlike_training"] == summary.loc[0, "total"] == len(cells)
    assert summary.loc[0, "needs_review"] == len(cells)
