"""Check that the built-in ensemble's weights are reproducible from the training script.

    python scripts/check_default_reproducible.py [--member lite-ghostnet] [-o outputs/repro]

Retrains one member of the default ensemble with exactly the settings of
scripts/train_default_model.sh (same data subset, seed, epochs, threads),
then compares it with the shipped member: the validation metrics stored in
both files, and the weights themselves (the retrained ones cast to float16,
as shipped). Takes one member's training time (~15-20 min on a 2-core CPU).
Prints a Markdown table; exit status 1 when the numbers differ by more than
``--tolerance`` (macro-F1 points).
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import torch

from napari_wbc.cli import main as cli_main
from napari_wbc.models.files import (
    default_model_path,
    load_model,
    read_ensemble,
    read_model_config,
)
from napari_wbc.settings import data_root

SCRIPT = Path(__file__).resolve().parent / "train_default_model.sh"


def training_arguments() -> list[str]:
    """The `napari-wbc train` options of scripts/train_default_model.sh."""
    text = SCRIPT.read_text()
    values = dict(re.findall(r"^(SEED|PER_CLASS)=(\S+)$", text, flags=re.M))
    command = re.search(r"^napari-wbc train (.*?)(?<!\\)$", text, flags=re.M | re.S).group(1)
    command = command.replace("\\\n", " ").replace('"$SEED"', values["SEED"])
    command = command.replace('"$PER_CLASS"', values["PER_CLASS"])
    args = shlex.split(command)[1:]  # drop the data folder
    out = []
    skip = False
    for arg in args:  # drop -o (set below) and -q
        if skip:
            skip = False
        elif arg == "-o":
            skip = True
        elif arg != "-q":
            out.append(arg)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--member", default="lite-ghostnet")
    parser.add_argument("-o", "--output", type=Path, default=Path("outputs/repro"))
    parser.add_argument("--data", type=Path, default=data_root())
    parser.add_argument("--tolerance", type=float, default=0.01)
    args = parser.parse_args()

    ensemble = default_model_path()
    shipped = next(
        Path(ref.path)
        for ref in read_ensemble(ensemble).members
        if args.member in Path(ref.path).stem
    )
    retrained = args.output / shipped.name
    argv = ["train", str(args.data / "pbc"), *training_arguments(), "--member", args.member]
    argv += ["-o", str(retrained), "-q"]
    print("napari-wbc " + shlex.join(argv), flush=True)
    cli_main(argv)
    new_file = retrained

    a, b = read_model_config(shipped).metrics, read_model_config(new_file).metrics
    print(f"\n| {args.member} | accuracy | macro-F1 | balanced accuracy |")
    print("|---|---:|---:|---:|")
    for name, m in (("shipped", a), ("retrained", b)):
        print(
            f"| {name} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {m['balanced_accuracy']:.4f} |"
        )
    w_a = load_model(shipped, cache=False)[0].state_dict()
    w_b = load_model(new_file, cache=False)[0].state_dict()
    diffs = [
        (w_a[k].float() - w_b[k].half().float()).abs().max().item()
        for k in w_a
        if w_a[k].is_floating_point()
    ]
    identical = sum(d == 0 for d in diffs)
    print(
        f"\nweights: {identical}/{len(diffs)} tensors identical after the float16 cast, "
        f"largest difference {max(diffs):.3g}"
    )
    gap = abs(a["macro_f1"] - b["macro_f1"])
    sys.exit(0 if gap <= args.tolerance else 1)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
