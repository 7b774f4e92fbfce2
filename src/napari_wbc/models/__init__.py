"""Model specs, presets, building, and self-describing model files.

``napari_wbc.models`` itself does not import torch: the registry and the file
readers work without it. :mod:`napari_wbc.models.build` (and the names it
provides here, loaded on first use) needs torch and timm. Loading a model as
an :class:`~napari_wbc.inference.Ensemble` is :func:`napari_wbc.inference.load_any`.
"""

from napari_wbc.models.files import (
    FORMAT_VERSION,
    EnsembleConfig,
    ModelConfig,
    clear_model_cache,
    load_network,
    read_ensemble,
    read_model_config,
    save_ensemble,
    save_model,
)
from napari_wbc.models.registry import (
    PBC_CLASSES,
    ModelSpec,
    get_preset,
    get_spec,
    list_presets,
    register_preset,
)

_BUILD_NAMES = (
    "BuildInfo",
    "build_model",
    "classifier_parameters",
    "classify_features",
    "extract_features",
    "freeze_backbone",
    "get_device",
)

__all__ = [
    "FORMAT_VERSION",
    "PBC_CLASSES",
    "EnsembleConfig",
    "ModelConfig",
    "ModelSpec",
    "clear_model_cache",
    "get_preset",
    "get_spec",
    "list_presets",
    "load_network",
    "read_ensemble",
    "read_model_config",
    "register_preset",
    "save_ensemble",
    "save_model",
    *_BUILD_NAMES,
]


def __getattr__(name):
    # Importing torch takes seconds; do it only when a build helper is used.
    if name in _BUILD_NAMES:
        from napari_wbc.models import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
