"""Decoupled two-stage training of one classifier.

The recipe of arXiv 2603.01976 for long-tailed white-cell classes:

* **Stage 1 (representation).** The whole network is trained with plain
  cross-entropy on instance-balanced batches (every crop equally likely), so
  the abundant classes shape good features.
* **Stage 2 (classifier).** The backbone is frozen. Features of the training
  crops are extracted once (without augmentation) with the best stage-1
  model and kept in memory; only the linear classifier is retrained on them,
  with class-aware sampling (every class equally likely) and the hybrid loss
  (effective-number class weights × focal modulation), which moves the
  decision boundaries towards the rare classes.

Each stage keeps the epoch with the best validation macro-F1 (a seeded,
stratified split of the data). Stage 2 starts from the stage-1 classifier
rather than a re-initialised one: on a CPU budget of a few epochs this
converges faster, and since the starting head is validated too ("epoch 0"),
stage 2 can only keep or improve stage 1's validation macro-F1.

Crops are stain-normalised (by default): the stain statistics of the training
set, pooled over a sample of its crops, are the source, and the built-in
reference is the target; both are stored in the model file, and the model's
:class:`~napari_wbc.preprocess.Preprocessor` normalises other crops to it the
same way (evaluation and prediction are in :mod:`napari_wbc.prediction`).

Training is a generator (:func:`iter_train`); closing it cancels at the next
batch. A checkpoint is written after every epoch in ``<output>.ckpt/``, so an
interrupted run resumes from its last complete epoch, and the model file
itself is written (atomically) only at the very end.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from napari_wbc.atomic import atomic_write
from napari_wbc.datasets import (
    CropCache,
    CropDataset,
    class_counts,
    load_labelled_crops,
    stratified_split,
)
from napari_wbc.errors import Checked, DataError, WBCError
from napari_wbc.losses import HybridLoss
from napari_wbc.metrics import classification_metrics
from napari_wbc.models.build import (
    build_model,
    classifier_modules,
    classifier_parameters,
    classify_features,
    extract_features,
    freeze_backbone,
    get_device,
)
from napari_wbc.models.files import (
    ModelConfig,
    load_network,
    read_model_config,
    save_model,
)
from napari_wbc.models.registry import get_spec
from napari_wbc.preprocess import STAIN_SAMPLE_CROPS, Preprocessor
from napari_wbc.progress import Progress, ProgressGen, run
from napari_wbc.sampling import ClassAwareSampler, InstanceBalancedSampler
from napari_wbc.stain import stain_methods

logger = logging.getLogger(__name__)

__all__ = [
    "STAGES",
    "TrainConfig",
    "checkpoint_dir",
    "iter_train",
    "train",
    "validation_split",
]

#: Values of :attr:`TrainConfig.stages`.
STAGES = ("both", "stage1", "stage2")
#: Layout version of the checkpoint folder; other versions are not resumed.
CHECKPOINT_VERSION = 1


class CheckedConfig(Checked):
    """A training config: ``validate`` (:class:`~napari_wbc.errors.Checked`) and ``to_dict``."""

    label = "training config"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(CheckedConfig):
    """How to train one model.

    Parameters
    ----------
    spec : str
        Name of a member spec of a preset (e.g. "lite-resnet18", "tiny-resnet").
    epochs_stage1, epochs_stage2 : int
        Epochs of representation learning and of classifier re-training.
    batch_size : int
        Crops per batch (stage 1) and features per batch (stage 2).
    lr_stage1, lr_stage2 : float
        Peak AdamW learning rates; each stage decays its rate along a cosine.
    weight_decay : float
        AdamW weight decay.
    beta, gamma : float
        Hybrid loss of stage 2: effective-number beta and focal gamma.
    val_fraction : float
        Fraction of each class held out for validation.
    seed : int
        Seed of the split, the initial weights, sampling and augmentation.
    stain_normalize : bool
        Normalise crops from the training set's pooled stain statistics to
        the built-in reference.
    stain_method : str
        Normalisation method, one of :func:`napari_wbc.stain.stain_methods`
        (not "none": use ``stain_normalize=False``).
    input_size : int, optional
        Override the spec's network input side (small sizes for tests).
    cache_size : int, optional
        Side of the decoded crops kept in memory; default 1.25 × input size,
        so augmentation can zoom in without upsampling.
    num_threads : int, optional
        CPU threads for torch during training; default: torch's choice.
    stages : {"both", "stage1", "stage2"}
        "stage2" re-trains the classifier of the model already at the output
        path (for instance one trained with "stage1").
    device : str
        "auto", "cpu", "cuda", "mps".
    augment : bool
        Augment crops in stage 1.
    base_model : str, optional
        Fine-tune: a model file whose weights initialise the network (stages
        "both" and "stage1"). Its architecture, input size and stain target
        replace ``spec`` and ``input_size``; the new model knows the base
        model's classes plus any new class in the data, and the classifier
        rows of new classes are freshly initialised.
    """

    spec: str = "lite-resnet18"
    epochs_stage1: int = 10
    epochs_stage2: int = 10
    batch_size: int = 32
    lr_stage1: float = 1e-3
    lr_stage2: float = 1e-3
    weight_decay: float = 1e-4
    beta: float = 0.999
    gamma: float = 2.0
    val_fraction: float = 0.2
    seed: int = 0
    stain_normalize: bool = True
    stain_method: str = "macenko"
    input_size: int | None = None
    cache_size: int | None = None
    num_threads: int | None = None
    stages: str = "both"
    device: str = "auto"
    augment: bool = True
    base_model: str | None = None

    def problems(self) -> list[str]:
        """Return what is wrong with this config (empty when usable)."""
        out = []
        if self.stages not in STAGES:
            out.append(f"stages must be one of {', '.join(STAGES)}, got {self.stages!r}")
        for key in ("epochs_stage1", "epochs_stage2"):
            if int(getattr(self, key)) < 0:
                out.append(f"{key} must be >= 0")
        if self.stages in ("both", "stage1") and self.epochs_stage1 < 1:
            out.append("stage 1 needs at least one epoch (epochs_stage1 >= 1)")
        if self.batch_size < 1:
            out.append("batch_size must be >= 1")
        if not 0.0 < self.val_fraction < 1.0:
            out.append(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        methods = [m for m in stain_methods() if m != "none"]
        if self.stain_method not in methods:
            out.append(
                f"stain_method must be one of {', '.join(methods)}, got {self.stain_method!r}"
            )
        if self.input_size is not None and self.input_size < 8:
            out.append("input_size must be at least 8 px")
        if self.cache_size is not None and self.cache_size < 8:
            out.append("cache_size must be at least 8 px")
        if self.base_model and self.stages == "stage2":
            out.append(
                "base_model is for stages 'both' and 'stage1'; stage 2 alone "
                "re-trains the model already at the output path"
            )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def checkpoint_dir(output: str | os.PathLike) -> Path:
    """Folder holding the resumable checkpoint of a training run writing ``output``."""
    output = Path(output)
    return output.with_name(output.name + ".ckpt")


# --------------------------------------------------------------------- training


def train(
    data: pd.DataFrame | str | os.PathLike,
    config: TrainConfig,
    output: str | os.PathLike,
    callback: Callable[[Progress], None] | None = None,
    resume: bool = True,
) -> Path:
    """Train a model to the end; see :func:`iter_train`."""
    return run(iter_train(data, config, output, resume=resume), callback)


def iter_train(
    data: pd.DataFrame | str | os.PathLike,
    config: TrainConfig,
    output: str | os.PathLike,
    resume: bool = True,
) -> ProgressGen[Path]:
    """Train one classifier in two decoupled stages, yielding progress.

    Parameters
    ----------
    data : DataFrame or path
        Labelled crops (``path``, ``label`` columns, as from
        :func:`napari_wbc.datasets.load_labelled_crops`), or a CSV / folder
        to read them from.
    config : TrainConfig
        What to train and how.
    output : path-like
        Model file to write (``.safetensors``); its folder is created.
    resume : bool
        Continue from the checkpoint in ``<output>.ckpt/`` when it belongs to
        the same data and config; otherwise start afresh.

    Yields
    ------
    Progress
        Stage "cache" while decoding crops, "stage1" / "stage2" per batch
        (``info``: epoch, batch, loss) and at the end of each epoch
        (``info``: epoch, loss, val_macro_f1, best_val_macro_f1).

    Returns
    -------
    Path
        The model file written. Its config holds the spec (with the data's
        classes), the stain reference, this training config, the per-epoch
        history and the validation metrics of the saved weights.

    Raises
    ------
    DataError
        When the data are unusable (too few crops per class, ...).
    WBCError
        When the config is invalid.
    """
    config = copy.deepcopy(config).validate()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    df = data if isinstance(data, pd.DataFrame) else load_labelled_crops(data)
    if len(df) == 0:
        raise DataError("no labelled crops to train on")
    old_threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    try:
        return (yield from _Trainer(df, config, output, resume).iter_run())
    finally:
        torch.set_num_threads(old_threads)


def validation_split(data: pd.DataFrame, config: TrainConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The training and validation rows :func:`iter_train` uses for ``data`` and ``config``."""
    train_idx, val_idx = stratified_split(
        [str(v) for v in data["label"]],
        config.val_fraction,
        seed=config.seed,
    )
    return data.iloc[train_idx], data.iloc[val_idx]


def _order_classes(labels: Sequence[str], preferred: Sequence[str]) -> tuple[str, ...]:
    """Classes present in ``labels``: those of ``preferred`` in its order, then the rest sorted."""
    present = set(labels)
    return tuple(c for c in preferred if c in present) + tuple(sorted(present - set(preferred)))


def _cosine_lr(peak: float, epoch: int, epochs: int) -> float:
    """Learning rate of ``epoch`` on a cosine from ``peak`` down to 5 % of it."""
    if epochs <= 1:
        return peak
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * epoch / epochs)))


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> float:
    return float(classification_metrics(y_true, y_pred, classes)["macro_f1"])


class _Trainer:
    """State of one training run (split, caches, checkpoint); driven by :meth:`iter_run`."""

    def __init__(self, df: pd.DataFrame, config: TrainConfig, output: Path, resume: bool):
        self.config = config
        self.output = output
        self.ckpt = checkpoint_dir(output)
        self.device = get_device(config.device)
        paths = [str(p) for p in df["path"]]
        labels = [str(v) for v in df["label"]]

        if config.stages == "stage2":
            if not output.is_file():
                raise DataError(
                    f"stages='stage2' re-trains the classifier of an existing model, but "
                    f"{output} does not exist; train stage 1 first"
                )
            _, base_config = load_network(output, cache=False)
            spec = base_config.spec
            unknown = sorted(set(labels) - set(spec.classes))
            if unknown:
                raise DataError(
                    f"{output} does not know the classes {unknown}; retrain both stages"
                )
            self.base_config = base_config
            self.init_config = None
        elif config.base_model:
            # Fine-tuning: keep every class the base model knows, add the new ones.
            init_config = read_model_config(config.base_model)
            spec = dataclasses.replace(
                init_config.spec,
                classes=tuple(init_config.classes)
                + tuple(sorted(set(labels) - set(init_config.classes))),
            )
            self.base_config = None
            self.init_config = init_config
        else:
            spec = get_spec(config.spec)
            spec = dataclasses.replace(spec, classes=_order_classes(labels, spec.classes))
            if config.input_size:
                spec = dataclasses.replace(spec, input_size=int(config.input_size))
                if "img_size" in spec.timm_kwargs:
                    spec.timm_kwargs = dict(spec.timm_kwargs, img_size=int(config.input_size))
            self.base_config = None
            self.init_config = None
        self.spec = spec.validate()
        self.classes = spec.classes
        index = {c: i for i, c in enumerate(self.classes)}
        self.paths = paths
        self.y = np.array([index[v] for v in labels], dtype=np.int64)
        # Split on the label names, so validation_split() reproduces it from the table.
        self.train_idx, self.val_idx = stratified_split(labels, config.val_fraction, config.seed)
        self.cache_size = int(config.cache_size or round(spec.input_size * 1.25))
        self.cache = CropCache(self.cache_size)
        digest = hashlib.sha256()
        for p, v in zip(paths, labels, strict=True):
            digest.update(f"{p}\t{v}\n".encode())
        self.fingerprint = digest.hexdigest()
        self.state = self._load_checkpoint() if resume else None
        if not resume and self.ckpt.exists():
            shutil.rmtree(self.ckpt)

    # -- the run

    def iter_run(self) -> ProgressGen[Path]:
        config = self.config
        stain_source = yield from self._iter_prepare_stain()
        train_ds, eval_ds, val_ds = self._datasets()
        all_ds = CropDataset(
            self.paths,
            self.y,
            self.cache,
            self.spec.input_size,
            self.spec.mean,
            self.spec.std,
            False,
            self.normalizer,
        )
        yield from all_ds.iter_fill_cache()

        state = self.state or {
            "version": CHECKPOINT_VERSION,
            "fingerprint": self.fingerprint,
            "config": config.to_dict(),
            "stain_source": stain_source,
            "stage": "stage1" if config.stages != "stage2" else "stage2",
            "epoch": 0,
            "best": None,
            "history": [],
            "weights": None,
            "best_weights": None,
            "optimizer": None,
            "pretrained": None,
        }
        self.state = state
        model = self._initial_model(state)

        if state["stage"] == "stage1":
            yield from self._iter_stage1(model, train_ds, val_ds)
            # The best stage-1 weights are the starting point of stage 2.
            model.load_state_dict(self._read_weights(state["best_weights"]))
            if config.stages == "both" and config.epochs_stage2 > 0:
                state.update(stage="stage2", epoch=0, best=None, optimizer=None)
                self._write_checkpoint(model, model.state_dict())
        if state["stage"] == "stage2" and config.stages != "stage1":
            yield from self._iter_stage2(model, eval_ds, val_ds)
            model.load_state_dict(self._read_weights(state["best_weights"]))

        metrics = yield from self._iter_final_metrics(model, val_ds)
        training = config.to_dict()
        training.update(
            stain_source=stain_source,
            n_train=len(self.train_idx),
            n_val=len(self.val_idx),
            train_class_counts=dict(
                zip(
                    self.classes,
                    class_counts(self.y[self.train_idx], len(self.classes)),
                    strict=True,
                ),
            ),
            stage2_classifier="initialised from stage 1",
            pretrained=state.get("pretrained"),
        )
        history = state["history"]
        if self.base_config is not None:
            history = list(self.base_config.history) + history
        model_config = ModelConfig(
            spec=self.spec,
            name=self.output.stem,
            stain=self.target.to_dict() if self.target is not None else None,
            training=training,
            history=history,
            metrics=metrics,
        )
        model.to("cpu").eval()
        path = save_model(self.output, model, model_config)
        shutil.rmtree(self.ckpt, ignore_errors=True)
        yield Progress("done", 1, 1, f"saved {path}", {"metrics": metrics})
        return path

    # -- preparation

    def _iter_prepare_stain(self) -> ProgressGen[dict | None]:
        """Fit (or restore) the source stain statistics and build the normalizer."""
        from napari_wbc.stain import (
            StainNormalizer,
            StainReference,
            default_reference,
            fit_stain_reference,
        )

        self.normalizer = self.target = None
        if self.base_config is not None:
            # Stage 2 of an existing model: use the normalisation it was trained with.
            preprocessor = Preprocessor.from_configs([self.base_config])
            self.normalizer = preprocessor.training_normalizer()
            if self.normalizer is None:
                return None
            self.target = StainReference.from_dict(preprocessor.stain_target)
            return preprocessor.stain_training_source
        if not self.config.stain_normalize:
            return None
        if self.init_config is not None and self.init_config.stain is None:
            # The base model was trained on colours as they are (the built-in
            # model learned under randomized stains): fine-tune it the same way.
            logger.info(
                "base model %s takes colours as they are; no stain normalization",
                self.init_config.name,
            )
            return None
        if self.state is not None and self.state.get("stain_source"):
            source = StainReference.from_dict(self.state["stain_source"])
        else:
            rng = np.random.default_rng(self.config.seed)
            pick = rng.permutation(self.train_idx)[:STAIN_SAMPLE_CROPS]
            pixels = []
            for i, j in enumerate(pick, 1):
                pixels.append(self.cache.get(self.paths[j]).reshape(-1, 3))
                if i % 8 == 0 or i == len(pick):
                    yield Progress("stain", i, len(pick), "fitting the training set's stains")
            source = fit_stain_reference(
                np.concatenate(pixels),
                description=f"{len(pick)} training crops",
            )
        self.target = default_reference()
        if self.init_config is not None and self.init_config.stain is not None:
            # A fine-tuned backbone expects crops normalised as its base model saw them.
            self.target = StainReference.from_dict(self.init_config.stain)
        self.normalizer = StainNormalizer(self.config.stain_method, source, self.target)
        return source.to_dict()

    def _datasets(self) -> tuple[CropDataset, CropDataset, CropDataset]:
        spec, seed = self.spec, self.config.seed
        common = dict(
            cache=self.cache,
            input_size=spec.input_size,
            mean=spec.mean,
            std=spec.std,
            stain_normalizer=self.normalizer,
        )
        paths = np.asarray(self.paths, dtype=object)
        tr, va = self.train_idx, self.val_idx
        train_ds = CropDataset(
            paths[tr],
            self.y[tr],
            train=self.config.augment,
            seed=seed,
            **common,
        )
        eval_ds = CropDataset(paths[tr], self.y[tr], train=False, **common)
        val_ds = CropDataset(paths[va], self.y[va], train=False, **common)
        return train_ds, eval_ds, val_ds

    def _initial_model(self, state: dict) -> torch.nn.Module:
        if self.base_config is not None and state["weights"] is None:
            model, _ = load_network(self.output, cache=False)
        else:
            torch.manual_seed(self.config.seed)
            if self.init_config is not None:
                model, _ = build_model(self.spec, pretrained=False)
                if state["weights"] is None:
                    _init_from_base(model, self.spec.classes, self.config.base_model)
                state["pretrained"] = {"loaded": True, "source": str(self.config.base_model)}
            else:
                model, info = build_model(self.spec)
                if state.get("pretrained") is None:
                    state["pretrained"] = {"loaded": info.pretrained_loaded, "source": info.source}
        if state["weights"] is not None:
            model.load_state_dict(self._read_weights(state["weights"]))
        return model.to(self.device)

    # -- stage 1

    def _iter_stage1(self, model, train_ds: CropDataset, val_ds: CropDataset) -> ProgressGen[None]:
        config, state = self.config, self.state
        epochs = config.epochs_stage1
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=config.lr_stage1,
            weight_decay=config.weight_decay,
        )
        if state["optimizer"] is not None:
            optimizer.load_state_dict(self._read_optimizer(state["optimizer"], optimizer))
        sampler = InstanceBalancedSampler(len(train_ds), seed=config.seed)
        drop_last = len(train_ds) > config.batch_size  # batch norm cannot train on 1 item
        n_batches = (
            len(train_ds) // config.batch_size
            if drop_last
            else math.ceil(len(train_ds) / config.batch_size)
        )
        best = state["best"]
        best_weights = self._read_weights(state["best_weights"]) if state["best_weights"] else None
        for epoch in range(state["epoch"], epochs):
            # Seeding per epoch makes a resumed run draw what an uninterrupted one would.
            torch.manual_seed(config.seed * 100_003 + epoch)
            sampler.set_epoch(epoch)
            train_ds.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                train_ds,
                batch_size=config.batch_size,
                sampler=sampler,
                num_workers=0,
                drop_last=drop_last,
            )
            lr = _cosine_lr(config.lr_stage1, epoch, epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            total_loss, seen = 0.0, 0
            for b, (x, y) in enumerate(loader, 1):
                x, y = x.to(self.device), y.to(self.device)
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * len(y)
                seen += len(y)
                yield Progress(
                    "stage1",
                    epoch * n_batches + b,
                    epochs * n_batches,
                    f"epoch {epoch + 1}/{epochs} batch {b}/{n_batches} loss {loss.item():.3f}",
                    {"epoch": epoch + 1, "batch": b, "loss": loss.item()},
                )
            probs = yield from self._iter_predict_dataset(model, val_ds, "stage1")
            f1 = _macro_f1(val_ds.labels, probs.argmax(1), self.classes)
            if best is None or f1 > best:
                best = f1
                best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            entry = {
                "stage": 1,
                "epoch": epoch + 1,
                "lr": lr,
                "loss": total_loss / max(seen, 1),
                "val_macro_f1": f1,
            }
            state["history"].append(entry)
            state.update(epoch=epoch + 1, best=best)
            self._write_checkpoint(model, best_weights, optimizer)
            yield self._epoch_event("stage1", entry, epochs, (epoch + 1) * n_batches, best)

    # -- stage 2

    def _iter_stage2(self, model, eval_ds: CropDataset, val_ds: CropDataset) -> ProgressGen[None]:
        config, state = self.config, self.state
        epochs = config.epochs_stage2
        train_feats = yield from self._iter_features(model, eval_ds, "features (train)")
        val_feats = yield from self._iter_features(model, val_ds, "features (val)")
        train_y = torch.as_tensor(eval_ds.labels, device=self.device)
        freeze_backbone(model)
        model.eval()  # the frozen backbone is not run again; keep its norms fixed anyway
        heads = list(classifier_parameters(model))
        optimizer = torch.optim.AdamW(heads, lr=config.lr_stage2, weight_decay=config.weight_decay)
        if state["optimizer"] is not None:
            optimizer.load_state_dict(self._read_optimizer(state["optimizer"], optimizer))
        criterion = HybridLoss(
            class_counts(eval_ds.labels, len(self.classes)),
            beta=config.beta,
            gamma=config.gamma,
        ).to(self.device)
        sampler = ClassAwareSampler(eval_ds.labels, seed=config.seed)
        n_batches = math.ceil(len(eval_ds) / config.batch_size)

        def val_f1() -> float:
            with torch.no_grad():
                logits = classify_features(model, val_feats)
            return _macro_f1(val_ds.labels, logits.argmax(1).cpu().numpy(), self.classes)

        best = state["best"]
        if state["best_weights"] is None or best is None:
            # "Epoch 0": the stage-1 classifier, so stage 2 never ends worse on validation.
            best = val_f1()
            best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            best_weights = self._read_weights(state["best_weights"])
        for epoch in range(state["epoch"], epochs):
            torch.manual_seed(config.seed * 100_003 + 50_000 + epoch)
            sampler.set_epoch(epoch)
            order = torch.as_tensor(list(sampler), dtype=torch.int64, device=self.device)
            lr = _cosine_lr(config.lr_stage2, epoch, epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total_loss = 0.0
            for b in range(n_batches):
                idx = order[b * config.batch_size : (b + 1) * config.batch_size]
                loss = criterion(classify_features(model, train_feats[idx]), train_y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * len(idx)
                yield Progress(
                    "stage2",
                    epoch * n_batches + b + 1,
                    epochs * n_batches,
                    f"epoch {epoch + 1}/{epochs} batch {b + 1}/{n_batches} loss {loss.item():.3f}",
                    {"epoch": epoch + 1, "batch": b + 1, "loss": loss.item()},
                )
            f1 = val_f1()
            if f1 > best:
                best = f1
                best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            entry = {
                "stage": 2,
                "epoch": epoch + 1,
                "lr": lr,
                "loss": total_loss / max(len(order), 1),
                "val_macro_f1": f1,
            }
            state["history"].append(entry)
            state.update(epoch=epoch + 1, best=best)
            self._write_checkpoint(model, best_weights, optimizer)
            yield self._epoch_event("stage2", entry, epochs, (epoch + 1) * n_batches, best)
        if epochs == 0 or state["best_weights"] is None:
            self._write_checkpoint(model, best_weights)
        for param in model.parameters():
            param.requires_grad_(True)

    def _iter_features(self, model, ds: CropDataset, what: str) -> ProgressGen[torch.Tensor]:
        """Pooled features of every crop of ``ds`` (eval mode), on the training device."""
        model.eval()
        out = []
        loader = torch.utils.data.DataLoader(ds, batch_size=self.config.batch_size, num_workers=0)
        with torch.no_grad():
            for b, (x, _) in enumerate(loader, 1):
                out.append(extract_features(model, x.to(self.device)))
                yield Progress("stage2", b, len(loader), f"extracting {what}")
        return torch.cat(out).detach()

    # -- shared helpers

    def _iter_predict_dataset(self, model, ds: CropDataset, stage: str) -> ProgressGen[np.ndarray]:
        """Softmax probabilities of every crop of ``ds`` (eval mode)."""
        model.eval()
        out = []
        loader = torch.utils.data.DataLoader(ds, batch_size=self.config.batch_size, num_workers=0)
        with torch.no_grad():
            for b, (x, _) in enumerate(loader, 1):
                out.append(model(x.to(self.device)).float().softmax(-1).cpu().numpy())
                yield Progress(stage, 0, 0, f"validating {b}/{len(loader)}")
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def _iter_final_metrics(self, model, val_ds: CropDataset) -> ProgressGen[dict]:
        probs = yield from self._iter_predict_dataset(model, val_ds, "validate")
        metrics = classification_metrics(val_ds.labels, probs.argmax(1), self.classes)
        metrics["split"] = "validation"
        return metrics

    @staticmethod
    def _epoch_event(stage: str, entry: dict, epochs: int, done: int, best: float) -> Progress:
        return Progress(
            stage,
            done,
            0,
            f"epoch {entry['epoch']}/{epochs} loss {entry['loss']:.4f} "
            f"val macro-F1 {entry['val_macro_f1']:.3f}",
            dict(entry, best_val_macro_f1=best, event="epoch"),
        )

    # -- checkpoints

    def _load_checkpoint(self) -> dict | None:
        file = self.ckpt / "state.json"
        if not file.is_file():
            return None
        try:
            state = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("ignoring unreadable checkpoint %s (%s)", file, exc)
            return None
        same = (
            state.get("version") == CHECKPOINT_VERSION
            and state.get("fingerprint") == self.fingerprint
            and state.get("config") == self.config.to_dict()
        )
        if not same:
            logger.warning(
                "checkpoint in %s belongs to other data or settings; starting afresh",
                self.ckpt,
            )
            return None
        for key in ("weights", "best_weights"):
            if state.get(key) and not (self.ckpt / state[key]).is_file():
                logger.warning("checkpoint in %s is incomplete; starting afresh", self.ckpt)
                return None
        logger.info("resuming %s at %s epoch %d", self.output, state["stage"], state["epoch"])
        return state

    def _write_checkpoint(self, model, best_weights: dict, optimizer=None) -> None:
        """Write weights, best weights and optimizer state, then the JSON that names them.

        Files carry the stage and epoch in their names and the JSON is
        replaced last, so a crash at any point leaves a consistent checkpoint.
        """
        import safetensors.torch

        state = self.state
        self.ckpt.mkdir(parents=True, exist_ok=True)
        tag = f"{state['stage']}-e{state['epoch']}"
        old = {state.get("weights"), state.get("best_weights")}
        if state.get("optimizer"):
            old.add(state["optimizer"]["tensors"])
        names = {
            "weights": f"weights-{tag}.safetensors",
            "best_weights": f"best-{tag}.safetensors",
        }
        save_tensors(self.ckpt / names["weights"], model.state_dict())
        save_tensors(self.ckpt / names["best_weights"], best_weights)
        state.update(names)
        if optimizer is not None:
            tensors, scalars = split_optimizer_state(optimizer.state_dict())
            name = f"optimizer-{tag}.safetensors"
            safe = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            atomic_write(self.ckpt / name, lambda tmp: safetensors.torch.save_file(safe, tmp))
            state["optimizer"] = {"tensors": name, "scalars": scalars}
        else:
            state["optimizer"] = None
        text = json.dumps(state, indent=1)
        atomic_write(self.ckpt / "state.json", lambda tmp: Path(tmp).write_text(text))
        keep = {state["weights"], state["best_weights"]}
        if state["optimizer"]:
            keep.add(state["optimizer"]["tensors"])
        for name in old - keep - {None}:
            (self.ckpt / name).unlink(missing_ok=True)

    def _read_weights(self, name: str) -> dict[str, torch.Tensor]:
        import safetensors.torch

        return safetensors.torch.load_file(str(self.ckpt / name), device=str(self.device))

    def _read_optimizer(self, saved: dict, optimizer) -> dict:
        import safetensors.torch

        tensors = safetensors.torch.load_file(str(self.ckpt / saved["tensors"]))
        return join_optimizer_state(tensors, saved["scalars"])


def _init_from_base(model, classes: Sequence[str], base_path: str | os.PathLike) -> None:
    """Copy a base model's weights into ``model``, classifier rows matched by class name.

    Rows of classes the base model does not know keep their fresh initialisation.
    """
    base, base_config = load_network(base_path, cache=False)
    heads = {id(m) for m in classifier_modules(model)}
    head_prefixes = tuple(f"{name}." for name, m in model.named_modules() if id(m) in heads)
    rows = [
        (i, base_config.classes.index(c))
        for i, c in enumerate(classes)
        if c in base_config.classes
    ]
    source = base.state_dict()
    target = model.state_dict()
    for key, value in target.items():
        old = source.get(key)
        if old is None:
            raise WBCError(f"{base_path} does not match its own architecture (no {key})")
        if key.startswith(head_prefixes) and value.ndim >= 1 and value.shape[0] == len(classes):
            with torch.no_grad():
                for i, j in rows:
                    value[i] = old[j]
        elif value.shape == old.shape:
            with torch.no_grad():
                value.copy_(old)
        else:
            raise WBCError(
                f"{base_path}: weights {key} have shape {tuple(old.shape)}, "
                f"expected {tuple(value.shape)}"
            )
    model.load_state_dict(target)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    import safetensors.torch

    # Private contiguous copies: safetensors refuses tensors that share memory.
    safe = {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(safe, tmp))


def split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of an optimizer state dict (for safetensors) and the rest (for JSON)."""
    tensors, scalars = {}, {}
    for pid, slots in sd["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"values": scalars, "param_groups": sd["param_groups"]}


def join_optimizer_state(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    """Inverse of :func:`split_optimizer_state`."""
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(scalars["values"].items()):
        pid, key = flat.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = []
    for group in scalars["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}
