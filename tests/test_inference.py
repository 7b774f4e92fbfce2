"""TTA sets, ensemble prediction on crops, and member disagreement."""

import itertools

import numpy as np
import pytest
import torch

from napari_wbc.errors import DataError, ModelFileError, WBCError
from napari_wbc.inference import (
    Ensemble,
    EnsembleMember,
    disagreement,
    iter_predict_crops,
    load_any,
    predict_crops,
)
from napari_wbc.models.build import build_model
from napari_wbc.models.files import TTA_NAMES, ModelConfig, save_model
from napari_wbc.models.registry import get_preset
from napari_wbc.progress import Progress, run
from napari_wbc.tta import TTA_SETS, D4Transform


@pytest.fixture(scope="module")
def tiny_members():
    members = []
    for seed, spec in enumerate(get_preset("tiny")):
        torch.manual_seed(seed)
        model, _ = build_model(spec)
        members.append(EnsembleMember(model.eval(), ModelConfig(spec=spec, name=spec.name), 1.0))
    return members


@pytest.fixture
def ensemble(tiny_members):
    weighted = [m._replace(weight=w) for m, w in zip(tiny_members, (1.0, 2.0, 3.0), strict=True)]
    return Ensemble(weighted, tta="d4")


def random_crops(n, size=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def radial_crop(size=64):
    """An image that every symmetry of the square maps onto itself."""
    c = (size - 1) / 2
    y, x = np.mgrid[:size, :size]
    r = np.hypot(y - c, x - c) / c
    rgb = np.stack([np.cos(6 * r), np.sin(4 * r), r], axis=-1)
    return np.round(127.5 * (rgb - rgb.min()) / np.ptp(rgb) * 2).astype(np.uint8)


# numpy reference versions of the D4 elements, on HWC images
NUMPY_D4 = [
    lambda a, k=k, f=f: np.rot90(a[:, ::-1] if f else a, k, axes=(0, 1))
    for f in (False, True)
    for k in range(4)
]


# --- TTA sets -------------------------------------------------------------------


def test_tta_names_match_the_file_format():
    assert tuple(TTA_SETS) == TTA_NAMES


def _images(transforms, x):
    return [t(x) for t in transforms]


def _index_of(y, images):
    hits = [i for i, img in enumerate(images) if torch.equal(img, y)]
    assert len(hits) == 1
    return hits[0]


@pytest.mark.parametrize(("name", "size"), [("none", 1), ("flips", 4), ("d4", 8)])
def test_tta_sets_are_groups_of_distinct_transforms(name, size):
    transforms = TTA_SETS[name]
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    images = _images(transforms, x)
    assert len(transforms) == size
    # distinct: an asymmetric image gives a different result under each
    assert len({tuple(img.flatten().tolist()) for img in images}) == size
    # the identity is there
    _index_of(x, images)
    # closed under composition, and every element has an inverse
    for a, b in itertools.product(transforms, repeat=2):
        _index_of(a(b(x)), images)
    for a in transforms:
        assert any(torch.equal(b(a(x)), x) for b in transforms)


def test_d4_transforms_agree_with_numpy_rotations_and_mirrors():
    img = np.arange(5 * 5 * 3).reshape(5, 5, 3)
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    got = [t(x)[0].permute(1, 2, 0).numpy() for t in TTA_SETS["d4"]]
    want = [f(img) for f in NUMPY_D4]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(D4Transform(0, True)(x)[0, 0].numpy(), img[:, ::-1, 0])
    np.testing.assert_array_equal(D4Transform(2, True)(x)[0, 0].numpy(), img[::-1, :, 0])
    assert [t.name for t in TTA_SETS["flips"]] == ["identity", "hflip", "vflip", "rot180"]


def test_symmetric_crop_gives_the_same_probabilities_under_every_transform(tiny_members):
    crop = radial_crop(64)
    for f in NUMPY_D4:
        np.testing.assert_array_equal(f(crop), crop)
    ens = Ensemble(tiny_members, tta="none")
    reference = predict_crops(ens, crop[None])["member_probs"]
    for f in NUMPY_D4:
        out = predict_crops(ens, np.ascontiguousarray(f(crop))[None])["member_probs"]
        np.testing.assert_allclose(out, reference, atol=1e-6)
    d4 = predict_crops(ens, crop[None], tta="d4")
    np.testing.assert_allclose(d4["member_probs"], reference, atol=1e-5)


def test_d4_average_equals_the_mean_over_transformed_crops(tiny_members):
    # crops at the input size, so resizing plays no part
    crops = random_crops(3, size=32, seed=4)
    ens = Ensemble(tiny_members, tta="d4")
    per_view = [
        predict_crops(ens, np.stack([f(c) for c in crops]), tta="none")["member_probs"]
        for f in NUMPY_D4
    ]
    expected = np.mean(per_view, axis=0)
    got = predict_crops(ens, crops)["member_probs"]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # and TTA matters for these non-symmetric models and crops
    assert np.abs(got - per_view[0]).max() > 1e-4


# --- predict_crops --------------------------------------------------------------


def test_predict_crops_shapes_and_weighted_average(ensemble):
    crops = random_crops(5)
    out = predict_crops(ensemble, crops, batch_size=2)
    probs, member = out["probs"], out["member_probs"]
    assert probs.shape == (5, 8) and probs.dtype == np.float32
    assert member.shape == (3, 5, 8) and member.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(member.sum(axis=2), 1, atol=1e-5)
    expected = (1 * member[0] + 2 * member[1] + 3 * member[2]) / 6
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    np.testing.assert_array_equal(out["pred"], probs.argmax(axis=1))
    np.testing.assert_allclose(out["confidence"], probs.max(axis=1))
    assert out["classes"] == get_preset("tiny")[0].classes


def test_batching_does_not_change_results(ensemble):
    crops = random_crops(7, seed=1)
    one = predict_crops(ensemble, crops, batch_size=64, tta="flips")
    small = predict_crops(ensemble, crops, batch_size=3, tta="flips")
    np.testing.assert_allclose(one["member_probs"], small["member_probs"], atol=1e-5)


def test_member_probabilities_follow_the_spec_preprocessing(tiny_members):
    member = tiny_members[1]  # ImageNet mean/std, unlike the others
    spec = member.config.spec
    crops = random_crops(2, size=40, seed=2)
    out = predict_crops(Ensemble([member], tta="none"), crops)
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(
        x, size=(spec.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False
    )
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        want = member.model(x).softmax(-1).numpy()
    np.testing.assert_allclose(out["probs"], want, atol=1e-5)


def test_crops_of_different_sizes_in_a_list(ensemble):
    a, b = random_crops(1, size=48, seed=5)[0], random_crops(1, size=40, seed=6)[0]
    both = predict_crops(ensemble, [a, b], tta="none")["probs"]
    np.testing.assert_allclose(
        both[0], predict_crops(ensemble, a[None], tta="none")["probs"][0], atol=1e-5
    )
    np.testing.assert_allclose(
        both[1], predict_crops(ensemble, b[None], tta="none")["probs"][0], atol=1e-5
    )


def test_no_crops_give_empty_results(ensemble):
    out = predict_crops(ensemble, np.zeros((0, 48, 48, 3), np.uint8))
    assert out["probs"].shape == (0, 8) and out["member_probs"].shape == (3, 0, 8)
    assert out["pred"].shape == (0,) and out["confidence"].shape == (0,)


@pytest.mark.parametrize(
    "crops",
    [
        np.zeros((2, 32, 32, 3), np.float32),
        np.zeros((2, 32, 32), np.uint8),
        np.zeros((2, 32, 32, 4), np.uint8),
        [np.zeros((32, 32), np.uint8)],
    ],
)
def test_bad_crops_are_refused(ensemble, crops):
    with pytest.raises(DataError, match="RGB uint8"):
        predict_crops(ensemble, crops)


def test_iter_predict_crops_reports_progress_per_batch(ensemble):
    crops = random_crops(5)
    events = []
    out = run(iter_predict_crops(ensemble, crops, batch_size=2, tta="none"), events.append)
    assert all(isinstance(e, Progress) and e.stage == "classify" for e in events)
    assert len(events) == 3 * 3  # 3 batches × 3 members
    dones = [e.done for e in events]
    assert dones == sorted(dones) and dones[-1] == events[-1].total == 5 * 3
    np.testing.assert_allclose(
        out["probs"], predict_crops(ensemble, crops, tta="none")["probs"], atol=1e-6
    )


def test_saved_models_predict_like_the_originals(tiny_members, tmp_path):
    paths = [
        save_model(tmp_path / f"{i}.safetensors", m.model, m.config)
        for i, m in enumerate(tiny_members)
    ]
    crops = random_crops(4, seed=3)
    direct = predict_crops(Ensemble([tiny_members[0]], tta="flips"), crops)
    loaded = predict_crops(load_any(paths[0], tta="flips"), crops)
    np.testing.assert_array_equal(loaded["probs"], direct["probs"])


def test_ensemble_members_must_agree_on_classes(tiny_members):
    a = tiny_members[0]
    spec = a.config.spec
    other = ModelConfig(spec=type(spec)(**{**spec.__dict__, "classes": spec.classes[::-1]}))
    with pytest.raises(ModelFileError, match="different order"):
        Ensemble([a, EnsembleMember(a.model, other, 1.0)])


def test_ensemble_exposes_scale_and_weights(ensemble):
    assert ensemble.fov_px == 360 and ensemble.rbc_diameter_px == 75.0
    np.testing.assert_allclose(ensemble.weights, [1 / 6, 2 / 6, 3 / 6])
    assert ensemble.device == torch.device("cpu")


# --- disagreement ---------------------------------------------------------------


def test_disagreement_counts_members_against_the_ensemble():
    # 3 members, 2 crops, 3 classes
    member_probs = np.array(
        [
            [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1]],
            [[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]],
            [[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]],
        ]
    )
    # mean: crop 0 -> class 0 (one member says 1); crop 1 -> class 2 (one says 1)
    np.testing.assert_allclose(disagreement(member_probs), [1 / 3, 1 / 3])
    # with ensemble probs that pick class 1 for crop 0, two members disagree
    probs = np.array([[0.1, 0.9, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(disagreement(member_probs, probs), [2 / 3, 1 / 3])
    with pytest.raises(DataError):
        disagreement(member_probs[0])


def _sub_ensemble_probs(ensemble, members, crops, tta):
    """The weighted ensemble of ``members`` alone (their own TTA averages)."""
    full = predict_crops(ensemble, crops, tta=tta)
    w = ensemble.weights[list(members)]
    return np.einsum("m,mnc->nc", w / w.sum(), full["member_probs"][list(members)])


def test_members_are_ordered_by_their_cost(ensemble):
    from napari_wbc.gate import member_cost, member_order

    costs = [member_cost(m.model, m.config.spec.input_size) for m in ensemble.members]
    assert all(c > 0 for c in costs)
    order = member_order(ensemble)
    assert sorted(order) == [0, 1, 2]
    assert [costs[j] for j in order] == sorted(costs)
    # Counting operations runs on a model in eval mode and leaves it as it was.
    ensemble.members[0].model.train()
    member_cost(ensemble.members[0].model, 40)
    assert ensemble.members[0].model.training
    ensemble.members[0].model.eval()


def test_gate_settles_each_cell_at_the_first_stage_sure_of_it(ensemble):
    from napari_wbc.gate import member_order

    crops = random_crops(40, seed=5)
    order = member_order(ensemble)
    two = order[:2]
    first = _sub_ensemble_probs(ensemble, two, crops, "none")
    everyone = predict_crops(ensemble, crops, tta="none")
    full = predict_crops(ensemble, crops, tta="d4")
    # Thresholds at the medians: some cells settle at each stage.
    t1 = float(np.median(first.max(1)))
    t2 = float(np.median(everyone["confidence"]))
    stages = [(2, 1, t1), (None, 1, t2)]
    events = []
    gated = run(iter_predict_crops(ensemble, crops, tta="d4", gate=stages), events.append)
    passes = gated["passes"]
    assert set(np.unique(passes)) <= {2, 3, 24} and len(np.unique(passes)) >= 2
    agree_two = (everyone["member_probs"][two].argmax(-1) == first.argmax(1)[None]).all(0)
    stage1 = agree_two & (first.max(1) >= t1)
    np.testing.assert_array_equal(passes == 2, stage1)
    # Settled on the two cheapest members' first view: their ensemble's answer,
    # and the member not run adds no disagreement.
    np.testing.assert_allclose(gated["probs"][stage1], first[stage1], atol=1e-5)
    assert (gated["views"][order[2], stage1] == 0).all()
    assert (disagreement(gated["member_probs"], gated["probs"])[stage1] == 0).all()
    later = passes == 3
    np.testing.assert_allclose(gated["probs"][later], everyone["probs"][later], atol=1e-5)
    # A cell no stage was sure of gets exactly every view of every member.
    last = passes == 24
    assert last.any()
    np.testing.assert_allclose(gated["probs"][last], full["probs"][last], atol=1e-5)
    np.testing.assert_allclose(
        gated["member_probs"][:, last], full["member_probs"][:, last], atol=1e-5
    )
    assert {e.stage for e in events} == {"classify", "doubtful"}
    assert (full["passes"] == 24).all() and (everyone["passes"] == 3).all()


def test_default_gate_stages_and_exhaustive_run(ensemble):
    from napari_wbc.gate import GATE_STAGES, member_order

    crops = random_crops(12, seed=6)
    # Settle everything on the cheapest member's first view (it always
    # agrees with itself)...
    sure = run(iter_predict_crops(ensemble, crops, tta="d4", gate=[(1, 1, 0.0)]))
    assert (sure["passes"] == 1).all()
    cheapest = member_order(ensemble)[0]
    alone = predict_crops(ensemble, crops, tta="none")["member_probs"][cheapest]
    np.testing.assert_allclose(sure["probs"], alone, atol=1e-5)
    # ...and nothing: every view of every member, as without the gate.
    never = run(iter_predict_crops(ensemble, crops, tta="d4", gate=[(2, 1, 1.1)]))
    exhaustive = run(iter_predict_crops(ensemble, crops, tta="d4", gate=False))
    assert (never["passes"] == 24).all() and (exhaustive["passes"] == 24).all()
    np.testing.assert_allclose(never["probs"], exhaustive["probs"], atol=1e-6)
    # The default stages end with every member's four rotations for the cells
    # still in doubt: D4's other four views are --exhaustive's.
    assert GATE_STAGES[-1] == (None, 4, None)
    default = run(iter_predict_crops(ensemble, crops, tta="d4", gate=True))
    passes = default["passes"]
    assert set(np.unique(passes)) <= {2, 3, 12} and (passes == 12).any()
    doubt = passes == 12
    rotations = run(iter_predict_crops(ensemble, crops, tta="d4", gate=[(None, 4, None)]))
    assert (rotations["passes"] == 12).all()
    np.testing.assert_allclose(default["probs"][doubt], rotations["probs"][doubt], atol=1e-5)


def _with_statistics(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A model whose batch norms hold non-trivial statistics and affine weights."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("arch", ["resnet10t", "regnety_002"])
def test_folded_batch_norms_give_the_same_outputs(arch):
    import copy

    import timm

    from napari_wbc.bnfold import fold_batch_norms

    model = _with_statistics(timm.create_model(arch, num_classes=5, pretrained=False))
    folded = copy.deepcopy(model)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert fold_batch_norms(folded) == n_bn > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        np.testing.assert_allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)
        # timm's split forward, used for the trust features, still works.
        pre = folded.forward_head(folded.forward_features(x), pre_logits=True)
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
        np.testing.assert_allclose(pre, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(Exception, match="eval"):
        fold_batch_norms(copy.deepcopy(model).train())


def test_inference_model_is_a_folded_copy_renewed_when_weights_change():
    import timm

    from napari_wbc.bnfold import inference_model

    model = _with_statistics(timm.create_model("resnet10t", num_classes=3, pretrained=False))
    fast = inference_model(model)
    assert fast is not model and inference_model(model) is fast  # kept while unchanged
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # untouched
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        before = fast(x)
    # Batch-norm statistics changed in place (as adaptation does): a new copy.
    with torch.no_grad():
        next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_mean += 1
    renewed = inference_model(model)
    assert renewed is not fast
    with torch.inference_mode():
        np.testing.assert_allclose(renewed(x), model(x), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(renewed(x), before)


def test_members_are_folded_only_for_sets_worth_it(tiny_members, monkeypatch):
    import napari_wbc.bnfold as bnfold

    ensemble = Ensemble(tiny_members[:1], tta="none")
    model = ensemble.members[0].model
    crops = random_crops(6, seed=9)
    few = predict_crops(ensemble, crops)
    assert not bnfold.is_folded(model)  # a few crops: not worth a copy
    monkeypatch.setattr(bnfold, "FOLD_MIN_CROPS", 4)
    many = predict_crops(ensemble, crops)
    assert bnfold.is_folded(model)
    np.testing.assert_allclose(few["probs"], many["probs"], atol=1e-4)
    monkeypatch.setattr(bnfold, "FOLD_MIN_CROPS", 1000)
    again = predict_crops(ensemble, crops)  # once folded, the copy is used
    np.testing.assert_allclose(again["probs"], many["probs"], atol=1e-6)


def test_member_cost_counts_what_torch_counts(ensemble):
    # The hook count equals torch's own FLOP counter on convolutional members.
    from torch.utils.flop_counter import FlopCounterMode

    from napari_wbc.gate import member_cost

    model = ensemble.members[0].model.eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 48, 48))
    assert member_cost(model, 48) == pytest.approx(counter.get_total_flops(), rel=1e-9)
    assert member_cost(model, 96) == pytest.approx(4 * member_cost(model, 48), rel=0.2)


def _count_passes(monkeypatch):
    """Crop × view × member passes run by the ensemble from now on."""
    from napari_wbc import passes

    count = [0]
    real = passes.iter_add_views

    def counted(ensemble, prepared, crops, transforms, members, first, sums, rows, *rest):
        count[0] += len(rows) * len(transforms) * len(members)
        return (
            yield from real(
                ensemble, prepared, crops, transforms, members, first, sums, rows, *rest
            )
        )

    monkeypatch.setattr(passes, "iter_add_views", counted)
    return count


@pytest.mark.parametrize("gate", [False, True])
def test_earlier_passes_are_taken_not_run_again(ensemble, monkeypatch, gate):
    from napari_wbc.gate import iter_predict_sums

    crops = random_crops(40, seed=3)
    rows = np.array([0, 5, 7, 20, 39])
    known = run(iter_predict_sums(ensemble, crops[rows], tta="none"))._replace(rows=rows)
    count = _count_passes(monkeypatch)
    fresh = predict_crops(ensemble, crops, tta="d4", gate=gate)
    ran = count[0]
    count[0] = 0
    reused = run(iter_predict_crops(ensemble, crops, tta="d4", gate=gate, known=known))
    if not gate:  # every view of every member either way: the same numbers
        np.testing.assert_allclose(reused["probs"], fresh["probs"], atol=1e-5)
        assert count[0] == ran - len(rows) * 3
    else:  # the known cells were seen by every member: they may settle sooner
        assert count[0] <= ran
        assert (reused["views"][:, rows] >= 1).all()
        other = np.setdiff1d(np.arange(40), rows)
        np.testing.assert_array_equal(reused["pred"][other], fresh["pred"][other])
    assert reused["passes"].sum() >= count[0]


def test_earlier_passes_of_another_model_or_view_are_refused(ensemble, tiny_members):
    from napari_wbc.gate import iter_predict_sums

    crops = random_crops(8, seed=4)
    flips = run(iter_predict_sums(ensemble, crops, tta="flips"))
    with pytest.raises(WBCError, match="first views"):
        run(iter_predict_crops(ensemble, crops, tta="d4", known=flips))
    other = Ensemble(list(tiny_members), tta="d4")
    plain = run(iter_predict_sums(other, crops, tta="none"))
    with pytest.raises(WBCError, match="another model"):
        run(iter_predict_crops(ensemble, crops, tta="d4", known=plain))


def test_the_gate_resizes_each_crop_once_for_all_its_stages(ensemble, monkeypatch):
    from napari_wbc import passes

    crops = random_crops(30, seed=8)
    sizes = len({m.config.spec.input_size for m in ensemble.members})
    # Nothing settles before the last stage: every cell goes through all three.
    stages = [(2, 1, 1.1), (None, 1, 1.1), (None, 4, None)]
    resized: list[int] = []
    real = passes.to_input

    def counted(batch, size, device):
        resized.append(len(batch))
        return real(batch, size, device)

    monkeypatch.setattr(passes, "to_input", counted)
    kept = run(iter_predict_crops(ensemble, crops, tta="d4", gate=stages))
    assert (kept["passes"] == 12).all()
    assert sum(resized) == 30 * sizes
    # Beyond the memory allowed, crops are resized again at each stage: the same answer.
    resized.clear()
    monkeypatch.setattr(passes, "RESIZED_KEEP_BYTES", 0)
    again = run(iter_predict_crops(ensemble, crops, tta="d4", gate=stages))
    assert sum(resized) >= 3 * 30
    np.testing.assert_array_equal(kept["probs"], again["probs"])
    np.testing.assert_array_equal(kept["member_probs"], again["member_probs"])
