"""Model specs, presets, and building timm models from them (offline)."""

import json
import logging
import time

import pytest
import safetensors.torch
import timm
import torch

from napari_wbc.errors import WBCError
from napari_wbc.models import build, registry
from napari_wbc.models.build import (
    build_model,
    classifier_parameters,
    classify_features,
    extract_features,
    find_cached_weights,
    freeze_backbone,
    get_device,
)
from napari_wbc.models.registry import ModelSpec, get_preset, get_spec, list_presets

PBC_ORDER = [
    "basophil",
    "eosinophil",
    "erythroblast",
    "ig",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
]


# --- registry -------------------------------------------------------------------


def test_builtin_presets_are_listed_with_descriptions():
    presets = list_presets()
    assert {"paper", "lite", "tiny"} <= set(presets)
    assert all(isinstance(d, str) and d for d in presets.values())


def test_paper_preset_matches_the_method():
    specs = get_preset("paper")
    archs = [s.arch for s in specs]
    assert archs[:2] == ["resnet50", "resnet152"]
    assert archs[2].startswith("swin")
    assert all(s.input_size == 224 and s.pretrained for s in specs)


def test_default_spec_describes_pbc_crops():
    spec = ModelSpec("x", "resnet18")
    assert list(spec.classes) == PBC_ORDER
    assert spec.fov_px == 360 and spec.rbc_diameter_px == 75.0
    assert spec.fov_rbc == pytest.approx(4.8)
    assert spec.num_classes == 8


def test_lite_preset_uses_three_different_architecture_families():
    specs = get_preset("lite")
    assert len(specs) == 3
    assert len({s.arch for s in specs}) == 3
    assert all(s.input_size <= 160 for s in specs)


def test_unknown_preset_error_lists_known_names():
    with pytest.raises(WBCError) as err:
        get_preset("nope")
    msg = str(err.value)
    assert "nope" in msg
    for name in ("paper", "lite", "tiny"):
        assert name in msg


def test_get_preset_returns_copies():
    specs = get_preset("tiny")
    specs[0].input_size = 999
    specs[0].timm_kwargs["drop_rate"] = 0.5
    again = get_preset("tiny")
    assert again[0].input_size != 999
    assert "drop_rate" not in again[0].timm_kwargs


def test_get_spec_finds_members_and_rejects_unknown():
    first = get_preset("tiny")[0]
    assert get_spec(first.name) == first
    with pytest.raises(WBCError, match="known specs"):
        get_spec("no-such-member")


def test_spec_json_round_trip():
    spec = ModelSpec(
        "m", "test_vit", 48, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 300, 60.0, ("a", "b"),
        {"img_size": 48, "drop_rate": 0.1}, False,
    )  # fmt: skip
    again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert isinstance(again.classes, tuple) and isinstance(again.mean, tuple)


def test_spec_from_dict_ignores_unknown_keys_but_needs_arch():
    data = ModelSpec("m", "test_resnet").to_dict()
    data["added_in_a_later_version"] = 1
    assert ModelSpec.from_dict(data).arch == "test_resnet"
    del data["arch"]
    with pytest.raises(WBCError, match="arch"):
        ModelSpec.from_dict(data)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"classes": ("a", "b", "a")}, "unique"),
        ({"classes": ()}, "empty"),
        ({"input_size": 0}, "input_size"),
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.5, 0.0, 0.5)}, "std"),
        ({"rbc_diameter_px": -3.0}, "rbc_diameter_px"),
    ],
)
def test_invalid_specs_are_refused_with_the_reason(changes, fragment):
    spec = ModelSpec("bad", "test_resnet", **changes)
    with pytest.raises(WBCError, match=fragment):
        spec.validate()


def test_register_preset_checks_members(monkeypatch):
    monkeypatch.setattr(registry, "_PRESETS", dict(registry._PRESETS))
    a = ModelSpec("a", "test_resnet", classes=("x", "y"))
    with pytest.raises(WBCError, match="different classes"):
        registry.register_preset("mixed", [a, ModelSpec("b", "test_vit", classes=("y", "x"))])
    with pytest.raises(WBCError, match="fields of view"):
        registry.register_preset(
            "mixed", [a, ModelSpec("b", "test_vit", fov_px=200, classes=("x", "y"))]
        )
    with pytest.raises(WBCError, match="repeats"):
        registry.register_preset("twice", [a, a])
    registry.register_preset("mine", [a], "my preset")
    assert list_presets()["mine"] == "my preset"
    assert get_preset("mine") == [a]


@pytest.mark.parametrize("preset", ["paper", "lite", "tiny"])
def test_preset_archs_exist_and_normalise_like_their_imagenet_weights(preset):
    for spec in get_preset(preset):
        assert timm.is_model(spec.arch), spec.arch
        cfg = timm.models.get_pretrained_cfg(spec.arch)
        # Pretrained weights only help when crops are normalised as in their training.
        assert spec.mean == pytest.approx(cfg.mean), spec.name
        assert spec.std == pytest.approx(cfg.std), spec.name


# --- building -------------------------------------------------------------------


@pytest.mark.parametrize("spec", get_preset("tiny"), ids=lambda s: s.name)
def test_tiny_models_build_and_classify_features_like_the_full_model(spec):
    torch.manual_seed(0)
    model, info = build_model(spec)
    assert info.pretrained_loaded is False and info.source == "random"
    model.eval()
    x = torch.rand(2, 3, spec.input_size, spec.input_size)
    with torch.no_grad():
        logits = model(x)
        feats = extract_features(model, x)
        again = classify_features(model, feats)
    assert logits.shape == (2, 8)
    assert feats.ndim == 2 and feats.shape[0] == 2
    torch.testing.assert_close(again, logits)


def test_build_model_num_classes_override():
    spec = get_preset("tiny")[0]
    model, _ = build_model(spec, num_classes=3)
    out = model.eval()(torch.rand(1, 3, spec.input_size, spec.input_size))
    assert out.shape == (1, 3)


def test_lite_models_build_and_split_into_backbone_and_head():
    for spec in get_preset("lite"):
        model, info = build_model(spec, pretrained=False)
        assert not info.pretrained_loaded
        model.eval()
        x = torch.rand(1, 3, spec.input_size, spec.input_size)
        with torch.no_grad():
            torch.testing.assert_close(
                classify_features(model, extract_features(model, x)), model(x)
            )


@pytest.mark.slow
def test_paper_models_build_and_run():
    for spec in get_preset("paper"):
        model, _ = build_model(spec, pretrained=False)
        with torch.no_grad():
            out = model.eval()(torch.rand(1, 3, 224, 224))
        assert out.shape == (1, 8)


def test_freeze_backbone_leaves_only_the_classifier_trainable():
    spec = get_preset("tiny")[0]
    model, _ = build_model(spec)
    freeze_backbone(model)
    head = {id(p) for p in classifier_parameters(model)}
    assert head, "the classifier has parameters"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == head
    assert len(trainable) < len(list(model.parameters()))


def test_unknown_arch_is_a_wbc_error():
    with pytest.raises(WBCError, match="no model"):
        build_model(ModelSpec("x", "resnet_that_does_not_exist", pretrained=False))


def _no_cache(monkeypatch):
    monkeypatch.setattr(build, "find_cached_weights", lambda arch: None)


def test_pretrained_offline_falls_back_to_random_with_a_warning(monkeypatch, caplog):
    _no_cache(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = get_preset("tiny")[0]
    with caplog.at_level(logging.WARNING, logger="napari_wbc.models.build"):
        model, info = build_model(spec, pretrained=True)
    assert info.pretrained_loaded is False and info.source == "random-fallback"
    assert "RANDOM WEIGHTS" in caplog.text and "HF_HUB_OFFLINE" in caplog.text
    assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 8)


def test_pretrained_without_network_does_not_hang(monkeypatch, caplog):
    """The real network probe, as a user without network would hit it."""
    _no_cache(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(build, "_network_ok", None)
    spec = get_preset("tiny")[0]
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="napari_wbc.models.build"):
        _, info = build_model(spec, pretrained=True)
    assert time.monotonic() - start < 10
    if not info.pretrained_loaded:  # the usual case here: no network
        assert info.source == "random-fallback"
        assert "RANDOM WEIGHTS" in caplog.text


def test_failed_download_falls_back(monkeypatch, caplog):
    _no_cache(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(build, "network_available", lambda *a: True)
    real_create = timm.create_model

    def create(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("connection reset")
        return real_create(name, pretrained=False, **kw)

    monkeypatch.setattr(build.timm, "create_model", create)
    with caplog.at_level(logging.WARNING, logger="napari_wbc.models.build"):
        _, info = build_model(get_preset("tiny")[0], pretrained=True)
    assert info.source == "random-fallback"
    assert "connection reset" in info.message and "RANDOM WEIGHTS" in caplog.text


def test_pretrained_weights_come_from_the_local_cache(monkeypatch, tmp_path):
    spec = get_preset("tiny")[0]
    torch.manual_seed(1)
    imagenet = timm.create_model(spec.arch, num_classes=1000)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(imagenet.state_dict(), str(path))
    monkeypatch.setattr(build, "find_cached_weights", lambda arch: str(path))
    model, info = build_model(spec, pretrained=True)
    assert info.pretrained_loaded and info.source == "cache"
    # Backbone from the file, a fresh 8-class head.
    head = {id(p) for p in classifier_parameters(model)}
    head_names = {n for n, p in model.named_parameters() if id(p) in head}
    want = imagenet.state_dict()
    backbone = {k: v for k, v in model.state_dict().items() if k not in head_names}
    assert len(backbone) > 10
    for key, value in backbone.items():
        assert torch.equal(value, want[key]), key
    assert model.get_classifier().out_features == 8


def test_find_cached_weights_sees_the_torch_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub

    # Hide a Hugging Face cache the developer may have, to test the torch hub one.
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    cfg = timm.models.get_pretrained_cfg("resnet18")
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        assert find_cached_weights("resnet18") is None
        target = tmp_path / "checkpoints" / cfg.url.rsplit("/", 1)[-1]
        target.parent.mkdir()
        target.write_bytes(b"weights")
        assert find_cached_weights("resnet18") == str(target)
    finally:
        torch.hub.set_dir(old)


def test_get_device():
    assert get_device("cpu") == torch.device("cpu")
    assert get_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(WBCError, match="unknown device"):
        get_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(WBCError, match="CUDA"):
            get_device("cuda")
