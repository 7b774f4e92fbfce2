"""Replay doubt-gating policies on the per-view outputs of research/gate_study.py (issue #15).

    python -m research.gate_policies outputs/gate/views

For each set and policy: macro-F1 against every view of every member (the
exhaustive result), predictions changed, and network cost per crop in
milliseconds (each member's measured cost of one view).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from napari_wbc.metrics import classification_metrics
from napari_wbc.routing import load_router
from napari_wbc.trust import softmax

# ms per crop for one view (batch 32, 2 threads, folded batch norms), on the
# 2-core AVX2 machine of 2026-12-01 (an AVX-512 one measured 3.4, 1.6, 1.2).
COST = {"wbc-pbc": [9.8, 4.7, 3.4], "wbc-lite": [1.2, 1.2, 1.2]}


class Replay:
    def __init__(self, path: Path, ensemble):
        d = np.load(path)
        self.logits = d["logits"].astype(np.float64)  # (M, V, N, C)
        m = self.logits.shape[0]
        self.features = [d[f"features{j}"].astype(np.float64) for j in range(m)]
        self.labels = d["labels"]
        self.ens = ensemble
        self.trust = ensemble.trust
        base = str(d["model"]).split(" ")[0]
        self.cost = COST.get(base, [1.0] * m)
        self.dist = np.zeros((m, self.logits.shape[1], self.logits.shape[2]))
        self.classes = list(ensemble.classes)

    def output(self, views: np.ndarray):
        """Ensemble output when member j has seen views[j] (N,) first views (0: not run)."""
        m, v, n, c = self.logits.shape
        t = self.trust.temperature
        w = self.ens.weights.astype(float)
        probs = np.zeros((n, c))
        wsum = np.zeros(n)
        member_probs = np.zeros((m, n, c))
        dist = np.zeros((m, n))
        for j in range(m):
            k = views[j]
            has = k > 0
            mask = (np.arange(v)[:, None] < k[None]).astype(float)  # (V, N)
            mean_logit = (self.logits[j] * mask[..., None]).sum(0) / np.maximum(k, 1)[:, None]
            mp = softmax(mean_logit, t)
            member_probs[j] = mp
            probs += w[j] * mp * has[:, None]
            wsum += w[j] * has
            f = (self.features[j] * mask[..., None]).sum(0) / np.maximum(k, 1)[:, None]
            dist[j] = self.trust.features[j].distance(f)
        probs /= np.maximum(wsum, 1e-9)[:, None]
        present = views > 0
        ood = (dist * present).sum(0) / np.maximum(present.sum(0), 1)
        pred = probs.argmax(1)
        disagree = ((member_probs.argmax(2) != pred[None]) & present).sum(0) / np.maximum(
            present.sum(0), 1
        )
        conf = probs.max(1)
        return pred, conf, disagree, ood, dist, member_probs

    def doubt(self, out, conf_min=None, ood_k=1.0):
        _, conf, dis, ood, _, _ = out
        s = self.trust
        return (
            (conf < (conf_min or s.min_confidence))
            | (dis > s.max_disagreement)
            | (ood > s.ood_threshold * ood_k)
        )

    def score(self, pred):
        keep = self.labels >= 0
        return classification_metrics(self.labels[keep], pred[keep], self.classes)["macro_f1"]

    def cost_of(self, views):
        return float(sum(self.cost[j] * views[j].mean() for j in range(len(self.cost))))


def run_policy(r: Replay, stages):
    """stages: list of (views per member tuple, doubt kwargs or None for last)."""
    m, _, n, _ = r.logits.shape
    views = np.zeros((m, n), int)
    active = np.ones(n, bool)
    for target, kw in stages:
        for j in range(m):
            views[j][active] = np.maximum(views[j][active], target[j])
        if kw is None:
            break
        out = r.output(views)
        active &= r.doubt(out, **kw)
    out = r.output(views)
    return out[0], views


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("folder", type=Path)
    p.add_argument("--only", default=None, help="policies whose name starts with this")
    p.add_argument(
        "--sets",
        nargs="*",
        default=["pbc", "lisc", "bccd", "slide"],
        help="saved sets to replay (slide: research/slide_gate_views.py's, if saved)",
    )
    args = p.parse_args(argv)
    router = load_router()
    ens = {"wbc-pbc": router.specialist, "wbc-lite": router.generalist}
    for name in args.sets:
        if not (args.folder / f"{name}.npz").exists():
            print(f"\n{name}: not saved, skipped")
            continue
        d = np.load(args.folder / f"{name}.npz")
        # An adapted model ("wbc-lite (adapted)") keeps its base's trust statistics.
        r = Replay(args.folder / f"{name}.npz", ens[str(d["model"]).split(" ")[0]])
        m = r.logits.shape[0]
        full = np.full((m, r.logits.shape[2]), 8)
        ref = r.output(full)[0]
        f_ref = r.score(ref)
        print(
            f"\n{name} ({d['model']}, {len(ref)} cells): exhaustive F1 {f_ref:.4f}, "
            f"cost {r.cost_of(full):.1f} ms"
        )
        order = list(np.argsort(r.cost))
        no = np.inf

        def members(k, views=1, order=order, m=m):
            return tuple(views if j in order[:k] else 0 for j in range(m))

        policies = {"current": [((1,) * m, {}), ((8,) * m, None)]}
        for c in (0.6, 0.7):
            policies[f"no-ood {c}"] = [((1,) * m, {"conf_min": c, "ood_k": no}), ((8,) * m, None)]
            for c4 in (0.6, 0.8, 0.9):
                policies[f"no-ood {c} -> 4v {c4}"] = [
                    ((1,) * m, {"conf_min": c, "ood_k": no}),
                    ((4,) * m, {"conf_min": c4, "ood_k": no}),
                    ((8,) * m, None),
                ]
            policies[f"no-ood {c} -> 2v -> 4v 0.8"] = [
                ((1,) * m, {"conf_min": c, "ood_k": no}),
                ((2,) * m, {"conf_min": 0.8, "ood_k": no}),
                ((4,) * m, {"conf_min": 0.8, "ood_k": no}),
                ((8,) * m, None),
            ]
        for c1 in (0.9, 0.95, 0.99):
            policies[f"2 cheap agree {c1} -> no-ood 0.6 -> 4v 0.8"] = [
                (members(2), {"conf_min": c1, "ood_k": no}),
                ((1,) * m, {"conf_min": 0.6, "ood_k": no}),
                ((4,) * m, {"conf_min": 0.8, "ood_k": no}),
                ((8,) * m, None),
            ]
            policies[f"cheap {c1} -> 2 cheap {c1} -> no-ood 0.6 -> 4v 0.8"] = [
                (members(1), {"conf_min": c1, "ood_k": no}),
                (members(2), {"conf_min": c1, "ood_k": no}),
                ((1,) * m, {"conf_min": 0.6, "ood_k": no}),
                ((4,) * m, {"conf_min": 0.8, "ood_k": no}),
                ((8,) * m, None),
            ]
        for c4 in (0.6, 0.8):
            policies[f"SHIP? 2 cheap 0.99 -> all 0.6 -> 4v {c4} -> 8v"] = [
                (members(2), {"conf_min": 0.99, "ood_k": no}),
                ((1,) * m, {"conf_min": 0.6, "ood_k": no}),
                ((4,) * m, {"conf_min": c4, "ood_k": no}),
                ((8,) * m, None),
            ]

        def split(expensive, cheap, order=order, m=m):
            """The costliest member sees ``expensive`` views, the others ``cheap``."""
            return tuple(expensive if j == order[-1] else cheap for j in range(m))

        s12 = [
            (members(2), {"conf_min": 0.99, "ood_k": no}),
            ((1,) * m, {"conf_min": 0.6, "ood_k": no}),
        ]
        policies["NEW 4v last"] = [*s12, ((4,) * m, None)]
        policies["NEW 4v 0.6 -> cheap 8v"] = [
            *s12,
            ((4,) * m, {"conf_min": 0.6, "ood_k": no}),
            (split(4, 8), None),
        ]
        policies["NEW cheap 4v 0.6 -> all 8v"] = [
            *s12,
            (split(1, 4), {"conf_min": 0.6, "ood_k": no}),
            ((8,) * m, None),
        ]
        policies["NEW cheap 4v 0.6 -> cheap 8v"] = [
            *s12,
            (split(1, 4), {"conf_min": 0.6, "ood_k": no}),
            (split(1, 8), None),
        ]
        policies["NEW cheap 8v last"] = [*s12, (split(1, 8), None)]
        policies["NEW cheap 4v 0.6 -> 4v 0.6 -> 8v"] = [
            *s12,
            (split(1, 4), {"conf_min": 0.6, "ood_k": no}),
            ((4,) * m, {"conf_min": 0.6, "ood_k": no}),
            ((8,) * m, None),
        ]
        for c2 in (0.7, 0.8):
            shipped = " (shipped)" if c2 == 0.7 else ""
            policies[f"NEW all {c2} -> 4v last{shipped}"] = [
                (members(2), {"conf_min": 0.99, "ood_k": no}),
                ((1,) * m, {"conf_min": c2, "ood_k": no}),
                ((4,) * m, None),
            ]
        for c3 in (0.5, 0.4):
            policies[f"NEW 4v {c3} -> 8v"] = [
                *s12,
                ((4,) * m, {"conf_min": c3, "ood_k": no}),
                ((8,) * m, None),
            ]
        if args.only:
            policies = {k: v for k, v in policies.items() if k.startswith(args.only)}
        for key, stages in policies.items():
            pred, views = run_policy(r, stages)
            print(
                f"  {key:34s} F1 {r.score(pred):.4f} Δ {r.score(pred) - f_ref:+.4f} "
                f"changed {(pred != ref).sum():3d} cost {r.cost_of(views):5.2f} ms "
                f"speed-up {r.cost_of(full) / r.cost_of(views):5.2f}x"
            )


if __name__ == "__main__":
    main()
