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
from .routing import AUTO_MODEL, ROUTE_CELLS, SPECIALIST, ModelRouter

__all__ = [
    "evaluate",
    "iter_evaluate",
    "iter_predict_crop_files",
    "list_crop_files",
]


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

    Returns
    -------
    dict
        The output of :func:`napari_wbc.inference.iter_predict_crops`
        (``probs``, ``pred``, ``confidence``, ``classes``, ...) plus ``paths``,
        ``crop_scale`` (red-cell px and method, or None when taken as they
        are) and, with ``adapt``, ``adapted``.
    """
    from .adapt import adapt_method, auto_adapts, is_auto

    method = adapt_method(adapt)
    ensemble = _loaded(model, device, classes)
    paths = [str(p) for p in paths]
    if not paths:
        raise DataError("no crops to classify")
    route = None
    normalizer = "fit"
    reader = known = None
    if isinstance(ensemble, ModelRouter):
        # The scale is the set's, whichever model reads it: measured once.
        found = ensemble.specialist.preprocessor.resolve_crop_scale(paths, scale)
        ensemble, route, normalizer, reader = yield from _iter_route_crops(
            ensemble, paths, stain_source, found, device, batch_size
        )
    else:
        found = ensemble.preprocessor.resolve_crop_scale(paths, scale)
    if is_auto(adapt) and not auto_adapts(route, len(paths)):
        method = None  # the default adapts only sets auto gives the three-lab model
    if not method and route is not None and route.passes is not None:
        if ensemble is route.passes.ensemble:
            known = route.passes
    crops = yield from ensemble.preprocessor.iter_read_crop_files(
        paths,
        stain_source,
        None if found is None else found.rbc_diameter_px,
        normalizer,
        reader=reader,
    )
    adapted = None
    if method:
        from .adapt import adapt_ensemble_and_passes
        from .progress import Progress

        yield Progress("adapt", 0, 1, f"adapting the model to {len(crops)} crops ({method})")
        # The adaptation's look at every crop is the adapted model's first view.
        adapted, known = adapt_ensemble_and_passes(ensemble, crops, method=method)
        ensemble = adapted
        yield Progress("adapt", 1, 1, "adapted")
    result = yield from iter_predict_crops(
        ensemble,
        crops,
        batch_size=batch_size,
        tta=tta,
        device=get_device(device),
        gate=not exhaustive,
        known=known,
    )
    result["paths"] = paths
    result["tta"] = tta if tta is not None else ensemble.tta
    result["crop_scale"] = (
        None
        if found is None
        else {"rbc_diameter_px": round(found.rbc_diameter_px, 2), "method": found.method}
    )
    if adapted is not None:
        result["adapted"] = adapted
    if route is not None:
        result["route"] = route.to_dict()
    return result


def _loaded(model, device, classes=None):
    """``model`` as an Ensemble or ModelRouter, loading it when it is a file or a built-in name.

    ``classes``: the count panel it answers with (:mod:`napari_wbc.panels`).
    """
    from .panels import restrict_classes
    from .routing import load_model

    if isinstance(model, (Ensemble, ModelRouter)):
        return restrict_classes(model, classes)
    return load_model(model, device, classes)


def _iter_route_crops(router, paths, stain_source, found, device, batch_size):
    """The ensemble the router picks for these crop files (an even spread of them is read).

    ``found`` is the set's scale (:meth:`Preprocessor.resolve_crop_scale`).
    Returns the ensemble, the :class:`~napari_wbc.routing.Route` (its
    ``passes`` rows index ``paths``), the stain normalizer to read the whole
    set with (the one fitted for the specialist when it is chosen: it was
    found on the whole set; else "fit") and the crop reader (the
    specialist's, holding the crops read so far, when it is chosen).
    """
    pick = np.unique(np.linspace(0, len(paths) - 1, min(len(paths), ROUTE_CELLS)).astype(int))
    sample = [paths[i] for i in pick]
    specialist = router.specialist.preprocessor
    rbc = None if found is None else found.rbc_diameter_px
    reader = specialist.crop_file_reader(rbc)
    normalizer = specialist.crop_files_normalizer(paths, stain_source, rbc, reader=reader)
    crops = yield from specialist.iter_read_crop_files(
        sample, stain_source, rbc, normalizer, reader=reader
    )
    ensemble, route = yield from router.iter_choose(
        crops, device=get_device(device), batch_size=batch_size
    )
    if route.passes is not None:
        rows = np.arange(len(pick)) if route.passes.rows is None else route.passes.rows
        route.passes = route.passes._replace(rows=pick[rows])
    if route.model == SPECIALIST:  # (the router's answering copy with a panel)
        return ensemble, route, normalizer, reader
    return ensemble, route, "fit", None


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
    scale, adapt, exhaustive, classes
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
