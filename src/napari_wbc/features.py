"""Each member's logits and penultimate features for crops (trust statistics, adaptation).

:func:`napari_wbc.inference.iter_predict_crops` returns probabilities, which is
all a count needs. Judging a prediction needs more of the network: its logits
(for temperature scaling) and the pooled features its classifier reads (for
the distance to the training cells). Every timm backbone splits into
``forward_features`` → ``forward_head(pre_logits=True)`` → classifier, so both
come from one pass.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .inference import Ensemble
from .progress import Progress, ProgressGen, run
from .tta import TTA_SETS


def prepare_input(crops: np.ndarray, spec, device) -> torch.Tensor:
    """uint8 (N, H, W, 3) crops → a member's normalised NCHW input at its input size."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).to(device).permute(0, 3, 1, 2)
    x = x.float().div_(255.0)
    size = spec.input_size
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def member_outputs(
    ensemble: Ensemble, crops: np.ndarray, batch_size: int = 64, tta: str = "none"
) -> dict[str, object]:
    """See :func:`iter_member_outputs`."""
    return run(iter_member_outputs(ensemble, crops, batch_size, tta))


def iter_member_outputs(
    ensemble: Ensemble, crops: np.ndarray, batch_size: int = 64, tta: str = "none"
) -> ProgressGen[dict[str, object]]:
    """Logits and penultimate features of every member, averaged over a TTA set.

    Parameters
    ----------
    ensemble : Ensemble
    crops : ndarray (N, H, W, 3) uint8
        Crops prepared as for :func:`napari_wbc.inference.iter_predict_crops`
        (field of view cut, stain normalised).
    batch_size : int
    tta : {"none", "flips", "d4"}

    Returns
    -------
    dict
        ``logits`` (M, N, C) float32 and ``features``: a list of M arrays (N, D_m).
    """
    transforms = TTA_SETS[tta]
    n, m, c = len(crops), len(ensemble.members), len(ensemble.classes)
    logits = np.zeros((m, n, c), np.float32)
    features: list[np.ndarray] = []
    with torch.inference_mode():
        for j, member in enumerate(ensemble.members):
            model = member.model.eval()
            spec = member.config.spec
            feats = None
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                x = prepare_input(crops[start:stop], spec, ensemble.device)
                f_acc, l_acc = 0.0, 0.0
                for transform in transforms:
                    pre = model.forward_head(model.forward_features(transform(x)), pre_logits=True)
                    f_acc = f_acc + pre.float()
                    l_acc = l_acc + model.get_classifier()(pre).float()
                f_acc, l_acc = f_acc / len(transforms), l_acc / len(transforms)
                if feats is None:
                    feats = np.zeros((n, f_acc.shape[1]), np.float32)
                feats[start:stop] = f_acc.cpu().numpy()
                logits[j, start:stop] = l_acc.cpu().numpy()
                yield Progress("features", j * n + stop, m * n, f"model {j + 1}/{m}: {stop}/{n}")
            features.append(feats if feats is not None else np.zeros((0, 0), np.float32))
    return {"logits": logits, "features": features}
