"""Self-describing model files and ensemble files.

A model file is one ``.safetensors`` file: the weights plus, in the header
metadata under the key ``"napari_wbc"``, a JSON :class:`ModelConfig` holding
everything needed to use the model again (architecture, preprocessing,
classes, crop scale, stain reference, training config, history, metrics).
Loading validates that config and never unpickles anything. A SHA-256 of the
config and the tensors, stored next to the config, catches corrupt bytes that
the safetensors format itself would not notice.

An ensemble file is a small JSON file listing member model files (relative to
the ensemble file's folder), their weights and the test-time augmentation set.
:func:`napari_wbc.inference.load_any` turns either kind of file into an
:class:`~napari_wbc.inference.Ensemble`; this module only reads and writes
the files, so it never imports the inference code.

Saving is atomic: the file is written next to its destination, synced, and
renamed over it, so a crash or a cancel never leaves a half-written file.

This module imports torch only inside the functions that need it, so configs
can be read (e.g. to fill a GUI list) without loading torch.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_wbc.atomic import atomic_write
from napari_wbc.errors import Checked, ModelFileError, WBCError
from napari_wbc.models.registry import ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

#: Version of the model file layout written by this napari-wbc.
FORMAT_VERSION = 1
#: Version of the ensemble file layout written by this napari-wbc.
ENSEMBLE_FORMAT_VERSION = 2
#: Version 2 added ``fov_scale``; a file without one is still written as 1,
#: so that older napari-wbc releases keep reading it.
_ENSEMBLE_FOV_VERSION = 2
#: The test-time field of view an ensemble file may ask for, relative to training.
FOV_SCALE_RANGE = (0.5, 2.0)
ENSEMBLE_FORMAT = "napari-wbc-ensemble"
#: Metadata keys in the safetensors header.
CONFIG_KEY = "napari_wbc"
DIGEST_KEY = "napari_wbc_sha256"
#: Test-time augmentation sets an ensemble may name (see napari_wbc.inference).
TTA_NAMES: tuple[str, ...] = ("none", "flips", "d4")
#: Built models kept in memory by :func:`load_network`.
MODEL_CACHE_SIZE = 6

# A safetensors header larger than this is certainly not one of ours.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass
class ModelConfig(Checked):
    """Everything needed to use a trained model again.

    Parameters
    ----------
    spec : ModelSpec
        Architecture, input size, mean/std, field of view, red-cell diameter
        and classes.
    name : str
        Display name of the model.
    stain : dict or None
        Stain reference the training crops were normalised to (opaque,
        JSON-able; see napari_wbc.stain), or None when crops were not
        normalised.
    training : dict
        Training configuration (epochs, learning rates, sampler, ...).
    history : list of dict
        One entry per epoch (loss, metrics, ...).
    metrics : dict
        Final evaluation numbers.
    notes : str
        Free text.
    created : str
        ISO 8601 time of saving (filled in by :func:`save_model`).
    format_version : int
        Layout version of the file; readers refuse newer versions.
    package_version, torch_version, timm_version : str
        Versions that wrote the file (filled in by :func:`save_model`).
    """

    spec: ModelSpec
    name: str = ""
    stain: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    created: str = ""
    format_version: int = FORMAT_VERSION
    package_version: str = ""
    torch_version: str = ""
    timm_version: str = ""

    error = ModelFileError
    label = "model config"

    @property
    def classes(self) -> tuple[str, ...]:
        return self.spec.classes

    def problems(self) -> list[str]:
        """Return what is wrong with this config (empty when it is usable)."""
        out = []
        if not isinstance(self.spec, ModelSpec):
            return [f"spec must be a ModelSpec, got {type(self.spec).__name__}"]
        out += [f"spec: {p}" for p in self.spec.problems()]
        fv = self.format_version
        if not isinstance(fv, int) or isinstance(fv, bool) or fv < 1:
            out.append(f"format_version must be a positive integer, got {fv!r}")
        for key in ("name", "notes", "created", "package_version", "torch_version"):
            if not isinstance(getattr(self, key), str):
                out.append(f"{key} must be a string")
        if not isinstance(self.timm_version, str):
            out.append("timm_version must be a string")
        if self.stain is not None and not isinstance(self.stain, dict):
            out.append("stain must be a dict or None")
        if not isinstance(self.training, dict):
            out.append("training must be a dict")
        if not isinstance(self.metrics, dict):
            out.append("metrics must be a dict")
        if not isinstance(self.history, list) or not all(
            isinstance(h, dict) for h in self.history
        ):
            out.append("history must be a list of dicts")
        if not out:
            try:
                self.to_json()
            except (TypeError, ValueError) as exc:
                out.append(f"not JSON-serialisable: {exc}")
        return out

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        out = asdict(self)
        out["spec"] = self.spec.to_dict()
        return out

    def to_json(self) -> str:
        """Return the config as a JSON string (numpy numbers become plain numbers)."""
        return json.dumps(self.to_dict(), default=_json_default)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build and validate a config; refuses formats newer than this reader."""
        if not isinstance(data, dict):
            raise ModelFileError(
                f"a model config must be a JSON object, got {type(data).__name__}"
            )
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ModelFileError(
                f"model config has no valid format_version (got {version!r}); "
                "the file was not written by napari-wbc or is corrupt"
            )
        if version > FORMAT_VERSION:
            raise ModelFileError(
                f"this model was made by a newer napari-wbc (format {version}); upgrade "
                f"napari-wbc (this version {_package_version()} reads formats up to "
                f"{FORMAT_VERSION})"
            )
        if "spec" not in data:
            raise ModelFileError("model config lacks the required 'spec' entry")
        try:
            spec = ModelSpec.from_dict(data["spec"])
        except WBCError as exc:
            raise ModelFileError(f"model config: {exc}") from exc
        known = set(cls.__dataclass_fields__) - {"spec"}
        kwargs = {k: v for k, v in data.items() if k in known}
        return cls(spec=spec, **kwargs).validate()

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """Parse and validate a config written by :meth:`to_json`."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"model config is not valid JSON ({exc})") from exc
        return cls.from_dict(data)


def _json_default(obj: Any) -> Any:
    """Convert numpy scalars/arrays (common in metrics) for json.dumps."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _package_version() -> str:
    from napari_wbc import __version__

    return __version__


# --- header ---------------------------------------------------------------------


def _read_header(path: Path) -> dict[str, Any]:
    """Read and check the safetensors header of ``path`` without touching the data."""
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a model file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ModelFileError(
                    f"{path} is empty or truncated ({size} bytes); it is not a model file"
                )
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise ModelFileError(
                    f"{path} is not a napari-wbc model file, or it is truncated: its header "
                    f"claims {n} bytes but the file has {size}"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = 0
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            begin, stop = entry["data_offsets"]
            if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop):
                raise ValueError(f"bad data offsets for tensor {key!r}")
            end = max(end, stop)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ModelFileError(
            f"{path} is corrupt or not a napari-wbc model file (unreadable header: {exc})"
        ) from exc
    expected = 8 + n + end
    if size < expected:
        raise ModelFileError(
            f"{path} is truncated: expected {expected} bytes, found {size}; copy the file "
            "again or re-save the model"
        )
    if size > expected:
        raise ModelFileError(
            f"{path} is corrupt: {size - expected} unexpected bytes after the weights"
        )
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or CONFIG_KEY not in meta:
        raise ModelFileError(
            f"{path} is a safetensors file but not a napari-wbc model (no {CONFIG_KEY!r} "
            "metadata); save models with napari_wbc.models.save_model"
        )
    return header


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """Read and validate the config of a model file without loading its weights.

    Raises
    ------
    ModelFileError
        When the file is missing, truncated, corrupt, not a napari-wbc model,
        or of a newer format.
    """
    path = Path(path)
    meta = _read_header(path)["__metadata__"]
    try:
        return ModelConfig.from_json(meta[CONFIG_KEY])
    except ModelFileError as exc:
        raise ModelFileError(f"{path}: {exc}") from exc


# --- save / load ----------------------------------------------------------------


def save_model(
    path: str | os.PathLike, model: torch.nn.Module, config: ModelConfig, half: bool = False
) -> Path:
    """Save a model and its config to one ``.safetensors`` file, atomically.

    Parameters
    ----------
    path : path-like
        Destination; its folder must exist. An existing file is replaced only
        once the new one is completely written.
    model : torch.nn.Module
        A timm model built from ``config.spec``.
    config : ModelConfig
        Its description. Versions and (if empty) the creation time and name are
        filled in on a copy; ``config`` itself is not changed.
    half : bool
        Store floating-point tensors as float16 (half the size). They are
        restored to float32 on load; outputs change slightly.

    Returns
    -------
    Path
        The path written.
    """
    import safetensors.torch
    import timm
    import torch

    path = Path(path)
    config = copy.deepcopy(config).validate()
    config.format_version = FORMAT_VERSION
    config.package_version = _package_version()
    config.torch_version = torch.__version__
    config.timm_version = timm.__version__
    config.created = config.created or _dt.datetime.now(_dt.timezone.utc).isoformat(
        timespec="seconds"
    )
    config.name = config.name or path.stem
    _check_model_matches(model, config.spec)

    tensors = {}
    for key, value in model.state_dict().items():
        value = value.detach().to("cpu")
        if half and value.is_floating_point():
            value = value.to(torch.float16)
        # A private contiguous copy: safetensors refuses tensors sharing memory.
        tensors[key] = value.clone().contiguous()
    config_json = config.to_json()
    metadata = {
        "format": "pt",
        CONFIG_KEY: config_json,
        DIGEST_KEY: _digest(config_json, tensors),
    }

    def write(tmp: str) -> None:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)

    _atomic_write(path, write)
    logger.info("saved model %s (%s) to %s", config.name, config.spec.arch, path)
    return path


def _check_model_matches(model: torch.nn.Module, spec: ModelSpec) -> None:
    """Refuse to save a model that its spec could not rebuild."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if arch is not None and arch != spec.arch.split(".")[0]:
        raise ModelFileError(f"the model is a timm {arch!r} but its spec says {spec.arch!r}")
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n != spec.num_classes:
        raise ModelFileError(
            f"the model has {n} outputs but its spec lists {spec.num_classes} classes"
        )


def _digest(config_json: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the config text and the names, dtypes, shapes and bytes of the tensors."""
    import torch

    h = hashlib.sha256(config_json.encode("utf-8"))
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Save through ``write(tmp_path)`` atomically (see :mod:`napari_wbc.atomic`)."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ModelFileError(f"cannot save to {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ModelFileError(f"cannot write in {folder}: permission denied")
    atomic_write(path, write, ".tmp")


_cache: OrderedDict[tuple, tuple[Any, ModelConfig]] = OrderedDict()
_cache_lock = threading.RLock()


def clear_model_cache() -> None:
    """Forget the models kept in memory by :func:`load_network`."""
    with _cache_lock:
        _cache.clear()


def load_network(
    path: str | os.PathLike, device: str | torch.device = "cpu", cache: bool = True
) -> tuple[torch.nn.Module, ModelConfig]:
    """Load a model file: validate its config, rebuild the model, load the weights.

    Built models are kept in a small LRU cache keyed by (resolved path,
    modification time, size, device), so loading the same file again is
    instant, and re-saving a file invalidates its entry. A cached model is
    shared: treat it as read-only (do not train it or change its memory
    format); pass ``cache=False`` to get a private copy.

    Parameters
    ----------
    path : path-like
        A ``.safetensors`` file written by :func:`save_model`.
    device : str or torch.device
        Where to put the model ("cpu", "cuda", "auto", ...).
    cache : bool
        Use and fill the cache.

    Returns
    -------
    model : torch.nn.Module
        The model in eval mode, float32, on ``device``.
    config : ModelConfig
        Its config (a copy, safe to modify).

    Raises
    ------
    ModelFileError
        When the file is missing, truncated, corrupt, not a napari-wbc model,
        of a newer format, or its weights do not fit its architecture.
    """
    from napari_wbc.models.build import get_device

    path = Path(path)
    device = get_device(device)
    key = None
    if cache:
        try:
            st = path.resolve().stat()
            key = (str(path.resolve()), st.st_mtime_ns, st.st_size, str(device))
        except OSError:
            key = None  # _read_header below reports the missing file
        with _cache_lock:
            if key in _cache:
                _cache.move_to_end(key)
                model, config = _cache[key]
                return model, copy.deepcopy(config)
    model, config = _load_uncached(path, device)
    if key is not None:
        with _cache_lock:
            _cache[key] = (model, config)
            while len(_cache) > MODEL_CACHE_SIZE:
                _cache.popitem(last=False)
    return model, copy.deepcopy(config)


def _load_uncached(path: Path, device: torch.device) -> tuple[torch.nn.Module, ModelConfig]:
    """Read, verify and build one model file."""
    import safetensors.torch
    import torch

    from napari_wbc.models.build import build_model

    header = _read_header(path)
    meta = header["__metadata__"]
    try:
        config = ModelConfig.from_json(meta[CONFIG_KEY])
    except ModelFileError as exc:
        raise ModelFileError(f"{path}: {exc}") from exc
    try:
        tensors = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFileError(f"{path} is corrupt: the weights cannot be read ({exc})") from exc
    digest = meta.get(DIGEST_KEY)
    if digest is None:
        raise ModelFileError(f"{path} has no weights checksum; it was not written by napari-wbc")
    if _digest(meta[CONFIG_KEY], tensors) != digest:
        raise ModelFileError(
            f"{path} is corrupt: its weights or config do not match their checksum; copy "
            "the file again or re-train the model"
        )
    state = {
        k: v.to(torch.float32) if v.is_floating_point() and v.dtype != torch.float32 else v
        for k, v in tensors.items()
    }
    try:
        model, _ = build_model(config.spec, pretrained=False)
    except WBCError as exc:
        raise ModelFileError(f"{path}: cannot rebuild the model: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(
            f"{path}: the weights do not fit architecture {config.spec.arch!r} as built by "
            f"timm {_timm_version()} (saved with timm {config.timm_version or '?'}): {exc}"
        ) from exc
    model.to(device).eval()
    return model, config


def _timm_version() -> str:
    import timm

    return timm.__version__


# --- ensembles ------------------------------------------------------------------


@dataclass
class EnsembleMemberRef:
    """One member entry of an ensemble file (path resolved)."""

    path: Path
    weight: float = 1.0


@dataclass
class EnsembleConfig:
    """The content of an ensemble file, with member paths resolved."""

    members: list[EnsembleMemberRef]
    tta: str = "d4"
    name: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    format_version: int = ENSEMBLE_FORMAT_VERSION
    #: How far to trust the ensemble's predictions (napari_wbc.trust.TrustStats
    #: as a dict: temperature, feature statistics, thresholds); None without.
    trust: dict[str, Any] | None = None
    #: The field of view cells are classified at, relative to the one the
    #: members were trained at (napari_wbc.inference.Ensemble.fov_scale).
    fov_scale: float = 1.0


def class_difference(a: Sequence[str], b: Sequence[str]) -> str:
    """Describe how two class lists differ ("" when they are equal)."""
    a, b = tuple(a), tuple(b)
    if a == b:
        return ""
    only_a = [c for c in a if c not in b]
    only_b = [c for c in b if c not in a]
    if not only_a and not only_b:
        return f"same classes in a different order: {list(a)} vs {list(b)}"
    parts = []
    if only_a:
        parts.append(f"only the first has {only_a}")
    if only_b:
        parts.append(f"only the second has {only_b}")
    return "; ".join(parts)


def save_ensemble(
    path: str | os.PathLike,
    member_paths: Sequence[str | os.PathLike],
    weights: Sequence[float] | None = None,
    tta: str = "d4",
    *,
    name: str = "",
    metrics: dict[str, Any] | None = None,
    notes: str = "",
    trust: dict[str, Any] | None = None,
    fov_scale: float = 1.0,
) -> Path:
    """Write an ensemble file (JSON) listing member model files, atomically.

    Parameters
    ----------
    path : path-like
        Destination ``.json`` file.
    member_paths : sequence of path-like
        Model files. They are stored relative to the ensemble file's folder
        when possible, so the folder can be moved as a whole.
    weights : sequence of float, optional
        Positive weight of each member; default all 1.
    tta : {"none", "flips", "d4"}
        Test-time augmentation set.
    name, metrics, notes
        Description stored in the file.
    trust : dict, optional
        Trust statistics of the ensemble as a whole
        (:meth:`napari_wbc.trust.TrustStats.to_dict`), fitted for these
        members in this order.
    fov_scale : float
        The field of view to classify cells at, relative to the members'
        training one (:attr:`napari_wbc.inference.Ensemble.fov_scale`;
        within :data:`FOV_SCALE_RANGE`).

    Raises
    ------
    ModelFileError
        When a member is not a valid model file, members disagree on classes
        or field of view, or weights/tta are invalid.
    """
    path = Path(path)
    if not member_paths:
        raise ModelFileError("an ensemble needs at least one member model")
    weights = [1.0] * len(member_paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(member_paths):
        raise ModelFileError(f"{len(weights)} weights given for {len(member_paths)} members")
    _check_weights(weights, path)
    check_tta(tta, path)
    check_fov_scale(fov_scale, path)
    configs = [read_model_config(p) for p in member_paths]
    check_members_agree(list(member_paths), configs)

    folder = (path.parent if str(path.parent) else Path(".")).resolve()
    members = []
    for member, weight in zip(member_paths, weights, strict=True):
        target = Path(member).resolve()
        try:
            stored = Path(os.path.relpath(target, folder)).as_posix()
        except ValueError:  # another drive on Windows: only an absolute path works
            stored = str(target)
        members.append({"path": stored, "weight": weight})
    data = {
        "format": ENSEMBLE_FORMAT,
        "format_version": _ENSEMBLE_FOV_VERSION if fov_scale != 1 else 1,
        "members": members,
        "tta": tta,
        "name": name or path.stem,
        "metrics": metrics or {},
        "notes": notes,
    }
    if fov_scale != 1:
        data["fov_scale"] = float(fov_scale)
    if trust is not None:
        _check_trust(trust, len(members), path)
        data["trust"] = trust
    text = json.dumps(data, indent=2, default=_json_default)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")

    _atomic_write(path, write)
    return path


def _check_weights(weights: Sequence[float], where: Path) -> None:
    """Member weights must be positive finite numbers."""
    bad = [w for w in weights if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0)]
    if bad:
        raise ModelFileError(f"{where}: member weights must be positive numbers, got {bad}")


def _check_trust(trust: Any, n_members: int, where: Path) -> None:
    """Trust statistics must be an object describing every member (or none)."""
    if not isinstance(trust, dict):
        raise ModelFileError(f'{where}: "trust" must be an object')
    features = trust.get("features") or []
    if features and len(features) != n_members:
        raise ModelFileError(
            f"{where}: the trust statistics describe {len(features)} members, the ensemble "
            f"has {n_members}; refit them (scripts/fit_trust.py)"
        )


def check_fov_scale(fov_scale: Any, where: Path) -> None:
    """The test-time field of view must be a number within :data:`FOV_SCALE_RANGE`."""
    lo, hi = FOV_SCALE_RANGE
    if (
        not isinstance(fov_scale, (int, float))
        or isinstance(fov_scale, bool)
        or not math.isfinite(fov_scale)
        or not lo <= fov_scale <= hi
    ):
        raise ModelFileError(
            f"{where}: fov_scale must be a number from {lo} to {hi} (the field of view "
            f"relative to training), got {fov_scale!r}"
        )


def check_tta(tta: Any, where: Path) -> None:
    """The TTA set must be one of TTA_NAMES."""
    if tta not in TTA_NAMES:
        raise ModelFileError(
            f"{where}: unknown test-time augmentation {tta!r}; use one of {', '.join(TTA_NAMES)}"
        )


def check_members_agree(paths: Sequence[Any], configs: Sequence[ModelConfig]) -> None:
    """Members (named by ``paths``) must share classes (in order) and field of view."""
    first = configs[0]
    for p, cfg in zip(paths[1:], configs[1:], strict=True):
        diff = class_difference(first.classes, cfg.classes)
        if diff:
            raise ModelFileError(
                f"ensemble members {paths[0]} and {p} have different classes: {diff}"
            )
        if abs(cfg.spec.fov_rbc - first.spec.fov_rbc) > 1e-6 * first.spec.fov_rbc:
            raise ModelFileError(
                f"ensemble members {paths[0]} and {p} see different fields of view "
                f"({first.spec.fov_rbc:.3f} vs {cfg.spec.fov_rbc:.3f} red-cell diameters)"
            )


def read_ensemble(path: str | os.PathLike) -> EnsembleConfig:
    """Read and validate an ensemble file without loading the members.

    Member paths are resolved against the ensemble file's folder.

    Raises
    ------
    ModelFileError
        When the file is missing, not JSON, not an ensemble file, of a newer
        format, or has invalid entries.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"ensemble file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelFileError(f"{path} is not a valid ensemble file (JSON error: {exc})") from exc
    if not isinstance(data, dict) or data.get("format") != ENSEMBLE_FORMAT:
        raise ModelFileError(
            f'{path} is not a napari-wbc ensemble file (missing "format": "{ENSEMBLE_FORMAT}")'
        )
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFileError(f"{path}: ensemble file has no valid format_version")
    if version > ENSEMBLE_FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was made by a newer napari-wbc (format {version}); upgrade napari-wbc"
        )
    entries = data.get("members")
    if not isinstance(entries, list) or not entries:
        raise ModelFileError(f"{path}: an ensemble needs a non-empty list of members")
    members = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ModelFileError(f'{path}: member {i} needs a "path" string')
        weight = entry.get("weight", 1.0)
        _check_weights([weight], path)
        member = Path(entry["path"])
        if not member.is_absolute():
            member = path.parent / member
        members.append(EnsembleMemberRef(member, float(weight)))
    tta = data.get("tta", "d4")
    check_tta(tta, path)
    metrics = data.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise ModelFileError(f'{path}: "metrics" must be an object')
    trust = data.get("trust")
    if trust is not None:
        _check_trust(trust, len(members), path)
    fov_scale = data.get("fov_scale", 1.0)
    check_fov_scale(fov_scale, path)
    return EnsembleConfig(
        members=members,
        tta=tta,
        name=str(data.get("name") or path.stem),
        metrics=metrics,
        notes=str(data.get("notes") or ""),
        format_version=version,
        trust=trust,
        fov_scale=float(fov_scale),
    )


#: Where the shipped default ensemble lives inside the package.
DEFAULT_MODEL_RESOURCE = "resources/models/wbc-lite.json"
#: The ensembles shipped inside the package, by the name ``--model`` accepts:
#: ``wbc-lite``, the default, trained on three labs for other labs' images
#: (MODEL_CARD.md); ``wbc-pbc``, the PBC specialist, best on images like the
#: PBC data set's (CellaVision, Barcelona) and near chance elsewhere
#: (docs/model-card-pbc-only.md).
BUILTIN_MODELS: dict[str, str] = {
    "wbc-lite": DEFAULT_MODEL_RESOURCE,
    "wbc-pbc": "resources/models/wbc-pbc.json",
}


def _package_file(resource: str) -> Path:
    """A file shipped inside the napari_wbc package (it may be missing)."""
    from importlib import resources

    return Path(str(resources.files("napari_wbc").joinpath(resource)))


def builtin_model_path(name: str) -> Path:
    """The file of a built-in ensemble (:data:`BUILTIN_MODELS`).

    Raises
    ------
    ModelFileError
        For an unknown name, or when this installation does not ship it.
    """
    if name not in BUILTIN_MODELS:
        raise ModelFileError(
            f"no built-in model {name!r}; the built-in ones are {', '.join(BUILTIN_MODELS)}"
        )
    path = _package_file(BUILTIN_MODELS[name])
    if not path.is_file():
        raise ModelFileError(f"this napari-wbc installation does not ship {name}")
    return path


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A model argument as a file: None is the default, a built-in name its file, else the path."""
    if model is None:
        return default_model_path()
    path = Path(model)
    if not path.exists() and str(model) in BUILTIN_MODELS:
        return builtin_model_path(str(model))
    return path


def default_model_path() -> Path:
    """The ensemble the plugin uses when none is named (shipped inside the package).

    Raises
    ------
    ModelFileError
        When this installation holds no default model.
    """
    path = _package_file(DEFAULT_MODEL_RESOURCE)
    if not path.is_file():
        raise ModelFileError(
            "no default model is installed in this napari-wbc; pass a model file "
            "(napari-wbc train makes one)"
        )
    return path
