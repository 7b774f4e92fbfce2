"""Classify cell crops with a test-time-augmented ensemble.

Each member of an :class:`Ensemble` sees every crop under each transform of a
test-time augmentation (TTA) set; its softmax probabilities are averaged over
the transforms, and the members' averages are combined with the member weights
(arXiv 2603.01976: different timm backbones, flips and 90° rotations,
probability averaging). Blood-cell crops have no preferred orientation, so
the dihedral group D4 (4 rotations × optional mirror) is the natural TTA set.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F

from napari_wbc.errors import DataError, ModelFileError, WBCError
from napari_wbc.models.build import get_device
from napari_wbc.models.files import (
    ModelConfig,
    check_members_agree,
    check_tta,
    load_model,
    read_ensemble,
)
from napari_wbc.preprocess import Preprocessor
from napari_wbc.progress import Progress, ProgressGen, run
from napari_wbc.trust import TrustStats, softmax

logger = logging.getLogger(__name__)


#: Crops per forward pass. On a 2-core CPU every built-in member runs
#: 10-30 % faster per crop in batches of 32 than of 64 (they fit the caches
#: better): resnet18 3.30 against 3.66 ms, ghostnet 1.04 against 1.50 ms.
INFERENCE_BATCH = 32
#: Memory (bytes) that crops resized to the members' input may keep between
#: the gate's stages, so that a cell in doubt is not resized again for each
#: stage (a slide's batch of 512 cells at 128 px: 100 MB). A larger set is
#: resized again where needed.
RESIZED_KEEP_BYTES = 128 * 2**20


# --- test-time augmentation -----------------------------------------------------


@dataclass(frozen=True)
class D4Transform:
    """An element of the dihedral group D4 acting on the last two axes.

    The image is first mirrored left-right (when ``flip``), then rotated by
    ``k`` quarter turns counter-clockwise. Works on NCHW tensors.
    """

    k: int = 0
    flip: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip:
            x = x.flip(-1)
        return torch.rot90(x, self.k % 4, dims=(-2, -1)) if self.k % 4 else x

    @property
    def name(self) -> str:
        names = {
            (0, False): "identity",
            (1, False): "rot90",
            (2, False): "rot180",
            (3, False): "rot270",
            (0, True): "hflip",
            (1, True): "hflip+rot90",
            (2, True): "vflip",
            (3, True): "hflip+rot270",
        }
        return names[(self.k % 4, self.flip)]


#: Named TTA sets: lists of transforms on NCHW tensors. "flips" holds the
#: identity, the two mirrors and their product (a half turn); "d4" all 8
#: symmetries of the square.
TTA_SETS: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
    "none": [D4Transform(0, False)],
    "flips": [D4Transform(0, False), D4Transform(0, True), D4Transform(2, True), D4Transform(2)],
    "d4": [D4Transform(k, f) for f in (False, True) for k in range(4)],
}


# --- ensembles ------------------------------------------------------------------


class EnsembleMember(NamedTuple):
    """One model of an ensemble with its config and (unnormalised) weight."""

    model: torch.nn.Module
    config: ModelConfig
    weight: float = 1.0


@dataclass
class Ensemble:
    """Models that classify the same crops, combined by weighted probability averaging.

    Parameters
    ----------
    members : list of EnsembleMember or (model, config, weight) tuples
        The models. They must share classes (in order) and field of view.
    tta : {"none", "flips", "d4"}
        Default test-time augmentation set.
    name, metrics, notes, path
        Description (from the ensemble or model file).

    Raises
    ------
    ModelFileError
        When members disagree on classes or field of view.
    """

    members: list[EnsembleMember]
    tta: str = "d4"
    name: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    path: Path | None = None
    #: How far to trust predictions (calibration, feature statistics); None
    #: leaves needs_review to the confidence and disagreement thresholds.
    trust: TrustStats | None = None
    #: The field of view cells are cut at for classifying, relative to the
    #: one the members were trained at (below 1: a tighter field, the cell
    #: larger in the input). Stored in the ensemble file (``fov_scale``).
    fov_scale: float = 1.0

    def __post_init__(self):
        self.members = [EnsembleMember(*m) for m in self.members]
        if not self.members:
            raise ModelFileError("an ensemble needs at least one member model")
        if self.tta not in TTA_SETS:
            raise WBCError(f"unknown TTA set {self.tta!r}; use one of {', '.join(TTA_SETS)}")
        check_members_agree(
            [f"{i} ({m.config.name})" for i, m in enumerate(self.members)],
            [m.config for m in self.members],
        )
        from .models.files import check_fov_scale

        check_fov_scale(self.fov_scale, Path(self.name or "ensemble"))
        for i, member in enumerate(self.members):
            if member.weight <= 0:
                raise ModelFileError(f"member {i} has weight {member.weight}; must be positive")
        stains = {repr(m.config.stain) for m in self.members}
        if len(stains) > 1:
            logger.warning(
                "ensemble %s: members were trained on different stain references; "
                "crops are normalised to the first one's",
                self.name,
            )

    @property
    def classes(self) -> tuple[str, ...]:
        return self.members[0].config.classes

    @property
    def fov_px(self) -> int:
        """Crop side in pixels at training scale (of the first member)."""
        return self.members[0].config.spec.fov_px

    @property
    def rbc_diameter_px(self) -> float:
        """Red-cell diameter in pixels at training scale (of the first member)."""
        return self.members[0].config.spec.rbc_diameter_px

    @property
    def fov_rbc(self) -> float:
        """Crop side in red-cell diameters that cells are classified at (``fov_scale`` applied)."""
        return self.members[0].config.spec.fov_rbc * self.fov_scale

    @property
    def stain(self) -> dict[str, Any] | None:
        """Stain reference that crops should be normalised to (first member's)."""
        return self.members[0].config.stain

    @property
    def stain_method(self) -> str:
        """Stain normalization method the members were trained with (first member's)."""
        return self.preprocessor.stain_method

    @cached_property
    def preprocessor(self) -> Preprocessor:
        """How raw crops or a smear become this ensemble's input (stain, field of view)."""
        return Preprocessor.from_configs([m.config for m in self.members], self.fov_scale)

    @property
    def weights(self) -> np.ndarray:
        """Member weights normalised to sum to 1."""
        w = np.array([m.weight for m in self.members], dtype=np.float64)
        return w / w.sum()

    @property
    def device(self) -> torch.device:
        return _model_device(self.members[0].model)

    def to(self, device: str | torch.device) -> Ensemble:
        """Move every member model to ``device`` (in place); return self."""
        device = get_device(device)
        for member in self.members:
            member.model.to(device)
        return self

    def predict(self, crops, **kwargs) -> dict[str, Any]:
        """Shortcut for :func:`predict_crops` (``ensemble.predict(crops)``)."""
        return predict_crops(self, crops, **kwargs)


def _model_device(model: torch.nn.Module) -> torch.device:
    """Device of a model's first parameter (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


# --- loading --------------------------------------------------------------------


def load_ensemble(path: str | os.PathLike, device: str | torch.device = "cpu") -> Ensemble:
    """Load an ensemble file and its member models (through the model cache).

    Raises
    ------
    ModelFileError
        When the ensemble file or a member is invalid, or members disagree
        on classes or field of view.
    """
    path = Path(path)
    ens = read_ensemble(path)
    members = []
    for ref in ens.members:
        try:
            model, config = load_model(ref.path, device)
        except ModelFileError as exc:
            raise ModelFileError(f"ensemble {path}: member {ref.path}: {exc}") from exc
        members.append(EnsembleMember(model, config, ref.weight))
    check_members_agree([m.path for m in ens.members], [m.config for m in members])
    return Ensemble(
        members,
        tta=ens.tta,
        name=ens.name,
        metrics=ens.metrics,
        notes=ens.notes,
        path=path,
        trust=TrustStats.from_dict(ens.trust) if ens.trust else None,
        fov_scale=ens.fov_scale,
    )


def load_any(
    path: str | os.PathLike, device: str | torch.device = "cpu", tta: str = "d4"
) -> Ensemble:
    """Load a model file or an ensemble file as an :class:`Ensemble`.

    A ``.json`` file is read as an ensemble file; anything else as a model
    file, which becomes a one-member ensemble using the TTA set ``tta``.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        return load_ensemble(path, device)
    check_tta(tta, path)
    model, config = load_model(path, device)
    return Ensemble(
        [EnsembleMember(model, config, 1.0)],
        tta=tta,
        name=config.name,
        metrics=config.metrics,
        notes=config.notes,
        path=path,
    )


# --- prediction -----------------------------------------------------------------


def predict_crops(
    ensemble: Ensemble,
    crops: np.ndarray | Sequence[np.ndarray],
    batch_size: int = INFERENCE_BATCH,
    tta: str | None = None,
    device: str | torch.device | None = None,
    gate: bool = False,
) -> dict[str, Any]:
    """Classify crops with an ensemble; see :func:`iter_predict_crops`."""
    return run(iter_predict_crops(ensemble, crops, batch_size, tta, device, gate))


def iter_predict_crops(
    ensemble: Ensemble,
    crops: np.ndarray | Sequence[np.ndarray],
    batch_size: int = INFERENCE_BATCH,
    tta: str | None = None,
    device: str | torch.device | None = None,
    gate: bool | Sequence[tuple[int | None, int | None, float | None]] = False,
    known: ViewSums | None = None,
) -> ProgressGen[dict[str, Any]]:
    """Classify crops with an ensemble, yielding progress after each batch and member.

    Parameters
    ----------
    ensemble : Ensemble
        The models.
    crops : ndarray (N, H, W, 3) uint8, or sequence of (H, W, 3) uint8 arrays
        RGB crops already cut at the models' field of view (``ensemble.fov_px``
        at training scale) and stain-normalised; any size, they are resized to
        each member's input size (bilinear, antialiased).
    batch_size : int
        Crops per forward pass.
    tta : {"none", "flips", "d4"}, optional
        TTA set; default ``ensemble.tta``.
    device : str or torch.device, optional
        Where to run; member models are moved there. Default: where the first
        member is.
    gate : bool
        Spend members and views only where the answer is still in doubt, in
        the stages of :data:`GATE_STAGES`: the two cheapest members first
        see the crop as it is; a cell they agree on with calibrated
        confidence ≥ 0.99 is settled there; then every member, settling
        the cells whose members all name the same class with confidence
        ≥ 0.7; a cell still in doubt gets every member's first four views of
        the TTA set (D4's rotations). False: every view of every cell. A
        sequence of stages instead of True replaces :data:`GATE_STAGES`;
        one whose last stage settles (not None) ends with every view of
        every member for the cells still in doubt.
    known : ViewSums, optional
        Passes this ensemble already made over some of these crops (the
        model choice's look at a sample, :func:`iter_predict_sums`), taken
        as they are instead of being run again. Their views must be the
        first views of ``tta``'s set.

    Yields
    ------
    Progress
        Stage "classify"; ``done``/``total`` count crop × member passes of
        the first stage (with ``gate``, then stage "doubtful" for the rest).

    Returns
    -------
    dict
        ``probs`` (N, C) float32 ensemble probabilities; ``member_probs``
        (M, N, C) float32 per member (each averaged over TTA); ``classes``
        tuple of names; ``pred`` (N,) int64 argmax of ``probs``;
        ``confidence`` (N,) float32 max of ``probs``; ``passes`` (N,) int
        forward passes each crop took (members × views); ``views`` (M, N)
        int, the views each member saw of each crop (0: a member that was not
        run, gated; its ``member_probs`` row is then the ensemble's, so it
        adds no disagreement). With trust
        statistics (``ensemble.trust``) the probabilities are calibrated (each
        member's view-averaged logits divided by the fitted temperature), and
        the dict also holds ``member_logits`` (M, N, C) and, when the
        statistics have feature centres, ``ood_distance`` (N,): the distance
        of each crop's features to the training cells
        (:class:`napari_wbc.trust.TrustStats`), averaged over the members
        that saw the crop.
    """
    sums = yield from iter_predict_sums(ensemble, crops, batch_size, tta, device, gate, known)
    return _combine(ensemble, sums.sums, sums.views)


class ViewSums(NamedTuple):
    """An ensemble's outputs summed over the views it ran (what :func:`_combine` needs).

    ``rows``: which crops of a larger set these are (None: all of them, in
    order); ``views`` (M, N): how many views, the first of the TTA set, each
    member ran on each crop; ``sums``: as :func:`_empty_sums`; ``tta``: the
    TTA set the views come from.
    """

    ensemble: Ensemble
    tta: str
    views: np.ndarray
    sums: dict[str, Any]
    rows: np.ndarray | None = None


def iter_predict_sums(
    ensemble: Ensemble,
    crops: np.ndarray | Sequence[np.ndarray],
    batch_size: int = INFERENCE_BATCH,
    tta: str | None = None,
    device: str | torch.device | None = None,
    gate: bool | Sequence[tuple[int | None, int | None, float | None]] = False,
    known: ViewSums | None = None,
) -> ProgressGen[ViewSums]:
    """:func:`iter_predict_crops` before its outputs are combined: per-member view sums."""
    crops = _check_crops(crops)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise WBCError(f"batch_size must be a positive integer, got {batch_size!r}")
    tta = ensemble.tta if tta is None else tta
    if tta not in TTA_SETS:
        raise WBCError(f"unknown TTA set {tta!r}; use one of {', '.join(TTA_SETS)}")
    transforms = TTA_SETS[tta]
    device = ensemble.device if device is None else get_device(device)
    n = len(crops)

    prepared = []
    for member in ensemble.members:
        model = member.model
        if _model_device(model) != device:
            model.to(device)
        if n >= FOLD_MIN_CROPS or _FOLDED.get(model) is not None:
            model = inference_model(model)
        spec = member.config.spec
        mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
        prepared.append((model, spec.input_size, mean, std))

    m = len(prepared)
    sums = _empty_sums(ensemble, n)
    views = np.zeros((m, n), int)
    if known is not None:
        _add_known(ensemble, known, transforms, sums, views)
    # Every view of every member is the one-stage plan; the gate's plans
    # take the cheapest members first.
    order = member_order(ensemble) if gate else list(range(m))
    active = np.arange(n)
    stages = GATE_STAGES if gate is True else (gate or [(None, None, None)])
    plan = _gate_plan(stages, m, len(transforms))
    # Cells in doubt are not resized again for each stage.
    resized = _Resized(crops, device, keep=len(plan) > 1)
    for i, (k, v, settle) in enumerate(plan):
        stage = "classify" if i == 0 else "doubtful"
        # Members that need the same views of the same cells run together
        # (each batch is resized once for them). Cells still in doubt have
        # mostly come the same way; those seen earlier (``known``) may be
        # further along.
        need: dict[tuple[int, bytes], tuple[np.ndarray, list[int]]] = {}
        for j in order[:k]:
            for have in np.unique(views[j, active]):
                if have < v:
                    rows = active[views[j, active] == have]
                    need.setdefault((int(have), rows.tobytes()), (rows, []))[1].append(j)
        for (have, _), (rows, members) in need.items():
            yield from _iter_add_views(
                ensemble,
                prepared,
                crops,
                transforms[have:v],
                members,
                have,
                sums,
                rows,
                batch_size,
                device,
                stage,
                resized,
            )
            views[np.ix_(members, rows)] = v
        if settle is None or not len(active):
            break
        out = _combine(ensemble, _take(sums, active), views[:, active], ood=False)
        members = views[:, active] > 0
        agree = (out["member_probs"].argmax(-1) == out["pred"][None]) | ~members
        sure = agree.all(axis=0) & (out["confidence"] >= settle)
        active = active[~sure]
    return ViewSums(ensemble, tta, views, sums)


def _add_known(ensemble, known: ViewSums, transforms, sums, views) -> None:
    """Copy earlier passes (``known``) into this run's ``sums`` and ``views``."""
    if known.ensemble is not ensemble:
        raise WBCError("earlier passes come from another model; they cannot be reused")
    ran = TTA_SETS[known.tta]
    if int(known.views.max(initial=0)) > len(transforms) or ran[
        : known.views.max(initial=0)
    ] != list(transforms[: known.views.max(initial=0)]):
        raise WBCError(f"earlier passes used TTA {known.tta!r}, not the first views of this set")
    rows = np.arange(known.views.shape[1]) if known.rows is None else np.asarray(known.rows)
    views[:, rows] = known.views
    sums["probs"][:, rows] = known.sums["probs"]
    if sums["logits"] is not None:
        sums["logits"][:, rows] = known.sums["logits"]
        for j, f in enumerate(known.sums["features"]):
            if f is not None:
                if sums["features"][j] is None:
                    sums["features"][j] = np.zeros((views.shape[1], f.shape[1]), np.float32)
                sums["features"][j][rows] = f


#: How ``gate=True`` spends passes: stages of (members, views, settle).
#: ``members`` are taken cheapest first (:func:`member_order`; None: all),
#: ``views`` are the first views of the TTA set (None: all). After a stage, a
#: cell whose members so far all name the same class with calibrated
#: ensemble confidence ≥ ``settle`` is done; the others go on to the next
#: stage (a last stage whose ``settle`` is None ends it). A cell still in
#: doubt after every member's first view gets the first four views of the
#: TTA set (D4's four rotations), not all eight. Replayed on every view of
#: every member for PBC's validation split, LISC and BCCD (adapted, as by
#: default) and a whole slide of real cells (scripts/gate_policies.py), it
#: stays within 0.003 of the macro-F1 of every view of every member on each,
#: with 7–26 % less network time than the previous stages (which
#: went on to all eight views); docs/benchmarks.md. ``--exhaustive`` runs
#: every view.
GATE_STAGES: tuple[tuple[int | None, int | None, float | None], ...] = (
    (2, 1, 0.99),
    (None, 1, 0.7),
    (None, 4, None),
)


def _gate_plan(stages, members: int, views: int) -> list[tuple[int, int, float | None]]:
    """``stages`` (as :data:`GATE_STAGES`) for ``members`` members and a TTA set of ``views``."""
    stages = list(stages)
    if not stages or stages[-1][2] is not None:
        stages.append((None, None, None))  # whatever is left in doubt gets everything
    plan = []
    for k, v, settle in stages:
        k = members if k is None else min(k, members)
        v = views if v is None else min(v, views)
        plan.append((k, v, settle))
    return plan


_COST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def member_cost(model: torch.nn.Module, input_size: int) -> float:
    """Floating-point operations of one forward pass of one crop (counted once, kept).

    Counted by hooks on the convolutions and linear layers during one pass
    (2 per multiply-add; the same total as torch's FlopCounterMode for the
    convolutional members, in a quarter of its time). Products inside
    attention are not counted: the figure orders members, it is not a
    profile.
    """
    key = int(input_size)
    known = _COST.get(model, {})
    if key not in known:
        total = [0.0]

        def conv(mod, args, out):
            k = int(np.prod(mod.kernel_size))
            total[0] += 2.0 * out.numel() * (mod.in_channels // mod.groups) * k

        def linear(mod, args, out):
            total[0] += 2.0 * out.numel() * mod.in_features

        hooks = []
        for mod in model.modules():
            if isinstance(mod, torch.nn.Conv2d):
                hooks.append(mod.register_forward_hook(conv))
            elif isinstance(mod, torch.nn.Linear):
                hooks.append(mod.register_forward_hook(linear))
        was_training = model.training
        device = _model_device(model)
        try:
            model.eval()
            with torch.inference_mode():
                model(torch.zeros(1, 3, key, key, device=device))
        finally:
            model.train(was_training)
            for hook in hooks:
                hook.remove()
        known[key] = total[0]
        _COST[model] = known
    return known[key]


def member_order(ensemble: Ensemble) -> list[int]:
    """Member indices, cheapest first (ties: in the ensemble's order); the gate's order."""
    costs = [member_cost(mb.model, mb.config.spec.input_size) for mb in ensemble.members]
    return sorted(range(len(costs)), key=lambda j: (costs[j], j))


def _empty_sums(ensemble: Ensemble, n: int) -> dict[str, Any]:
    m, c = len(ensemble.members), len(ensemble.classes)
    trust = ensemble.trust is not None
    return {
        "probs": np.zeros((m, n, c), np.float32),
        "logits": np.zeros((m, n, c), np.float32) if trust else None,
        "features": [None] * m if trust else None,
    }


def _take(sums: dict[str, Any], rows: np.ndarray) -> dict[str, Any]:
    """The sums of the cells ``rows``."""
    return {
        "probs": sums["probs"][:, rows],
        "logits": None if sums["logits"] is None else sums["logits"][:, rows],
        "features": None
        if sums["features"] is None
        else [None if f is None else f[rows] for f in sums["features"]],
    }


class _BatchNormLeaves(torch.fx.Tracer):
    """Traces a model keeping every batch norm (timm's with an activation too) as one call."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, torch.nn.BatchNorm2d) or super().is_leaf_module(m, qualname)


def fold_batch_norms(model: torch.nn.Module) -> int:
    """Fold each batch norm into the convolution that alone feeds it; returns how many.

    For inference only (eval mode): the folded convolution gives the same
    output as convolution then normalization, within float rounding, in one
    pass instead of two. The model keeps its structure (its methods, such as
    timm's ``forward_features``, still work): each folded convolution is
    replaced by the fused one and its batch norm by what follows the
    normalization in it (nothing, or timm's activation). A model that cannot
    be traced is left as it is (0).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise WBCError("batch norms are folded for inference only; call model.eval() first")
    try:
        graph = _BatchNormLeaves().trace(model)
    except Exception as exc:  # dynamic control flow: no folding, still correct
        logger.debug("not folding batch norms of %s: %s", type(model).__name__, exc)
        return 0
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, torch.nn.BatchNorm2d) or calls[node.target] != 1:
            continue
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, torch.fx.Node) else None
        if not (
            src.op == "call_module"
            and type(conv) is torch.nn.Conv2d
            and len(src.users) == 1
            and calls[src.target] == 1
            and bn.track_running_stats
        ):
            continue
        if type(bn) is torch.nn.BatchNorm2d:
            after: torch.nn.Module = torch.nn.Identity()
        elif hasattr(bn, "act") and hasattr(bn, "drop"):  # timm's BatchNormAct2d
            after = torch.nn.Sequential(bn.drop, bn.act)
        else:
            continue
        _set_submodule(model, src.target, fuse_conv_bn_eval(conv, bn))
        _set_submodule(model, node.target, after)
        folded += 1
    return folded


def _set_submodule(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


_FOLDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Folding a member's batch norms takes 0.1–0.3 s (a copy and a trace) and
#: saves 10–30 % of each pass: below this many crops (the routing sample, a
#: camera field's cells) the model runs as it is, unless already folded.
FOLD_MIN_CROPS = 128
_FOLDED_LOCK = threading.Lock()


def _weights_version(model: torch.nn.Module) -> int:
    """Changes whenever a parameter or buffer (e.g. batch-norm statistics) changes in place."""
    return sum(t._version for t in model.parameters()) + sum(t._version for t in model.buffers())


def inference_model(model: torch.nn.Module) -> torch.nn.Module:
    """The copy of ``model`` that classification runs: batch norms folded, channels-last.

    The model itself is left as it is (training and batch-norm adaptation
    need its batch norms); the copy is kept while the model lives and made
    again when the model's weights or device change.
    """
    key = (_weights_version(model), str(_model_device(model)))
    with _FOLDED_LOCK:
        hit = _FOLDED.get(model)
        if hit is not None and hit[0] == key:
            return hit[1]
    fast = copy.deepcopy(model).eval()
    n = fold_batch_norms(fast)
    # channels_last makes convolutions faster on CPU and GPU alike.
    fast.to(memory_format=torch.channels_last)
    logger.debug("%s: %d batch norms folded for inference", type(model).__name__, n)
    with _FOLDED_LOCK:
        _FOLDED[model] = (key, fast)
    return fast


def _iter_add_views(
    ensemble,
    prepared,
    crops,
    transforms,
    members,
    first_view,
    sums,
    rows,
    batch_size,
    device,
    stage,
    resized=None,
):
    """Add to ``sums`` the outputs of ``members`` for ``transforms`` of the crops ``rows``.

    ``sums`` (:func:`_empty_sums`): ``probs`` (M, N, C) sums of
    probabilities over views; ``logits`` and per-member ``features`` (N, D_m),
    when the ensemble has trust statistics (one pass: features -> pooled
    pre-logits -> classifier). ``first_view`` is the index of
    ``transforms[0]`` in the TTA set, for the progress text. ``resized``
    (:class:`_Resized`): crops already resized, kept for later stages.
    """
    c = len(ensemble.classes)
    if resized is None:
        resized = _Resized(crops, device, keep=False)
    trust = ensemble.trust
    members = list(members)
    n = len(rows)
    total = n * len(members)
    done = 0
    what = "crops in doubt" if stage == "doubtful" else "crops"
    last_view = first_view + len(transforms)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            idx = rows[start:stop]
            inputs: dict[int, torch.Tensor] = {}
            for j in members:
                model, size, mean, std = prepared[j]
                if size not in inputs:
                    inputs[size] = resized.get(idx, size)
                x = ((inputs[size] - mean) / std).contiguous(memory_format=torch.channels_last)
                acc = torch.zeros((stop - start, c), dtype=torch.float32, device=device)
                logit_sum, feature_sum = 0.0, 0.0
                for transform in transforms:
                    # rot90 returns a strided view; convolutions want a dense layout
                    view = transform(x).contiguous(memory_format=torch.channels_last)
                    if trust is None:
                        logits = model(view)
                    else:
                        pre = model.forward_head(model.forward_features(view), pre_logits=True)
                        logits = model.get_classifier()(pre)
                        logit_sum = logit_sum + logits.float()
                        feature_sum = feature_sum + pre.float()
                    if logits.shape[-1] != c:
                        raise ModelFileError(
                            f"member {j} outputs {logits.shape[-1]} scores but its config "
                            f"lists {c} classes"
                        )
                    acc += logits.float().softmax(dim=-1)
                sums["probs"][j, idx] += acc.cpu().numpy()
                if trust is not None:
                    sums["logits"][j, idx] += logit_sum.cpu().numpy()
                    f = feature_sum.cpu().numpy()
                    if sums["features"][j] is None:
                        sums["features"][j] = np.zeros(
                            (sums["probs"].shape[1], f.shape[1]), np.float32
                        )
                    sums["features"][j][idx] += f
                done += stop - start
                yield Progress(
                    stage,
                    done,
                    total,
                    f"classified {stop}/{n} {what} (model {j + 1}/{len(prepared)}, "
                    f"views {first_view + 1}-{last_view})",
                )


class _Resized:
    """Crops resized to a member's input side, kept for the gate's later stages.

    Within :data:`RESIZED_KEEP_BYTES` for the whole set (``keep``); beyond
    it, or without ``keep``, each request resizes its crops (as it did
    before anything was kept). Kept or not, a crop's input is the same.
    """

    def __init__(self, crops, device: torch.device, keep: bool = True):
        self.crops, self.device, self.keep = crops, device, keep
        self.kept: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

    def get(self, idx: np.ndarray, size: int) -> torch.Tensor:
        entry = self.kept.get(size)
        if entry is None and self.keep:
            n = len(self.crops)
            used = sum(t.numel() * t.element_size() for t, _ in self.kept.values())
            if used + n * 3 * size * size * 4 <= RESIZED_KEEP_BYTES:
                entry = (torch.empty((n, 3, size, size), device=self.device), np.zeros(n, bool))
                self.kept[size] = entry
        where = torch.from_numpy(np.asarray(idx, np.int64))
        if entry is not None and entry[1][idx].all():
            return entry[0][where.to(self.device)]
        if isinstance(self.crops, np.ndarray):
            batch = self.crops[idx]
        else:
            batch = [self.crops[i] for i in idx]
        x = _to_input(batch, size, self.device)
        if entry is not None:
            entry[0][where.to(self.device)] = x
            entry[1][idx] = True
        return x


def _combine(
    ensemble: Ensemble, sums: dict, views: np.ndarray, ood: bool = True
) -> dict[str, Any]:
    """The prediction dict of :func:`iter_predict_crops` from per-view sums.

    ``views`` (M, N): how many views each member saw of each crop; a member
    with 0 was not run on that crop and is left out of its ensemble.
    ``ood``: also the out-of-distribution distance (not needed to settle a
    cell, and the costliest part).
    """
    trust = ensemble.trust
    views = np.asarray(views, np.int64)
    m, n = views.shape
    ran = views > 0
    per_view = np.maximum(views, 1).astype(np.float32)[:, :, None]
    member_probs = (sums["probs"] / per_view).astype(np.float32)
    member_logits = None
    ood_distance = None
    if trust is not None:
        # Calibrated: each member's view-averaged logits over the temperature
        # fitted on validation cells (napari_wbc.trust.fit_temperature).
        member_logits = (sums["logits"] / per_view).astype(np.float32)
        for j in range(m):
            member_probs[j] = softmax(member_logits[j], trust.temperature) if n else 0
        if ood and trust.features and n and sums["features"] is not None:
            distance = np.zeros((m, n))
            for j, (stats, f) in enumerate(zip(trust.features, sums["features"], strict=True)):
                if f is not None:
                    distance[j] = stats.distance(f / per_view[j])
            ood_distance = (distance * ran).sum(axis=0) / np.maximum(ran.sum(axis=0), 1)
    weights = ensemble.weights.astype(np.float32)[:, None] * ran
    weights = weights / np.maximum(weights.sum(axis=0, keepdims=True), 1e-12)
    probs = np.einsum("mn,mnc->nc", weights, member_probs).astype(np.float32)
    if not ran.all():
        # A member not run on a crop takes the ensemble's answer: no disagreement.
        member_probs = np.where(ran[:, :, None], member_probs, probs[None])
        if member_logits is not None:
            mean_logits = np.einsum("mn,mnc->nc", weights, member_logits)
            member_logits = np.where(ran[:, :, None], member_logits, mean_logits[None])
    out = {
        "probs": probs,
        "member_probs": member_probs.astype(np.float32),
        "classes": tuple(ensemble.classes),
        "pred": probs.argmax(axis=1).astype(np.int64),
        "confidence": (probs.max(axis=1) if n else np.zeros(0)).astype(np.float32),
        "passes": views.sum(axis=0),
        "views": views,
    }
    if trust is not None:
        out["member_logits"] = member_logits.astype(np.float32)
        out["calibrated"] = True
        if ood_distance is not None:
            out["ood_distance"] = ood_distance.astype(np.float32)
    return out


def _check_crops(crops) -> np.ndarray | list[np.ndarray]:
    """Accept an (N, H, W, 3) uint8 array or a sequence of (H, W, 3) uint8 arrays."""
    hint = "crops must be RGB uint8, as an (N, H, W, 3) array or a list of (H, W, 3) arrays"
    if isinstance(crops, np.ndarray):
        if crops.ndim != 4 or crops.shape[-1] != 3:
            raise DataError(f"{hint}; got an array of shape {crops.shape}")
        if crops.dtype != np.uint8:
            raise DataError(f"{hint}; got dtype {crops.dtype}")
        return crops
    crops = list(crops)
    for i, crop in enumerate(crops):
        crop = np.asarray(crop)
        if crop.ndim != 3 or crop.shape[-1] != 3 or crop.dtype != np.uint8:
            raise DataError(f"{hint}; crop {i} has shape {crop.shape} and dtype {crop.dtype}")
    return crops


#: How crops are resized to a member's input side (torch, antialiased), as
#: training evaluated them. Bicubic here was worse on PBC crops outside the
#: specialist's training and reported sets (scripts/resample_study.py
#: --input-resize bicubic: 0.941 / 0.876 / 0.940 at 1x / 0.5x / 2x against
#: 0.956 / 0.924 / 0.946).
INPUT_RESIZE = "bilinear"


def _to_input(batch, size: int, device: torch.device) -> torch.Tensor:
    """Turn uint8 HWC crops into a float NCHW tensor in [0, 1] of side ``size``."""
    if isinstance(batch, np.ndarray):
        parts = [batch]
    else:
        parts = [np.asarray(crop)[None] for crop in batch]
    out = []
    for part in parts:
        # Send uint8 to the device: four times less to transfer than float.
        x = torch.from_numpy(np.ascontiguousarray(part)).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(
                x, size=(size, size), mode=INPUT_RESIZE, antialias=True, align_corners=False
            )
        out.append(x)
    return out[0] if len(out) == 1 else torch.cat(out)


def disagreement(member_probs: np.ndarray, probs: np.ndarray | None = None) -> np.ndarray:
    """Fraction of members whose top class differs from the ensemble's, per crop.

    Parameters
    ----------
    member_probs : ndarray (M, N, C)
        Per-member probabilities (``member_probs`` of :func:`predict_crops`).
    probs : ndarray (N, C), optional
        Ensemble probabilities; default the unweighted mean of the members.

    Returns
    -------
    ndarray (N,) float32
        0 where all members agree with the ensemble, up to 1.
    """
    member_probs = np.asarray(member_probs)
    if member_probs.ndim != 3:
        raise DataError(
            f"member_probs must be (members, crops, classes), got {member_probs.shape}"
        )
    probs = member_probs.mean(axis=0) if probs is None else np.asarray(probs)
    ensemble_pred = probs.argmax(axis=-1)
    return (member_probs.argmax(axis=-1) != ensemble_pred[None]).mean(axis=0).astype(np.float32)
