"""Train with a linear probe first (LP-FT): does an undistorted start transfer better? (#32)

    OUT=outputs/crosslab5-lpft EPOCHS1=27 TRAIN="python -m research.lpft_train" SCORE=0 \\
        bash scripts/run_crosslab_lolo.sh

Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution" (ICLR 2022): fine-tuning a pretrained network with a
randomly initialised head changes the features most in the first steps, while
the head's gradients are still noise, and this costs accuracy under
distribution shift. Training the head alone first (a linear probe) and then
the whole network (LP-FT) keeps more of what pretraining learned. Here the
first ``LP_EPOCHS`` stage-1 epochs (``LP_EPOCHS × 40`` training steps) pass
only the head's gradients: a hook detaches the pooled features while the
network is in training mode. The backbone then fine-tunes as usual; with
``--epochs1 27`` it gets three epochs of probe plus about as many fine-tuning
steps as the shipped recipe's 24 epochs (the cosine rate spans all 27).

Batch-norm statistics still follow the training batches during the probe.
Stage 2, validation and the saved model are the product's: the file is an
ordinary model. Everything else is ``napari-wbc train --labs`` with the
arguments given (``train`` first).
"""

from __future__ import annotations

import sys

import napari_wbc.crosslab as crosslab
from napari_wbc.cli import main as cli_main

LP_EPOCHS = 3
STEPS_PER_EPOCH = crosslab.LabsTrainConfig().steps
_build = crosslab.build_model


def build_with_probe_start(*args, **kwargs):
    """The product's network, its pooled features detached for the first training steps."""
    model, info = _build(*args, **kwargs)
    state = {"steps": 0}
    lp_steps = LP_EPOCHS * STEPS_PER_EPOCH

    def count(module, inputs):
        if module.training:
            state["steps"] += 1

    def detach_early(module, inputs, output):
        if module.training and state["steps"] <= lp_steps:
            return output.detach()
        return output

    model.register_forward_pre_hook(count)
    model.global_pool.register_forward_hook(detach_early)
    return model, info


def main(argv: list[str] | None = None) -> int:
    crosslab.build_model = build_with_probe_start
    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
