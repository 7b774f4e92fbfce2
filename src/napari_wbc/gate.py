"""The staged gate: spend members and views only where the answer is still in doubt.

:func:`iter_predict_sums` runs an ensemble's members over crops in the
stages of :data:`GATE_STAGES` (the cheapest members first, see
:func:`member_order`), settling each cell at the first stage sure of it, and
returns the per-member sums of its passes (:class:`napari_wbc.passes.ViewSums`),
which :func:`napari_wbc.passes.combine` turns into probabilities.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import torch

import napari_wbc.passes as passes
from napari_wbc.bnfold import model_device, runner
from napari_wbc.errors import WBCError
from napari_wbc.models.build import get_device
from napari_wbc.passes import (
    INFERENCE_BATCH,
    ViewSums,
    check_crops,
    combine,
    empty_sums,
    take_sums,
)
from napari_wbc.progress import ProgressGen
from napari_wbc.tta import TTA_SETS

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


def gate_plan(stages, members: int, views: int) -> list[tuple[int, int, float | None]]:
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
        device = model_device(model)
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


def member_order(ensemble) -> list[int]:
    """Member indices, cheapest first (ties: in the ensemble's order); the gate's order."""
    costs = [member_cost(mb.model, mb.config.spec.input_size) for mb in ensemble.members]
    return sorted(range(len(costs)), key=lambda j: (costs[j], j))


def iter_predict_sums(
    ensemble,
    crops: np.ndarray | Sequence[np.ndarray],
    batch_size: int = INFERENCE_BATCH,
    tta: str | None = None,
    device: str | torch.device | None = None,
    gate: bool | Sequence[tuple[int | None, int | None, float | None]] = False,
    known: ViewSums | None = None,
) -> ProgressGen[ViewSums]:
    """:func:`napari_wbc.inference.iter_predict_crops` before its outputs are combined.

    Takes the same arguments (``ensemble`` an :class:`napari_wbc.inference.Ensemble`);
    returns the per-member view sums (:class:`napari_wbc.passes.ViewSums`).
    """
    crops = check_crops(crops)
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
        if model_device(model) != device:
            model.to(device)
        model = runner(model, n)
        spec = member.config.spec
        mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
        prepared.append((model, spec.input_size, mean, std))

    m = len(prepared)
    sums = empty_sums(ensemble, n)
    views = np.zeros((m, n), int)
    if known is not None:
        add_known(ensemble, known, transforms, sums, views)
    # Every view of every member is the one-stage plan; the gate's plans
    # take the cheapest members first.
    order = member_order(ensemble) if gate else list(range(m))
    active = np.arange(n)
    stages = GATE_STAGES if gate is True else (gate or [(None, None, None)])
    plan = gate_plan(stages, m, len(transforms))
    # Cells in doubt are not resized again for each stage.
    resized = passes.Resized(crops, device, keep=len(plan) > 1)
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
            yield from passes.iter_add_views(
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
        out = combine(ensemble, take_sums(sums, active), views[:, active], ood=False)
        members = views[:, active] > 0
        agree = (out["member_probs"].argmax(-1) == out["pred"][None]) | ~members
        sure = agree.all(axis=0) & (out["confidence"] >= settle)
        active = active[~sure]
    return ViewSums(ensemble, tta, views, sums)


def add_known(ensemble, known: ViewSums, transforms, sums, views) -> None:
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
