"""Label-free class-prior adaptation (EM, Saerens et al. 2002) on the held-out labs (issue #12).

    python -m research.crosslab_prior_em      # needs outputs/lolo8c and outputs/lolo8c-s1 fold models

The fold models of the shipped recipe (seeds 0 and 1) score their held-out
lab's cells; the class prior of those cells is re-estimated without labels,
starting from the uniform prior that class-aware stage 2 trains to, and the
probabilities are reweighted. Prints macro-F1 before -> after and writes
outputs/emprior/probe.json. No setting is tuned.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from benchmarks.bench_crosslab import probabilities, score, to_input

from napari_wbc.datasets import cached_lab_crops
from napari_wbc.models.files import load_network

RUNS = ("lolo8c", "lolo8c-s1")


def em_prior(p: np.ndarray, train_prior: np.ndarray, iters: int = 100, tol: float = 1e-6):
    """Probabilities reweighted to the prior EM estimates on ``p``, and that prior."""
    prior = train_prior.copy()
    for _ in range(iters):
        w = p * (prior / train_prior)[None]
        w /= w.sum(1, keepdims=True)
        new = w.mean(0)
        converged = np.abs(new - prior).max() < tol
        prior = new
        if converged:
            break
    w = p * (prior / train_prior)[None]
    return w / w.sum(1, keepdims=True), prior


def main() -> None:
    torch.set_num_threads(2)
    cache = Path("outputs/crosslab/cache")
    out = {}
    for lab in ("bccd", "lisc"):
        probs = {}
        for run in RUNS:
            model, config = load_network(Path(f"outputs/{run}/dr-{lab}/model.safetensors"))
            classes = tuple(config.spec.classes)
            table, crops = cached_lab_crops(lab, cache, 128, round(config.spec.fov_rbc, 2))
            x = to_input(crops, config)
            labels = table["label"].tolist()
            for tta in (False, True):
                probs[f"{run} d4={tta}"] = probabilities(model, x, tta=tta)
        probs["ensemble d4=True"] = np.mean([probs[f"{run} d4=True"] for run in RUNS], axis=0)
        uniform = np.full(len(classes), 1 / len(classes))
        out[lab] = {}
        for key, p in probs.items():
            adapted, prior = em_prior(p, uniform)
            row = {
                "base": score(p, labels, classes)["macro_f1"],
                "em": score(adapted, labels, classes)["macro_f1"],
                "prior": dict(zip(classes, np.round(prior, 3).tolist(), strict=True)),
            }
            out[lab][key] = row
            print(lab, key, f"{row['base']:.4f} -> {row['em']:.4f}", flush=True)
    Path("outputs/emprior").mkdir(parents=True, exist_ok=True)
    Path("outputs/emprior/probe.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
