"""One source's classification: the model chosen for it, its adaptation, and their passes.

A source is a smear (or camera field), a set of crop files, or a folder of
smears adapted together. Before its cells are classified, two steps may
look at some of them: with ``--model auto`` the router picks a model by the
specialist's view of a sample (:class:`napari_wbc.routing.ModelRouter`),
and adaptation fits the chosen model to the source's own cells
(:mod:`napari_wbc.adapt`). Both run passes that classification takes over
instead of running them again (``known=`` of
:func:`napari_wbc.inference.iter_predict_crops`). :class:`ClassifySession`
holds that sequence for every workflow (importing it loads no torch) (:mod:`napari_wbc.pipeline`,
:mod:`napari_wbc.prediction`, :mod:`napari_wbc.smears`); each gives it its
crops through a callback, in its own way of cutting them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import WBCError
from .progress import ProgressGen
from .routing import ModelRouter

log = logging.getLogger(__name__)


class ClassifySession:
    """The model that classifies one source, as chosen and adapted, and what that ran.

    Parameters
    ----------
    model : Ensemble or ModelRouter
        The classifier; a router chooses one of its ensembles in
        :meth:`iter_choose`.
    adapt : bool or {"auto", "prototypes", "adabn"}
        Adaptation asked for (:meth:`adapt_method`).
    device, batch_size
        Where and in what batches the router's look at a sample runs
        (``batch_size`` None: :data:`napari_wbc.passes.INFERENCE_BATCH`).
    local : bool
        Classified on this machine (False: on a cluster, which does not adapt).
    """

    def __init__(
        self,
        model,
        adapt: bool | str = False,
        device: str = "auto",
        batch_size: int | None = None,
        local: bool = True,
    ):
        from .adapt import adapt_method

        adapt_method(adapt)  # an unknown method fails here, before any work
        self.router = model if isinstance(model, ModelRouter) else None
        #: The ensemble that classifies (None until a router has chosen).
        self.ensemble = None if self.router is not None else model
        self.adapt, self.device, self.batch_size, self.local = adapt, device, batch_size, local
        #: The router's choice (:class:`napari_wbc.routing.Route`), or None.
        self.route = None
        #: What the workflow cut to choose or adapt by (in its own form), to
        #: classify first without cutting it again.
        self.cut: Any = None
        #: Passes ``ensemble`` already ran (:class:`napari_wbc.passes.ViewSums`,
        #: rows among the crops of ``cut``), or None.
        self.passes = None
        #: Cells the ensemble was adapted to (0: not adapted).
        self.adapted_cells = 0
        #: Warnings to show with the result.
        self.notes: list[str] = []
        #: Copies adapted to a larger source (``id(model)`` → copy; a folder's).
        self.adapted: dict = {}
        #: The workflow's own preparation of the source (a smear's scale,
        #: stain fit and block grid), when it was prepared ahead.
        self.prepared: Any = None

    def iter_choose(
        self, iter_sample: Callable[[Any], ProgressGen[tuple[Any, Any]]]
    ) -> ProgressGen[Any]:
        """The ensemble for this source: with a router, chosen by a sample of its cells.

        ``iter_sample(specialist)`` gives ``(crops, cut)``: cells of the
        source cut for the router's specialist, and what was cut (kept as
        :attr:`cut` when the specialist is chosen, whose passes over them
        classification then reuses).
        """
        if self.router is None:
            return self.ensemble
        from .models.build import get_device
        from .passes import INFERENCE_BATCH

        crops, cut = yield from iter_sample(self.router.specialist)
        batch_size = INFERENCE_BATCH if self.batch_size is None else self.batch_size
        self.ensemble, self.route = yield from self.router.iter_choose(
            crops, device=get_device(self.device), batch_size=batch_size
        )
        passes = self.route.passes
        if passes is not None and self.ensemble is passes.ensemble:
            self.passes, self.cut = passes, cut
        return self.ensemble

    def adapt_method(self, seen: int | None = None) -> str | None:
        """The adaptation this source gets, or None.

        ``"auto"`` adapts only a source that the router gave the three-lab
        model (:func:`napari_wbc.adapt.auto_adapts`; ``seen``: its cells,
        when known), on this machine. Asked for on a cluster, an error.
        """
        from .adapt import adapt_method, auto_adapts, is_auto

        method = adapt_method(self.adapt)
        if is_auto(self.adapt):
            return method if self.local and auto_adapts(self.route, seen) else None
        if method and not self.local:
            raise WBCError(
                "adaptation runs on this machine only; adapt once (napari-wbc predict --adapt "
                "--save-adapted) and give the cluster that model"
            )
        return method

    def adapt_to(self, crops, method: str, cut: Any = None, quiet: bool = False, strict=False):
        """Adapt the chosen ensemble to ``crops``; its passes over them are kept for classifying.

        ``cut``: what the workflow cut to get them (replaces :attr:`cut`).
        With fewer crops than ``method`` needs, ``strict`` raises
        :class:`napari_wbc.adapt.AdaptationError`; otherwise the ensemble
        stays as it is, with a warning (a log line only when ``quiet``: the
        default's adaptation, which was not asked for).
        """
        from .adapt import adapt_ensemble_and_passes, cells_needed

        self.cut, self.passes = cut, None
        least = cells_needed(method)
        if not strict and len(crops) < least:
            note = (
                f"not adapted: {len(crops)} cells found, adaptation needs {least}; "
                "classified with the model as it is"
            )
            if quiet:
                log.info("%s", note)
            else:
                log.warning("%s", note)
                self.notes.append(note)
            return self.ensemble
        self.ensemble, self.passes = adapt_ensemble_and_passes(self.ensemble, crops, method=method)
        self.adapted_cells = int(self.ensemble.metrics["adapted"]["cells"])
        return self.ensemble

    def take_adapted(self) -> None:
        """Classify with the chosen ensemble's copy adapted to a larger source, if it has one."""
        copy = self.adapted.get(id(self.ensemble))
        if copy is not None and not self.adapt:
            self.ensemble = copy
            self.adapted_cells = int(copy.metrics["adapted"]["cells"])


def passes_of(passes, start: int, stop: int):
    """The part of ``passes`` on rows ``start:stop`` of a larger set, rows shifted to start at 0.

    None when ``passes`` is None or holds none of those rows.
    """
    if passes is None:
        return None
    from .passes import take_sums

    rows = np.arange(passes.views.shape[1]) if passes.rows is None else np.asarray(passes.rows)
    at = np.flatnonzero((rows >= start) & (rows < stop))
    if not len(at):
        return None
    return passes._replace(
        views=passes.views[:, at], sums=take_sums(passes.sums, at), rows=rows[at] - start
    )
