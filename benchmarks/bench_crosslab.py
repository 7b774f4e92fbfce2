"""Leave-one-lab-out benchmark of the cross-lab classifiers (issue #12).

    python benchmarks/bench_crosslab.py outputs/crosslab          # every fold model found
    python benchmarks/bench_crosslab.py outputs/crosslab --grid   # also PNGs of the crops

Protocol. The labelled labs are PBC, LISC and BCCD, scored on the five
classes they share (basophil, eosinophil, lymphocyte, monocyte, neutrophil).
A fold model ``<run>/<aug>-<lab>/model.safetensors`` (written by
``napari-wbc train --labs ... --holdout <lab>``) never saw ``<lab>``: not in
training, not in choosing epochs (both stages keep their last epoch). Here
it is scored on every cell of ``<lab>`` that has one of the five classes:

* ``plain``: crops at the model's field of view (the lab's documented
  red-cell size), no test-time augmentation;
* ``d4``: the mean over the 8 flips/rotations;
* ``adabn``: batch-norm statistics re-estimated on the held-out lab's cells,
  without labels (napari_wbc.adapt, class-balanced guard on); ``adabn-raw``
  without the guard.

Models trained on PBC are also scored on PBC's validation split (20 % per
class, seed 0, never trained on), as is and with its crops cut to 0.5×,
0.7×, 1.4× and 2× the field of view and resized to the original pixel size
(the cell's size in pixels changes by 1/factor), the scale then **measured**
from the crops (napari_wbc.crop_scale) and the crops brought back to the
model's field of view.

Models with PBC's 8 classes (``--classes pbc``) are scored the same way:
a held-out lab's cell predicted as one of PBC's three extra classes counts
as an error, and PBC validation is the split of PBC's 8-class table (its
macro-F1 then covers 8 classes).

Metrics: macro-F1 and balanced accuracy over the classes the lab has, and
per-class F1. BCCD has only 2 basophils: its macro-F1 moves by up to 0.2 with
one of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_wbc.adapt import adapt_batchnorm
from napari_wbc.crop_scale import measure_crop_scale, to_field_of_view
from napari_wbc.datasets import (
    LABS,
    SHARED_CLASSES,
    cached_lab_crops,
    decode_image,
    stratified_split,
)
from napari_wbc.metrics import classification_metrics
from napari_wbc.models.files import load_network

FACTORS = (0.5, 0.7, 1.4, 2.0)


def to_input(crops: np.ndarray, config) -> torch.Tensor:
    """uint8 crops at the model's field of view → normalised network input."""
    size = config.spec.input_size
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    mean = torch.tensor(config.spec.mean)[:, None, None]
    std = torch.tensor(config.spec.std)[:, None, None]
    return (x - mean) / std


@torch.no_grad()
def probabilities(model, x: torch.Tensor, tta: bool = False, batch: int = 128) -> np.ndarray:
    model.eval()
    views = [(k, f) for f in (False, True) for k in range(4)] if tta else [(0, False)]
    out = []
    for s in range(0, len(x), batch):
        xb = x[s : s + batch]
        p = 0
        for k, flip in views:
            v = torch.rot90(xb, k, dims=(2, 3))
            v = torch.flip(v, dims=(3,)) if flip else v
            p = p + torch.softmax(model(v), 1)
        out.append(p / len(views))
    return torch.cat(out).numpy()


def metric_row(m: dict, **keys) -> dict:
    """``keys`` then the rounded figures of :func:`classification_metrics`' result ``m``.

    The one row format of the cross-lab scripts' JSON tables.
    """
    return {
        **keys,
        "n": int(m["n"]),
        "macro_f1": round(float(m["macro_f1"]), 4),
        "balanced_accuracy": round(float(m["balanced_accuracy"]), 4),
        "accuracy": round(float(m["accuracy"]), 4),
        "per_class_f1": {c: round(float(v["f1"]), 3) for c, v in m["per_class"].items()},
    }


class Rows(list):
    """A script's JSON table: each row printed as it comes, all saved at the end.

    ``file`` is the script's ``--json`` path (None: print only).
    """

    def __init__(self, file: Path | None = None):
        super().__init__()
        self.file = file

    def add(self, row: dict) -> None:
        self.append(row)
        print(json.dumps(row), flush=True)

    def save(self) -> None:
        if self.file is not None:
            self.file.write_text(json.dumps(list(self), indent=1))


def score(prob: np.ndarray, labels, classes) -> dict:
    m = classification_metrics(list(labels), [classes[i] for i in prob.argmax(1)], classes)
    return metric_row(m)


def fold_ensemble(roots, lab: str, **kwargs):
    """The fold models of held-out ``lab`` as one D4 ensemble, one member per seed.

    ``roots`` are the folders of one training run each (``<root>/dr-<lab>/
    model.safetensors``, as scripts/run_crosslab_lolo.sh writes them);
    ``kwargs`` go to :class:`~napari_wbc.inference.Ensemble` (e.g. ``fov_scale``).
    """
    from napari_wbc.inference import Ensemble, EnsembleMember

    members = []
    for root in roots:
        model, config = load_network(Path(root) / f"dr-{lab}" / "model.safetensors", cache=False)
        members.append(EnsembleMember(model, config, 1.0))
    return Ensemble(members, tta="d4", name=f"fold {lab}", **kwargs)


def rescaled_pbc(paths, factor: float) -> list[np.ndarray]:
    """PBC crops showing ``factor`` × their field of view at their original pixel count."""
    from PIL import Image

    out = []
    for p in paths:
        im = decode_image(p)
        h, w = im.shape[:2]
        side = round(min(h, w) * factor)
        glass = np.median(
            im.reshape(-1, 3)[
                im.reshape(-1, 3).astype(int).sum(1)
                >= np.percentile(im.reshape(-1, 3).astype(int).sum(1), 90)
            ],
            0,
        )
        canvas = np.empty((side, side, 3), np.uint8)
        canvas[:] = np.round(glass).astype(np.uint8)
        y0, x0 = (h - side) // 2, (w - side) // 2
        ys, xs = max(y0, 0), max(x0, 0)
        ye, xe = min(y0 + side, h), min(x0 + side, w)
        canvas[ys - y0 : ye - y0, xs - x0 : xe - x0] = im[ys:ye, xs:xe]
        out.append(
            np.asarray(Image.fromarray(canvas).resize((min(h, w),) * 2, Image.Resampling.BILINEAR))
        )
    return out


def save_grid(
    crops: np.ndarray, labels, file: Path, per_class: int = 8, classes=SHARED_CLASSES
) -> None:
    """A PNG of ``per_class`` crops of every class (one row each), as the model sees them."""
    from PIL import Image

    labels = np.asarray(labels)
    rows = []
    for c in classes:
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) == 0:
            continue
        row = list(crops[idx]) + [np.full_like(crops[0], 255)] * (per_class - len(idx))
        rows.append(np.concatenate(row, 1))
    Image.fromarray(np.concatenate(rows, 0)).save(file)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("root", type=Path, help="folder holding <aug>-<lab>/model.safetensors")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", action="store_true", help="save PNG grids of the test crops")
    p.add_argument("--no-scale", action="store_true", help="skip the rescaled-PBC rows")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = Path("outputs/crosslab/cache")
    results = []
    for model_file in sorted(args.root.glob("*-*/model.safetensors")):
        model, config = load_network(model_file, cache=False)
        # Scored over the model's own classes: a held-out cell called "ig" by
        # an 8-class model is an error, not skipped.
        classes = tuple(config.spec.classes)
        holdout = config.training.get("holdout")
        if isinstance(holdout, list):
            holdout = holdout[0] if len(holdout) == 1 else None
        elif holdout is None and "labs" in config.training:  # napari_wbc.crosslab's models
            left = [lab for lab in LABS if lab not in config.training["labs"]]
            holdout = left[0] if len(left) == 1 else None
        fov_rbc = config.spec.fov_rbc
        name = model_file.parent.name
        t0 = time.time()
        if holdout in LABS:
            table, crops = cached_lab_crops(holdout, cache, 128, round(fov_rbc, 2))
            if holdout == "pbc":
                pass  # the whole of PBC: the model never saw it
            if args.grid:
                save_grid(crops, table["label"], args.root / f"grid-{holdout}.png")
            x = to_input(crops, config)
            labels = table["label"].tolist()
            rows = {
                "plain": score(probabilities(model, x), labels, classes),
                "d4": score(probabilities(model, x, tta=True), labels, classes),
            }
            adapted = adapt_batchnorm(model, x, balance=True)
            rows["adabn"] = score(probabilities(adapted, x), labels, classes)
            rows["adabn+d4"] = score(probabilities(adapted, x, tta=True), labels, classes)
            raw = adapt_batchnorm(model, x, balance=False)
            rows["adabn-raw"] = score(probabilities(raw, x), labels, classes)
            for how, r in rows.items():
                results.append({"model": name, "test": f"{holdout} (held out)", "how": how, **r})
        if "pbc" in config.training.get("train_labs", []):
            # The split the model was trained beside: of the table of its own classes.
            table, crops = cached_lab_crops("pbc", cache, 128, round(fov_rbc, 2), classes)
            _, va = stratified_split(table["label"].tolist(), 0.2, seed=0)
            labels = table["label"].iloc[va].tolist()
            x = to_input(crops[va], config)
            results.append(
                {
                    "model": name,
                    "test": "pbc validation",
                    "how": "plain",
                    **score(probabilities(model, x), labels, classes),
                }
            )
            results.append(
                {
                    "model": name,
                    "test": "pbc validation",
                    "how": "d4",
                    **score(probabilities(model, x, tta=True), labels, classes),
                }
            )
            if not args.no_scale:
                paths = table["path"].iloc[va].tolist()
                for factor in FACTORS:
                    imgs = rescaled_pbc(paths, factor)
                    measured = measure_crop_scale(imgs)
                    fixed = np.stack(
                        [
                            to_field_of_view(im, measured.rbc_diameter_px, fov_rbc, 128)
                            for im in imgs
                        ]
                    )
                    r = score(probabilities(model, to_input(fixed, config)), labels, classes)
                    results.append(
                        {
                            "model": name,
                            "test": f"pbc validation {factor}x fov",
                            "how": "scale measured",
                            "true_rbc_px": round(75.0 / factor, 1),
                            "measured_rbc_px": round(measured.rbc_diameter_px, 1),
                            "scale_method": measured.method,
                            **r,
                        }
                    )
        print(f"# {name}: {time.time() - t0:.0f} s", file=sys.stderr)

    print(
        "| model | test | how | n | macro-F1 | balanced acc. | per-class F1 (baso, eos, lym, mono, neut) |"
    )
    print("|---|---|---|---:|---:|---:|---|")
    for r in results:
        pcs = ", ".join(f"{r['per_class_f1'].get(c, float('nan')):.2f}" for c in SHARED_CLASSES)
        extra = (
            f" (RBC {r['measured_rbc_px']} px measured, {r['true_rbc_px']} true, {r['scale_method']})"
            if "measured_rbc_px" in r
            else ""
        )
        print(
            f"| {r['model']} | {r['test']}{extra} | {r['how']} | {r['n']} | {r['macro_f1']:.3f} | {r['balanced_accuracy']:.3f} | {pcs} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
