"""Classify cell crops with a test-time-augmented ensemble.

Each member of an :class:`Ensemble` sees every crop under each transform of a
test-time augmentation (TTA) set; its softmax probabilities are averaged over
the transforms, and the members' averages are combined with the member weights
(arXiv 2603.01976: different timm backbones, flips and 90° rotations,
probability averaging). Blood-cell crops have no preferred orientation, so
the dihedral group D4 (4 rotations × optional mirror) is the natural TTA set.

The parts: the views (:mod:`napari_wbc.tta`), the members' forward passes
and their sums (:mod:`napari_wbc.passes`), the staged gate that spends them
where a cell is in doubt (:mod:`napari_wbc.gate`), and the batch-norm-folded
copies that run them (:mod:`napari_wbc.bnfold`); this module holds the
:class:`Ensemble`, its loading and :func:`predict_crops`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from napari_wbc.bnfold import model_device
from napari_wbc.errors import DataError, ModelFileError, WBCError
from napari_wbc.gate import iter_predict_sums
from napari_wbc.models.build import get_device
from napari_wbc.models.files import (
    ModelConfig,
    check_members_agree,
    check_tta,
    load_network,
    read_ensemble,
    save_ensemble,
)
from napari_wbc.passes import INFERENCE_BATCH, ViewSums, combine
from napari_wbc.preprocess import Preprocessor
from napari_wbc.progress import ProgressGen, run
from napari_wbc.trust import TrustStats
from napari_wbc.tta import TTA_SETS

logger = logging.getLogger(__name__)


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
        return model_device(self.members[0].model)

    def to(self, device: str | torch.device) -> Ensemble:
        """Move every member model to ``device`` (in place); return self."""
        device = get_device(device)
        for member in self.members:
            member.model.to(device)
        return self

    def write_file(self, path: Path, member_files: Sequence[Path], notes: str) -> Path:
        """Write the ensemble file ``path`` listing ``member_files`` (saved already, in order).

        The file keeps this ensemble's weights, TTA, metrics, trust statistics
        and field of view; for ensembles made in memory (adapted, taught).
        """
        return save_ensemble(
            path,
            member_files,
            [m.weight for m in self.members],
            self.tta,
            name=path.stem,
            metrics=dict(self.metrics),
            notes=notes,
            trust=self.trust.to_dict() if self.trust is not None else None,
            fov_scale=self.fov_scale,
        )

    def predict(self, crops, **kwargs) -> dict[str, Any]:
        """Shortcut for :func:`predict_crops` (``ensemble.predict(crops)``)."""
        return predict_crops(self, crops, **kwargs)


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
            model, config = load_network(ref.path, device)
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
    model, config = load_network(path, device)
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
        the stages of :data:`napari_wbc.gate.GATE_STAGES`: the two cheapest members first
        see the crop as it is; a cell they agree on with calibrated
        confidence ≥ 0.99 is settled there; then every member, settling
        the cells whose members all name the same class with confidence
        ≥ 0.7; a cell still in doubt gets every member's first four views of
        the TTA set (D4's rotations). False: every view of every cell. A
        sequence of stages instead of True replaces :data:`napari_wbc.gate.GATE_STAGES`;
        one whose last stage settles (not None) ends with every view of
        every member for the cells still in doubt.
    known : ViewSums, optional
        Passes this ensemble already made over some of these crops (the
        model choice's look at a sample, :func:`napari_wbc.gate.iter_predict_sums`), taken
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
    return combine(ensemble, sums.sums, sums.views)


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
