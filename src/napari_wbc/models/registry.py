"""Named model specs and presets of ensembles.

A :class:`ModelSpec` says everything needed to build a classifier and feed it:
the timm architecture, the input size and normalisation, the class names, and
the physical scale of a crop (its field of view and the size of a red cell in
it, so crops from any microscope can be rescaled to match). Presets are named
lists of specs that make up one ensemble, in the spirit of timm's
``register_model`` and its pretrained configs.

This module imports neither torch nor timm, so the GUI can list presets cheaply.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from napari_wbc.errors import Checked, WBCError

logger = logging.getLogger(__name__)

#: The 8 classes of the PBC data set (Acevedo et al. 2020), in training order.
PBC_CLASSES: tuple[str, ...] = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "ig",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# timm's test_* models and some others are trained with inception-style scaling.
HALF_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
HALF_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass
class ModelSpec(Checked):
    """How to build one classifier and how to prepare its input.

    Parameters
    ----------
    name : str
        Short unique name of this member ("paper-resnet50").
    arch : str
        timm model name, optionally with a pretrained tag ("resnet50.a1_in1k").
    input_size : int
        Side of the square network input in pixels; crops are resized to it.
    mean, std : tuple of 3 floats
        Per-channel normalisation of RGB values scaled to [0, 1].
    fov_px : int
        Side of one crop (its field of view) in pixels at training scale.
        PBC crops are about 360 px.
    rbc_diameter_px : float
        Diameter of a red blood cell in pixels at training scale (about 75 px
        in PBC). ``fov_px / rbc_diameter_px`` is the crop size in red-cell
        diameters, which fixes the physical scale for any other image.
    classes : tuple of str
        Class names in the order of the classifier outputs.
    timm_kwargs : dict
        Extra keyword arguments for ``timm.create_model`` (``drop_rate``,
        ``drop_path_rate``; transformers with a fixed token grid need
        ``img_size=input_size``).
    pretrained : bool
        Whether training should start from ImageNet weights.
    """

    name: str
    arch: str
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    fov_px: int = 360
    rbc_diameter_px: float = 75.0
    classes: tuple[str, ...] = PBC_CLASSES
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = True

    def __post_init__(self):
        # JSON gives lists; keep tuples so specs compare equal after a round trip.
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.classes = tuple(str(c) for c in self.classes)
        self.timm_kwargs = dict(self.timm_kwargs)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fov_rbc(self) -> float:
        """Field of view of one crop in red-cell diameters."""
        return self.fov_px / self.rbc_diameter_px

    def problems(self) -> list[str]:
        """Return what is wrong with this spec (empty when it is usable)."""
        out = []
        if not isinstance(self.name, str) or not self.name:
            out.append("name must be a non-empty string")
        if not isinstance(self.arch, str) or not self.arch:
            out.append("arch must be a timm model name")
        if not isinstance(self.input_size, int) or isinstance(self.input_size, bool):
            out.append(f"input_size must be an integer, got {self.input_size!r}")
        elif self.input_size <= 0:
            out.append(f"input_size must be positive, got {self.input_size}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if len(value) != 3:
                out.append(f"{key} must have 3 values (R, G, B), got {len(value)}")
        if any(s <= 0 for s in self.std):
            out.append(f"std values must be positive, got {self.std}")
        if not isinstance(self.fov_px, int) or isinstance(self.fov_px, bool) or self.fov_px <= 0:
            out.append(f"fov_px must be a positive integer, got {self.fov_px!r}")
        if not isinstance(self.rbc_diameter_px, (int, float)) or not self.rbc_diameter_px > 0:
            out.append(f"rbc_diameter_px must be a positive number, got {self.rbc_diameter_px!r}")
        if not self.classes:
            out.append("classes is empty; a classifier needs at least one class")
        elif len(set(self.classes)) != len(self.classes):
            dupes = sorted({c for c in self.classes if self.classes.count(c) > 1})
            out.append(f"classes must be unique; repeated: {', '.join(dupes)}")
        if not isinstance(self.timm_kwargs, dict):
            out.append("timm_kwargs must be a dict")
        return out

    def describe(self) -> str:
        return f"model spec {self.name!r}"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (tuples become lists)."""
        out = asdict(self)
        for key in ("mean", "std", "classes"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """Build a spec from :meth:`to_dict` output; unknown keys are ignored."""
        if not isinstance(data, dict):
            raise WBCError(f"a model spec must be a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            # A newer napari-wbc may add optional fields within the same format.
            logger.debug("ignoring unknown model spec keys: %s", unknown)
        missing = [k for k in ("name", "arch") if k not in data]
        if missing:
            raise WBCError(f"model spec lacks required keys: {', '.join(missing)}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise WBCError(f"invalid model spec: {exc}") from exc


@dataclass(frozen=True)
class _Preset:
    specs: tuple[ModelSpec, ...]
    description: str


_PRESETS: dict[str, _Preset] = {}


def register_preset(name: str, specs: list[ModelSpec], description: str = "") -> None:
    """Register a named ensemble preset.

    Parameters
    ----------
    name : str
        Preset name; registering the same name again replaces it.
    specs : list of ModelSpec
        The members. Their names must be unique and they must share the class
        list and the field of view, since they classify the same crops.
    description : str
        One line shown to users.
    """
    specs = [s.validate() for s in specs]
    if not specs:
        raise WBCError(f"preset {name!r} has no models")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise WBCError(f"preset {name!r} repeats member names: {names}")
    first = specs[0]
    for spec in specs[1:]:
        if spec.classes != first.classes:
            raise WBCError(f"preset {name!r}: {spec.name} and {first.name} have different classes")
        if abs(spec.fov_rbc - first.fov_rbc) > 1e-6 * first.fov_rbc:
            raise WBCError(
                f"preset {name!r}: {spec.name} and {first.name} see different fields of view"
            )
    _PRESETS[name] = _Preset(tuple(copy.deepcopy(specs)), description)


def get_preset(name: str) -> list[ModelSpec]:
    """Return copies of the specs of a preset (safe to modify).

    Raises
    ------
    WBCError
        When no preset has this name; the message lists the known names.
    """
    try:
        preset = _PRESETS[name]
    except KeyError:
        raise WBCError(
            f"unknown model preset {name!r}; known presets: {', '.join(sorted(_PRESETS))}"
        ) from None
    return copy.deepcopy(list(preset.specs))


def list_presets() -> dict[str, str]:
    """Return ``{preset name: description}``."""
    return {name: preset.description for name, preset in _PRESETS.items()}


def get_spec(name: str) -> ModelSpec:
    """Return a copy of the member spec called ``name`` from any preset."""
    for preset in _PRESETS.values():
        for spec in preset.specs:
            if spec.name == name:
                return copy.deepcopy(spec)
    known = sorted(s.name for p in _PRESETS.values() for s in p.specs)
    raise WBCError(f"unknown model spec {name!r}; known specs: {', '.join(known)}")


# --- built-in presets --------------------------------------------------------

register_preset(
    "paper",
    [
        ModelSpec("paper-resnet50", "resnet50", 224),
        ModelSpec("paper-resnet152", "resnet152", 224),
        ModelSpec("paper-swin-tiny", "swin_tiny_patch4_window7_224", 224),
    ],
    "ResNet-50 + ResNet-152 + Swin-T at 224 px from ImageNet, as in arXiv 2603.01976 "
    "(needs a GPU to train in reasonable time)",
)

# How "lite" was chosen: one training step (forward + backward + AdamW) on a
# batch of 32 RGB crops at 128 px, torch 2.14.1, timm 1.0.31,
# torch.set_num_threads(2), channels_last, random init, 8 classes; best of 7
# steps, min over 2 runs on a shared 2-core CPU. "epoch" = 313 such steps
# (~10k crops), without data loading. Inference = eval forward of the batch.
#
#   model                   family                  params  step s  infer s  epoch min
#   resnet18                residual CNN            11.2 M   0.31    0.09     1.6
#   resnet18d               residual CNN            11.2 M   0.38    0.10     2.0
#   efficientnet_b0         inverted residual       4.0 M    0.27    0.05     1.4
#   mobilenetv3_large_100   inverted residual + SE  4.2 M    0.17    0.03     0.9
#   mobilenetv4_conv_small  inverted residual       2.5 M    0.09    0.02     0.5
#   regnety_004             RegNet                  3.9 M    0.20    0.05     1.0
#   ghostnet_100            Ghost CNN               3.9 M    0.20    0.03     1.0
#   repvit_m0_9             re-param. CNN           4.7 M    0.27    0.07     1.4
#   convnext_atto           ConvNeXt                3.4 M    0.19    0.04     1.0
#   edgenext_xx_small       CNN-transformer hybrid  1.2 M    0.13    0.04     0.7
#   mobilevit_xxs           CNN-transformer hybrid  1.0 M    0.17    0.05     0.9
#   mobilevitv2_050         CNN-transformer hybrid  1.1 M    0.19    0.05     1.0
#   efficientvit_m0         transformer (MSRA)      2.2 M    0.08    0.02     0.4
#   efficientvit_m2         transformer (MSRA)      4.0 M    0.11    0.03     0.6
#   levit_128s (img_size)   conv-stem transformer   7.0 M    0.12    0.03     0.6
#   tiny_vit_5m_224         transformer             5.1 M    0.88    0.28     4.6
#   fastvit_t8              re-param. hybrid        segfaults in backward with
#                                                   channels_last (0.47 s without)
#
# With other jobs on the same two cores a step was 3-6x slower (resnet18 at
# 128 px: 1.9 s). At 160 px resnet18 takes ~0.57 s a step (3.0 min an epoch)
# even when quiet, too close to the 4 min budget once data loading shares the
# cores, so "lite" uses 128 px (a red cell is then ~27 px, a white cell 35-55).
#
# Speed is not enough: offline, every model starts from random weights, and
# some families barely learn blood cells from scratch on a CPU budget.
# scripts/screen_backbones.py (PBC, 150 crops per class, 8 epochs of stage 1,
# 64 px, random init, seed 0) gave validation macro-F1:
#
#   resnet10t 0.859, resnet18 0.841, regnety_004 0.789, ghostnet_100 0.743,
#   edgenext_xx_small 0.554, mobilenetv4_conv_small 0.529,
#   efficientnet_b0 0.508, convnext_atto 0.490, mobilenetv3_large_100 0.373
#
# "lite" takes the best of three different families: a residual CNN
# (resnet18), a RegNet with grouped convolutions and squeeze-excitation
# (regnety_004) and a Ghost-module CNN (ghostnet_100). No transformer: none
# learned from scratch in this budget (a Swin is in "paper", for ImageNet
# starts on a GPU).
register_preset(
    "lite",
    [
        ModelSpec("lite-resnet18", "resnet18", 128),
        ModelSpec("lite-regnety", "regnety_004", 128),
        ModelSpec("lite-ghostnet", "ghostnet_100", 128),
    ],
    "resnet18 + regnety_004 + ghostnet_100 at 128 px: three compact CNN families that "
    "learn from random weights; each trains ~10 epochs on ~10k crops within an hour on a "
    "2-core CPU",
)

register_preset(
    "tiny",
    [
        ModelSpec("tiny-resnet", "test_resnet", 32, HALF_MEAN, HALF_STD, pretrained=False),
        ModelSpec("tiny-efficientnet", "test_efficientnet", 32, pretrained=False),
        ModelSpec(
            "tiny-vit",
            "test_vit",
            32,
            HALF_MEAN,
            HALF_STD,
            timm_kwargs={"img_size": 32},
            pretrained=False,
        ),
    ],
    "timm's test models at 32 px, random init: for tests only, not for real use",
)
