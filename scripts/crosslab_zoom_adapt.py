"""Leave one lab out: test-time zoom, prototype adaptation and the 5-part panel together (#12).

    python scripts/crosslab_zoom_adapt.py outputs/lolo8c outputs/lolo8c-s1

The two seeds' fold models of each held-out lab make one ensemble (as in
scripts/crosslab_adapt_product.py) and classify its cells through
``evaluate``'s path (scale measured, stain fitted, doubt-gated D4), with the
measured scale multiplied by k before the crops are cut. k is the one the
*other* held-out lab preferred (docs/crosslab/test-time-zoom.md: LISC chose
0.78, BCCD 0.85), and 1.0 for reference. Each with and without prototype
adaptation, over all eight classes and the 5-part panel.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from bench_gate import lab_sets

from napari_wbc.inference import Ensemble, EnsembleMember
from napari_wbc.models.files import load_model
from napari_wbc.prediction import evaluate
from napari_wbc.threads import configure_threads

#: k chosen on the other held-out lab.
OTHER_LABS_K = {"lisc": 0.85, "bccd": 0.78}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", type=Path, nargs="+")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    configure_threads(2)
    sets = lab_sets(0, Path(tempfile.mkdtemp()))
    names = {"lisc": "LISC", "bccd": "BCCD"}
    rows = []
    for lab in ("bccd", "lisc"):
        members = []
        for root in args.roots:
            model, config = load_model(root / f"dr-{lab}" / "model.safetensors", cache=False)
            members.append(EnsembleMember(model, config, 1.0))
        ensemble = Ensemble(members, tta="d4", name=f"fold {lab}")
        table = sets[names[lab]][["path", "label"]]
        found = ensemble.preprocessor.resolve_crop_scale(
            table["path"].astype(str).tolist(), "measure"
        )
        for k in (1.0, OTHER_LABS_K[lab]):
            for classes in (None, "5-part"):
                for adapt in (False, "prototypes"):
                    m = evaluate(
                        ensemble,
                        table,
                        scale=found.rbc_diameter_px * k,
                        adapt=adapt,
                        classes=classes,
                    )
                    row = {
                        "fold": lab,
                        "k": k,
                        "classes": classes or "all",
                        "adapt": adapt or "none",
                        "n": int(m["n"]),
                        "macro_f1": round(float(m["macro_f1"]), 4),
                        "per_class_f1": {
                            c: round(float(v["f1"]), 3) for c, v in m["per_class"].items()
                        },
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
