"""Whole-smear runs over many images: classify folders, evaluate on annotated boxes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError, WBCError
from .images import list_image_files, read_smear
from .pipeline import ClassifyConfig, iter_classify_smear
from .progress import Progress, ProgressGen, run

log = logging.getLogger(__name__)

#: Box labels that count for detection but carry no usable class.
NO_CLASS_LABELS = ("ambiguous", "unlabeled", "unknown", "")


def iter_classify_files(
    inputs,
    ensemble,
    out_dir: str | Path,
    config: ClassifyConfig | None = None,
    formats=("csv", "geojson"),
    client=None,
) -> ProgressGen[pd.DataFrame]:
    """Classify every image, writing ``<stem>.csv`` / ``<stem>.geojson`` and ``summary.csv``.

    Returns the summary: one row per image with the count per class, the
    total and the scale used, plus a final row summing all images.
    """
    from .export import cells_to_csv, cells_to_geojson

    config = config or ClassifyConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = list_image_files(inputs)
    classes = list(ensemble.classes)
    rows = []
    for i, path in enumerate(paths):
        smear = read_smear(path)
        try:
            gen = iter_classify_smear(
                smear.levels[0],
                ensemble,
                config,
                client=client,
                source_path=path,
                file_pixel_size_um=smear.pixel_size_um,
            )
            while True:
                try:
                    event = next(gen)
                except StopIteration as stop:
                    cells = stop.value
                    break
                yield Progress(
                    "images", i, len(paths), f"{path.name}: {event.stage} {event.done}/{event.total}"
                )
        finally:
            smear.close()
        table = cells
        if "csv" in formats:
            # The pixel size the cells were found with (the user's over the file's).
            pixel_size = cells.attrs.get("pixel_size_um")
            cells_to_csv(table, out_dir / f"{path.stem}.csv", pixel_size)
        if "geojson" in formats:
            cells_to_geojson(table, out_dir / f"{path.stem}.geojson")
        counts = table["class"].value_counts().reindex(classes, fill_value=0)
        rows.append(
            {
                "image": path.name,
                **counts.to_dict(),
                "total": int(counts.sum()),
                "needs_review": int(table["needs_review"].sum()) if len(table) else 0,
                "rbc_diameter_px": round(float(cells.attrs.get("rbc_diameter_px", np.nan)), 1),
                "scale": cells.attrs.get("scale", ""),
            }
        )
        yield Progress("images", i + 1, len(paths), f"{path.name}: {len(table)} cells")
    summary = pd.DataFrame(rows)
    total = {"image": "all images", **{c: int(summary[c].sum()) for c in [*classes, "total", "needs_review"]}}
    summary = pd.concat([summary, pd.DataFrame([total])], ignore_index=True)
    from .atomic import atomic_write_stream

    atomic_write_stream(out_dir / "summary.csv", lambda fh: summary.to_csv(fh, index=False))
    return summary


def load_boxes(source: str | Path) -> pd.DataFrame:
    """Read ``path,label,x,y,w,h`` white-cell boxes (x, y = top-left), paths absolute."""
    source = Path(source)
    try:
        df = pd.read_csv(source)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"cannot read {source}: {exc}") from exc
    missing = [c for c in ("path", "label", "x", "y", "w", "h") if c not in df.columns]
    if missing:
        raise DataError(f"{source} lacks column(s) {', '.join(missing)}")
    df = df.assign(path=[str((source.parent / p).resolve()) for p in df["path"]])
    df["label"] = df["label"].fillna("").astype(str)
    return df


def is_box_table(source) -> bool:
    """True when a CSV holds boxes (x, y, w, h) rather than crops."""
    try:
        columns = pd.read_csv(source, nrows=0).columns
    except Exception:
        return False
    return {"x", "y", "w", "h"} <= set(columns)


def iter_evaluate_smears(
    boxes: pd.DataFrame, ensemble, config: ClassifyConfig | None = None
) -> ProgressGen[dict]:
    """Run the whole pipeline per image and score detection and classification.

    A detection matches one unmatched box whose area contains its centre.
    Classification metrics are computed over matched cells whose box has a real
    class (``ambiguous`` / ``unlabeled`` boxes count for detection only).
    """
    from .detection import match_detections
    from .metrics import classification_metrics

    config = config or ClassifyConfig()
    images = list(dict.fromkeys(boxes["path"]))
    tp = fp = fn = 0
    y_true, y_pred = [], []
    failed: dict[str, str] = {}
    for i, path in enumerate(images):
        own = boxes[boxes["path"] == path].reset_index(drop=True)
        smear = read_smear(path)
        try:
            cells = run(
                iter_classify_smear(
                    smear.levels[0], ensemble, config, file_pixel_size_um=smear.pixel_size_um
                )
            )
        except WBCError as exc:
            # One unusable field (e.g. too few red cells to measure the scale)
            # must not end the evaluation: its boxes count as missed.
            log.warning("%s: %s", Path(path).name, exc)
            failed[Path(path).name] = str(exc)
            fn += len(own)
            yield Progress("images", i + 1, len(images), f"{Path(path).name}: failed")
            continue
        finally:
            smear.close()
        match = match_detections(cells, own)
        tp, fp, fn = tp + match["tp"], fp + match["fp"], fn + match["fn"]
        for det, box in match["pairs"]:
            label = own.loc[box, "label"]
            if label.lower() not in NO_CLASS_LABELS:
                y_true.append(label)
                y_pred.append(cells.iloc[det]["class"])
        yield Progress("images", i + 1, len(images), f"{Path(path).name}: {len(cells)} cells")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    if y_true:
        unknown = sorted(set(y_true) - set(ensemble.classes))
        if unknown:
            raise DataError(f"the boxes hold labels the model does not know: {unknown}")
        result = classification_metrics(y_true, y_pred, list(ensemble.classes))
    else:
        result = {"n": 0}
    result["detection"] = {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "images": len(images),
        "boxes": len(boxes),
    }
    result["stain_normalization"] = config.stain_normalize
    result["pixel_size_um"] = config.pixel_size_um
    return result


__all__ = [
    "is_box_table",
    "iter_classify_files",
    "iter_evaluate_smears",
    "load_boxes",
]
