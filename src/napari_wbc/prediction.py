"""Classify and evaluate crop image files with a model or ensemble, as it was trained.

The crops are read and stain-normalised by the ensemble's own
:class:`~napari_wbc.preprocess.Preprocessor` and classified with
:func:`napari_wbc.inference.iter_predict_crops`; whole smears go through
:mod:`napari_wbc.pipeline` instead.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .datasets import IMAGE_SUFFIXES, load_labelled_crops
from .errors import DataError
from .images import list_image_files
from .inference import INFERENCE_BATCH, Ensemble, iter_predict_crops
from .metrics import classification_metrics
from .models.build import get_device
from .progress import ProgressGen, run
from .routing import AUTO_MODEL, ROUTE_CELLS, ModelRouter
from .session import ClassifySession

__all__ = [
    "UNSURE_SCALE_FACTORS",
    "evaluate",
    "iter_evaluate",
    "iter_predict_crop_files",
    "list_crop_files",
]


#: When a crop set's measured scale is unsure, its crops are also classified
#: with the red cell taken this many times as large, and the probabilities of
#: the three scales averaged (docs/results.md, "A scale that is unsure").
UNSURE_SCALE_FACTORS = (0.8, 1.25)


def list_crop_files(items: Sequence[str | os.PathLike]) -> list[Path]:
    """Crop images named in ``items``: files as given, folders searched recursively (sorted).

    Raises
    ------
    DataError
        When an item does not exist or nothing is found.
    """
    return list_image_files(items, recursive=True, suffixes=IMAGE_SUFFIXES)


def iter_predict_crop_files(
    model: str | os.PathLike | Ensemble,
    paths: Sequence[str | os.PathLike],
    tta: str | None = None,
    batch_size: int = INFERENCE_BATCH,
    device: str = "auto",
    stain_source: str = "auto",
    *,
    scale: str | float = "auto",
    adapt: bool | str = "auto",
    exhaustive: bool = False,
    classes: str | Sequence[str] | None = None,
    several_scales: bool = True,
) -> ProgressGen[dict[str, Any]]:
    """Classify crop image files with a model or ensemble, as it was trained.

    Each image is decoded, centre-cropped to a square, resized, normalised
    to the model's stain reference, and classified with test-time
    augmentation.

    Parameters
    ----------
    model : path-like or Ensemble
        Model file (``.safetensors``), ensemble file (``.json``) or a loaded
        :class:`napari_wbc.inference.Ensemble`.
    paths : sequence of path-like
        Crop images at the model's field of view.
    tta : {"none", "flips", "d4"}, optional
        Test-time augmentation; default the ensemble's (d4 for a model file).
    batch_size : int
        Crops per forward pass.
    device : str
        Where to run.
    stain_source : {"auto", "fit", "training"}
        Where the source stain statistics come from; see
        :meth:`napari_wbc.preprocess.Preprocessor.crop_normalizer`.
    scale : {"auto", "measure", "as-is"} or float
        How the crops' magnification is found and matched to the model's
        field of view (a number: the red-cell diameter in px); see
        :meth:`napari_wbc.preprocess.Preprocessor.resolve_crop_scale`.
    adapt : bool or {"auto", "prototypes", "adabn"}
        Adapt the ensemble to these crops first, without labels
        (:func:`napari_wbc.adapt.adapt_ensemble`; True: its default method; needs
        :func:`napari_wbc.adapt.cells_needed` crops). The model files are not
        touched; the adapted ensemble is returned as ``adapted``. The default,
        ``"auto"`` (:data:`napari_wbc.adapt.AUTO`), adapts only a set that
        ``model="auto"`` gives the three-lab model, with enough crops.
    exhaustive : bool
        Every TTA view of every member for every crop; by default only the
        crops in doubt after the first view get the others (``gate`` of
        :func:`napari_wbc.inference.iter_predict_crops`).
    classes : str or sequence of str, optional
        A count panel to answer with: ``"5-part"``, class names, or None for
        every class of the model (:func:`napari_wbc.panels.restrict_classes`).
    several_scales : bool
        When the measured scale is unsure (:class:`napari_wbc.crop_scale.CropScale`),
        also classify the crops with the red cell taken
        :data:`UNSURE_SCALE_FACTORS` times as large and average the three
        (default); False trusts the one figure. A given scale is always trusted.

    Returns
    -------
    dict
        The output of :func:`napari_wbc.inference.iter_predict_crops`
        (``probs``, ``pred``, ``confidence``, ``classes``, ...) plus ``paths``,
        ``needs_review`` (and with trust statistics ``ood_score``,
        ``out_of_distribution`` and maybe ``warning``: :func:`_review`),
        ``crop_scale`` (red-cell px, method, ``unsure`` and the ``factors``
        classified at; None when taken as they are) and, with ``adapt``,
        ``adapted``.
    """
    session = ClassifySession(_loaded(model, device, classes), adapt, device, batch_size)
    paths = [str(p) for p in paths]
    if not paths:
        raise DataError("no crops to classify")
    normalizer, reader = "fit", None
    if session.router is not None:
        # The scale is the set's, whichever model reads it: measured once.
        found = session.router.specialist.preprocessor.resolve_crop_scale(paths, scale)
        pick = np.unique(np.linspace(0, len(paths) - 1, min(len(paths), ROUTE_CELLS)).astype(int))
        yield from session.iter_choose(
            lambda specialist: iter_route_sample(specialist, paths, pick, stain_source, found)
        )
        if session.cut is not None:  # the specialist: read as it read the sample
            normalizer, reader = session.cut
            rows = np.arange(len(pick)) if session.passes.rows is None else session.passes.rows
            session.passes = session.passes._replace(rows=pick[rows])
    else:
        found = session.ensemble.preprocessor.resolve_crop_scale(paths, scale)
    # The default adapts only sets auto gives the three-lab model.
    method = session.adapt_method(len(paths))
    ensemble = session.ensemble
    crops = yield from ensemble.preprocessor.iter_read_crop_files(
        paths,
        stain_source,
        None if found is None else found.rbc_diameter_px,
        normalizer,
        reader=reader,
    )
    if method:
        from .progress import Progress

        yield Progress("adapt", 0, 1, f"adapting the model to {len(crops)} crops ({method})")
        # The adaptation's look at every crop is the adapted model's first view.
        ensemble = session.adapt_to(crops, method, strict=True)
        yield Progress("adapt", 1, 1, "adapted")

    def classify(crops, known=None):
        return iter_predict_crops(
            ensemble,
            crops,
            batch_size=batch_size,
            tta=tta,
            device=get_device(device),
            gate=not exhaustive,
            known=known,
        )

    result = yield from classify(crops, session.passes)
    factors = [1.0]
    if several_scales and found is not None and found.unsure:
        from .progress import Progress

        runs = [result]
        for factor in UNSURE_SCALE_FACTORS:
            yield Progress(
                "scale",
                len(runs) - 1,
                len(UNSURE_SCALE_FACTORS),
                f"the scale is unsure: classifying again with red cells {factor:g}× as large",
            )
            other = yield from ensemble.preprocessor.iter_read_crop_files(
                paths, stain_source, found.rbc_diameter_px * factor
            )
            runs.append((yield from classify(other)))
            factors.append(factor)
        result = merge_scales(runs)
    result.update(_review(result, ensemble))
    result["paths"] = paths
    result["tta"] = tta if tta is not None else ensemble.tta
    result["crop_scale"] = (
        None
        if found is None
        else {
            "rbc_diameter_px": round(found.rbc_diameter_px, 2),
            "method": found.method,
            "unsure": bool(found.unsure),
            "factors": factors,
        }
    )
    if method:
        result["adapted"] = ensemble
    if session.route is not None:
        result["route"] = session.route.to_dict()
    return result


def merge_scales(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One prediction from :func:`~napari_wbc.inference.iter_predict_crops` results of the
    same crops read at several scales: probabilities (and each member's, logits and the
    out-of-distribution distance) averaged, passes and views added up."""
    out = dict(runs[0])
    for key in ("probs", "member_probs", "member_logits", "ood_distance"):
        if all(run.get(key) is not None for run in runs):
            out[key] = np.mean([np.asarray(run[key]) for run in runs], axis=0).astype(np.float32)
    for key in ("passes", "views"):
        out[key] = np.sum([np.asarray(run[key]) for run in runs], axis=0)
    probs = np.asarray(out["probs"])
    out["pred"] = probs.argmax(axis=1).astype(np.int64)
    out["confidence"] = (probs.max(axis=1) if len(probs) else np.zeros(0)).astype(np.float32)
    return out


def crop_table(result: dict[str, Any]) -> pd.DataFrame:
    """One row per crop of :func:`iter_predict_crop_files`'s result (``napari-wbc predict``'s table).

    Columns: ``path``, ``class``, ``confidence``, ``needs_review`` (the review
    rule, as for a smear's cells), with the model's trust statistics
    ``out_of_distribution`` and ``ood_score`` (above 1: unlike the training
    cells), ``passes`` (forward passes the crop took) and one probability
    column per class. ``attrs``: ``classes``, ``tta``, ``crop_scale`` and,
    where they apply, ``route``, ``adapted`` and ``warning``.
    """
    classes = [str(c) for c in result["classes"]]
    table = pd.DataFrame(
        {
            "path": result["paths"],
            "class": [classes[int(i)] for i in result["pred"]],
            "confidence": np.asarray(result["confidence"], float),
            "needs_review": np.asarray(result["needs_review"], bool),
        }
    )
    if "out_of_distribution" in result:
        table["out_of_distribution"] = np.asarray(result["out_of_distribution"], bool)
        table["ood_score"] = np.asarray(result["ood_score"], float)
    table["passes"] = np.asarray(result["passes"], int)
    probs = pd.DataFrame(np.asarray(result["probs"], float), columns=classes)
    table = pd.concat([table, probs], axis=1)
    keys = ("classes", "tta", "crop_scale", "route", "adapted", "warning")
    table.attrs.update({key: result[key] for key in keys if key in result})
    return table


def _review(result: dict[str, Any], ensemble: Ensemble) -> dict[str, Any]:
    """The review rule on crops, as on a smear's cells (:func:`napari_wbc.trust.review_flags`).

    ``needs_review`` per crop; with the model's trust statistics also
    ``ood_score``, ``out_of_distribution`` and, when most crops look unlike
    the training cells, the set's ``warning``.
    """
    from .inference import disagreement
    from .trust import image_warning, review_flags

    flags = review_flags(
        result["confidence"],
        disagreement(result["member_probs"], result["probs"]),
        result.get("ood_distance"),
        ensemble.trust,
    )
    out: dict[str, Any] = {"needs_review": flags["needs_review"]}
    if flags["ood_score"] is not None:
        out["ood_score"] = flags["ood_score"]
        out["out_of_distribution"] = flags["out_of_distribution"]
        warning = image_warning(flags["out_of_distribution"])
        if warning:
            out["warning"] = warning
    return out


def _loaded(model, device, classes=None):
    """``model`` as an Ensemble or ModelRouter, loading it when it is a file or a built-in name.

    ``classes``: the count panel it answers with (:mod:`napari_wbc.panels`).
    """
    from .panels import restrict_classes
    from .routing import load_model

    if isinstance(model, (Ensemble, ModelRouter)):
        return restrict_classes(model, classes)
    return load_model(model, device, classes)


def iter_route_sample(specialist, paths, pick, stain_source, found):
    """The crop files ``paths[pick]`` read for a router's ``specialist``, to choose the model by.

    ``found`` is the set's scale (:meth:`Preprocessor.resolve_crop_scale`).
    Returns the crops and what reading the whole set as the specialist
    needs: the stain normalizer fitted for it (on the whole set) and its
    crop reader, holding the crops read so far.
    """
    sample = [paths[i] for i in pick]
    specialist = specialist.preprocessor
    rbc = None if found is None else found.rbc_diameter_px
    reader = specialist.crop_file_reader(rbc)
    normalizer = specialist.crop_files_normalizer(paths, stain_source, rbc, reader=reader)
    crops = yield from specialist.iter_read_crop_files(
        sample, stain_source, rbc, normalizer, reader=reader
    )
    return crops, (normalizer, reader)


def evaluate(
    model,
    data,
    tta: str | None = None,
    batch_size: int = INFERENCE_BATCH,
    device: str = "auto",
    stain_source: str = "auto",
    **options,
) -> dict[str, Any]:
    """Evaluate a model on labelled crops; see :func:`iter_evaluate`."""
    return run(iter_evaluate(model, data, tta, batch_size, device, stain_source, **options))


def iter_evaluate(
    model: str | os.PathLike | Ensemble,
    data: pd.DataFrame | str | os.PathLike,
    tta: str | None = None,
    batch_size: int = INFERENCE_BATCH,
    device: str = "auto",
    stain_source: str = "auto",
    *,
    scale: str | float = "auto",
    adapt: bool | str = "auto",
    exhaustive: bool = False,
    classes: str | Sequence[str] | None = None,
    several_scales: bool = True,
) -> ProgressGen[dict[str, Any]]:
    """Classify labelled crops and score the predictions.

    Parameters
    ----------
    model : path-like or Ensemble
        Model file, ensemble file, or loaded ensemble.
    data : DataFrame or path
        Labelled crops (``path``, ``label``), or a CSV / folder to read.
    tta : {"none", "flips", "d4"}, optional
        Test-time augmentation; default the ensemble's.
    batch_size : int
        Crops per forward pass.
    device : str
        Where to run.
    stain_source : {"auto", "fit", "training"}
        See :func:`iter_predict_crop_files`.
    scale, adapt, exhaustive, classes, several_scales
        See :func:`iter_predict_crop_files`.

    Returns
    -------
    dict
        :func:`napari_wbc.metrics.classification_metrics` of the predictions
        (macro averages over the classes present in ``data``), plus ``tta``
        ``model``, ``crop_scale`` and ``adapted`` (cells, or None).

    Raises
    ------
    DataError
        When ``data`` holds labels the model does not know.
    """
    df = data if isinstance(data, pd.DataFrame) else load_labelled_crops(data)
    from .panels import restrict_classes

    full = _loaded(model, device)
    ensemble = restrict_classes(full, classes)
    unknown = sorted(set(map(str, df["label"])) - set(ensemble.classes))
    if unknown:
        if not set(unknown) - set(full.classes):
            raise DataError(
                f"the data hold cells of {unknown}, outside the count panel "
                f"({', '.join(ensemble.classes)}); leave those cells out of the data or "
                "evaluate with every class"
            )
        raise DataError(
            f"the data hold labels the model does not know: {unknown}; "
            f"the model's classes are {list(ensemble.classes)}"
        )
    result = yield from iter_predict_crop_files(
        ensemble,
        list(df["path"]),
        tta,
        batch_size,
        device,
        stain_source,
        scale=scale,
        adapt=adapt,
        exhaustive=exhaustive,
        several_scales=several_scales,
    )
    names = list(result["classes"])
    metrics = classification_metrics(list(map(str, df["label"])), result["pred"], names)
    metrics["tta"] = result["tta"]  # the routed model's own, with --model auto
    metrics["model"] = str(ensemble.path) if ensemble.path is not None else ensemble.name
    if "route" in result:
        metrics["model"] = f"{AUTO_MODEL} → {result['route']['model']}"
        metrics["route"] = result["route"]
    metrics["crop_scale"] = result["crop_scale"]
    metrics["passes_per_crop"] = round(float(np.mean(result["passes"])), 2) if len(df) else 0.0
    metrics["adapted"] = (
        result["adapted"].metrics["adapted"]["cells"] if "adapted" in result else None
    )
    return metrics
