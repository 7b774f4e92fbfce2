"""Classification metrics and the confusion-matrix figure.

Plain numpy on purpose (scikit-learn is not a dependency), and no torch, so
evaluation reports can be made anywhere. The results are JSON-serialisable
dicts, stored as they are in a saved model's config.

Contract when the data hold only some of the model's classes (for example a
smear set without basophils): the metrics are computed over the classes
*present in the true labels*. Macro averages run over those classes only, and
a prediction of any other class is simply an error. The confusion matrix has
one row per present class and one column per present class followed by one
column per class that was predicted but is absent from the true labels, so
such errors stay visible.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_wbc.errors import DataError

__all__ = ["classification_metrics", "save_confusion_png"]


def _as_names(values: Sequence, classes: list[str], what: str) -> list[str]:
    """Class names from names or integer indices into ``classes``."""
    names = []
    for v in np.asarray(values, dtype=object).ravel().tolist():
        if isinstance(v, numbers.Integral) and not isinstance(v, bool):
            if not 0 <= v < len(classes):
                raise DataError(
                    f"{what} holds class index {v}, but there are only {len(classes)} classes"
                )
            names.append(classes[v])
        else:
            names.append(str(v))
    return names


def classification_metrics(
    y_true: Sequence, y_pred: Sequence, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, macro F1, balanced accuracy, per-class scores and confusion matrix.

    Parameters
    ----------
    y_true, y_pred : sequence
        True and predicted labels, as class names or as integer indices into
        ``classes``. Predicted names outside ``classes`` are accepted and
        count as errors.
    classes : sequence of str
        The model's classes, in model order. Every true label must be one of them.

    Returns
    -------
    dict
        JSON-serialisable, with keys:

        - ``n``: number of samples.
        - ``accuracy``: fraction of correct predictions.
        - ``macro_f1``, ``macro_precision``, ``balanced_accuracy`` (macro
          recall): unweighted means over the evaluated classes.
        - ``classes``: the evaluated classes, i.e. those of ``classes``
          present in ``y_true``, in model order.
        - ``absent_classes``: model classes with no true sample.
        - ``per_class``: ``{class: {"precision", "recall", "f1", "support"}}``
          for each evaluated class. Precision of a class never predicted is 0
          (not undefined), and so is F1 when precision and recall are both 0.
        - ``confusion``: list of lists of counts; rows are the evaluated
          classes (true), columns are ``confusion_columns`` (predicted).
        - ``confusion_columns``: the evaluated classes, then any predicted
          class not present in ``y_true`` (model order, then unknown names
          sorted).

    Raises
    ------
    DataError
        If the inputs are empty or of different lengths, or a true label is
        not one of ``classes``.
    """
    classes = [str(c) for c in classes]
    true = _as_names(y_true, classes, "y_true")
    pred = _as_names(y_pred, classes, "y_pred")
    if len(true) != len(pred):
        raise DataError(f"y_true has {len(true)} labels but y_pred has {len(pred)}")
    if not true:
        raise DataError("no samples to evaluate")
    unknown = sorted(set(true) - set(classes))
    if unknown:
        raise DataError(f"true labels {unknown} are not among the model classes {classes}")

    present = set(true)
    evaluated = [c for c in classes if c in present]
    predicted_only = [c for c in classes if c not in present and c in set(pred)]
    predicted_only += sorted(set(pred) - set(classes))
    columns = evaluated + predicted_only

    row_of = {c: i for i, c in enumerate(evaluated)}
    col_of = {c: j for j, c in enumerate(columns)}
    confusion = np.zeros((len(evaluated), len(columns)), dtype=np.int64)
    np.add.at(confusion, ([row_of[t] for t in true], [col_of[p] for p in pred]), 1)

    k = len(evaluated)
    tp = np.diag(confusion[:, :k]).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion[:, :k].sum(axis=0).astype(np.float64)
    recall = tp / support  # every evaluated class has support >= 1
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)

    return {
        "n": len(true),
        "accuracy": float(tp.sum() / len(true)),
        "macro_f1": float(f1.mean()),
        "macro_precision": float(precision.mean()),
        "balanced_accuracy": float(recall.mean()),
        "classes": evaluated,
        "absent_classes": [c for c in classes if c not in present],
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(evaluated)
        },
        "confusion": confusion.tolist(),
        "confusion_columns": columns,
    }


def save_confusion_png(
    metrics: dict[str, Any], path: str | os.PathLike, normalize: bool = True
) -> Path:
    """Draw the confusion matrix of :func:`classification_metrics` to a PNG file.

    Parameters
    ----------
    metrics : dict
        Output of :func:`classification_metrics` (``confusion``, ``classes``
        and, if present, ``confusion_columns`` are used).
    path : str or Path
        Destination; written atomically (temporary file, then rename), so a
        reader never sees a half-written image.
    normalize : bool
        Show each row as fractions of its true class (recall on the
        diagonal) instead of counts.

    Returns
    -------
    Path
        The written file.
    """
    # Figure + Agg canvas directly: no pyplot state, no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(metrics["confusion"], dtype=np.float64)
    rows = list(metrics["classes"])
    cols = list(metrics.get("confusion_columns", rows))
    if counts.shape != (len(rows), len(cols)):
        raise DataError(
            f"confusion matrix of shape {counts.shape} does not match "
            f"{len(rows)} classes x {len(cols)} columns"
        )
    if normalize:
        totals = counts.sum(axis=1, keepdims=True)
        values = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    else:
        values = counts

    size = 1.5 + 0.6 * max(len(rows), len(cols))
    fig = Figure(figsize=(size + 1.0, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = values.max() if values.size else 0
    for (i, j), v in np.ndenumerate(values):
        text = f"{v:.2f}" if normalize else str(int(v))
        ax.text(j, i, text, ha="center", va="center", fontsize=8,
                color="white" if top and v > 0.6 * top else "black")  # fmt: skip
    title = "confusion (row-normalised)" if normalize else "confusion (counts)"
    if "accuracy" in metrics and "macro_f1" in metrics:
        title += f"\naccuracy {metrics['accuracy']:.3f}, macro F1 {metrics['macro_f1']:.3f}"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()

    from .atomic import atomic_write

    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), ".png")
