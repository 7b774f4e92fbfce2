"""Label-free adaptation of a classifier to a new lab at test time (AdaBN).

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

log = logging.getLogger(__name__)

__all__ = [
    "MAX_CELLS",
    "MIN_CELLS",
    "AdaptationError",
    "adapt_batchnorm",
    "adapt_ensemble",
    "save_adapted_ensemble",
    "save_adapted_model",
]


class AdaptationError(WBCError, ValueError):
    """Adaptation is impossible: too few cells, or a model without batch norm."""


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
    if n < min_cells:
        raise AdaptationError(
            f"adaptation needs at least {min_cells} cells of the same source; got {n}. "
            "Classify without adaptation, or adapt on a larger smear or folder."
        )
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
    path: str | os.PathLike, model: torch.nn.Module, config, source: str, n_cells: int
) -> Path:
    """Save an adapted model as a new model file; never overwrites an existing file.

    Parameters
    ----------
    path : path-like
        The new file; must not exist.
    model : torch.nn.Module
        From :func:`adapt_batchnorm`.
    config : napari_wbc.models.files.ModelConfig
        The base model's config; a copy is saved with a note of the adaptation.
    source : str
        What the cells came from (a folder, a smear), recorded in the file.
    n_cells : int
        How many cells the statistics were estimated on.

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
        config.training, adapted={"method": "adabn", "source": str(source), "cells": int(n_cells)}
    )
    config.notes = (config.notes + " " if config.notes else "") + (
        f"Batch-norm statistics re-estimated (AdaBN) on {n_cells} cells of {source}."
    )
    return save_model(path, model, config)


def adapt_ensemble(ensemble, crops, balance: bool = True, min_cells: int = MIN_CELLS):
    """An ensemble whose members are adapted (AdaBN) to ``crops``; ``ensemble`` is unchanged.

    Parameters
    ----------
    ensemble : napari_wbc.inference.Ensemble
    crops : ndarray (N, H, W, 3) uint8 or sequence of (H, W, 3) uint8
        The cells of one source as the ensemble classifies them (at its field
        of view, stain handled by its preprocessor). At most :data:`MAX_CELLS`
        of them (a seeded sample) are used.
    balance, min_cells
        See :func:`adapt_batchnorm`.

    Returns
    -------
    napari_wbc.inference.Ensemble
        New members (copies), the same weights, TTA and trust statistics;
        ``adapted`` in its ``metrics`` records the number of cells. Its
        ``path`` is None: it exists in memory until
        :func:`save_adapted_ensemble` writes it.
    """
    import dataclasses

    from napari_wbc.inference import EnsembleMember, _to_input

    n = len(crops)
    if n < min_cells:
        raise AdaptationError(
            f"adaptation needs at least {min_cells} cells of the same source; got {n}. "
            "Classify without adaptation, or adapt on a larger smear or folder."
        )
    pick = np.arange(n)
    if n > MAX_CELLS:
        pick = np.sort(np.random.default_rng(0).choice(n, MAX_CELLS, replace=False))
    chosen = crops[pick] if isinstance(crops, np.ndarray) else [crops[int(i)] for i in pick]
    device = ensemble.device
    members = []
    for member in ensemble.members:
        spec = member.config.spec
        x = _to_input(chosen, spec.input_size, device)
        mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
        model = adapt_batchnorm(member.model, (x - mean) / std, balance, min_cells=min_cells)
        members.append(EnsembleMember(model, member.config, member.weight))
    log.info("adapted %d member(s) to %d cells", len(members), len(pick))
    return dataclasses.replace(
        ensemble,
        members=members,
        name=f"{ensemble.name} (adapted)",
        metrics={"adapted": {"method": "adabn", "cells": len(pick)}},
        path=None,
    )


def save_adapted_ensemble(path: str | os.PathLike, ensemble, source: str) -> Path:
    """Save an ensemble from :func:`adapt_ensemble` as new files; never overwrites any.

    One member is saved as the model file ``path`` (``.safetensors``);
    several as ``<stem>-<i>.safetensors`` beside the ensemble file ``path``
    (``.json``). Raises :class:`AdaptationError` when any of them exists.
    """
    from napari_wbc.models.files import save_ensemble

    path = Path(path)
    cells = int(ensemble.metrics.get("adapted", {}).get("cells", 0))
    if len(ensemble.members) == 1:
        path = path if path.suffix else path.with_suffix(".safetensors")
        member = ensemble.members[0]
        return save_adapted_model(path, member.model, member.config, source, cells)
    path = path.with_suffix(".json")
    files = [path.with_name(f"{path.stem}-{i}.safetensors") for i in range(len(ensemble.members))]
    taken = [f for f in [path, *files] if f.exists()]
    if taken:
        raise AdaptationError(
            f"{taken[0]} exists; an adapted model is saved as new files, choose another name"
        )
    for file, member in zip(files, ensemble.members, strict=True):
        save_adapted_model(file, member.model, member.config, source, cells)
    return save_ensemble(
        path,
        files,
        [m.weight for m in ensemble.members],
        ensemble.tta,
        name=path.stem,
        metrics=dict(ensemble.metrics),
        notes=f"{ensemble.name}: batch-norm statistics re-estimated (AdaBN) on {cells} "
        f"cells of {source}",
        trust=ensemble.trust.to_dict() if ensemble.trust is not None else None,
    )
