"""Forward passes of an ensemble's members and their per-view sums.

The low-level step of classification: crops resized to each member's input
(:func:`to_input`), run under the views of a TTA set
(:func:`iter_add_views`), their softmax probabilities (and, with trust
statistics, logits and features) summed per member and crop
(:class:`ViewSums`), and the sums combined into the ensemble's prediction
(:func:`combine`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from napari_wbc.errors import DataError, ModelFileError
from napari_wbc.progress import Progress
from napari_wbc.trust import softmax

#: Crops per forward pass. On a 2-core CPU every built-in member runs
#: 10-30 % faster per crop in batches of 32 than of 64 (they fit the caches
#: better): resnet18 3.30 against 3.66 ms, ghostnet 1.04 against 1.50 ms.
INFERENCE_BATCH = 32
#: Memory (bytes) that crops resized to the members' input may keep between
#: the gate's stages, so that a cell in doubt is not resized again for each
#: stage (a slide's batch of 512 cells at 128 px: 100 MB). A larger set is
#: resized again where needed.
RESIZED_KEEP_BYTES = 128 * 2**20
#: How crops are resized to a member's input side (torch, antialiased), as
#: training evaluated them. Bicubic here was worse on PBC crops outside the
#: specialist's training and reported sets (scripts/resample_study.py
#: --input-resize bicubic: 0.941 / 0.876 / 0.940 at 1x / 0.5x / 2x against
#: 0.956 / 0.924 / 0.946).
INPUT_RESIZE = "bilinear"


class ViewSums(NamedTuple):
    """An ensemble's outputs summed over the views it ran (what :func:`combine` needs).

    ``rows``: which crops of a larger set these are (None: all of them, in
    order); ``views`` (M, N): how many views, the first of the TTA set, each
    member ran on each crop; ``sums``: as :func:`empty_sums`; ``tta``: the
    TTA set the views come from.
    """

    #: The :class:`napari_wbc.inference.Ensemble` whose members ran.
    ensemble: Any
    tta: str
    views: np.ndarray
    sums: dict[str, Any]
    rows: np.ndarray | None = None


def empty_sums(ensemble, n: int) -> dict[str, Any]:
    """Zero sums for ``n`` crops of ``ensemble``: what :func:`iter_add_views` adds to."""
    m, c = len(ensemble.members), len(ensemble.classes)
    trust = ensemble.trust is not None
    return {
        "probs": np.zeros((m, n, c), np.float32),
        "logits": np.zeros((m, n, c), np.float32) if trust else None,
        "features": [None] * m if trust else None,
    }


def take_sums(sums: dict[str, Any], rows: np.ndarray) -> dict[str, Any]:
    """The sums (as :func:`empty_sums`) of the cells ``rows``."""
    return {
        "probs": sums["probs"][:, rows],
        "logits": None if sums["logits"] is None else sums["logits"][:, rows],
        "features": None
        if sums["features"] is None
        else [None if f is None else f[rows] for f in sums["features"]],
    }


def iter_add_views(
    ensemble,
    prepared,
    crops,
    transforms,
    members,
    first_view,
    sums,
    rows,
    batch_size,
    device,
    stage,
    resized=None,
):
    """Add to ``sums`` the outputs of ``members`` for ``transforms`` of the crops ``rows``.

    ``sums`` (:func:`empty_sums`): ``probs`` (M, N, C) sums of
    probabilities over views; ``logits`` and per-member ``features`` (N, D_m),
    when the ensemble has trust statistics (one pass: features -> pooled
    pre-logits -> classifier). ``first_view`` is the index of
    ``transforms[0]`` in the TTA set, for the progress text. ``resized``
    (:class:`Resized`): crops already resized, kept for later stages.
    """
    c = len(ensemble.classes)
    if resized is None:
        resized = Resized(crops, device, keep=False)
    trust = ensemble.trust
    members = list(members)
    n = len(rows)
    total = n * len(members)
    done = 0
    what = "crops in doubt" if stage == "doubtful" else "crops"
    last_view = first_view + len(transforms)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            idx = rows[start:stop]
            inputs: dict[int, torch.Tensor] = {}
            for j in members:
                model, size, mean, std = prepared[j]
                if size not in inputs:
                    inputs[size] = resized.get(idx, size)
                x = ((inputs[size] - mean) / std).contiguous(memory_format=torch.channels_last)
                acc = torch.zeros((stop - start, c), dtype=torch.float32, device=device)
                logit_sum, feature_sum = 0.0, 0.0
                for transform in transforms:
                    # rot90 returns a strided view; convolutions want a dense layout
                    view = transform(x).contiguous(memory_format=torch.channels_last)
                    if trust is None:
                        logits = model(view)
                    else:
                        pre = model.forward_head(model.forward_features(view), pre_logits=True)
                        logits = model.get_classifier()(pre)
                        logit_sum = logit_sum + logits.float()
                        feature_sum = feature_sum + pre.float()
                    if logits.shape[-1] != c:
                        raise ModelFileError(
                            f"member {j} outputs {logits.shape[-1]} scores but its config "
                            f"lists {c} classes"
                        )
                    acc += logits.float().softmax(dim=-1)
                sums["probs"][j, idx] += acc.cpu().numpy()
                if trust is not None:
                    sums["logits"][j, idx] += logit_sum.cpu().numpy()
                    f = feature_sum.cpu().numpy()
                    if sums["features"][j] is None:
                        sums["features"][j] = np.zeros(
                            (sums["probs"].shape[1], f.shape[1]), np.float32
                        )
                    sums["features"][j][idx] += f
                done += stop - start
                yield Progress(
                    stage,
                    done,
                    total,
                    f"classified {stop}/{n} {what} (model {j + 1}/{len(prepared)}, "
                    f"views {first_view + 1}-{last_view})",
                )


class Resized:
    """Crops resized to a member's input side, kept for the gate's later stages.

    Within :data:`RESIZED_KEEP_BYTES` for the whole set (``keep``); beyond
    it, or without ``keep``, each request resizes its crops (as it did
    before anything was kept). Kept or not, a crop's input is the same.
    """

    def __init__(self, crops, device: torch.device, keep: bool = True):
        self.crops, self.device, self.keep = crops, device, keep
        self.kept: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

    def get(self, idx: np.ndarray, size: int) -> torch.Tensor:
        entry = self.kept.get(size)
        if entry is None and self.keep:
            n = len(self.crops)
            used = sum(t.numel() * t.element_size() for t, _ in self.kept.values())
            if used + n * 3 * size * size * 4 <= RESIZED_KEEP_BYTES:
                entry = (torch.empty((n, 3, size, size), device=self.device), np.zeros(n, bool))
                self.kept[size] = entry
        where = torch.from_numpy(np.asarray(idx, np.int64))
        if entry is not None and entry[1][idx].all():
            return entry[0][where.to(self.device)]
        if isinstance(self.crops, np.ndarray):
            batch = self.crops[idx]
        else:
            batch = [self.crops[i] for i in idx]
        x = to_input(batch, size, self.device)
        if entry is not None:
            entry[0][where.to(self.device)] = x
            entry[1][idx] = True
        return x


def combine(ensemble, sums: dict, views: np.ndarray, ood: bool = True) -> dict[str, Any]:
    """The prediction dict of :func:`napari_wbc.inference.iter_predict_crops` from per-view sums.

    ``views`` (M, N): how many views each member saw of each crop; a member
    with 0 was not run on that crop and is left out of its ensemble.
    ``ood``: also the out-of-distribution distance (not needed to settle a
    cell, and the costliest part).
    """
    trust = ensemble.trust
    views = np.asarray(views, np.int64)
    m, n = views.shape
    ran = views > 0
    per_view = np.maximum(views, 1).astype(np.float32)[:, :, None]
    member_probs = (sums["probs"] / per_view).astype(np.float32)
    member_logits = None
    ood_distance = None
    if trust is not None:
        # Calibrated: each member's view-averaged logits over the temperature
        # fitted on validation cells (napari_wbc.trust.fit_temperature).
        member_logits = (sums["logits"] / per_view).astype(np.float32)
        for j in range(m):
            member_probs[j] = softmax(member_logits[j], trust.temperature) if n else 0
        if ood and trust.features and n and sums["features"] is not None:
            distance = np.zeros((m, n))
            for j, (stats, f) in enumerate(zip(trust.features, sums["features"], strict=True)):
                if f is not None:
                    distance[j] = stats.distance(f / per_view[j])
            ood_distance = (distance * ran).sum(axis=0) / np.maximum(ran.sum(axis=0), 1)
    weights = ensemble.weights.astype(np.float32)[:, None] * ran
    weights = weights / np.maximum(weights.sum(axis=0, keepdims=True), 1e-12)
    probs = np.einsum("mn,mnc->nc", weights, member_probs).astype(np.float32)
    if not ran.all():
        # A member not run on a crop takes the ensemble's answer: no disagreement.
        member_probs = np.where(ran[:, :, None], member_probs, probs[None])
        if member_logits is not None:
            mean_logits = np.einsum("mn,mnc->nc", weights, member_logits)
            member_logits = np.where(ran[:, :, None], member_logits, mean_logits[None])
    out = {
        "probs": probs,
        "member_probs": member_probs.astype(np.float32),
        "classes": tuple(ensemble.classes),
        "pred": probs.argmax(axis=1).astype(np.int64),
        "confidence": (probs.max(axis=1) if n else np.zeros(0)).astype(np.float32),
        "passes": views.sum(axis=0),
        "views": views,
    }
    if trust is not None:
        out["member_logits"] = member_logits.astype(np.float32)
        out["calibrated"] = True
        if ood_distance is not None:
            out["ood_distance"] = ood_distance.astype(np.float32)
    return out


def check_crops(crops) -> np.ndarray | list[np.ndarray]:
    """Accept an (N, H, W, 3) uint8 array or a sequence of (H, W, 3) uint8 arrays."""
    hint = "crops must be RGB uint8, as an (N, H, W, 3) array or a list of (H, W, 3) arrays"
    if isinstance(crops, np.ndarray):
        if crops.ndim != 4 or crops.shape[-1] != 3:
            raise DataError(f"{hint}; got an array of shape {crops.shape}")
        if crops.dtype != np.uint8:
            raise DataError(f"{hint}; got dtype {crops.dtype}")
        return crops
    crops = list(crops)
    for i, crop in enumerate(crops):
        crop = np.asarray(crop)
        if crop.ndim != 3 or crop.shape[-1] != 3 or crop.dtype != np.uint8:
            raise DataError(f"{hint}; crop {i} has shape {crop.shape} and dtype {crop.dtype}")
    return crops


def to_input(batch, size: int, device: torch.device) -> torch.Tensor:
    """Turn uint8 HWC crops into a float NCHW tensor in [0, 1] of side ``size``."""
    if isinstance(batch, np.ndarray):
        parts = [batch]
    else:
        parts = [np.asarray(crop)[None] for crop in batch]
    out = []
    for part in parts:
        # Send uint8 to the device: four times less to transfer than float.
        x = torch.from_numpy(np.ascontiguousarray(part)).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(
                x, size=(size, size), mode=INPUT_RESIZE, antialias=True, align_corners=False
            )
        out.append(x)
    return out[0] if len(out) == 1 else torch.cat(out)
