"""Decoupled two-stage training, checkpoints and resume, and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from napari_wbc.datasets import balanced_subset, load_labelled_crops  # noqa: E402
from napari_wbc.errors import DataError, WBCError  # noqa: E402
from napari_wbc.models import load_network, read_model_config  # noqa: E402
from napari_wbc.prediction import evaluate  # noqa: E402
from napari_wbc.progress import run  # noqa: E402
from napari_wbc.stain import default_reference  # noqa: E402
from napari_wbc.training import (  # noqa: E402
    TrainConfig,
    checkpoint_dir,
    iter_train,
    train,
    validation_split,
)

#: Classes of the synthetic crops: stain-like discs differing in colour and size.
DISC_CLASSES = {
    "big_pink": ((220, 120, 160), 0.38),
    "big_purple": ((110, 40, 140), 0.38),
    "small_pink": ((220, 120, 160), 0.18),
    "small_purple": ((110, 40, 140), 0.18),
}


def write_disc_crops(root: Path, per_class: int = 40, size: int = 40, seed: int = 0) -> Path:
    """Write ``root/<class>/<i>.png`` crops of one disc on cream glass; return ``root``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for name, (colour, radius) in DISC_CLASSES.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = np.empty((size, size, 3))
            image[:] = (238, 228, 222)
            r = size * radius * rng.uniform(0.9, 1.1)
            cy, cx = size / 2 + rng.uniform(-3, 3, 2)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = np.asarray(colour) + rng.normal(
                0,
                6,
                3,
            )
            image += rng.normal(0, 4, image.shape)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def tiny_config(**kw) -> TrainConfig:
    """A config that trains in seconds on the disc crops."""
    base = dict(
        spec="tiny-resnet",
        epochs_stage1=4,
        epochs_stage2=3,
        batch_size=16,
        input_size=32,
        lr_stage1=3e-3,
        lr_stage2=3e-3,
        num_threads=2,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def discs(tmp_path_factory) -> pd.DataFrame:
    root = write_disc_crops(tmp_path_factory.mktemp("discs"))
    return load_labelled_crops(root)


@pytest.fixture(scope="module")
def trained(discs, tmp_path_factory):
    """A model trained through both stages, with the progress events it yielded."""
    out = tmp_path_factory.mktemp("model") / "discs.safetensors"
    events = []
    path = train(discs, tiny_config(), out, callback=events.append)
    return path, events


def _classifier_keys(model) -> set[str]:
    head = {id(p) for p in model.get_classifier().parameters()}
    return {name for name, p in model.named_parameters() if id(p) in head}


def _tensors(path) -> dict:
    import safetensors.torch

    return safetensors.torch.load_file(str(path))


def test_two_stages_give_a_model_that_beats_chance(trained, discs):
    path, events = trained
    config = read_model_config(path)
    assert config.classes == tuple(sorted(DISC_CLASSES))
    # 4 stage-1 epochs, then 3 stage-2 epochs, each validated.
    assert [(h["stage"], h["epoch"]) for h in config.history] == [
        (1, 1),
        (1, 2),
        (1, 3),
        (1, 4),
        (2, 1),
        (2, 2),
        (2, 3),
    ]
    assert config.training["spec"] == "tiny-resnet"
    assert config.spec.input_size == 32
    # Crops were normalised to the built-in reference, and the model says so.
    assert config.stain == default_reference().to_dict()
    assert config.training["stain_source"]["n_pixels"] > 0
    # Chance is 0.25 for 4 balanced classes; seeds 0-4 all measured 1.0.
    assert config.metrics["macro_f1"] >= 0.8
    assert config.metrics["n"] == len(validation_split(discs, tiny_config())[1])
    metrics = evaluate(path, discs, tta="none")
    assert metrics["n"] == len(discs)
    assert metrics["macro_f1"] >= 0.8
    # No checkpoint is left once the model is saved.
    assert not checkpoint_dir(path).exists()

    batches = [e for e in events if e.stage in ("stage1", "stage2") and "batch" in e.info]
    epochs = [e for e in events if e.info.get("event") == "epoch"]
    assert len(epochs) == 7
    assert all(np.isfinite(e.info["loss"]) for e in batches)
    assert {"loss", "val_macro_f1", "epoch"} <= set(epochs[-1].info)
    # Stage 2 never ends below the stage-1 classifier on validation.
    best1 = max(h["val_macro_f1"] for h in config.history if h["stage"] == 1)
    assert config.metrics["macro_f1"] >= best1 - 1e-9


def test_stage2_changes_only_the_classifier(discs, tmp_path):
    out = tmp_path / "m.safetensors"
    train(discs, tiny_config(stages="stage1", epochs_stage1=2), out)
    before = _tensors(out)
    assert [h["stage"] for h in read_model_config(out).history] == [1, 1]

    train(discs, tiny_config(stages="stage2", epochs_stage2=3, lr_stage2=1e-2), out)
    after = _tensors(out)
    model, config = load_network(out, cache=False)
    head = _classifier_keys(model)
    assert head and set(before) == set(after)
    for key in before:
        if key in head:
            continue
        assert torch.equal(before[key], after[key]), f"stage 2 changed backbone tensor {key}"
    assert any(not torch.equal(before[k], after[k]) for k in head), "classifier did not train"
    assert [h["stage"] for h in config.history] == [1, 1, 2, 2, 2]


def test_stage2_alone_needs_an_existing_model(discs, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        train(discs, tiny_config(stages="stage2"), tmp_path / "none.safetensors")


def test_invalid_config_is_refused(discs, tmp_path):
    with pytest.raises(WBCError, match="stages"):
        train(discs, tiny_config(stages="all"), tmp_path / "m.safetensors")
    with pytest.raises(WBCError, match="val_fraction"):
        train(discs, tiny_config(val_fraction=1.5), tmp_path / "m.safetensors")


def test_config_round_trip():
    config = tiny_config(seed=7, stages="stage1")
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def _cancel_at(gen, stop) -> None:
    """Drive ``gen`` until an event satisfies ``stop``, then close it (a cancel)."""
    for event in gen:
        if stop(event):
            gen.close()
            return
    raise AssertionError("training ended before the cancel point")


def test_cancel_leaves_no_model_and_resume_matches_an_uninterrupted_run(discs, tmp_path):
    config = tiny_config(epochs_stage1=3, epochs_stage2=2, augment=True)
    reference = train(discs, config, tmp_path / "a.safetensors")
    again = train(discs, config, tmp_path / "b.safetensors")
    other_seed = train(
        discs,
        tiny_config(epochs_stage1=3, epochs_stage2=2, seed=1),
        tmp_path / "c.safetensors",
    )

    ref_cfg = read_model_config(reference)
    # Same seed and data: the same numbers, epoch by epoch.
    assert read_model_config(again).history == ref_cfg.history
    assert read_model_config(again).metrics == ref_cfg.metrics
    assert read_model_config(other_seed).history != ref_cfg.history

    out = tmp_path / "resumed.safetensors"
    ckpt = checkpoint_dir(out)
    # Cancel in the middle of stage 1's second epoch.
    _cancel_at(
        iter_train(discs, config, out),
        lambda e: e.stage == "stage1" and e.info.get("epoch") == 2 and e.info.get("batch") == 2,
    )
    assert not out.exists()
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["stage"], state["epoch"]) == ("stage1", 1)
    # Resume, then cancel again in stage 2.
    _cancel_at(
        iter_train(discs, config, out),
        lambda e: e.stage == "stage2" and e.info.get("epoch") == 2 and e.info.get("batch") == 1,
    )
    assert not out.exists()
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["stage"], state["epoch"]) == ("stage2", 1)
    # Resume to the end: the same run as if it had never stopped.
    events = []
    path = run(iter_train(discs, config, out), events.append)
    first_epoch = next(e for e in events if e.info.get("event") == "epoch")
    assert (first_epoch.stage, first_epoch.info["epoch"]) == ("stage2", 2)
    resumed = read_model_config(path)
    assert len(resumed.history) == len(ref_cfg.history) == 5
    for got, want in zip(resumed.history, ref_cfg.history, strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert resumed.metrics["macro_f1"] == pytest.approx(ref_cfg.metrics["macro_f1"])
    assert not ckpt.exists()


def test_no_resume_starts_afresh(discs, tmp_path):
    out = tmp_path / "m.safetensors"
    config = tiny_config(epochs_stage1=2, epochs_stage2=1)
    _cancel_at(iter_train(discs, config, out), lambda e: e.info.get("event") == "epoch")
    events = []
    run(iter_train(discs, config, out, resume=False), events.append)
    epochs = [(e.stage, e.info["epoch"]) for e in events if e.info.get("event") == "epoch"]
    assert epochs == [("stage1", 1), ("stage1", 2), ("stage2", 1)]


def test_evaluate_on_a_subset_of_classes(trained, discs):
    path, _ = trained
    part = discs[discs["label"].isin(["big_pink", "small_purple"])]
    metrics = evaluate(path, part, tta="flips")
    assert metrics["n"] == len(part)
    assert metrics["classes"] == ["big_pink", "small_purple"]
    assert sorted(metrics["absent_classes"]) == ["big_purple", "small_pink"]
    assert set(metrics["per_class"]) == {"big_pink", "small_purple"}
    assert metrics["tta"] == "flips"


def test_evaluate_refuses_unknown_labels(trained, discs):
    path, _ = trained
    bad = discs.head(3).assign(label="basophil")
    with pytest.raises(DataError, match="does not know"):
        evaluate(path, bad)


# ------------------------------------------------------------------- real data

PBC_DISTINCT = ["eosinophil", "lymphocyte", "neutrophil", "platelet"]


@pytest.mark.realdata
def test_tiny_model_learns_real_pbc_classes(data_dir, tmp_path):
    """Four visually distinct PBC classes, 40 crops each, 40 px: far above chance.

    Measured (seeds 0, 1, 2; 8 + 4 epochs; 2 CPU threads): training about 2 s,
    held-out macro-F1 0.89, 0.75, 0.84 (chance 0.25); the bar is 0.6.
    """
    df = load_labelled_crops(data_dir / "pbc" / "labels.csv")
    df = balanced_subset(df[df["label"].isin(PBC_DISTINCT)], per_class=80, seed=0)
    train_rows = df.groupby("label").head(40)
    held_out = df.drop(train_rows.index)
    config = tiny_config(epochs_stage1=8, epochs_stage2=4, input_size=40)
    path = train(train_rows, config, tmp_path / "pbc.safetensors")
    config_saved = read_model_config(path)
    assert config_saved.classes == tuple(PBC_DISTINCT)
    metrics = evaluate(path, held_out, tta="none")
    assert metrics["n"] == 160
    assert metrics["macro_f1"] >= 0.6, metrics


def test_stain_source_choices(trained, discs):
    from napari_wbc.errors import StainError

    path, _ = trained
    # Pale, small discs of one class hold too little stain to fit statistics on.
    pale = discs[discs["label"] == "small_pink"]
    with pytest.raises(StainError, match="cannot normalise"):
        evaluate(path, pale, tta="none", stain_source="fit")
    # "auto" falls back to the training set's statistics, as does "training".
    auto = evaluate(path, pale, tta="none", stain_source="auto")
    same = evaluate(path, pale, tta="none", stain_source="training")
    assert auto["accuracy"] == same["accuracy"] >= 0.8
    with pytest.raises(WBCError, match="stain_source"):
        evaluate(path, pale, stain_source="guess")


def test_fine_tuning_a_model_trained_without_stain_normalization_keeps_it_so(discs, tmp_path):
    # The built-in model learned under randomized stains and takes colours as
    # they are; a model fine-tuned from it must not start normalising them.
    import torch

    from napari_wbc.models.build import build_model
    from napari_wbc.models.files import ModelConfig, read_model_config, save_model
    from napari_wbc.models.registry import get_spec

    torch.manual_seed(0)
    spec = get_spec("tiny-resnet")
    model, _ = build_model(spec, pretrained=False)
    base = save_model(tmp_path / "base.safetensors", model, ModelConfig(spec=spec, stain=None))
    out = train(
        discs,
        tiny_config(base_model=str(base), epochs_stage1=1, epochs_stage2=1),
        tmp_path / "tuned.safetensors",
    )
    assert read_model_config(out).stain is None
    # From a base that normalises, the fine-tuned model normalises too.
    with_stain = train(
        discs, tiny_config(epochs_stage1=1, epochs_stage2=1), tmp_path / "s.safetensors"
    )
    assert read_model_config(with_stain).stain is not None
