"""Stage 2 on features of augmented crops: does a classifier refit on every lab's look transfer better? (#32)

    python -m research.stage2_augmented outputs/crosslab2 outputs/crosslab2-s2aug --views 4
    python -m research.lolo_adapt outputs/crosslab2-s2aug --json docs/crosslab/lolo-adapt-s2aug.json

The product's stage 2 (``napari_wbc.crosslab.iter_train_labs``) refits the classifier on
features of the *clean* training crops. Here each fold model's backbone is kept and its
classifier refit the same way (hybrid loss, the lab-and-class balanced draw, the recipe's
stage-2 epochs, learning rate and seed) on the clean features plus ``--views`` views of every
training crop under stage 1's domain randomization (stain re-mixing, optics, geometry); each
draw takes one of the views at random. The held-out lab is never read. The new fold models
are written to ``OUT/in-<lab>/model.safetensors`` for ``research/lolo_adapt.py`` and
``research/lolo_ensemble.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from napari_wbc.augment import DomainRandomization, randomize_batch
from napari_wbc.crosslab import (
    balanced_draw,
    lab_stain,
    lab_training_set,
    to_input,
    txl_stain_pool,
)
from napari_wbc.losses import HybridLoss
from napari_wbc.models.build import classifier_parameters, classify_features, extract_features
from napari_wbc.models.files import load_network, save_model
from napari_wbc.threads import configure_threads

CACHE = Path.home() / ".cache" / "napari-wbc" / "labs"


@torch.no_grad()
def features(model, crops, spec, rng, views, labs, stains, pool) -> list[torch.Tensor]:
    """Clean features, then ``views`` domain-randomized ones, of every crop."""
    mean = torch.tensor(spec.mean)[:, None, None]
    std = torch.tensor(spec.std)[:, None, None]
    aug = DomainRandomization()
    out = []
    for v in range(views + 1):
        part = []
        for s in range(0, len(crops), 128):
            if v == 0:
                x = to_input(crops[s : s + 128], spec.input_size, spec.mean, spec.std)
            else:
                src = [stains[lab] for lab in labs[s : s + 128]]
                x = randomize_batch(crops[s : s + 128], rng, spec.input_size, aug, src, pool)
                x = (x - mean) / std
            part.append(extract_features(model, x.contiguous(memory_format=torch.channels_last)))
        out.append(torch.cat(part))
        print(f"  view {v}: {len(crops)} crops", flush=True)
    return out


def refit(model, feats, y, labs, labels, n_classes: int, epochs: int, seed: int):
    for p in model.parameters():
        p.requires_grad_(False)
    head = list(classifier_parameters(model))
    for p in head:
        p.requires_grad_(True)
    criterion = HybridLoss(np.bincount(y, minlength=n_classes), beta=0.999, gamma=2.0)
    opt = torch.optim.AdamW(head, lr=1e-3, weight_decay=1e-4)
    rng = np.random.default_rng([seed, 999])
    stacked = torch.stack(feats)  # views x N x D
    for _ in range(epochs):
        draws = balanced_draw(labs, labels, len(y), rng)
        for s in range(0, len(draws), 128):
            idx = torch.from_numpy(draws[s : s + 128])
            view = torch.from_numpy(rng.integers(len(feats), size=len(idx)))
            loss = criterion(
                classify_features(model, stacked[view, idx]), torch.from_numpy(y[idx])
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--labs", nargs="+", default=["raabin", "lisc", "bccd"])
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    configure_threads(args.threads)
    for held in args.labs:
        model, config = load_network(args.root / f"in-{held}" / "model.safetensors", cache=False)
        model = model.to(memory_format=torch.channels_last).eval()
        train = config.training
        spec = config.spec
        classes = tuple(spec.classes)
        crops, labels, labs = lab_training_set(train["labs"], classes, spec.fov_rbc, CACHE)
        y = np.array([classes.index(v) for v in labels])
        stains = {lab: lab_stain(crops[labs == lab]) for lab in train["labs"]}
        pool = txl_stain_pool(skip=() if "raabin" in train["labs"] else ("raabin",))
        rng = np.random.default_rng([train["seed"], 4242])
        print(
            f"{held} held out: {len(y)} training cells, {args.views} augmented views", flush=True
        )
        feats = features(model, crops, spec, rng, args.views, labs, stains, pool)
        model = refit(model, feats, y, labs, labels, len(classes), train["epochs2"], train["seed"])
        out = args.out / f"in-{held}" / "model.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        note = f"{config.notes}; stage 2 refit on clean + {args.views} augmented views"
        save_model(out, model, dataclasses.replace(config, notes=note))
        print(f"  -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
