"""LISC through the product's path with each resize filter (issue #12).

    python -m research.lisc_resample_check outputs/lolo8c/dr-lisc/model.safetensors ...

Each model (trained without LISC) classifies every LISC crop with
``napari_wbc.prediction.evaluate`` (scale measured, as ``napari-wbc
evaluate`` does), once with the bilinear and once with the bicubic filter of
``napari_wbc.crop_scale.to_field_of_view``, without TTA and with every D4
view. A check that the filter chosen on PBC crops costs no other lab;
nothing is chosen here.
"""

from __future__ import annotations

import functools
import json
import sys

import napari_wbc.crop_scale as crop_scale
from napari_wbc.datasets import load_lab_table
from napari_wbc.inference import load_any
from napari_wbc.prediction import evaluate
from napari_wbc.threads import configure_threads


def main(paths: list[str]) -> int:
    configure_threads(2)
    table = load_lab_table("lisc")[["path", "label"]]
    plain = crop_scale.to_field_of_view
    for path in paths:
        model = load_any(path)
        for name in ("BILINEAR", "BICUBIC"):
            crop_scale.to_field_of_view = functools.partial(plain, resample=name)
            try:
                for tta in ("none", "d4"):
                    m = evaluate(model, table, tta=tta, exhaustive=True)
                    row = {"model": path, "filter": name, "tta": tta}
                    row |= {"macro_f1": round(m["macro_f1"], 4), "scale": m.get("crop_scale")}
                    print(json.dumps(row), flush=True)
            finally:
                crop_scale.to_field_of_view = plain
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
