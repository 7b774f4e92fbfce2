"""The calls a script needs, as the ``napari-wbc`` command makes them.

:mod:`napari_wbc` re-exports these, and the functions they stand beside
(``read_smear``, ``load_model``, ``evaluate``, ``differential_count``),
lazily: ``import napari_wbc`` stays light, and each call imports what it
needs when it runs. A script that uses them gets the command line's numbers:

>>> import napari_wbc as wbc
>>> model = wbc.load_model("auto")  # doctest: +SKIP
>>> cells = wbc.classify_smear("smear.tif", model)  # doctest: +SKIP
>>> wbc.differential_count(cells, model.classes)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from .images import Smear
    from .pipeline import ClassifyConfig
    from .progress import Progress

__all__ = ["classify_crops", "classify_smear", "loaded_model"]


def loaded_model(model: Any = "auto", device: str = "auto", classes=None):
    """``model`` loaded as the command line loads it, or ``model`` itself when it already is.

    Parameters
    ----------
    model : str, path-like, Ensemble or ModelRouter
        ``"auto"`` (the built-in models, one chosen per image or crop set),
        a built-in name (``"wbc-lite"``, ``"wbc-pbc"``), a model file
        (``.safetensors``) or an ensemble file (``.json``); a model already
        loaded by :func:`napari_wbc.load_model` is returned as it is (with
        ``classes``, restricted to that panel).
    device : str
        ``"auto"`` loads on the CPU, as ``napari-wbc classify`` does (the
        classification itself runs where ``ClassifyConfig.device`` says);
        else "cpu", "cuda", "mps".
    classes : str or sequence of str, optional
        A count panel (``"5-part"`` or class names); None: every class.

    Returns
    -------
    Ensemble or ModelRouter
    """
    from .routing import load_model

    if hasattr(model, "classes"):
        from .panels import restrict_classes

        return restrict_classes(model, classes)
    return load_model(model, device="cpu" if device == "auto" else device, classes=classes)


def classify_smear(
    image: str | os.PathLike | Smear | np.ndarray,
    model: Any = "auto",
    config: ClassifyConfig | None = None,
    *,
    callback: Callable[[Progress], None] | None = None,
) -> pd.DataFrame:
    """Find and classify the white cells of one smear, as ``napari-wbc classify`` does.

    Parameters
    ----------
    image : path-like, Smear or ndarray
        An image file (read with :func:`napari_wbc.read_smear`; the pixel
        size in its metadata is used when ``config`` gives none), an open
        :class:`~napari_wbc.images.Smear`, or a (Y, X, 3) uint8 RGB array.
        With no pixel size anywhere, the red cells are measured.
    model : str, path-like, Ensemble or ModelRouter
        What classifies (see :func:`loaded_model`); default ``"auto"``, the
        command line's default. Pass a model from :func:`napari_wbc.load_model`
        to classify many smears without loading it again.
    config : ClassifyConfig, optional
        Scale, stain normalization, test-time augmentation, adaptation,
        device...; the default is the command line's defaults.
    callback : callable, optional
        Called with every :class:`~napari_wbc.progress.Progress` event.

    Returns
    -------
    DataFrame
        One row per white cell (y, x, diameter, class, confidence,
        needs_review, p_<class>, ...); see
        :func:`napari_wbc.pipeline.iter_classify_smear`. Count it with
        :func:`napari_wbc.differential_count`.
    """
    from .images import read_smear
    from .pipeline import ClassifyConfig, iter_classify_smear
    from .progress import run

    config = config or ClassifyConfig()
    ensemble = loaded_model(model, config.device)
    opened = None
    if isinstance(image, (str, os.PathLike)):
        image = opened = read_smear(image)
    try:
        if hasattr(image, "levels"):
            gen = iter_classify_smear(
                image.levels[0],
                ensemble,
                config,
                source_path=image.path,
                file_pixel_size_um=image.pixel_size_um,
            )
        else:
            gen = iter_classify_smear(image, ensemble, config)
        return run(gen, callback)
    finally:
        if opened is not None:
            opened.close()


def classify_crops(
    crops: str | os.PathLike | Sequence[str | os.PathLike],
    model: Any = "auto",
    *,
    device: str = "auto",
    callback: Callable[[Progress], None] | None = None,
    **options,
) -> pd.DataFrame:
    """Classify crop images (one white cell centred in each), as ``napari-wbc predict`` does.

    Parameters
    ----------
    crops : path-like or sequence of path-like
        Crop image files, or folders searched recursively.
    model : str, path-like, Ensemble or ModelRouter
        What classifies (see :func:`loaded_model`); default ``"auto"``.
    device : str
        Where to run ("auto", "cpu", "cuda", "mps").
    callback : callable, optional
        Called with every :class:`~napari_wbc.progress.Progress` event.
    **options
        ``tta``, ``batch_size``, ``stain_source``, ``scale``, ``adapt``,
        ``exhaustive``, ``classes``: see
        :func:`napari_wbc.prediction.iter_predict_crop_files`.

    Returns
    -------
    DataFrame
        One row per crop (:func:`napari_wbc.prediction.crop_table`): ``path``,
        ``class``, ``confidence``, ``needs_review``, ``out_of_distribution``
        and ``ood_score`` (with the model's trust statistics), ``passes`` and
        one probability column per class. ``attrs`` holds ``classes``,
        ``tta``, ``crop_scale`` and, where they apply, ``route`` (which
        built-in model ``"auto"`` chose), ``adapted`` and ``warning``.
    """

    from .prediction import crop_table, iter_predict_crop_files, list_crop_files
    from .progress import run

    items = [crops] if isinstance(crops, (str, os.PathLike)) else list(crops)
    paths = list_crop_files(items)
    result = run(
        iter_predict_crop_files(model, paths, device=device, **options),
        callback,
    )
    return crop_table(result)
