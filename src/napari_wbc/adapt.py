"""Label-free adaptation of a classifier to a new lab at test time.

Two methods (:data:`METHODS`; ``adapt=True`` means :data:`DEFAULT_METHOD`):

- ``"prototypes"`` (T3A; Iwasawa & Matsuo, "Test-Time Classifier
  Adjustment Module for Model-Agnostic Domain Generalization", NeurIPS
  2021): the classifier's weight vector of each class becomes a prototype
  made of that vector and the features of the :data:`PROTOTYPE_SUPPORT`
  cells the model is surest of among those it calls that class (lowest
  entropy); cells are then classified by their direction's similarity to
  the prototypes. The features stay as they are; only the last layer
  moves, towards where this lab's cells actually lie. It needs
  :data:`PROTOTYPE_MIN_CELLS` cells (fewer gave unreliable prototypes). Leave one lab out,
  it raised macro-F1 on both held-out labs (docs/results.md); on cells of
  a lab the model was trained on it costs accuracy, so by default
  (:data:`AUTO`) it adapts only sources that ``--model auto`` gives the
  three-lab model, those unlike PBC's.
- ``"adabn"``: batch-norm statistics re-estimated on the cells (below).

A network trained on some labs normalises its activations with batch-norm
statistics of those labs. On cells from another lab (another stain, camera,
blur) the activations are shifted, and the network answers confidently and
wrongly. Re-estimating the batch-norm statistics on the new lab's own cells
(AdaBN; Li et al., "Revisiting Batch Normalization for Practical Domain
Adaptation", 2016) removes much of that shift without a single label.

The statistics follow the class mix of the cells at hand, though: a smear of
mostly neutrophils would pull every layer's mean towards neutrophils. With
``balance=True`` (the default) the cells are first classified by a plainly
adapted copy, and each predicted class then contributes equally to the final
statistics (cells of rare predicted classes are repeated, deterministically).

Adaptation is deterministic (fixed order, fixed seed), needs at least
:data:`MIN_CELLS` cells, returns a new model and never touches the model it
was given nor any file; :func:`save_adapted_model` writes it as a new model
file and refuses to overwrite an existing one.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import numpy as np
import torch

from napari_wbc.errors import WBCError
from napari_wbc.settings import ADAPT_MAX_CELLS as MAX_CELLS
from napari_wbc.settings import ADAPT_MIN_CELLS as MIN_CELLS
from napari_wbc.settings import ADAPT_PROTOTYPE_MIN_CELLS as PROTOTYPE_MIN_CELLS

log = logging.getLogger(__name__)

__all__ = [
    "AUTO",
    "DEFAULT_METHOD",
    "MAX_CELLS",
    "METHODS",
    "MIN_CELLS",
    "PROTOTYPE_MIN_CELLS",
    "PROTOTYPE_SUPPORT",
    "AdaptationError",
    "adapt_batchnorm",
    "adapt_ensemble",
    "adapt_ensemble_and_passes",
    "adapt_method",
    "adapt_prototypes",
    "auto_adapts",
    "cells_needed",
    "is_auto",
    "save_adapted_ensemble",
    "save_adapted_model",
]


#: Adaptation methods, by name.
METHODS = ("prototypes", "adabn")
#: What ``adapt=True`` (``--adapt``, the Classify widget's switch) uses.
DEFAULT_METHOD = "prototypes"
#: The default ``adapt``: :data:`DEFAULT_METHOD`, but only for a source that
#: ``--model auto`` hands to the three-lab model (its cells are unlike the
#: PBC specialist's, so from a lab that is not PBC) and that holds enough
#: cells (:func:`cells_needed`); any other source is classified as it is,
#: without a warning. Leave one lab out it raised both held-out labs
#: (docs/results.md); on PBC, where it costs accuracy, the specialist
#: classifies, unadapted.
AUTO = "auto"
#: Cells per class that join its prototype (T3A's filter size M): chosen on
#: BCCD's cells for the LISC figure and on LISC's for BCCD's, leave one lab
#: out (20-100 gave the same within 0.01 on both; scripts/crosslab_t3a.py).
PROTOTYPE_SUPPORT = 50

_NAMES = {"prototypes": "prototype classifier (T3A)", "adabn": "batch-norm statistics (AdaBN)"}


class AdaptationError(WBCError, ValueError):
    """Adaptation is impossible: too few cells, or a model without batch norm."""


def adapt_method(adapt) -> str | None:
    """``adapt`` as given to the classifying functions, as a method name or None (off).

    False, None and "none" are off; True is :data:`DEFAULT_METHOD`; so is
    :data:`AUTO`, which the callers apply only where it says
    (:func:`auto_adapts`).
    """
    if adapt is None or adapt is False or adapt == "none":
        return None
    if adapt is True or adapt == AUTO:
        return DEFAULT_METHOD
    if adapt not in METHODS:
        raise AdaptationError(
            f"unknown adaptation {adapt!r}; use one of {', '.join(METHODS)} (or none)"
        )
    return str(adapt)


def is_auto(adapt) -> bool:
    """Whether ``adapt`` is :data:`AUTO` (adapt only where it applies, quietly)."""
    return isinstance(adapt, str) and adapt == AUTO


def auto_adapts(route, n_cells: int | None = None) -> bool:
    """Whether :data:`AUTO` adapts a source: ``--model auto`` chose the three-lab model for it.

    ``route``: the :class:`napari_wbc.routing.Route` of the source (None: no
    automatic choice was made, a model was named); ``n_cells``: its cells,
    when known (fewer than :func:`cells_needed` do not adapt).
    """
    from napari_wbc.routing import GENERALIST

    if route is None or route.model != GENERALIST:
        return False
    return n_cells is None or n_cells >= cells_needed(DEFAULT_METHOD)


def cells_needed(method) -> int:
    """Fewest cells ``method`` adapts to (:data:`PROTOTYPE_MIN_CELLS`, AdaBN :data:`MIN_CELLS`)."""
    return PROTOTYPE_MIN_CELLS if adapt_method(method) == "prototypes" else MIN_CELLS


def _check_cells(n: int, min_cells: int) -> None:
    if n < min_cells:
        raise AdaptationError(
            f"adaptation needs at least {min_cells} cells of the same source; got {n}. "
            "Classify without adaptation, or adapt on a larger smear or folder."
        )


@torch.no_grad()
def adapt_prototypes(
    model: torch.nn.Module,
    images: torch.Tensor,
    support: int = PROTOTYPE_SUPPORT,
    batch_size: int = 64,
    min_cells: int = PROTOTYPE_MIN_CELLS,
) -> torch.nn.Module:
    """A copy of ``model`` whose classifier holds class prototypes from ``images`` (T3A).

    Each class's prototype is the unit-length sum of the classifier's unit
    weight vector for it and the unit feature vectors of up to ``support``
    cells predicted as that class, those with the lowest prediction entropy.
    The copy's classifier holds the prototypes scaled to the mean norm of
    the original weight vectors, without bias: its argmax is T3A's cosine
    similarity. Deterministic; ``model`` is unchanged.

    Raises
    ------
    AdaptationError
        With fewer than ``min_cells`` cells, or when the model's classifier
        is not one linear layer over pooled features (timm's
        ``get_classifier``/``forward_head``).
    """
    return _adapt_prototypes(model, images, support, batch_size, min_cells)[0]


@torch.no_grad()
def _adapt_prototypes(model, images, support, batch_size, min_cells, runner=None):
    """:func:`adapt_prototypes`, and the pooled features of ``images`` (N, D) it used.

    ``runner``: an equivalent copy of ``model`` to compute the features with
    (its batch norms folded: :func:`napari_wbc.bnfold.inference_model`).
    """
    _check_cells(int(images.shape[0]), min_cells)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, torch.nn.Linear) or not hasattr(model, "forward_head"):
        raise AdaptationError(
            f"{type(model).__name__} has no linear classifier over pooled features; "
            "use --adapt adabn"
        )
    was_training = model.training
    model.eval()
    net = runner if runner is not None else model
    feats, logits = [], []
    try:
        for start in range(0, int(images.shape[0]), batch_size):
            pre = net.forward_head(
                net.forward_features(images[start : start + batch_size]), pre_logits=True
            )
            feats.append(pre.float())
            logits.append(head(pre).float())
    finally:
        model.train(was_training)
    z = torch.nn.functional.normalize(torch.cat(feats), dim=1).cpu().numpy().astype(np.float64)
    lg = torch.cat(logits).cpu().numpy().astype(np.float64)
    weight = head.weight.detach().cpu().numpy().astype(np.float64)
    p = np.exp(lg - lg.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    entropy = -(p * np.log(np.maximum(p, 1e-12))).sum(axis=1)
    pred = lg.argmax(axis=1)
    unit = weight / np.maximum(np.linalg.norm(weight, axis=1, keepdims=True), 1e-12)
    prototypes = []
    joined = {}
    for k in range(len(weight)):
        cells = np.flatnonzero(pred == k)
        cells = cells[np.argsort(entropy[cells], kind="stable")[:support]]
        joined[k] = len(cells)
        proto = unit[k] + z[cells].sum(axis=0)
        prototypes.append(proto / max(np.linalg.norm(proto), 1e-12))
    scale = float(np.linalg.norm(weight, axis=1).mean())
    log.info("prototype adaptation: cells joined per class %s", joined)
    adapted = copy.deepcopy(model).eval()
    new_head = adapted.get_classifier()
    new_head.weight.copy_(
        torch.as_tensor(np.stack(prototypes) * scale, dtype=new_head.weight.dtype)
    )
    if new_head.bias is not None:
        new_head.bias.zero_()
    return adapted, torch.cat(feats)


def _bn_layers(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def _reestimate(model: torch.nn.Module, images: torch.Tensor, order: np.ndarray, batch_size: int):
    """Reset and recompute every batch-norm layer's running statistics on ``images[order]``."""
    layers = _bn_layers(model)
    saved = [(m.momentum, m.training) for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
        m.train()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # a batch of one has no variance
                continue
            model(images[torch.from_numpy(idx)])
    finally:
        for m, (momentum, _) in zip(layers, saved, strict=True):
            m.momentum = momentum
        model.eval()


@torch.no_grad()
def _predict(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> np.ndarray:
    model.eval()
    out = [model(images[s : s + batch_size]).argmax(1) for s in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def adapt_batchnorm(
    model: torch.nn.Module,
    images: torch.Tensor,
    balance: bool = True,
    batch_size: int = 64,
    seed: int = 0,
    min_cells: int = MIN_CELLS,
) -> torch.nn.Module:
    """A copy of ``model`` with batch-norm statistics re-estimated on ``images``.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier (left unchanged).
    images : torch.Tensor
        ``(N, 3, H, W)`` cells of one source, preprocessed exactly as for
        classification (resized, normalised).
    balance : bool
        Guard against the class mix: classify the cells with a plainly
        adapted copy, then re-estimate with every predicted class weighted
        equally (cells of rarer predicted classes repeated).
    batch_size : int
        Cells per forward pass; the statistics are the average over batches.
    seed : int
        Seed of the (fixed) order of the cells.
    min_cells : int
        Fewest cells accepted (default :data:`MIN_CELLS`).

    Returns
    -------
    torch.nn.Module
        The adapted copy, in eval mode.

    Raises
    ------
    AdaptationError
        With fewer than ``min_cells`` cells or when the model has no batch norm.
    """
    n = int(images.shape[0])
    _check_cells(n, min_cells)
    adapted = copy.deepcopy(model)
    if not _bn_layers(adapted):
        raise AdaptationError(
            f"{type(model).__name__} has no batch-norm layers; there is nothing to adapt"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    _reestimate(adapted, images, order, batch_size)
    if balance:
        predicted = _predict(adapted, images, batch_size)
        classes, counts = np.unique(predicted, return_counts=True)
        target = int(counts.max())
        parts = []
        for c in classes:
            members = np.flatnonzero(predicted == c)
            reps = int(np.ceil(target / len(members)))
            parts.append(np.tile(members, reps)[:target])
        order = rng.permutation(np.concatenate(parts))
        log.info(
            "adaptation: predicted class counts %s, balanced to %d each",
            dict(zip(classes.tolist(), counts.tolist(), strict=True)),
            target,
        )
        adapted = copy.deepcopy(model)
        _reestimate(adapted, images, order, batch_size)
    return adapted


def save_adapted_model(
    path: str | os.PathLike,
    model: torch.nn.Module,
    config,
    source: str,
    n_cells: int,
    method: str = "adabn",
) -> Path:
    """Save an adapted model as a new model file; never overwrites an existing file.

    Parameters
    ----------
    path : path-like
        The new file; must not exist.
    model : torch.nn.Module
        From :func:`adapt_batchnorm` or :func:`adapt_prototypes`.
    config : napari_wbc.models.files.ModelConfig
        The base model's config; a copy is saved with a note of the adaptation.
    source : str
        What the cells came from (a folder, a smear), recorded in the file.
    n_cells : int
        How many cells the model was adapted to.
    method : str
        Which adaptation (one of :data:`METHODS`), recorded in the file.

    Raises
    ------
    AdaptationError
        When ``path`` exists.
    """
    from napari_wbc.models.files import save_model

    path = Path(path)
    if path.exists():
        raise AdaptationError(
            f"{path} exists; an adapted model is saved as a new file, choose another name"
        )
    config = copy.deepcopy(config)
    config.name = path.stem
    config.created = ""
    config.training = dict(
        config.training, adapted={"method": method, "source": str(source), "cells": int(n_cells)}
    )
    config.notes = (config.notes + " " if config.notes else "") + (
        f"Adapted without labels ({_NAMES[method]}) to {n_cells} cells of {source}."
    )
    return save_model(path, model, config)


def adapt_ensemble(
    ensemble,
    crops,
    balance: bool = True,
    min_cells: int | None = None,
    method: str = DEFAULT_METHOD,
):
    """An ensemble whose members are adapted to ``crops``; ``ensemble`` is unchanged.

    Parameters
    ----------
    ensemble : napari_wbc.inference.Ensemble
    crops : ndarray (N, H, W, 3) uint8 or sequence of (H, W, 3) uint8
        The cells of one source as the ensemble classifies them (at its field
        of view, stain handled by its preprocessor). At most :data:`MAX_CELLS`
        of them (a seeded sample) are used.
    balance : bool
        AdaBN's class balance (:func:`adapt_batchnorm`).
    min_cells : int, optional
        Fewest cells accepted; default the method's (:func:`cells_needed`).
    method : {"prototypes", "adabn"}
        How (:data:`METHODS`); each member is adapted on its own.

    Returns
    -------
    napari_wbc.inference.Ensemble
        New members (copies), the same weights, TTA and trust statistics;
        ``adapted`` in its ``metrics`` records the number of cells. Its
        ``path`` is None: it exists in memory until
        :func:`save_adapted_ensemble` writes it.
    """
    return adapt_ensemble_and_passes(ensemble, crops, balance, min_cells, method)[0]


def adapt_ensemble_and_passes(
    ensemble,
    crops,
    balance: bool = True,
    min_cells: int | None = None,
    method: str = DEFAULT_METHOD,
):
    """:func:`adapt_ensemble`, and the adapted ensemble's first view of every crop.

    Prototype adaptation runs every member over the crops as they are to
    find their features; the adapted members' answers for those crops are
    the same features through the new last layer, so they need not be run
    again. Returns the adapted ensemble and those passes
    (:class:`napari_wbc.passes.ViewSums`, for ``known=`` of
    :func:`napari_wbc.inference.iter_predict_crops`; for the sampled crops
    only when a set larger than :data:`MAX_CELLS` was sampled), or None for
    AdaBN.
    """
    import dataclasses

    from napari_wbc.bnfold import FOLD_MIN_CROPS, inference_model
    from napari_wbc.inference import EnsembleMember
    from napari_wbc.passes import ViewSums, empty_sums, to_input

    method = adapt_method(method) or DEFAULT_METHOD
    least = cells_needed(method) if min_cells is None else min_cells
    n = len(crops)
    _check_cells(n, least)
    pick = np.arange(n)
    if n > MAX_CELLS:
        pick = np.sort(np.random.default_rng(0).choice(n, MAX_CELLS, replace=False))
    chosen = crops[pick] if isinstance(crops, np.ndarray) else [crops[int(i)] for i in pick]
    device = ensemble.device
    members = []
    features = []
    inputs = {}  # members of one input size and normalisation share their resized crops
    for member in ensemble.members:
        spec = member.config.spec
        key = (spec.input_size, tuple(spec.mean), tuple(spec.std))
        if key not in inputs:
            x = to_input(chosen, spec.input_size, device)
            mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
            std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
            inputs[key] = (x - mean) / std
        x = inputs[key]
        if method == "prototypes":
            model, pre = _adapt_prototypes(
                member.model,
                x,
                PROTOTYPE_SUPPORT,
                64,
                min_cells=least,
                # The features as classification computes them (and faster).
                runner=inference_model(member.model) if n >= FOLD_MIN_CROPS else None,
            )
            features.append(pre)
        else:
            model = adapt_batchnorm(member.model, x, balance, min_cells=least)
        members.append(EnsembleMember(model, member.config, member.weight))
    log.info("adapted %d member(s) to %d cells (%s)", len(members), len(pick), method)
    adapted = dataclasses.replace(
        ensemble,
        members=members,
        name=f"{ensemble.name} (adapted)",
        metrics={"adapted": {"method": method, "cells": len(pick)}},
        path=None,
    )
    if method != "prototypes":
        return adapted, None
    sums = empty_sums(adapted, len(pick))
    with torch.no_grad():
        for j, (member, pre) in enumerate(zip(members, features, strict=True)):
            logits = member.model.get_classifier()(pre.to(device)).float()
            sums["probs"][j] = logits.softmax(dim=-1).cpu().numpy()
            if sums["logits"] is not None:
                sums["logits"][j] = logits.cpu().numpy()
                sums["features"][j] = pre.float().cpu().numpy()
    views = np.ones((len(members), len(pick)), int)
    return adapted, ViewSums(adapted, "none", views, sums, None if len(pick) == n else pick)


def save_adapted_ensemble(path: str | os.PathLike, ensemble, source: str) -> Path:
    """Save an ensemble from :func:`adapt_ensemble` as new files; never overwrites any.

    One member is saved as the model file ``path`` (``.safetensors``);
    several, or one classifying at another field of view than it was trained
    at (``fov_scale``, which only an ensemble file holds), as
    ``<stem>-<i>.safetensors`` beside the ensemble file ``path`` (``.json``).
    Raises :class:`AdaptationError` when any of them exists.
    """
    path = Path(path)
    cells = int(ensemble.metrics.get("adapted", {}).get("cells", 0))
    method = ensemble.metrics.get("adapted", {}).get("method", "adabn")
    if len(ensemble.members) == 1 and ensemble.fov_scale == 1:
        path = path if path.suffix else path.with_suffix(".safetensors")
        member = ensemble.members[0]
        return save_adapted_model(path, member.model, member.config, source, cells, method)
    path = path.with_suffix(".json")
    files = [path.with_name(f"{path.stem}-{i}.safetensors") for i in range(len(ensemble.members))]
    taken = [f for f in [path, *files] if f.exists()]
    if taken:
        raise AdaptationError(
            f"{taken[0]} exists; an adapted model is saved as new files, choose another name"
        )
    for file, member in zip(files, ensemble.members, strict=True):
        save_adapted_model(file, member.model, member.config, source, cells, method)
    notes = (
        f"{ensemble.name}: adapted without labels ({_NAMES[method]}) to {cells} cells of {source}"
    )
    return ensemble.write_file(path, files, notes)
