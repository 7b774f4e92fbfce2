"""Training on the shared data's labs: the built-in model's recipe (napari_wbc.crosslab, issue #32)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from napari_wbc import crosslab
from napari_wbc.crosslab import LabsTrainConfig, balanced_draw, iter_train_labs
from napari_wbc.errors import WBCError
from napari_wbc.models.files import load_network, read_model_config
from napari_wbc.progress import run

#: A run small enough for a test: two small labs, random weights, 32 px, 2 × 3 batches of 8.
TINY = LabsTrainConfig(
    labs=("lisc", "bccd"),
    classes="shared",
    arch="resnet10t",
    imagenet=False,
    input_size=32,
    epochs1=2,
    steps=3,
    batch=8,
    epochs2=1,
    stain_pool=False,
    name="tiny-labs",
)


def test_config_problems_name_every_bad_setting():
    bad = LabsTrainConfig(
        labs=("pbc", "nowhere"), classes="all", aug="wild", epochs1=0, fov_rbc=20
    )
    text = "; ".join(bad.problems())
    for word in ("nowhere", "classes", "aug", "epochs1", "fov_rbc"):
        assert word in text
    with pytest.raises(WBCError, match="invalid training config"):
        bad.validate()
    assert LabsTrainConfig().problems() == []
    # PBC's eight classes are taught by PBC; without it they cannot be.
    assert "pbc lab" in " ".join(LabsTrainConfig(labs=("lisc",), classes="pbc").problems())


def test_spec_carries_the_field_of_view_and_input_normalisation():
    spec = LabsTrainConfig(fov_rbc=3.2, input_size=96).spec()
    assert spec.fov_px / spec.rbc_diameter_px == pytest.approx(3.2, rel=0.01)
    assert spec.input_size == 96 and spec.mean == (0.5, 0.5, 0.5) and len(spec.classes) == 8
    assert LabsTrainConfig(classes="shared", imagenet=False).spec().mean != (0.5, 0.5, 0.5)


def test_balanced_draw_picks_labs_evenly_and_spares_tiny_classes():
    # Lab A: 900 cells of two classes; lab B: 100 cells, one class of only 2 cells.
    lab = np.array(["a"] * 900 + ["b"] * 100)
    label = np.array(["x"] * 450 + ["y"] * 450 + ["x"] * 98 + ["y"] * 2)
    idx = balanced_draw(lab, label, 20000, np.random.default_rng(0))
    share_b = np.mean(lab[idx] == "b")
    assert 0.47 < share_b < 0.53  # a lab is drawn uniformly, whatever its size
    in_b = label[idx][lab[idx] == "b"]
    # B's 2-cell class is drawn in proportion to its size (2 of 22), not as half of B.
    assert np.mean(in_b == "y") == pytest.approx(2 / 22, abs=0.02)
    in_a = label[idx][lab[idx] == "a"]
    assert np.mean(in_a == "x") == pytest.approx(0.5, abs=0.03)


@pytest.fixture(scope="module")
def lab_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lab-crops")


@pytest.mark.realdata
@pytest.mark.slow
def test_cancel_resume_and_never_read_labs(data_dir, lab_cache, tmp_path, monkeypatch):
    read = []
    real = crosslab.cached_lab_crops

    def spy(lab, *args, **kwargs):
        read.append(lab)
        return real(lab, *args, **kwargs)

    monkeypatch.setattr(crosslab, "cached_lab_crops", spy)
    out = tmp_path / "m.safetensors"
    gen = iter_train_labs(TINY, out, cache_dir=lab_cache)
    epochs = []
    for event in gen:
        if event.info.get("event") == "epoch":
            epochs.append(event.info["epoch"])
            break
    gen.close()  # cancel after the first epoch
    assert epochs == [1]
    assert not out.exists()  # nothing half-written
    ckpt = tmp_path / "m.safetensors.ckpt"
    assert (ckpt / "state.json").is_file()

    seen = []
    written = run(
        iter_train_labs(TINY, out, cache_dir=lab_cache),
        lambda e: seen.append(e.info.get("epoch")) if e.info.get("event") == "epoch" else None,
    )
    assert seen == [2]  # resumed after epoch 1
    assert written == out and not ckpt.exists()
    config = read_model_config(out)
    assert [h["epoch"] for h in config.history if "stage" not in h] == [1, 2]
    assert config.training["labs"] == ["lisc", "bccd"]
    assert "pbc_val_macro_f1" not in config.metrics  # PBC not trained on, not scored
    assert set(read) == {"lisc", "bccd"}  # the other labs are never read
    model, loaded = load_network(out, cache=False)
    assert loaded.classes == ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
    x = np.random.default_rng(0).integers(0, 255, (2, 128, 128, 3), dtype=np.uint8)
    prob = crosslab.predict_crops(model, x, loaded.spec, d4=True)
    assert prob.shape == (2, 5) and np.allclose(prob.sum(1), 1, atol=1e-5)


@pytest.mark.realdata
@pytest.mark.slow
def test_a_changed_setting_starts_afresh(data_dir, lab_cache, tmp_path):
    out = tmp_path / "m.safetensors"
    gen = iter_train_labs(TINY, out, cache_dir=lab_cache)
    for event in gen:
        if event.info.get("event") == "epoch":
            break
    gen.close()
    other = dataclasses.replace(TINY, lr=5e-4)
    seen = []
    run(
        iter_train_labs(other, out, cache_dir=lab_cache),
        lambda e: seen.append(e.info.get("epoch")) if e.info.get("event") == "epoch" else None,
    )
    assert seen == [1, 2]  # the checkpoint of other settings was not resumed


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "napari_wbc.cli", "train", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_train_labs_errors_are_actionable(tmp_path):
    r = _cli("--labs", "pbc,mars", "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown lab 'mars'" in r.stderr and "raabin" in r.stderr
    r = _cli("-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "--labs" in r.stderr
    r = _cli(str(tmp_path), "--labs", "all", "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "not both" in r.stderr
    r = _cli("--labs", "lisc", "-o", str(tmp_path / "x"))  # PBC's 8 classes without PBC
    assert r.returncode == 2 and "pbc lab" in r.stderr
