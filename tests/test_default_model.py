"""The built-in ensemble: loads offline from inside the package and classifies."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import napari_wbc
from napari_wbc.errors import ModelFileError
from napari_wbc.inference import load_any
from napari_wbc.models.files import default_model_path, read_ensemble

try:
    DEFAULT = default_model_path()
except ModelFileError:
    DEFAULT = None

pytestmark = pytest.mark.skipif(DEFAULT is None, reason="this installation ships no default model")


def test_default_model_lives_inside_the_package_and_fits_the_budget():
    package = Path(napari_wbc.__file__).parent
    assert package in DEFAULT.parents
    members = [DEFAULT.parent / ref.path for ref in read_ensemble(DEFAULT).members]
    assert len(members) == 3
    assert all(package in p.resolve().parents for p in members)
    assert sum(p.stat().st_size for p in members) <= 40e6


def test_default_model_classifies_the_sample_offline(tmp_path):
    # A fresh interpreter with no network access allowed by the environment.
    code = (
        "from napari_wbc.inference import load_any\n"
        "from napari_wbc.models.files import default_model_path\n"
        "from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear\n"
        "from napari_wbc.progress import run\n"
        "from napari_wbc.synthetic import make_sample_smear\n"
        "ens = load_any(default_model_path())\n"
        "cells = run(iter_classify_smear(make_sample_smear(), ens, ClassifyConfig(pixel_size_um=0.1, tta='none')))\n"
        "print(len(cells), sorted(set(cells['class'])))\n"
    )
    env = {
        "HF_HUB_OFFLINE": "1",
        "NO_PROXY": "*",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    n = int(out.stdout.split()[0])
    assert n >= 13


@pytest.mark.realdata
def test_default_model_on_pbc_validation_crops(data_dir):
    from napari_wbc.datasets import balanced_subset, load_labelled_crops
    from napari_wbc.prediction import evaluate
    from napari_wbc.training import TrainConfig, validation_split

    table = load_labelled_crops(data_dir / "pbc" / "labels.csv")
    # The crops scripts/train_default_model.sh kept out of training: its
    # seeded subset (1000 per class, seed 0) and that subset's validation split.
    used = balanced_subset(table, per_class=1000, seed=0)
    _, validation = validation_split(used, TrainConfig(seed=0, val_fraction=0.2))
    sample = balanced_subset(validation, per_class=15, seed=12345)
    metrics = evaluate(load_any(DEFAULT), sample, tta="none", stain_source="training")
    assert metrics["n"] == 120
    assert metrics["absent_classes"] == []
    # Measured 0.959 (no TTA); a change to the stain transform the models
    # were trained with once dropped it to about 0.89.
    assert metrics["macro_f1"] >= 0.94
    assert np.isfinite(metrics["balanced_accuracy"])
