"""Average the weights of several fold models into one (a "model soup"): does it transfer better? (#32)

    python -m research.soup outputs/crosslab2 outputs/crosslab2-s1 -o outputs/soup-s01
    python benchmarks/bench_crosslab.py outputs/soup-s01 --no-scale
    python -m research.lolo_adapt outputs/soup-s01

Wortsman et al., "Model soups" (ICML 2022): networks fine-tuned from the same
pretrained weights with different seeds or settings often lie in one basin of
the loss, and the average of their weights is then about as good as their
ensemble (and more robust under distribution shift) at the cost of one network.
Every fold model here starts from the same ImageNet EfficientNet-Lite0 weights,
so the fold models of different runs (seeds, schedules) can be averaged.

For each fold ``in-<lab>`` found in every root, the models' tensors (weights,
batch-norm statistics, classifier) are averaged uniformly and written to
``<out>/in-<lab>/model.safetensors`` with the first model's description. The
default four-lab models (``default/wbc-lite.safetensors``) are souped the same
way when every root has one. Nothing here reads a held-out lab.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from napari_wbc.models.files import load_network, save_model

FOLDS = ("raabin", "lisc", "bccd")


def soup(files: list[Path], output: Path) -> Path:
    """Average the tensors of ``files`` (one architecture, one class list) into ``output``."""
    models = [load_network(f, cache=False) for f in files]
    first, config = models[0]
    arch = {c.spec.arch for _, c in models}
    classes = {tuple(c.spec.classes) for _, c in models}
    if len(arch) > 1 or len(classes) > 1:
        raise SystemExit(f"cannot average {arch} with classes {classes}: one architecture needed")
    states = [m.state_dict() for m, _ in models]
    mixed = {}
    for key, value in states[0].items():
        if value.is_floating_point():
            mixed[key] = torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype)
        else:  # counters (num_batches_tracked): keep the first model's
            mixed[key] = value
    first.load_state_dict(mixed)  # a private copy (cache=False): nothing else holds it
    config = copy.deepcopy(config)
    config.notes = f"uniform weight average of {len(files)} models: " + ", ".join(map(str, files))
    config.created = ""
    output.parent.mkdir(parents=True, exist_ok=True)
    return save_model(output, first, config)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("roots", type=Path, nargs="+")
    p.add_argument("-o", "--out", type=Path, required=True)
    args = p.parse_args(argv)
    targets = [(f"in-{lab}", "model.safetensors") for lab in FOLDS]
    targets.append(("default", "wbc-lite.safetensors"))
    for folder, name in targets:
        files = [root / folder / name for root in args.roots]
        if not all(f.is_file() for f in files):
            print(f"{folder}: not in every root; skipped")
            continue
        written = soup(files, args.out / folder / name)
        print(f"{folder}: {len(files)} models -> {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
