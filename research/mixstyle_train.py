"""Train with MixStyle: do mixed feature statistics make the fold models transfer better? (#32)

    OUT=outputs/crosslab4-mix TRAIN="python -m research.mixstyle_train" SCORE=0 \\
        bash scripts/run_crosslab_lolo.sh
    python -m research.mixstyle_train train --labs all --classes pbc --fov-rbc 3.2 --seed 0 \\
        -o outputs/crosslab4-mix/default/wbc-lite.safetensors

MixStyle (Zhou et al., "Domain Generalization with MixStyle", ICLR 2021) mixes the
per-channel mean and standard deviation of two training images' early feature maps, so a
cell is seen with another lab's "style" while its shape and texture stay. Here it is added
after the first three stages of the EfficientNet (``blocks[0:3]``), with the paper's
defaults (probability 0.5, Beta(0.1, 0.1) mixing weights, partners drawn at random from the
batch, which mixes labs because every batch is drawn balanced over them). The hooks act only
in training mode, so stage 2's features, validation and the saved model file are those of
the plain network: the file is an ordinary model that needs nothing from here.

Everything else is ``napari-wbc train --labs`` with the arguments given (``train`` first): this module patches
the network builder of :mod:`napari_wbc.crosslab` and calls the product's CLI.
"""

from __future__ import annotations

import sys

import torch

import napari_wbc.crosslab as crosslab
from napari_wbc.cli import main as cli_main

P_MIX = 0.5
ALPHA = 0.1
STAGES = (0, 1, 2)
_build = crosslab.build_model


def mixstyle(x: torch.Tensor, p: float = P_MIX, alpha: float = ALPHA) -> torch.Tensor:
    """Mix each image's channel statistics with a random partner's (training only)."""
    if x.shape[0] < 2 or float(torch.rand(())) > p:
        return x
    mu = x.mean(dim=(2, 3), keepdim=True).detach()
    sig = (x.var(dim=(2, 3), keepdim=True) + 1e-6).sqrt().detach()
    lam = torch.distributions.Beta(alpha, alpha).sample((x.shape[0], 1, 1, 1)).to(x.dtype)
    perm = torch.randperm(x.shape[0])
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sig_mix = lam * sig + (1 - lam) * sig[perm]
    return (x - mu) / sig * sig_mix + mu_mix


def _hook(module, inputs, output):
    return mixstyle(output) if module.training else output


def build_with_mixstyle(*args, **kwargs):
    model, info = _build(*args, **kwargs)
    for s in STAGES:
        model.blocks[s].register_forward_hook(_hook)
    return model, info


def main(argv: list[str] | None = None) -> int:
    crosslab.build_model = build_with_mixstyle
    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
