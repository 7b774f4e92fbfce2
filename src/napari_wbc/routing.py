"""Automatic choice between the built-in models, by how a set of cells looks (issue #12).

Two ensembles ship: the PBC specialist (``wbc-pbc``: one lab's CellaVision
images, macro-F1 0.966 on them, near chance elsewhere) and the three-lab
model (``wbc-lite``: any lab's images, 0.854 on PBC). Neither is best
everywhere. The specialist's trust statistics (:mod:`napari_wbc.trust`) say
how far each cell's features lie from its training cells; on images like
its own about 1 % of cells lie beyond its threshold, on other labs' 72-99 %.

``--model auto`` (the default of ``classify``, ``evaluate`` and ``predict``,
and of the Classify widget) therefore looks at one source at a time (a smear
or field, or a set of crops): the specialist classifies up to
:data:`ROUTE_CELLS` of its cells without test-time augmentation, and if at
most :data:`ROUTE_MAX_OOD_SHARE` of them lie beyond its threshold, their
median distance is at most :data:`ROUTE_MAX_MEDIAN_SCORE` of it, and at
least :data:`ROUTE_MIN_CELLS` were seen, the specialist classifies the
source; otherwise the three-lab model does. The choice and the share are
recorded with the result.

The threshold is the specialist's own image warning (more than 30 % of an
image's cells unlike its training cells: "this smear may come from another
lab"), so the specialist never classifies an image it would warn about. A
first threshold of 20 % sent PBC's validation crops cut to 0.7× their field
of view (22 % of 64 cells beyond) to the three-lab model; no held-out lab's
figure depends on the choice (their shares are 72-100 %).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .progress import Progress, ProgressGen
from .trust import IMAGE_OOD_SHARE

log = logging.getLogger(__name__)

#: The ``--model`` name of the automatic choice.
AUTO_MODEL = "auto"
#: The specialist and the model for everything else (names of BUILTIN_MODELS).
SPECIALIST = "wbc-pbc"
GENERALIST = "wbc-lite"
#: The specialist is chosen when at most this share of the sampled cells lie
#: beyond its out-of-distribution threshold (its own validation cells: 1 %;
#: other labs' 72-100 %): the share above which the specialist would warn
#: that the image looks unlike its training data (trust.IMAGE_OOD_SHARE).
ROUTE_MAX_OOD_SHARE = IMAGE_OOD_SHARE
#: ... and when the median of their distances to its training cells, in units of that
#: threshold, is at most this. Measured medians: PBC's own cells 0.20-0.26 (64 validation
#: crops, the gallery; 0.24 re-cut at 0.7x their field of view), the synthetic sample smear
#: (PBC cells on painted glass) 0.57; a mosaic of 20 BCCD fields 0.99, with only 48 % of its
#: cells beyond the threshold. A share counts few cells coarsely; the median sees a whole
#: source lying near the edge of the specialist's training cells.
ROUTE_MAX_MEDIAN_SCORE = 0.75
#: Cells the specialist looks at to decide (evenly spread over the source).
ROUTE_CELLS = 64
#: Fewer cells than this are too few to decide on: the three-lab model is used. With 6
#: cells one cell moves the share by 17 %: the built-in BCCD sample's 6 cells had 1 beyond
#: the threshold (median 0.62) and the specialist got 1 of 6 right; wbc-lite gets 6.
ROUTE_MIN_CELLS = 8


@dataclass
class Route:
    """Which model classified a source, and why."""

    model: str
    cells: int
    ood_share: float | None
    #: Median distance of the cells looked at to the specialist's training cells, in
    #: units of its threshold (None when not measured).
    median_score: float | None = None
    #: The specialist's passes over the cells it looked at (as it answers, with a
    #: count panel: :func:`napari_wbc.panels.restrict_passes`)
    #: (:class:`napari_wbc.passes.ViewSums`, rows: their indices among the
    #: crops given to :meth:`ModelRouter.iter_choose`), so that classifying
    #: the source with it need not run them again.
    passes: Any = field(default=None, repr=False, compare=False)
    #: Cells of the source given to choose by (:meth:`ModelRouter.iter_choose`'s
    #: ``crops``), of which ``cells`` were looked at.
    found: int | None = field(default=None, compare=False)

    @property
    def note(self) -> str:
        if self.ood_share is None or self.cells < ROUTE_MIN_CELLS:
            return (
                f"{self.model}: {self.cells} cells, too few to tell whether the images "
                f"are like the PBC specialist's (needs {ROUTE_MIN_CELLS})"
            )
        median = (
            ""
            if self.median_score is None
            else f", typical distance {self.median_score:.2f} of its limit (at most "
            f"{ROUTE_MAX_MEDIAN_SCORE:.2f})"
        )
        return (
            f"{self.model}: {self.ood_share:.0%} of {self.cells} cells look unlike the PBC "
            f"specialist's training cells (it is used when at most {ROUTE_MAX_OOD_SHARE:.0%} "
            f"do{median})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "cells": self.cells,
            "specialist_ood_share": None if self.ood_share is None else round(self.ood_share, 4),
            "specialist_median_score": None
            if self.median_score is None
            else round(self.median_score, 4),
        }


class ModelRouter:
    """The specialist and the three-lab ensembles, one of which classifies each source.

    Not an :class:`~napari_wbc.inference.Ensemble`: the functions that take a
    model (:func:`napari_wbc.pipeline.iter_classify_smear`,
    :func:`napari_wbc.prediction.iter_predict_crop_files`) resolve it to one
    with :meth:`iter_choose` before they classify.
    """

    name = AUTO_MODEL
    path = None

    def __init__(self, specialist, generalist, panel: tuple[str, ...] | None = None):
        """``generalist``: the three-lab ensemble, or a function that loads it when first needed.

        ``panel``: the classes the chosen ensemble answers with
        (:func:`napari_wbc.panels.restrict_classes`; None: all). The choice
        itself is made by the whole specialist, as without a panel.
        """
        self.specialist = specialist
        self._generalist = None
        self._load_generalist = None
        self._lock = threading.Lock()
        self.panel = None if panel is None else tuple(panel)
        self._answering: dict[str, Any] = {}
        if hasattr(generalist, "classes"):
            self._check(generalist)
            self._generalist = generalist
        else:
            self._load_generalist = generalist

    def _check(self, generalist) -> None:
        if list(self.specialist.classes) != list(generalist.classes):
            raise ValueError("the routed models must share their classes, in order")

    @property
    def generalist(self):
        """The three-lab ensemble (loaded the first time a source needs it)."""
        with self._lock:
            if self._generalist is None:
                generalist = self._load_generalist()
                self._check(generalist)
                self._generalist = generalist
            return self._generalist

    @property
    def classes(self) -> tuple[str, ...]:
        return self.panel if self.panel is not None else tuple(self.specialist.classes)

    def restricted(self, panel: tuple[str, ...]) -> ModelRouter:
        """A router over the same models whose chosen ensemble answers with ``panel`` only."""
        router = ModelRouter(self.specialist, self._generalist or self._load_generalist, panel)
        return router

    def answering(self, name: str):
        """The ensemble ``name`` (:data:`SPECIALIST` or :data:`GENERALIST`) as it answers.

        With a panel, one restricted copy per model, made once (so the same
        object classifies every source that chose it).
        """
        from .panels import restrict_classes

        ensemble = self.specialist if name == SPECIALIST else self.generalist
        if self.panel is None:
            return ensemble
        with self._lock:
            if name not in self._answering:
                self._answering[name] = restrict_classes(ensemble, self.panel)
            return self._answering[name]

    def iter_choose(
        self, crops: Sequence[np.ndarray] | np.ndarray, device=None, batch_size: int = 32
    ) -> ProgressGen[tuple[Any, Route]]:
        """The ensemble for a source whose cells, cut for the specialist, are ``crops``.

        ``crops`` may hold more than :data:`ROUTE_CELLS`; an even spread of
        them is looked at.
        """
        from .gate import iter_predict_sums
        from .passes import combine

        n = len(crops)
        trust = self.specialist.trust
        if n < ROUTE_MIN_CELLS or trust is None or not np.isfinite(trust.ood_threshold):
            route = Route(GENERALIST, n, None, found=n)
            yield Progress("route", 1, 1, route.note)
            return self.answering(GENERALIST), route
        pick = np.unique(np.linspace(0, n - 1, min(n, ROUTE_CELLS)).round().astype(int))
        # Every other cell first (still an even spread): when that half
        # alone already puts more than the threshold's share of all the
        # sample beyond the threshold, the rest cannot change the choice.
        halves = [pick[0::2], pick[1::2]]
        seen = np.zeros(0, int)
        passes = None
        beyond = 0
        scores = []
        for half in halves:
            if not len(half):
                continue
            more = yield from iter_predict_sums(
                self.specialist,
                np.stack([crops[i] for i in half]),
                batch_size=batch_size,
                tta="none",
                device=device,
            )
            distance = combine(self.specialist, more.sums, more.views).get("ood_distance")
            if distance is None:
                route = Route(GENERALIST, len(half), None, found=n)
                yield Progress("route", 1, 1, route.note)
                return self.answering(GENERALIST), route
            score = np.asarray(distance, float) / trust.ood_threshold
            scores.append(score)
            beyond += int(np.count_nonzero(score > 1.0))
            seen = np.concatenate([seen, half])
            passes = more if passes is None else _join(passes, more)
            if beyond > ROUTE_MAX_OOD_SHARE * len(pick):
                break
        share = beyond / len(seen)
        median = float(np.median(np.concatenate(scores)))
        like = share <= ROUTE_MAX_OOD_SHARE and median <= ROUTE_MAX_MEDIAN_SCORE
        chosen = SPECIALIST if like else GENERALIST
        answer = self.answering(chosen)
        passes = passes._replace(rows=seen)
        if chosen == SPECIALIST and answer is not passes.ensemble:
            # With a count panel: the same passes, as the panel's copy answers.
            from .panels import restrict_passes

            passes = restrict_passes(passes, answer)
        route = Route(chosen, len(seen), share, median, passes, found=n)
        log.info("model chosen: %s", route.note)
        yield Progress("route", 1, 1, route.note)
        return answer, route


def _join(a, b):
    """Two :class:`~napari_wbc.passes.ViewSums` of the same model over different cells, as one."""
    sums = {
        "probs": np.concatenate([a.sums["probs"], b.sums["probs"]], axis=1),
        "logits": None
        if a.sums["logits"] is None
        else np.concatenate([a.sums["logits"], b.sums["logits"]], axis=1),
        "features": None
        if a.sums["features"] is None
        else [
            None if f is None or g is None else np.concatenate([f, g])
            for f, g in zip(a.sums["features"], b.sums["features"], strict=True)
        ],
    }
    return a._replace(views=np.concatenate([a.views, b.views], axis=1), sums=sums)


def load_router(device="cpu") -> ModelRouter:
    """The two built-in ensembles, loaded, as a :class:`ModelRouter`."""
    from .errors import ModelFileError
    from .inference import load_any
    from .models.files import builtin_model_path

    try:
        files = builtin_model_path(SPECIALIST), builtin_model_path(GENERALIST)
    except ModelFileError as exc:
        raise ModelFileError(
            f"--model auto needs the built-in models, and this napari-wbc has not both "
            f"({exc}); pass a model file with --model (napari-wbc train makes one)"
        ) from exc
    # The three-lab model is loaded only when a source goes to it.
    return ModelRouter(load_any(files[0], device), lambda: load_any(files[1], device))


def load_model(model, device="cpu", classes=None):
    """A model argument, loaded: ``"auto"`` as a :class:`ModelRouter`, else an Ensemble.

    Anything but ``"auto"`` goes to :func:`napari_wbc.inference.load_any`
    (a model or ensemble file; built-in names are resolved first by
    :func:`napari_wbc.models.files.resolve_model`). ``classes``: a count
    panel to answer with (:func:`napari_wbc.panels.restrict_classes`;
    None: every class of the model).
    """
    from .inference import load_any
    from .models.files import resolve_model
    from .panels import restrict_classes

    if str(model) == AUTO_MODEL:
        return restrict_classes(load_router(device), classes)
    return restrict_classes(load_any(resolve_model(model), device), classes)
