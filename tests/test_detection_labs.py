"""Detection on real fields of three labs, with the scale measured as classify does.

Floors sit a little under the figures measured on these fields (see
docs/results.md, "White-cell detection across labs"): a detector change that
loses cells or finds false ones on any lab fails here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_wbc.datasets import decode_image
from napari_wbc.detection import dedupe_boxes, detect_cells, detection_scores, match_detections
from napari_wbc.errors import ScaleError
from napari_wbc.scale import estimate_rbc_diameter, folder_scales

pytestmark = pytest.mark.realdata

FIELDS = 12

# source: (boxes file, white-cell label, source column value, precision floor, recall floor)
SOURCES = {
    "bccd": ("bccd/boxes.csv", "WBC", None, 0.9, 0.9),
    "txl-raabin": ("txl/boxes.csv", "wbc", "raabin", 0.9, 0.9),
    "txl-bcd": ("txl/boxes.csv", "wbc", "bcd", 0.9, 0.9),
}


def _fields(data_dir, name):
    file, label, source, *_ = SOURCES[name]
    if not (data_dir / file).exists():
        pytest.skip(f"{data_dir / file} not found")
    boxes = pd.read_csv(data_dir / file)
    if source is not None:
        boxes = boxes[boxes["source"] == source]
    paths = sorted(boxes["path"].unique())
    # Every k-th field: the same spread of the set each time.
    picked = [paths[i] for i in np.linspace(0, len(paths) - 1, FIELDS).round().astype(int)]
    root = data_dir / file.split("/")[0]
    return [
        (decode_image(root / p), boxes[(boxes.path == p) & (boxes.label == label)]) for p in picked
    ]


@pytest.mark.parametrize("name", list(SOURCES))
def test_detection_holds_on_each_lab_with_the_scale_measured(data_dir, name):
    fields = _fields(data_dir, name)
    estimates = {}
    for i, (image, _) in enumerate(fields):
        try:
            estimates[i] = estimate_rbc_diameter(image)
        except ScaleError:
            estimates[i] = None
    scales = folder_scales(estimates)  # one folder of fields, as napari-wbc classify does
    tp = fp = fn = 0
    for i, (image, boxes) in enumerate(fields):
        found = detect_cells(image, rbc_diameter_px=scales[i].rbc_diameter_px)
        found = found[found["kind"] == "wbc"]
        m = match_detections(found, dedupe_boxes(boxes))
        tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
    scores = detection_scores(tp, fp, fn)
    precision, recall = scores["precision"], scores["recall"]
    print(f"{name}: precision {precision:.3f}, recall {recall:.3f} ({tp + fn} cells)")
    _, _, _, p_floor, r_floor = SOURCES[name]
    assert tp + fn >= FIELDS
    assert precision >= p_floor
    assert recall >= r_floor
