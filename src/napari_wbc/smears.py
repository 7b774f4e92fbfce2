"""Whole-smear runs over many images: classify folders, evaluate on annotated boxes."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError, WBCError
from .images import list_image_files, read_smear
from .pipeline import ClassifyConfig, iter_classify_smear
from .progress import Progress, ProgressGen, relabel, run

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

    A bad image does not stop the batch: its failure (file and reason) is
    recorded and the run goes on. Unless the scale is given, the red cells of
    every image (whose file gives no pixel size) are measured first: fields
    from one microscope share a scale, and one field's few red cells are a
    noisy ruler, so each image is classified at the folder's median
    (:func:`napari_wbc.scale.folder_scales`; an image clearly at another
    magnification keeps its own), which its ``scale`` column says. Failures
    are listed in ``failures.csv`` and in ``summary.attrs["failures"]``
    (dicts with ``image``, ``path``, ``reason``).
    Images whose cells largely look unlike the model's training cells are in
    ``summary.attrs["warnings"]`` (image name → message); the ``unlike_training``
    column counts those cells.

    Returns the summary: one row per classified image with the count per
    class, the total and the scale used, plus a final row summing all images.
    """
    config = config or ClassifyConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = list_image_files(inputs)
    classes = list(ensemble.classes)
    rows, failures = [], []
    warnings: dict[str, str] = {}  # image -> "unlike the training data" warning

    def fail(path: Path, exc: BaseException) -> None:
        reason = str(exc) if isinstance(exc, WBCError) else f"{type(exc).__name__}: {exc}"
        log.warning("%s: %s", path, reason)
        failures.append({"image": path.name, "path": str(path), "reason": reason})

    scales, unmeasured = {}, {}
    if config.rbc_diameter_px is None and config.pixel_size_um is None:
        scales, unmeasured = yield from _iter_folder_scales(paths)

    def own_config(path):
        scale = scales.get(path)
        return config if scale is None else replace(config, rbc_diameter_px=scale.rbc_diameter_px)

    from .adapt import adapt_method, is_auto

    folder = None
    method = adapt_method(config.adapt)
    # The default (adapt="auto") adapts each image that goes to the
    # three-lab model on its own cells when it holds enough; pooling a
    # folder's cells is asked for (--adapt): it costs a pass over every image.
    if len(paths) > 1 and method and client is None and not is_auto(config.adapt):
        # One microscope, one stain: the folder is one source, adapted once
        # to the cells of all its images (a camera field alone holds too few).
        config = replace(config, adapt=False)
        folder = yield from _iter_adapt_folder(
            [p for p in paths if not (p in unmeasured and p not in scales)],
            ensemble,
            own_config,
            method,
        )
    for i, path in enumerate(paths):
        if path in unmeasured and path not in scales:
            fail(path, WBCError(f"{unmeasured[path]}; give --pixel-size or --rbc-diameter-px"))
            continue
        scale = scales.get(path)
        own = own_config(path)
        try:
            cells = yield from _iter_classify_file(
                path, ensemble, own, client, out_dir, formats, (i, len(paths)), scale, folder
            )
        except Exception as exc:  # one bad file must not end a batch; recorded
            fail(path, exc)
            continue
        rows.append(_summary_row(path, cells, classes))
        if cells.attrs.get("warning"):
            warnings[path.name] = cells.attrs["warning"]
        yield Progress("images", i + 1, len(paths), f"{path.name}: {len(cells)} cells")
    summary = pd.DataFrame(
        rows,
        columns=[
            "image",
            *classes,
            "total",
            "needs_review",
            "unlike_training",
            "rbc_diameter_px",
            "scale",
            *(["model"] if any("model" in row for row in rows) else []),
        ],
    )
    counted = [*classes, "total", "needs_review", "unlike_training"]
    total = {"image": "all images", **{c: int(summary[c].sum()) for c in counted}}
    summary = pd.concat([summary, pd.DataFrame([total])], ignore_index=True)
    summary.attrs["failures"] = failures
    summary.attrs["warnings"] = warnings
    from .atomic import atomic_write_stream

    atomic_write_stream(out_dir / "summary.csv", lambda fh: summary.to_csv(fh, index=False))
    failures_csv = out_dir / "failures.csv"
    if failures:
        table = pd.DataFrame(failures, columns=["image", "path", "reason"])
        atomic_write_stream(failures_csv, lambda fh: table.to_csv(fh, index=False))
    elif failures_csv.exists():
        failures_csv.unlink()  # from an earlier run into the same folder
    return summary


def _iter_folder_scales(paths) -> ProgressGen[tuple[dict, dict]]:
    """Measure every image whose file gives no pixel size; one scale each for the folder.

    Returns ``(scales, unmeasured)``: path → :class:`~napari_wbc.scale.Scale`
    by :func:`napari_wbc.scale.folder_scales`, and path → the reason an image
    could not be measured (it takes the folder's scale when another was).
    Files that cannot be read are left to the classification pass, which
    records why.
    """
    from .scale import ScaleError, folder_scales, iter_estimate_rbc_diameter

    estimates, unmeasured = {}, {}
    for i, path in enumerate(paths):
        try:
            smear = read_smear(path)
        except Exception:  # reported when the image is classified
            continue
        try:
            if smear.pixel_size_um is None:
                measuring = Progress("scale", i, len(paths), f"measuring red cells: {path.name}")
                estimates[path] = yield from relabel(
                    iter_estimate_rbc_diameter(smear.levels[0]),
                    lambda _, event=measuring: event,
                )
        except ScaleError as exc:
            estimates[path] = None
            unmeasured[path] = exc
        except Exception:  # reported when the image is classified
            pass
        finally:
            smear.close()
        yield Progress("scale", i + 1, len(paths), f"measuring red cells: {path.name}")
    return folder_scales(estimates), unmeasured


class _Folder:
    """A folder adapted once: each image's session, already prepared and cut."""

    def __init__(self):
        #: ``id(model)`` → its copy adapted to the cells of the images that chose it.
        self.adapted: dict = {}
        #: Image path → its :class:`~napari_wbc.session.ClassifySession`
        #: (``session=`` of :func:`napari_wbc.pipeline.iter_classify_smear`), taken once.
        self.sessions: dict = {}

    def session(self, path, ensemble, config):
        """The session of the image ``path``: as cut in the adaptation pass, or a fresh one."""
        from .session import ClassifySession

        session = self.sessions.pop(str(path), None)
        if session is None:  # not cut in the adaptation pass: prepared when classified
            session = ClassifySession(ensemble, config.adapt, config.device, config.batch_size)
            session.adapted = self.adapted
        return session


def _iter_adapt_folder(paths, ensemble, own_config, method: str) -> ProgressGen[_Folder]:
    """Adapt the model of a folder's images to all their cells, once.

    Each image's cells are cut as its classification will cut them (with a
    router, for the model it chooses for that image); each chosen model is
    adapted to the cells of its images, when they are at least
    :func:`napari_wbc.adapt.cells_needed`. What was cut, and the adapted
    model's passes over the cells it looked at, are kept for the
    classification pass, which then neither prepares nor cuts an image
    again. Images that cannot be read are left to the classification pass,
    which records why.
    """
    from .adapt import adapt_ensemble_and_passes, cells_needed
    from .pipeline import block_crops, iter_smear_blocks
    from .session import ClassifySession, passes_of

    folder = _Folder()
    # id(model) -> (model, its images' crops, (path, first row, end row) per image)
    pooled: dict[int, tuple[object, list, list]] = {}
    for i, path in enumerate(paths):
        try:
            smear = read_smear(path)
        except Exception:  # reported when the image is classified
            continue
        config = own_config(path)
        session = ClassifySession(ensemble, config.adapt, config.device, config.batch_size)
        try:
            yield from relabel(
                iter_smear_blocks(
                    smear.levels[0], session, config, file_pixel_size_um=smear.pixel_size_um
                ),
                lambda e, i=i, name=path.name: Progress(
                    "adapt", i, len(paths), f"{name}: cells to adapt to"
                ),
            )
        except Exception:  # likewise: the classification pass says what went wrong
            continue
        finally:
            smear.close()
        crops = block_crops(session.cut.blocks)
        chosen, pool, spans = pooled.setdefault(id(session.ensemble), (session.ensemble, [], []))
        spans.append((str(path), len(pool), len(pool) + len(crops)))
        pool.extend(crops)
        session.adapted = folder.adapted
        folder.sessions[str(path)] = session
        yield Progress("adapt", i + 1, len(paths), f"{path.name}: {len(crops)} cells")
    for key, (chosen, crops, spans) in pooled.items():
        if len(crops) < cells_needed(method):
            log.warning(
                "not adapted: %d cells in these images, adaptation needs %d",
                len(crops),
                cells_needed(method),
            )
            continue
        folder.adapted[key], passes = adapt_ensemble_and_passes(
            chosen, np.stack(crops), method=method
        )
        log.info("%s adapted to %d cells of %d images", chosen.name, len(crops), len(paths))
        for path, start, stop in spans:
            folder.sessions[path].passes = passes_of(passes, start, stop)
    return folder


def _iter_classify_file(
    path, ensemble, config, client, out_dir, formats, position, scale=None, folder=None
):
    """Classify one image and write its tables; returns the cells.

    ``scale`` is the folder's measured scale for this image (its
    ``rbc_diameter_px`` is already in ``config``): it only names the scale.
    ``folder``: the folder adapted once (:func:`_iter_adapt_folder`).
    """
    from .export import cells_to_csv, cells_to_geojson

    i, n = position
    smear = read_smear(path)
    try:
        cells = yield from relabel(
            iter_classify_smear(
                smear.levels[0],
                ensemble,
                config,
                client=client,
                source_path=path,
                file_pixel_size_um=smear.pixel_size_um,
                session=None if folder is None else folder.session(path, ensemble, config),
            ),
            lambda e: Progress("images", i, n, f"{path.name}: {e.stage} {e.done}/{e.total}"),
        )
    finally:
        smear.close()
    if scale is not None:
        cells.attrs.update(scale=scale.note, scale_source=scale.source)
    if "csv" in formats:
        # The pixel size the cells were found with (the user's over the file's).
        cells_to_csv(cells, out_dir / f"{path.stem}.csv", cells.attrs.get("pixel_size_um"))
    if "geojson" in formats:
        cells_to_geojson(cells, out_dir / f"{path.stem}.geojson")
    return cells


def _summary_row(path: Path, cells: pd.DataFrame, classes) -> dict:
    counts = cells["class"].value_counts().reindex(classes, fill_value=0)
    return {
        "image": path.name,
        **counts.to_dict(),
        "total": int(counts.sum()),
        "needs_review": int(cells["needs_review"].sum()) if len(cells) else 0,
        # Cells unlike the model's training cells (0 for a model without trust statistics).
        "unlike_training": (
            int(cells["out_of_distribution"].sum()) if "out_of_distribution" in cells else 0
        ),
        "rbc_diameter_px": round(float(cells.attrs.get("rbc_diameter_px", np.nan)), 1),
        "scale": cells.attrs.get("scale", ""),
        # With --model auto, the built-in model this image was classified by.
        **({"model": cells.attrs["model"]} if "model" in cells.attrs else {}),
    }


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
    Unless the scale is given, the images share the folder's measured scale
    as in :func:`iter_classify_files`; with ``config.adapt`` the model is
    adapted once to the cells of all the images, as there too.
    """
    from .adapt import adapt_method, is_auto
    from .detection import match_detections
    from .metrics import classification_metrics

    config = config or ClassifyConfig()
    images = list(dict.fromkeys(boxes["path"]))
    tp = fp = fn = 0
    y_true, y_pred = [], []
    failed: dict[str, str] = {}
    scales = {}
    if config.rbc_diameter_px is None and config.pixel_size_um is None:
        scales, _ = yield from _iter_folder_scales([Path(p) for p in images])

    def own_config(path):
        scale = scales.get(Path(path))
        return config if scale is None else replace(config, rbc_diameter_px=scale.rbc_diameter_px)

    folder = None
    method = adapt_method(config.adapt)
    if len(images) > 1 and method and not is_auto(config.adapt):
        config = replace(config, adapt=False)
        folder = yield from _iter_adapt_folder(
            [Path(p) for p in images], ensemble, own_config, method
        )
    for i, path in enumerate(images):
        own = boxes[boxes["path"] == path].reset_index(drop=True)
        image_config = own_config(path)
        smear = read_smear(path)
        try:
            cells = run(
                iter_classify_smear(
                    smear.levels[0],
                    ensemble,
                    image_config,
                    file_pixel_size_um=smear.pixel_size_um,
                    session=None
                    if folder is None
                    else folder.session(path, ensemble, image_config),
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
