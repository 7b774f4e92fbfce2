"""Batch-norm folding: the fast copy of a member that classification runs.

A batch norm after a convolution is, in eval mode, an affine map that can be
folded into the convolution's weights: one pass instead of two, the same
output within float rounding. Training and batch-norm adaptation need the
model as it is, so classification runs a folded copy, made once per model
and weights.
"""

from __future__ import annotations

import copy
import logging
import threading
import weakref

import torch
import torch.fx

from napari_wbc.errors import WBCError

logger = logging.getLogger(__name__)


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of a model's first parameter (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


class _BatchNormLeaves(torch.fx.Tracer):
    """Traces a model keeping every batch norm (timm's with an activation too) as one call."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, torch.nn.BatchNorm2d) or super().is_leaf_module(m, qualname)


def fold_batch_norms(model: torch.nn.Module) -> int:
    """Fold each batch norm into the convolution that alone feeds it; returns how many.

    For inference only (eval mode): the folded convolution gives the same
    output as convolution then normalization, within float rounding, in one
    pass instead of two. The model keeps its structure (its methods, such as
    timm's ``forward_features``, still work): each folded convolution is
    replaced by the fused one and its batch norm by what follows the
    normalization in it (nothing, or timm's activation). A model that cannot
    be traced is left as it is (0).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if model.training:
        raise WBCError("batch norms are folded for inference only; call model.eval() first")
    try:
        graph = _BatchNormLeaves().trace(model)
    except Exception as exc:  # dynamic control flow: no folding, still correct
        logger.debug("not folding batch norms of %s: %s", type(model).__name__, exc)
        return 0
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, torch.nn.BatchNorm2d) or calls[node.target] != 1:
            continue
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, torch.fx.Node) else None
        if not (
            src.op == "call_module"
            and type(conv) is torch.nn.Conv2d
            and len(src.users) == 1
            and calls[src.target] == 1
            and bn.track_running_stats
        ):
            continue
        if type(bn) is torch.nn.BatchNorm2d:
            after: torch.nn.Module = torch.nn.Identity()
        elif hasattr(bn, "act") and hasattr(bn, "drop"):  # timm's BatchNormAct2d
            after = torch.nn.Sequential(bn.drop, bn.act)
        else:
            continue
        _set_submodule(model, src.target, fuse_conv_bn_eval(conv, bn))
        _set_submodule(model, node.target, after)
        folded += 1
    return folded


def _set_submodule(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


_FOLDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Folding a member's batch norms takes 0.1–0.3 s (a copy and a trace) and
#: saves 10–30 % of each pass: below this many crops (the routing sample, a
#: camera field's cells) the model runs as it is, unless already folded.
FOLD_MIN_CROPS = 128
_FOLDED_LOCK = threading.Lock()


def _weights_version(model: torch.nn.Module) -> int:
    """Changes whenever a parameter or buffer (e.g. batch-norm statistics) changes in place."""
    return sum(t._version for t in model.parameters()) + sum(t._version for t in model.buffers())


def inference_model(model: torch.nn.Module) -> torch.nn.Module:
    """The copy of ``model`` that classification runs: batch norms folded, channels-last.

    The model itself is left as it is (training and batch-norm adaptation
    need its batch norms); the copy is kept while the model lives and made
    again when the model's weights or device change.
    """
    key = (_weights_version(model), str(model_device(model)))
    with _FOLDED_LOCK:
        hit = _FOLDED.get(model)
        if hit is not None and hit[0] == key:
            return hit[1]
    fast = copy.deepcopy(model).eval()
    n = fold_batch_norms(fast)
    # channels_last makes convolutions faster on CPU and GPU alike.
    fast.to(memory_format=torch.channels_last)
    logger.debug("%s: %d batch norms folded for inference", type(model).__name__, n)
    with _FOLDED_LOCK:
        _FOLDED[model] = (key, fast)
    return fast


def runner(model: torch.nn.Module, n: int) -> torch.nn.Module:
    """The model that classifies ``n`` crops: its folded copy from :data:`FOLD_MIN_CROPS` on.

    A model already folded keeps using its copy, whatever ``n``.
    """
    if n >= FOLD_MIN_CROPS or is_folded(model):
        return inference_model(model)
    return model


def is_folded(model: torch.nn.Module) -> bool:
    """Whether ``model`` has a folded copy (made by :func:`inference_model`, kept while it lives)."""
    return _FOLDED.get(model) is not None
