"""Losses for decoupled long-tailed training.

Stage 2 of the decoupled scheme (arXiv 2603.01976) retrains the classifier
with a hybrid loss: class weights from the *effective number* of samples
(Cui et al., "Class-Balanced Loss Based on Effective Number of Samples",
CVPR 2019) multiplied by the *focal* modulation of Lin et al. ("Focal Loss
for Dense Object Detection", ICCV 2017)::

    w_c    = (1 - beta) / (1 - beta ** n_c)        normalised to sum to C
    loss_i = - w[y_i] * (1 - p_t,i) ** gamma * log p_t,i

With ``beta = 0`` every weight is 1 and with ``gamma = 0`` the modulation is
1, so the loss is then exactly cross-entropy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from napari_wbc.errors import DataError

__all__ = ["HybridLoss", "effective_number_weights"]

_REDUCTIONS = ("mean", "sum", "none")


def effective_number_weights(
    counts: Sequence[int] | np.ndarray | torch.Tensor, beta: float = 0.999
) -> torch.Tensor:
    """Class weights inversely proportional to the effective number of samples.

    Parameters
    ----------
    counts : sequence of int
        Number of training samples ``n_c`` of each class, in class order.
    beta : float
        Hyper-parameter in ``[0, 1)``. ``0`` gives equal weights; values close
        to 1 approach inverse-frequency weighting.

    Returns
    -------
    torch.Tensor
        float32 weights of shape ``(C,)``, ``w_c = (1 - beta) / (1 - beta**n_c)``,
        rescaled so that they sum to the number of classes ``C``. A class with
        no samples (``n_c = 0``) gets weight 0: it cannot appear as a target,
        and giving it the infinite weight of the formula would break the
        normalisation of the others. The weights of the remaining classes are
        then rescaled so that all ``C`` weights still sum to ``C``.

    Raises
    ------
    DataError
        If counts are negative, empty, all zero, or ``beta`` is outside ``[0, 1)``.
    """
    n = np.asarray(
        counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else counts,
        dtype=np.float64,
    )
    if n.ndim != 1 or n.size == 0:
        raise DataError(f"class counts must be a non-empty 1-D sequence; got shape {n.shape}")
    if np.any(n < 0) or not np.all(np.isfinite(n)):
        raise DataError(f"class counts must be finite and non-negative; got {n.tolist()}")
    if not 0.0 <= beta < 1.0:
        raise DataError(f"beta must be in [0, 1); got {beta}")
    present = n > 0
    if not present.any():
        raise DataError("every class count is zero; there is nothing to weight")
    weights = np.zeros_like(n)
    # beta ** n_c is evaluated only for n_c >= 1, so beta = 0 gives 0 ** n = 0 and
    # weight (1 - 0) / (1 - 0) = 1, never the 0 ** 0 = 1 that would divide by zero.
    weights[present] = (1.0 - beta) / (1.0 - np.power(beta, n[present]))
    weights *= n.size / weights.sum()
    return torch.as_tensor(weights, dtype=torch.float32)


class HybridLoss(torch.nn.Module):
    """Effective-number class weights times focal modulation of cross-entropy.

    ``loss_i = - w[y_i] * (1 - p_t,i) ** gamma * log p_t,i`` where ``p_t,i`` is
    the softmax probability of the true class of sample ``i``.

    Parameters
    ----------
    class_counts : sequence of int
        Training samples per class (see :func:`effective_number_weights`).
    beta : float
        Effective-number hyper-parameter in ``[0, 1)``.
    gamma : float
        Focal exponent, ``>= 0``; 0 turns the modulation off.
    reduction : {"mean", "sum", "none"}
        ``"mean"`` is ``sum(loss_i) / N``, the plain mean over the batch. It
        is *not* divided by the sum of the sample weights (as
        ``F.cross_entropy(weight=...)`` does), because that would cancel the
        class weighting within every batch drawn by a class-aware sampler.

    Attributes
    ----------
    weights : torch.Tensor
        The class weights, a registered buffer (moves with ``.to(device)``).
    beta, gamma : float
    """

    weights: torch.Tensor

    def __init__(
        self,
        class_counts: Sequence[int] | np.ndarray | torch.Tensor,
        beta: float = 0.999,
        gamma: float = 2.0,
        reduction: str = "mean",
    ):
        super().__init__()
        if gamma < 0:
            raise DataError(f"gamma must be >= 0; got {gamma}")
        if reduction not in _REDUCTIONS:
            raise DataError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.reduction = reduction
        self.register_buffer("weights", effective_number_weights(class_counts, beta))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of ``logits`` (N, C) against integer ``targets`` (N,)."""
        if logits.ndim != 2 or logits.shape[1] != self.weights.numel():
            raise DataError(
                f"logits must have shape (N, {self.weights.numel()}); got {tuple(logits.shape)}"
            )
        targets = targets.long()
        log_probs = F.log_softmax(logits, dim=1)
        log_pt = log_probs.gather(1, targets[:, None]).squeeze(1)
        factor = self.weights.to(log_probs.dtype)[targets]
        if self.gamma != 0.0:
            # (1 - p_t) comes from -expm1(log p_t), which keeps precision when
            # p_t is close to 1 (well-classified samples).
            factor = factor * (-torch.expm1(log_pt)).clamp_min(0.0).pow(self.gamma)
        # nll_loss without class weights picks -factor_i * log p_t,i and its
        # "mean" is sum / N; going through it (as cross_entropy does) makes
        # beta = 0, gamma = 0 reproduce F.cross_entropy bit for bit.
        return F.nll_loss(log_probs * factor[:, None], targets, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, reduction={self.reduction!r}"
