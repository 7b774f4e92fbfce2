"""Label-free test-time adaptation (napari_wbc.adapt)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from napari_wbc.adapt import MIN_CELLS, AdaptationError, adapt_batchnorm, save_adapted_model
from napari_wbc.models.build import build_model
from napari_wbc.models.files import ModelConfig, load_network, save_model
from napari_wbc.models.registry import get_spec


def _bn_means(model) -> list[torch.Tensor]:
    return [
        m.running_mean.clone()
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]


@pytest.fixture
def base_file(tmp_path):
    torch.manual_seed(0)
    spec = get_spec("tiny-resnet")
    model, _ = build_model(spec, pretrained=False)
    model.eval()
    return save_model(tmp_path / "base.safetensors", model, ModelConfig(spec=spec, name="base"))


def _cells(n: int, shift: float = 1.5, seed: int = 0) -> torch.Tensor:
    """A "new lab": inputs whose colour statistics are far from the training ones."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g) * 0.5 + shift


def test_adapted_statistics_differ_and_base_file_untouched(base_file, tmp_path):
    digest = hashlib.sha256(base_file.read_bytes()).hexdigest()
    base, config = load_network(base_file, cache=False)
    before = _bn_means(base)
    adapted = adapt_batchnorm(base, _cells(64))
    # The adapted copy learned the new cells' statistics ...
    after = _bn_means(adapted)
    assert any(not torch.allclose(a, b) for a, b in zip(before, after, strict=True))
    # ... and neither the model given nor its file changed.
    assert all(torch.equal(a, b) for a, b in zip(before, _bn_means(base), strict=True))
    out = save_adapted_model(tmp_path / "adapted.safetensors", adapted, config, "test cells", 64)
    assert hashlib.sha256(base_file.read_bytes()).hexdigest() == digest
    reloaded, reloaded_config = load_network(out, cache=False)
    assert all(torch.allclose(a, b) for a, b in zip(after, _bn_means(reloaded), strict=True))
    assert reloaded_config.training["adapted"]["cells"] == 64


def test_adaptation_is_deterministic(base_file):
    base, _ = load_network(base_file, cache=False)
    x = _cells(80)
    a = _bn_means(adapt_batchnorm(base, x))
    b = _bn_means(adapt_batchnorm(base, x))
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_too_few_cells_refused(base_file):
    base, _ = load_network(base_file, cache=False)
    with pytest.raises(AdaptationError, match=f"at least {MIN_CELLS} cells"):
        adapt_batchnorm(base, _cells(MIN_CELLS - 1))


def test_never_overwrites_a_model_file(base_file):
    base, config = load_network(base_file, cache=False)
    adapted = adapt_batchnorm(base, _cells(40))
    digest = hashlib.sha256(base_file.read_bytes()).hexdigest()
    with pytest.raises(AdaptationError, match="exists"):
        save_adapted_model(base_file, adapted, config, "test cells", 40)
    assert hashlib.sha256(base_file.read_bytes()).hexdigest() == digest


def test_model_without_batchnorm_refused():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    with pytest.raises(AdaptationError, match="no batch-norm"):
        adapt_batchnorm(model, _cells(40))


class _TwoGroups(torch.nn.Module):
    """Batch norm on the mean colour; class = which side of 0 the red channel is."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(3)

    def forward(self, x):
        f = self.bn(x.mean(dim=(2, 3)))
        return torch.stack([-f[:, 0], f[:, 0]], 1)


def test_balance_guards_against_the_class_mix():
    # 90 cells of one kind (red channel 0), 10 of another (red channel 4):
    # plain re-estimation puts the mean near the majority (0.4); balancing the
    # predicted classes puts it halfway (2.0), as for an even mix.
    x = torch.zeros(100, 3, 4, 4)
    x[90:, 0] = 4.0
    model = _TwoGroups().eval()
    raw = adapt_batchnorm(model, x, balance=False, min_cells=10)
    balanced = adapt_batchnorm(model, x, balance=True, min_cells=10)
    assert raw.bn.running_mean[0] == pytest.approx(0.4, abs=0.05)
    assert balanced.bn.running_mean[0] == pytest.approx(2.0, abs=0.2)
    assert model.bn.running_mean[0] == 0.0  # the model given is untouched


# -- ensembles, the smear pipeline and the command line -------------------------


def test_adapted_ensemble_is_a_new_object_and_saves_as_new_files(tiny_model_path, tmp_path):
    import numpy as np

    from napari_wbc.adapt import adapt_ensemble, save_adapted_ensemble
    from napari_wbc.inference import load_any

    base = load_any(tiny_model_path)
    digest = hashlib.sha256(tiny_model_path.read_bytes()).hexdigest()
    before = _bn_means(base.members[0].model)
    crops = np.random.default_rng(0).integers(0, 255, (40, 48, 48, 3), dtype=np.uint8)
    adapted = adapt_ensemble(base, crops, method="adabn")
    assert adapted is not base and adapted.path is None
    assert adapted.metrics["adapted"]["cells"] == 40
    assert any(
        not torch.allclose(a, b)
        for a, b in zip(before, _bn_means(adapted.members[0].model), strict=True)
    )
    assert all(
        torch.equal(a, b) for a, b in zip(before, _bn_means(base.members[0].model), strict=True)
    )
    out = save_adapted_ensemble(tmp_path / "adapted", adapted, "random crops")
    assert out.suffix == ".safetensors" and out.is_file()
    with pytest.raises(AdaptationError, match="exists"):
        save_adapted_ensemble(out, adapted, "random crops")
    assert hashlib.sha256(tiny_model_path.read_bytes()).hexdigest() == digest
    with pytest.raises(AdaptationError, match=f"at least {MIN_CELLS}"):
        adapt_ensemble(base, crops[: MIN_CELLS - 1], method="adabn")


def test_smear_adaptation_changes_the_answers_and_needs_enough_cells(tiny_model_path):
    import numpy as np

    from napari_wbc.inference import load_any
    from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear
    from napari_wbc.progress import run
    from napari_wbc.synthetic import make_sample_smear

    smear = make_sample_smear()
    ensemble = load_any(tiny_model_path)
    config = dict(pixel_size_um=0.1, tta="none", stain_normalize=False)
    rng = np.random.default_rng(0)
    points = np.column_stack(
        [rng.uniform(100, smear.shape[0] - 100, 48), rng.uniform(100, smear.shape[1] - 100, 48)]
    )
    plain = run(iter_classify_smear(smear, ensemble, ClassifyConfig(**config), points=points))
    events = []
    adapted = run(
        iter_classify_smear(
            smear, ensemble, ClassifyConfig(**config, adapt="adabn"), points=points
        ),
        events.append,
    )
    assert plain.attrs["adapted_cells"] == 0
    assert adapted.attrs["adapted_cells"] == 48
    assert any(e.stage == "adapt" for e in events)
    p = [c for c in plain.columns if c.startswith("p_")]
    assert not np.allclose(plain[p].to_numpy(), adapted[p].to_numpy(), atol=1e-4)
    # A few cells: classified as they are, and the result says why.
    few = run(
        iter_classify_smear(
            smear, ensemble, ClassifyConfig(**config, adapt="adabn"), points=points[:10]
        )
    )
    assert few.attrs["adapted_cells"] == 0
    assert "not adapted" in few.attrs["warning"]
    assert len(few) == 10


# -- prototypes (T3A) -------------------------------------------------------------


class _Features(torch.nn.Module):
    """A "network" whose input is its feature vector, with timm's head interface."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.fc = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(weight)
            self.fc.bias.zero_()

    def forward_features(self, x):
        return x

    def forward_head(self, x, pre_logits: bool = False):
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.fc(x)


def _rotated_lab(n_per_class: int = 50, turn_deg: float = 50.0, seed: int = 0):
    """Three classes 120° apart on a circle; a classifier trained on a lab turned ``turn_deg``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = np.deg2rad([0.0, 120.0, 240.0])
    x, y = [], []
    for k, a in enumerate(centres):
        angles = a + rng.normal(0, 0.35, n_per_class)
        radius = rng.uniform(0.8, 1.2, n_per_class)
        x.append(np.column_stack([np.cos(angles), np.sin(angles)]) * radius[:, None])
        y += [k] * n_per_class
    turn = np.deg2rad(turn_deg)
    weight = np.column_stack([np.cos(centres + turn), np.sin(centres + turn)]) * 3.0
    return (
        torch.tensor(np.concatenate(x), dtype=torch.float32),
        np.array(y),
        torch.tensor(weight, dtype=torch.float32),
    )


def test_prototypes_move_the_classifier_to_where_the_new_labs_cells_lie():
    from napari_wbc.adapt import PROTOTYPE_MIN_CELLS, adapt_prototypes

    x, y, weight = _rotated_lab()
    model = _Features(weight)
    before = model.fc.weight.clone()
    with torch.no_grad():
        base_acc = float((model(x).argmax(1).numpy() == y).mean())
    adapted = adapt_prototypes(model, x, support=20)
    with torch.no_grad():
        acc = float((adapted(x).argmax(1).numpy() == y).mean())
    assert base_acc < 0.75  # measured 0.69: the lab's cells lie 50° from the classifier
    assert acc > 0.88  # measured 0.91
    assert torch.equal(model.fc.weight, before)  # the model itself is untouched
    assert torch.all(adapted.fc.bias == 0)
    # The prototypes keep the classifier's scale.
    assert float(adapted.fc.weight.norm(dim=1).mean()) == pytest.approx(
        float(before.norm(dim=1).mean()), rel=1e-5
    )
    again = adapt_prototypes(model, x, support=20)
    assert torch.equal(again.fc.weight, adapted.fc.weight)  # deterministic
    with pytest.raises(AdaptationError, match=f"at least {PROTOTYPE_MIN_CELLS}"):
        adapt_prototypes(model, x[: PROTOTYPE_MIN_CELLS - 1])


def test_prototype_adaptation_of_an_ensemble_saves_as_new_files(tiny_model_path, tmp_path):
    import numpy as np

    from napari_wbc.adapt import adapt_ensemble, adapt_method, save_adapted_ensemble
    from napari_wbc.inference import load_any
    from napari_wbc.models.files import read_model_config

    base = load_any(tiny_model_path)
    head = base.members[0].model.get_classifier().weight.clone()
    before = _bn_means(base.members[0].model)
    crops = np.random.default_rng(1).integers(0, 255, (130, 48, 48, 3), dtype=np.uint8)
    with pytest.raises(AdaptationError, match="at least 128"):
        adapt_ensemble(base, crops[:100])  # enough for AdaBN, too few for prototypes
    adapted = adapt_ensemble(base, crops)  # the default method
    assert adapt_method(True) == "prototypes"
    assert adapted.metrics["adapted"] == {"method": "prototypes", "cells": 130}
    new_head = adapted.members[0].model.get_classifier().weight
    assert not torch.allclose(new_head, head)
    assert torch.equal(base.members[0].model.get_classifier().weight, head)
    # Only the classifier moves: the features' batch norms are as they were.
    assert all(
        torch.equal(a, b) for a, b in zip(before, _bn_means(adapted.members[0].model), strict=True)
    )
    out = save_adapted_ensemble(tmp_path / "adapted", adapted, "random crops")
    config = read_model_config(out)
    assert config.training["adapted"]["method"] == "prototypes"
    assert "T3A" in config.notes
    reloaded, _ = load_network(out, cache=False)
    assert torch.allclose(reloaded.get_classifier().weight, new_head)
    with pytest.raises(AdaptationError, match="unknown adaptation"):
        adapt_method("tent")


def test_a_folder_of_camera_fields_is_adapted_once_to_all_their_cells(
    tiny_model_path, tmp_path, monkeypatch, cut_and_run
):
    # Each field holds fewer cells than adaptation needs; the folder, one
    # microscope and stain, holds enough: the model is adapted once to all
    # of them, and every field is classified by the adapted copy.
    import numpy as np
    import pandas as pd
    from PIL import Image

    from napari_wbc.inference import load_any
    from napari_wbc.pipeline import ClassifyConfig
    from napari_wbc.progress import run
    from napari_wbc.smears import iter_classify_files
    from napari_wbc.synthetic import make_smear

    folder = tmp_path / "fields"
    folder.mkdir()
    for seed in (1, 2, 3):
        field = make_smear((1280, 1280), seed=seed, wbc_per_mpx=9.0)
        Image.fromarray(field).save(folder / f"field-{seed}.png")
    ensemble = load_any(tiny_model_path)
    config = dict(tta="none", stain_normalize=False)
    plain = run(
        iter_classify_files([folder], ensemble, tmp_path / "plain", ClassifyConfig(**config))
    )
    per_field = plain["total"].iloc[:-1].to_numpy()
    assert (per_field < MIN_CELLS).all() and per_field.sum() >= MIN_CELLS, per_field
    events = []
    adapted = run(
        iter_classify_files(
            [folder], ensemble, tmp_path / "adapted", ClassifyConfig(**config, adapt="adabn")
        ),
        events.append,
    )
    assert [e for e in events if e.stage == "adapt"]
    # The same cells, other probabilities: every field went through the adapted model.
    assert adapted["total"].tolist() == plain["total"].tolist()
    for seed in (1, 2, 3):
        a = pd.read_csv(tmp_path / "adapted" / f"field-{seed}.csv")
        b = pd.read_csv(tmp_path / "plain" / f"field-{seed}.csv")
        p = [c for c in a.columns if c.startswith("p_")]
        assert p and not np.allclose(a[p].to_numpy(), b[p].to_numpy(), atol=1e-4)
    # Each field is prepared and cut once, for the adaptation; the adapted
    # model's look at the cells is its first view of them (prototypes).
    cut, ran = cut_and_run
    cut.clear()
    ran.clear()
    monkeypatch.setattr("napari_wbc.adapt.PROTOTYPE_MIN_CELLS", int(per_field.sum()))
    run(iter_classify_files([folder], ensemble, tmp_path / "plain-2", ClassifyConfig(**config)))
    once, ran_plain = len(cut), sum(ran)
    cut.clear()
    ran.clear()
    protos = run(
        iter_classify_files(
            [folder], ensemble, tmp_path / "protos", ClassifyConfig(**config, adapt="prototypes")
        )
    )
    assert protos["total"].tolist() == plain["total"].tolist()
    assert len(cut) == once  # not cut again to classify
    assert ran_plain > 0 and ran == []  # each cell's one view: the adaptation's look
    # One field alone (its own scale): too few cells, classified as it is.
    field = [folder / "field-1.png"]
    for name, adapt in (("one", "adabn"), ("one-plain", False)):
        cfg = ClassifyConfig(**config, adapt=adapt)
        run(iter_classify_files(field, ensemble, tmp_path / name, cfg))
    a = pd.read_csv(tmp_path / "one" / "field-1.csv")
    b = pd.read_csv(tmp_path / "one-plain" / "field-1.csv")
    p = [c for c in a.columns if c.startswith("p_")]
    assert len(a) == len(b) and np.allclose(a[p].to_numpy(), b[p].to_numpy(), atol=1e-6)


def test_evaluating_a_folder_of_fields_adapts_once_to_all_their_cells(
    tiny_model_path, tmp_path, monkeypatch
):
    # `napari-wbc evaluate boxes.csv --adapt`: as `classify`, one adaptation
    # for the folder's fields, then every field classified by the adapted copy.
    import pandas as pd
    from PIL import Image

    from napari_wbc.inference import load_any
    from napari_wbc.pipeline import ClassifyConfig
    from napari_wbc.progress import run
    from napari_wbc.smears import iter_evaluate_smears
    from napari_wbc.synthetic import make_smear, smear_truth

    rows = []
    for seed in (1, 2, 3):
        path = tmp_path / f"field-{seed}.png"
        Image.fromarray(make_smear((1280, 1280), seed=seed, wbc_per_mpx=9.0)).save(path)
        truth = smear_truth((1280, 1280), seed=seed, wbc_per_mpx=9.0)
        for t in truth[truth["kind"] == "wbc"].itertuples():
            r = t.diameter / 2
            rows.append(
                {
                    "path": str(path),
                    "label": t.label,
                    "x": t.x - r,
                    "y": t.y - r,
                    "w": 2 * r,
                    "h": 2 * r,
                }
            )
    boxes = pd.DataFrame(rows)
    ensemble = load_any(tiny_model_path)
    config = dict(tta="none", stain_normalize=False)
    plain = run(iter_evaluate_smears(boxes, ensemble, ClassifyConfig(**config)))
    import napari_wbc.adapt as adapt

    calls = []
    real = adapt.adapt_ensemble_and_passes

    def recorded(ens, crops, *args, **kwargs):
        calls.append(len(crops))
        return real(ens, crops, *args, **kwargs)

    monkeypatch.setattr(adapt, "adapt_ensemble_and_passes", recorded)
    events = []
    adapted = run(
        iter_evaluate_smears(boxes, ensemble, ClassifyConfig(**config, adapt="adabn")),
        events.append,
    )
    adapting = [e for e in events if e.stage == "adapt"]
    assert adapting and adapting[-1].done == 3
    assert adapted["detection"] == plain["detection"]  # the same cells found
    assert adapted["n"] == plain["n"] > 0
    # Once, to the cells found in all three fields (each alone has fewer than needed).
    found = plain["detection"]["tp"] + plain["detection"]["fp"]
    assert calls == [found] and found >= MIN_CELLS


def test_the_adaptations_look_at_the_crops_is_the_adapted_models_first_view(
    tiny_model_path, monkeypatch
):
    # Prototype adaptation runs each member over every crop as it is; the
    # adapted model's first view of those crops is the same features through
    # its new last layer, handed on instead of run again.
    import numpy as np

    import napari_wbc.passes as passes
    from napari_wbc.adapt import PROTOTYPE_MIN_CELLS, adapt_ensemble_and_passes
    from napari_wbc.inference import iter_predict_crops, load_any
    from napari_wbc.progress import run

    base = load_any(tiny_model_path, tta="none")
    crops = np.random.default_rng(3).integers(
        0, 256, (PROTOTYPE_MIN_CELLS + 8, 40, 40, 3), dtype=np.uint8
    )
    adapted, known = adapt_ensemble_and_passes(base, crops)
    assert known is not None and known.ensemble is adapted
    assert (known.views == 1).all()
    fresh = run(iter_predict_crops(adapted, crops, gate=True))
    runs = []
    real = passes.iter_add_views
    monkeypatch.setattr(
        passes,
        "iter_add_views",
        lambda *a, **k: (runs.append(1), (yield from real(*a, **k)))[1],
    )
    reused = run(iter_predict_crops(adapted, crops, gate=True, known=known))
    assert runs == []  # one view: nothing left to run
    np.testing.assert_allclose(reused["probs"], fresh["probs"], atol=1e-4)
    assert (reused["pred"] == fresh["pred"]).mean() >= 0.99
    # A set larger than the adaptation uses: the passes of the sampled crops
    # only, which leave exactly the other crops to run, with the same answer.
    monkeypatch.setattr("napari_wbc.adapt.MAX_CELLS", PROTOTYPE_MIN_CELLS)
    adapted, known = adapt_ensemble_and_passes(base, crops)
    assert known is not None and len(known.rows) == PROTOTYPE_MIN_CELLS
    assert known.views.shape == (len(adapted.members), PROTOTYPE_MIN_CELLS)
    fresh = run(iter_predict_crops(adapted, crops, gate=True))
    ran = []
    monkeypatch.setattr(
        passes,
        "iter_add_views",
        lambda *a, **k: (ran.append(a[7].copy()), (yield from real(*a, **k)))[1],
    )
    reused = run(iter_predict_crops(adapted, crops, gate=True, known=known))
    left = np.setdiff1d(np.arange(len(crops)), known.rows)
    np.testing.assert_array_equal(np.unique(np.concatenate(ran)), left)
    np.testing.assert_allclose(reused["probs"], fresh["probs"], atol=1e-4)


def test_a_smear_is_adapted_to_a_sample_of_blocks_each_cut_once(
    tiny_model_path, monkeypatch, cut_and_run
):
    # Adaptation looks at MAX_CELLS cells at most: blocks are visited in a
    # seeded random order until they hold that many; the blocks cut for it,
    # and the adapted model's passes over its cells, are the classification's.
    import numpy as np

    from napari_wbc.adapt import PROTOTYPE_MIN_CELLS
    from napari_wbc.inference import load_any
    from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear
    from napari_wbc.progress import run
    from napari_wbc.synthetic import make_sample_smear

    smear = make_sample_smear()
    ensemble = load_any(tiny_model_path)
    config = dict(pixel_size_um=0.1, tta="none", stain_normalize=False, block=256)
    n = PROTOTYPE_MIN_CELLS + 64
    rng = np.random.default_rng(1)
    points = np.column_stack(
        [rng.uniform(50, smear.shape[0] - 50, n), rng.uniform(50, smear.shape[1] - 50, n)]
    )
    cut, ran = cut_and_run
    plain = run(iter_classify_smear(smear, ensemble, ClassifyConfig(**config), points=points))
    with_cells = sorted(cut)
    cut.clear()
    ran.clear()
    monkeypatch.setattr("napari_wbc.adapt.MAX_CELLS", PROTOTYPE_MIN_CELLS)
    events = []
    adapted = run(
        iter_classify_smear(
            smear, ensemble, ClassifyConfig(**config, adapt="prototypes"), points=points
        ),
        events.append,
    )
    assert adapted.attrs["adapted_cells"] == PROTOTYPE_MIN_CELLS
    blocks = [e for e in events if e.stage == "blocks"][-1].total
    visited = [e for e in events if e.stage == "adapt"]
    assert 0 < len(visited) < blocks  # a sample of the blocks, not all of them
    assert sorted(cut) == with_cells and len(set(cut)) > 1  # every block cut once
    # The sampled cells' one view came from the adaptation: only the others ran.
    assert sum(ran) == n - PROTOTYPE_MIN_CELLS
    # Every cell, in the grid's order, as without adaptation.
    np.testing.assert_allclose(adapted[["y", "x"]], plain[["y", "x"]])
    p = [c for c in plain.columns if c.startswith("p_")]
    assert not np.allclose(plain[p].to_numpy(), adapted[p].to_numpy(), atol=1e-4)
