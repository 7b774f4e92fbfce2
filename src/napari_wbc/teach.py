"""Teach a model a new lab from a few cells a person has confirmed or corrected.

No model is right on every lab's first smear. The paper's stage 2 (arXiv
2603.01976) retrains only the linear classifier on frozen features, with
class-aware sampling and the hybrid loss; with a handful of labelled cells it
takes seconds, so a user can correct about five cells per class and have the
rest of the lab classified with the classifier refit to them:

* every taught cell gives its features under the eight flips and quarter
  turns (the D4 views: the backbone is frozen, so this is cheap);
* the training labs are kept in the draw so that the classes the user did
  not teach (or taught with one cell) are not forgotten: the model file's
  trust statistics hold each member's class centres and spread of its
  training cells' features, and features are drawn from them ("replay");
* each member's classifier starts from its current weights and is refit on
  batches half taught cells (every taught class equally likely) and half
  replayed ones (every class equally likely), with the hybrid loss
  (effective-number weights × focal).

:func:`iter_teach` serves the CLI (``napari-wbc teach``) and the widget;
:func:`choose_cells_to_teach` picks the cells worth asking about.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from napari_wbc.errors import Checked, WBCError
from napari_wbc.features import iter_member_outputs
from napari_wbc.inference import Ensemble, EnsembleMember
from napari_wbc.losses import HybridLoss
from napari_wbc.models.build import classifier_parameters, classify_features
from napari_wbc.progress import Progress, ProgressGen, run
from napari_wbc.trust import FeatureStats

logger = logging.getLogger(__name__)

__all__ = [
    "TeachConfig",
    "TeachError",
    "choose_cells_to_teach",
    "free_model_path",
    "iter_cut_smear_cells",
    "iter_teach",
    "iter_teach_crop_files",
    "iter_teach_smear",
    "match_cells",
    "save_taught",
    "taught_models_dir",
    "teach",
]

#: Environment variable naming the folder taught models are saved in.
TAUGHT_DIR_ENV = "NAPARI_WBC_TAUGHT_MODELS"


class TeachError(WBCError, ValueError):
    """The taught cells cannot teach this model (unknown class, no cells)."""


@dataclass
class TeachConfig(Checked):
    """How the classifier is refit to the taught cells.

    Parameters
    ----------
    steps : int
        Optimiser steps per member.
    batch_size : int
        Features per step (half taught, half replayed when replay is on).
    lr : float
        AdamW learning rate of the classifier.
    weight_decay : float
    replay_share : float
        Share of each batch drawn from the training labs' feature statistics;
        0 turns replay off.
    beta, gamma : float
        The hybrid loss (effective-number beta, focal gamma).
    seed : int
    """

    steps: int = 200
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    replay_share: float = 0.5
    beta: float = 0.999
    gamma: float = 2.0
    seed: int = 0

    error = TeachError
    label = "teach settings"

    def problems(self) -> list[str]:
        out = []
        if self.steps < 1 or self.batch_size < 2:
            out.append("steps must be ≥ 1 and batch_size ≥ 2")
        if not 0 <= self.replay_share < 1:
            out.append(f"replay_share must be in [0, 1), got {self.replay_share}")
        return out


def d4_views(crops: np.ndarray) -> list[np.ndarray]:
    """The eight flips and quarter turns of (N, H, W, 3) crops."""
    crops = np.asarray(crops)
    out = []
    for flipped in (crops, crops[:, :, ::-1]):
        for k in range(4):
            out.append(np.ascontiguousarray(np.rot90(flipped, k, axes=(1, 2))))
    return out


def teach(ensemble: Ensemble, crops: np.ndarray, labels: Sequence[str], **kwargs) -> Ensemble:
    """See :func:`iter_teach`."""
    return run(iter_teach(ensemble, crops, labels, **kwargs))


def iter_teach(
    ensemble: Ensemble,
    crops: np.ndarray,
    labels: Sequence[str],
    config: TeachConfig | None = None,
    replay: Sequence[FeatureStats] | None = None,
    source: str = "",
) -> ProgressGen[Ensemble]:
    """Refit every member's classifier to taught cells; returns a new ensemble.

    Parameters
    ----------
    ensemble : Ensemble
        The model to teach; it is not changed.
    crops : ndarray (N, H, W, 3) uint8
        The taught cells as the ensemble classifies them (field of view cut,
        stain handled by its preprocessor).
    labels : sequence of str
        Each cell's confirmed or corrected class, one of ``ensemble.classes``.
    config : TeachConfig, optional
    replay : list of FeatureStats, optional
        Per member, the training cells' feature statistics to keep in the
        draw; default the ensemble's trust statistics (none: no replay).
    source : str
        What the cells came from, recorded in the new model's provenance.

    Yields
    ------
    Progress
        Stage "teach": features, then one event per member refit.

    Returns
    -------
    Ensemble
        Copies of the members with refit classifiers, the same backbones, TTA,
        trust statistics and field of view; ``metrics["taught"]`` records the
        base model, the cells per class and the date. :func:`save_taught`
        writes it as new model files.

    Raises
    ------
    TeachError
        For no cells, a label the model does not know, or crops and labels of
        different lengths.
    """
    config = (config or TeachConfig()).validate()
    classes = list(ensemble.classes)
    labels = [str(v) for v in labels]
    crops = np.asarray(crops)
    if len(labels) == 0:
        raise TeachError("no taught cells: confirm or correct at least one cell per class")
    if crops.ndim != 4 or len(crops) != len(labels):
        raise TeachError(f"{len(crops)} crops for {len(labels)} labels; give one label per crop")
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise TeachError(
            f"the model knows no class {', '.join(map(repr, unknown))}; its classes are "
            + ", ".join(classes)
        )
    y = np.array([classes.index(v) for v in labels])
    if replay is None and ensemble.trust is not None and ensemble.trust.features:
        replay = ensemble.trust.features
    if replay is not None and len(replay) != len(ensemble.members):
        raise TeachError(
            f"replay statistics for {len(replay)} members, not {len(ensemble.members)}"
        )

    views = d4_views(crops)
    yield Progress("teach", 0, len(views) + len(ensemble.members), "Reading the taught cells")
    member_feats: list[list[np.ndarray]] = [[] for _ in ensemble.members]
    for i, view in enumerate(views):
        out = yield from iter_member_outputs(ensemble, view, tta="none")
        for m, f in enumerate(out["features"]):
            member_feats[m].append(np.asarray(f, np.float32))
        yield Progress("teach", i + 1, len(views) + len(ensemble.members), "Reading the cells")
    y_views = np.tile(y, len(views))

    members = []
    for m, member in enumerate(ensemble.members):
        model = _refit(
            member.model,
            np.concatenate(member_feats[m]),
            y_views,
            len(classes),
            None if replay is None else replay[m],
            config,
        )
        members.append(EnsembleMember(model, copy.deepcopy(member.config), member.weight))
        yield Progress(
            "teach",
            len(views) + m + 1,
            len(views) + len(ensemble.members),
            f"Refit model {m + 1} of {len(ensemble.members)}",
        )
    counts = {c: int((y == k).sum()) for k, c in enumerate(classes) if (y == k).any()}
    taught = {
        "base": ensemble.name or (str(ensemble.path) if ensemble.path else ""),
        "cells": counts,
        "source": source,
        "date": _dt.date.today().isoformat(),
        "replay": replay is not None and config.replay_share > 0,
        "config": asdict(config),
    }
    return Ensemble(
        members,
        tta=ensemble.tta,
        name=f"{ensemble.name}-taught" if ensemble.name else "taught",
        metrics=dict(ensemble.metrics, taught=taught),
        notes=f"{ensemble.name}: classifier refit to {len(y)} taught cells ({source or 'user'})",
        trust=ensemble.trust,
        fov_scale=ensemble.fov_scale,
    )


def iter_teach_crop_files(
    model: str | os.PathLike | Ensemble,
    paths: Sequence[str | os.PathLike],
    labels: Sequence[str],
    scale: str | float = "auto",
    stain_source: str = "auto",
    config: TeachConfig | None = None,
    device: str = "cpu",
) -> ProgressGen[Ensemble]:
    """Teach a model from labelled crop files (the ``napari-wbc teach`` command).

    Parameters
    ----------
    model : path, built-in name or Ensemble
        The model to teach. ``"auto"`` means the cross-lab model
        (:data:`napari_wbc.routing.GENERALIST`): a lab that needs teaching is
        by definition not the PBC specialist's.
    paths, labels : sequences
        The crops (one cell each) and their confirmed classes.
    scale, stain_source : see :meth:`napari_wbc.preprocess.Preprocessor.resolve_crop_scale`
        and :meth:`~napari_wbc.preprocess.Preprocessor.iter_read_crop_files`;
        the crops are read as ``evaluate`` reads them.
    config : TeachConfig, optional
    device : str

    Returns
    -------
    Ensemble
        From :func:`iter_teach`; save it with :func:`save_taught`.
    """
    from napari_wbc.inference import load_any
    from napari_wbc.models.files import resolve_model
    from napari_wbc.routing import AUTO_MODEL, GENERALIST

    if isinstance(model, Ensemble):
        ensemble = model
    else:
        name = GENERALIST if str(model) == AUTO_MODEL else model
        ensemble = load_any(resolve_model(name), device)
    paths = [str(p) for p in paths]
    found = ensemble.preprocessor.resolve_crop_scale(paths, scale)
    crops = yield from ensemble.preprocessor.iter_read_crop_files(
        paths, stain_source, None if found is None else found.rbc_diameter_px
    )
    source = f"{len(paths)} crops from {Path(paths[0]).parent}" if paths else ""
    return (yield from iter_teach(ensemble, crops, labels, config, source=source))


def _refit(model, feats, y, n_classes, stats, config) -> torch.nn.Module:
    """A copy of ``model`` whose classifier is refit on ``feats`` (+ replayed features)."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    head = list(classifier_parameters(model))
    for p in head:
        p.requires_grad_(True)
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    taught_classes = np.unique(y)
    by_class = {c: np.flatnonzero(y == c) for c in taught_classes}
    use_replay = stats is not None and config.replay_share > 0
    n_replay = round(config.batch_size * config.replay_share) if use_replay else 0
    n_taught = config.batch_size - n_replay
    counts = np.bincount(y, minlength=n_classes) + (n_replay > 0)
    criterion = HybridLoss(np.maximum(counts, 1), beta=config.beta, gamma=config.gamma)
    x = torch.from_numpy(feats)
    if use_replay:
        centres = torch.as_tensor(stats.centres, dtype=torch.float32)
        scale = torch.as_tensor(stats.scale, dtype=torch.float32)
    opt = torch.optim.AdamW(head, lr=config.lr, weight_decay=config.weight_decay)
    with torch.enable_grad():  # a worker thread may come with gradients off
        for _ in range(config.steps):
            cls = rng.choice(taught_classes, size=n_taught)
            idx = np.array([by_class[c][rng.integers(len(by_class[c]))] for c in cls])
            batch, target = x[idx], torch.from_numpy(y[idx])
            if n_replay:
                rc = torch.from_numpy(rng.integers(n_classes, size=n_replay))
                noise = torch.randn(n_replay, centres.shape[1], generator=gen)
                batch = torch.cat([batch, centres[rc] + noise * scale])
                target = torch.cat([target, rc])
            loss = criterion(classify_features(model, batch), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in head:
        p.requires_grad_(False)
    return model.eval()


def choose_cells_to_teach(
    probs: np.ndarray,
    positions: np.ndarray | None = None,
    per_class: int = 5,
    seed: int = 0,
) -> np.ndarray:
    """Indices of the cells worth asking a person about: about ``per_class`` per predicted class.

    Within each predicted class, the least certain cells come first (lowest
    top probability), but a cell is skipped while another chosen cell of the
    class lies within a cell's width or two of it, so the cells do not all come
    from one spot of the smear; the rest of the class's quota is filled with
    the most varied of the confident ones (spread over the class's range of
    confidence).

    Parameters
    ----------
    probs : (N, C) array
        The classified cells' probabilities.
    positions : (N, 2) array, optional
        Their (y, x) centres; without them, no spacing rule.
    per_class : int
    seed : int
        Breaks ties reproducibly.

    Returns
    -------
    ndarray of int
        Cell indices, grouped by predicted class.
    """
    probs = np.asarray(probs, float)
    if probs.ndim != 2:
        raise TeachError("probs must be (cells, classes)")
    pred = probs.argmax(1)
    conf = probs.max(1)
    rng = np.random.default_rng(seed)
    jitter = rng.random(len(conf)) * 1e-9
    pos = None if positions is None else np.asarray(positions, float)
    spacing = 0.0
    if pos is not None and len(pos) > 1:
        # typical nearest-neighbour distance between cells: "one spot" is closer than half of it
        d = np.sqrt(((pos[:, None] - pos[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        spacing = 0.5 * float(np.median(d.min(1)))
    chosen: list[int] = []
    for c in np.unique(pred):
        members = np.flatnonzero(pred == c)
        order = members[np.argsort(conf[members] + jitter[members])]  # least certain first
        spread = order[np.linspace(0, len(order) - 1, num=min(len(order), per_class)).astype(int)]
        picks: list[int] = []

        def far(i: int, picks: list[int] = picks) -> bool:
            if pos is None or spacing == 0 or not picks:
                return True
            return bool(np.sqrt(((pos[picks] - pos[i]) ** 2).sum(1)).min() > spacing)

        for candidates, quota, spaced in (
            (order, (per_class + 1) // 2, True),  # the least certain, spaced out
            (spread, per_class, True),  # then the range of confidence, spaced out
            (order, per_class, False),  # then whatever is left
        ):
            for i in candidates:
                if len(picks) >= quota:
                    break
                if int(i) not in picks and (not spaced or far(int(i))):
                    picks.append(int(i))
        chosen.extend(picks)
    return np.asarray(chosen, int)


def save_taught(path: str | os.PathLike, ensemble: Ensemble) -> Path:
    """Save a taught ensemble as new files: ``path`` (``.json``) and one model file per member.

    The members are written as ``<stem>-<i>.safetensors`` beside the ensemble
    file, each with the provenance (base model, cells per class, date) in its
    config; nothing existing is overwritten.

    Raises
    ------
    TeachError
        When any of the files exists.
    """
    from napari_wbc.models.files import save_model

    path = Path(path).with_suffix(".json")
    files = [path.with_name(f"{path.stem}-{i}.safetensors") for i in range(len(ensemble.members))]
    taken = [f for f in [path, *files] if f.exists()]
    if taken:
        raise TeachError(
            f"{taken[0]} exists; a taught model is saved as new files, choose another name"
        )
    taught = ensemble.metrics.get("taught", {})
    for file, member in zip(files, ensemble.members, strict=True):
        config = copy.deepcopy(member.config)
        config.name = file.stem
        config.created = ""
        config.training = dict(config.training, taught=taught)
        config.notes = (config.notes + " " if config.notes else "") + (
            f"Classifier refit to {sum(taught.get('cells', {}).values())} taught cells."
        )
        save_model(file, member.model, config)
    return ensemble.write_file(path, files, ensemble.notes)


def taught_models_dir() -> Path:
    """Where the napari widget saves taught models (``$NAPARI_WBC_TAUGHT_MODELS``,
    default ``~/.napari-wbc/models``)."""
    return Path(os.environ.get(TAUGHT_DIR_ENV, "~/.napari-wbc/models")).expanduser()


def free_model_path(folder: str | os.PathLike, stem: str) -> Path:
    """``folder/<stem>.json``, or ``<stem>-2.json``, ``-3``… : the first name whose files are free.

    A taught model is an ensemble file with member files beside it
    (:func:`save_taught`); a name is free when neither exists.
    """
    folder = Path(folder)
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem)
    stem = "-".join(part for part in stem.split("-") if part).strip(".") or "taught"
    for k in range(1, 10_000):
        name = stem if k == 1 else f"{stem}-{k}"
        path = folder / f"{name}.json"
        if not path.exists() and not any(folder.glob(f"{name}-[0-9]*.safetensors")):
            return path
    raise TeachError(f"no free name for {stem} in {folder}")


def iter_cut_smear_cells(
    image,
    ensemble: Ensemble,
    positions: np.ndarray,
    rbc_diameter_px: float,
    stain_normalize: bool = True,
    stain_method: str | None = None,
) -> ProgressGen[np.ndarray]:
    """The crops of cells of a smear as :func:`napari_wbc.pipeline.iter_classify_smear` cut them.

    The same steps as the smear pipeline: the ensemble's preprocessor fits
    the smear's stains once at the scale the classification measured
    (:meth:`~napari_wbc.preprocess.Preprocessor.iter_prepare_smear`), then cuts
    and normalises each cell's crop (:meth:`~napari_wbc.preprocess.SmearInput.crops`);
    only the cells' windows are read from a dask image.

    Parameters
    ----------
    image : (Y, X, 3) uint8 array, dask array or Smear
    ensemble : Ensemble
        The model the cells were classified with.
    positions : (N, 2) array
        The cells' (y, x) centres in image pixels.
    rbc_diameter_px : float
        The scale of the classification (its ``rbc_diameter_px``).
    stain_normalize, stain_method
        As the classification's :class:`~napari_wbc.pipeline.ClassifyConfig`.

    Yields
    ------
    Progress
        The stain fit's events, then "crops".
    """
    from .pixels import as_dask_rgb

    arr = as_dask_rgb(image)
    positions = np.asarray(positions, float).reshape(-1, 2)
    model_input = yield from ensemble.preprocessor.iter_prepare_smear(
        [arr], float(rbc_diameter_px), stain_normalize, stain_method
    )
    crops = []
    for i, (y, x) in enumerate(positions):
        # The window is the whole image: SmearInput.crops reads only each crop's part.
        crops.append(model_input.crops(arr, (0, 0), [y], [x]))
        yield Progress("crops", i + 1, len(positions), f"{i + 1} of {len(positions)} cells cut")
    side = model_input.side
    return np.concatenate(crops) if crops else np.zeros((0, side, side, 3), np.uint8)


def iter_teach_smear(
    image,
    positions: np.ndarray,
    labels: Sequence[str],
    model: str | os.PathLike | Ensemble,
    rbc_diameter_px: float,
    stain_normalize: bool = True,
    config: TeachConfig | None = None,
    device: str = "cpu",
    source: str = "",
    save_to: str | os.PathLike | None = None,
) -> ProgressGen[Ensemble | Path]:
    """Teach the model that classified a smear the cells a person confirmed or corrected on it.

    The napari widget's Teach: the cells are cut as the classification cut
    them (:func:`iter_cut_smear_cells`) and the model's classifier is refit
    (:func:`iter_teach`).

    Parameters
    ----------
    image : (Y, X, 3) uint8 array, dask array or Smear
    positions : (N, 2) array
        The taught cells' (y, x) centres in image pixels.
    labels : sequence of str
        Their confirmed or corrected classes.
    model : path, built-in name or Ensemble
        The model the smear was classified with (with the automatic choice,
        the one it chose: the result's ``model``); ``"auto"`` means the
        cross-lab model, as for :func:`iter_teach_crop_files`.
    rbc_diameter_px : float
        The classification's scale (the result's ``rbc_diameter_px``).
    stain_normalize : bool
        Whether the classification normalised the stains.
    config : TeachConfig, optional
    device : str
    source : str
        What the cells came from (the image's name), for the provenance.
    save_to : path, optional
        Save the taught model there (:func:`save_taught`) and return the
        path of its ensemble file instead of the ensemble.

    Returns
    -------
    Ensemble or Path
    """
    from .inference import load_any
    from .models.files import resolve_model
    from .routing import AUTO_MODEL, GENERALIST

    labels = [str(v) for v in labels]
    positions = np.asarray(positions, float).reshape(-1, 2)
    if len(positions) != len(labels):
        raise TeachError(
            f"{len(positions)} cells for {len(labels)} labels; give one label per cell"
        )
    if not labels:
        raise TeachError("no taught cells: confirm or correct at least one cell per class")
    if isinstance(model, Ensemble):
        ensemble = model
    else:
        yield Progress("model", 0, 1, "Loading the model to teach")
        name = GENERALIST if str(model) == AUTO_MODEL else model
        ensemble = load_any(resolve_model(name), device)
    crops = yield from iter_cut_smear_cells(
        image, ensemble, positions, rbc_diameter_px, stain_normalize
    )
    source = f"{len(labels)} cells of {source}" if source else f"{len(labels)} cells of a smear"
    taught = yield from iter_teach(ensemble, crops, labels, config, source=source)
    if save_to is None:
        return taught
    return save_taught(save_to, taught)


def match_cells(
    taught: np.ndarray, cells: np.ndarray, diameters: np.ndarray | None = None
) -> np.ndarray:
    """For each taught (y, x), the index of the same cell among ``cells`` (y, x), or -1.

    The same cell is the nearest one within half a cell's width (the median
    of ``diameters``; 20 px without them): a smear classified again finds its
    cells where it found them before, give or take a few pixels.
    """
    taught = np.asarray(taught, float).reshape(-1, 2)
    cells = np.asarray(cells, float).reshape(-1, 2)
    out = np.full(len(taught), -1, int)
    if not len(cells):
        return out
    d = None if diameters is None else np.asarray(diameters, float)
    width = float(np.nanmedian(d)) if d is not None and np.isfinite(d).any() else 20.0
    dist = np.sqrt(((taught[:, None] - cells[None]) ** 2).sum(-1))
    nearest = dist.argmin(1)
    close = dist[np.arange(len(taught)), nearest] <= width / 2
    out[close] = nearest[close]
    return out
