"""Count panels: the classes a differential count may answer with.

The built-in models name PBC's eight classes: the five of a manual
differential count (neutrophil, lymphocyte, monocyte, eosinophil, basophil)
and three more (immature granulocytes, erythroblasts, platelets). A lab
whose count panel is the 5-part differential can restrict the answer to its
classes (``--classes 5-part``, the Classify widget's *classes*): each cell
is then called the most likely of them, its probabilities are the model's
renormalised over them, and the cell table has a column for each of them
only.

On cells from labs the models never saw this helps, because the three
extra classes were taught by one lab only and draw other labs' cells to
them (docs/results.md, "A count panel"). A cell of a class outside the panel
(an erythroblast in a 5-part count) is still given one of the panel's
classes, and is more often flagged for review: its features lie far from
every class centre the restricted model keeps.

A restricted model is a copy: the files and the loaded model it came from
are untouched.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

from napari_wbc.errors import WBCError

__all__ = ["FIVE_PART", "PANELS", "PanelError", "panel_classes", "restrict_classes"]

#: The 5-part differential count.
FIVE_PART = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
#: Named panels (``None``: every class the model has).
PANELS: dict[str, tuple[str, ...] | None] = {"all": None, "5-part": FIVE_PART}


class PanelError(WBCError, ValueError):
    """A count panel that the model cannot answer with."""


def panel_classes(panel: str | Sequence[str] | None, available: Sequence[str]):
    """The classes of ``panel`` in the model's order, or None for all of them.

    Parameters
    ----------
    panel : str, sequence of str or None
        A name of :data:`PANELS`, class names separated by commas, or a
        sequence of class names; None or ``"all"``: every class.
    available : sequence of str
        The model's classes.

    Raises
    ------
    PanelError
        For an unknown panel or class name, or fewer than two classes.
    """
    available = tuple(available)
    if panel is None:
        return None
    if isinstance(panel, str):
        text = panel.strip()
        if text in PANELS:
            wanted = PANELS[text]
            if wanted is None:
                return None
        else:
            wanted = tuple(c.strip() for c in text.split(",") if c.strip())
    else:
        wanted = tuple(str(c) for c in panel)
    unknown = [c for c in wanted if c not in available]
    if unknown:
        named = ", ".join(repr(c) for c in unknown)
        raise PanelError(
            f"the model has no class {named}; its classes are {', '.join(available)} "
            f"(or give a panel: {', '.join(PANELS)})"
        )
    kept = tuple(c for c in available if c in wanted)
    if len(kept) < 2:
        raise PanelError(f"a count panel needs at least two classes, got {', '.join(kept)}")
    return None if kept == available else kept


def restrict_classes(model: Any, panel: str | Sequence[str] | None):
    """``model`` answering with the classes of ``panel`` only; ``model`` itself is unchanged.

    Parameters
    ----------
    model : napari_wbc.inference.Ensemble or napari_wbc.routing.ModelRouter
    panel : str, sequence of str or None
        As :func:`panel_classes`; None or ``"all"`` returns ``model`` itself.

    Returns
    -------
    Ensemble or ModelRouter
        An ensemble whose members' classifiers keep the rows of the panel's
        classes (their weights unchanged), whose trust statistics keep those
        classes' feature centres (calibration unchanged); a router that
        chooses as before and answers with such an ensemble.
    """
    classes = panel_classes(panel, model.classes)
    if classes is None:
        return model
    if hasattr(model, "restricted"):  # a ModelRouter: it restricts what it chooses
        return model.restricted(classes)
    return _restrict_ensemble(model, classes)


def _restrict_ensemble(ensemble, classes: tuple[str, ...]):
    import torch

    from napari_wbc.inference import EnsembleMember

    keep = [ensemble.classes.index(c) for c in classes]
    members = []
    for member in ensemble.members:
        model = member.model
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        if not isinstance(head, torch.nn.Linear) or not hasattr(model, "reset_classifier"):
            raise PanelError(
                f"{type(model).__name__} has no linear classifier to restrict; "
                "classify with every class"
            )
        weight = head.weight.detach()[keep].clone()
        bias = None if head.bias is None else head.bias.detach()[keep].clone()
        restricted = copy.deepcopy(model)
        restricted.reset_classifier(len(keep))
        new_head = restricted.get_classifier()
        with torch.no_grad():
            new_head.weight.copy_(weight)
            if new_head.bias is not None:
                new_head.bias.copy_(bias if bias is not None else torch.zeros(len(keep)))
        restricted.to(head.weight.device).train(model.training)
        config = member.config
        config = dataclasses.replace(
            config, spec=dataclasses.replace(config.spec, classes=classes)
        )
        members.append(EnsembleMember(restricted, config, member.weight))
    trust = ensemble.trust
    if trust is not None and trust.features:
        trust = dataclasses.replace(
            trust,
            features=[dataclasses.replace(s, centres=s.centres[keep]) for s in trust.features],
        )
    return dataclasses.replace(
        ensemble,
        members=members,
        name=f"{ensemble.name} ({', '.join(classes)})",
        trust=trust,
    )


def restrict_passes(passes, restricted):
    """Passes of an ensemble (:class:`napari_wbc.passes.ViewSums`) as ``restricted`` would give them.

    ``restricted`` is that ensemble answering with a panel
    (:func:`restrict_classes`): the same networks, whose classifiers keep
    some rows. Its logits are those rows of the full logits, and its
    probabilities their softmax, so passes of one view per crop carry over
    without running the networks again. Returns None where they cannot (no
    logits were kept, or some crops were seen in several views, whose
    probabilities were summed after the softmax).
    """
    import numpy as np

    sums = passes.sums
    if sums["logits"] is None or (np.asarray(passes.views) > 1).any():
        return None
    keep = [passes.ensemble.classes.index(c) for c in restricted.classes]
    logits = sums["logits"][:, :, keep]
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)
    # Crops a member did not see keep zero sums.
    probs *= (np.asarray(passes.views) > 0)[:, :, None]
    restricted_sums = {"probs": probs, "logits": logits.copy(), "features": sums["features"]}
    return passes._replace(ensemble=restricted, sums=restricted_sums)
