"""The ``napari-wbc`` command line.

Each subcommand is a thin layer over one core generator, driven with a
terminal progress bar (tqdm). The exit status is :data:`EXIT_STATUS`'s: 0
when everything was written, 1 when ``classify`` could not process some of
its images (or no command was given), 2 for an error napari-wbc reports on
purpose (one line on stderr) or invalid arguments, 130 on Ctrl-C, which
leaves no half-written output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .cli_models import (
    DEVICE_HELP,
    add_adapt_option,
    add_model_commands,
    add_model_option,
    add_smear_options,
    add_threads_option,
    add_tta_option,
    drive,
    smear_setup,
)
from .errors import WBCError
from .progress import run
from .stain import DEFAULT_METHOD, stain_methods

log = logging.getLogger("napari_wbc")

#: What the exit status of ``napari-wbc`` means (shown at the end of ``--help``).
EXIT_STATUS = """exit status:
  0    everything was written
  1    classify could not process some images (the others are written; each
       failure is printed on stderr and listed in failures.csv), or no command
       was given
  2    an error napari-wbc reports on purpose (one line on stderr: a missing
       input, a bad option value, view without a display) or invalid arguments
  130  interrupted (Ctrl-C); outputs are written under a temporary name and
       renamed when complete, so no half-written file is left"""


# ------------------------------------------------------------------ normalize


def _load_reference(spec: str | None):
    from .images import read_smear
    from .stain import StainReference, default_reference, iter_fit_stain_reference

    if spec is None:
        return default_reference()
    path = Path(spec)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise WBCError(f"cannot read stain reference {path}: {exc}") from exc
        return StainReference.from_dict(data)
    smear = read_smear(path)
    try:
        return run(
            iter_fit_stain_reference(smear.levels[-1], description=f"fitted on {path.name}")
        )
    finally:
        smear.close()


def cmd_normalize(args) -> int:
    from .images import read_smear
    from .stain import iter_prepare_normalizer, normalize_array
    from .tiff import iter_write_pyramid_tiff

    reference = _load_reference(args.reference)
    smear = read_smear(args.input)
    try:
        normalizer = drive(
            iter_prepare_normalizer(smear.levels, args.method, reference), args.quiet
        )
        out = normalize_array(smear.levels[0], normalizer)
        meta = {"napari_wbc": {"stain_method": args.method, "source": str(args.input)}}
        path = drive(
            iter_write_pyramid_tiff(
                args.output, out, pixel_size_um=smear.pixel_size_um, tile=args.tile, metadata=meta
            ),
            args.quiet,
        )
    finally:
        smear.close()
    if args.save_reference:
        Path(args.save_reference).write_text(json.dumps(normalizer.source.to_dict(), indent=2))
    print(f"wrote {path}")
    return 0


def cmd_reference(args) -> int:
    reference = _load_reference(args.image)
    text = json.dumps(reference.to_dict(), indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        print(text)
    return 0


# ------------------------------------------------------------------- classify


def cmd_classify(args) -> int:
    from .images import list_image_files
    from .models.files import resolve_model

    model = resolve_model(args.model)
    formats = [f.strip().lower() for f in args.format.split(",") if f.strip()]
    bad = sorted(set(formats) - {"csv", "geojson"})
    if bad:
        raise WBCError(f"unknown format(s) {', '.join(bad)}; choose from csv, geojson")
    # Check the inputs before loading the model (and torch): a typo fails at once.
    n_images = len(list_image_files(args.inputs))
    from .smears import iter_classify_files  # (imports torch)

    ensemble, config = smear_setup(args, model, block=args.block)
    client = None
    if args.scheduler:
        try:
            from dask.distributed import Client
        except ImportError as exc:
            raise WBCError(
                "--scheduler needs dask.distributed: pip install 'napari-wbc[distributed]'"
            ) from exc
        try:
            # Not the default scheduler: the blocks go to the cluster explicitly,
            # and what this process reads itself (scale, stain, the model
            # choice) stays local, with its tile cache.
            client = Client(args.scheduler, timeout="10s", set_as_default=False)
        except OSError as exc:
            raise WBCError(f"cannot reach the dask scheduler at {args.scheduler}: {exc}") from exc
    try:
        summary = drive(
            iter_classify_files(args.inputs, ensemble, args.output, config, formats, client),
            args.quiet,
        )
    finally:
        if client is not None:
            client.close()
    print(summary.to_string(index=False))
    print(f"results in {args.output}")
    for image, warning in summary.attrs.get("warnings", {}).items():
        print(f"napari-wbc classify: warning: {image}: {warning}", file=sys.stderr)
    failures = summary.attrs.get("failures", [])
    for failure in failures:
        print(
            f"napari-wbc classify: failed: {failure['image']}: {failure['reason']}",
            file=sys.stderr,
        )
    if failures:
        print(
            f"napari-wbc classify: {len(failures)} of {n_images} images failed "
            f"(listed in {args.output / 'failures.csv'})",
            file=sys.stderr,
        )
        return 1
    return 0


# ----------------------------------------------------------------------- view


def _display_problem() -> str | None:
    """Why napari cannot open a window here (None when it can, as far as we can tell)."""
    if not sys.platform.startswith("linux"):
        return None
    if os.environ.get("QT_QPA_PLATFORM", "").split(":")[0] in ("offscreen", "minimal"):
        return None  # the user chose a platform without a screen on purpose
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    return (
        "napari-wbc view needs a display, and none is set (no DISPLAY or WAYLAND_DISPLAY). "
        "Run it on a desktop, over ssh -X, or under a virtual display: "
        "xvfb-run -a napari-wbc view (Debian/Ubuntu: apt-get install xvfb libgl1-mesa-dri "
        "libxkbcommon-x11-0 libxcb-cursor0; see the README's 'Set up' section). For work "
        "without a window, use napari-wbc classify / normalize."
    )


def cmd_view(args) -> int:
    problem = _display_problem()
    if problem:
        print(f"napari-wbc view: {problem}", file=sys.stderr)
        return 2
    import napari

    viewer = napari.Viewer()
    if args.files:
        viewer.open(args.files, plugin="napari-wbc")
    else:
        viewer.open_sample("napari-wbc", "smear")
    viewer.window.add_plugin_dock_widget("napari-wbc", "Stain normalization")
    if args.screenshot:
        from qtpy.QtWidgets import QApplication

        for _ in range(20):
            QApplication.processEvents()
        viewer.screenshot(args.screenshot, canvas_only=False, flash=False)
        viewer.close()
        return 0
    napari.run()
    return 0


# --------------------------------------------------------------------- sample


def cmd_sample(args) -> int:
    from .samples import SAMPLES, write_sample

    image, truth = write_sample(args.name, args.output)
    print(f"{SAMPLES[args.name].title}: {image} (truth: {truth}; {SAMPLES[args.name].licence})")
    return 0


# ----------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from .samples import sample_names

    parser = argparse.ArgumentParser(
        prog="napari-wbc",
        description="Find, classify and count white blood cells in blood smears.",
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"napari-wbc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "normalize",
        help="stain-normalize a smear into a tiled pyramidal TIFF",
        description="Stain-normalize a smear image of any size, streaming tile by tile, "
        "into a tiled, pyramidal BigTIFF.",
    )
    p.add_argument("input", type=Path, help="image to normalize (TIFF, SVS, JPEG, PNG, BMP)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .tif")
    p.add_argument(
        "--method",
        choices=stain_methods(),
        default=DEFAULT_METHOD,
        help=f"stain method (default {DEFAULT_METHOD}; see docs/results.md)",
    )
    p.add_argument(
        "--reference",
        help="image to take the target stain from, or a reference .json; "
        "default: the built-in PBC reference",
    )
    p.add_argument("--tile", type=int, default=512, help="TIFF tile size (default 512)")
    p.add_argument(
        "--save-reference", help="also save the input's fitted stain statistics (.json)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_normalize)

    p = sub.add_parser(
        "reference",
        help="print the stain reference of an image (or the built-in one) as JSON",
        description="Fit the stain statistics of an image (glass colour; nucleus and "
        "red-cell colours for the regions method; stain vectors for Macenko; colour "
        "moments for Reinhard) and print them as JSON, or print the built-in PBC "
        "reference. Pass the file to 'normalize --reference' to map other images onto "
        "this one's stains.",
    )
    p.add_argument("image", nargs="?", help="image to fit on; default: the built-in reference")
    p.add_argument("-o", "--output", help="write the JSON here instead of printing it")
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser(
        "classify",
        help="find, classify and count white cells in smear images",
        description="Detect and classify the white cells of each image (files or folders), "
        "streaming tile by tile; writes <image>.csv and <image>.geojson (QuPath) per image and "
        "summary.csv with the differential counts.",
        epilog="Exit status 0: every image was classified; 1: some images failed (the others "
        "are written; the failures are listed in failures.csv); 2: an error (one line on "
        "stderr). See napari-wbc --help.",
    )
    p.add_argument("inputs", nargs="+", type=Path, help="images or folders of images")
    add_model_option(p)
    p.add_argument("-o", "--output", type=Path, default=Path("wbc-results"), help="output folder")
    p.add_argument("--format", default="csv,geojson", help="comma-separated: csv, geojson")
    add_smear_options(p)
    add_tta_option(p)
    add_adapt_option(p)
    add_threads_option(p)
    p.add_argument("--block", type=int, default=2048, help="processing block edge in pixels")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--scheduler", help="address of a dask.distributed scheduler to run the tiles on"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("view", help="open napari with the plugin (on the sample smear by default)")
    p.add_argument("files", nargs="*", help="images to open instead of the sample")
    p.add_argument("--screenshot", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_view)

    p = sub.add_parser(
        "sample",
        help="write a built-in sample image and its truth table",
        description="Write a built-in sample (smear: generated; bccd: six real smear fields; "
        "gallery: 24 real PBC cells) as an image, with its truth table beside it as "
        "<name>-truth.csv, to try the other commands on.",
    )
    p.add_argument("name", choices=sample_names(), help="which sample")
    p.add_argument(
        "-o", "--output", type=Path, required=True, help="image file (.tif keeps the pixel size)"
    )
    p.set_defaults(func=cmd_sample)

    add_model_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        if hasattr(args, "threads"):
            from .threads import configure_threads

            configure_threads(args.threads)
        return int(args.func(args) or 0)
    except WBCError as exc:
        print(f"napari-wbc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"napari-wbc {args.command}: cancelled", file=sys.stderr)
        return 130


def console_main() -> None:
    """The ``napari-wbc`` command: :func:`main`, then a quick exit.

    Once torch and timm are imported, the interpreter's own teardown (freeing
    some ten thousand modules' objects one by one) takes about 1.2 s on a
    2-core machine: longer than classifying 150 crops. Nothing is left to
    do by then (results are written atomically and closed, the streams are
    flushed here, exit handlers such as temporary-folder cleanup have run),
    so the process ends without it. :func:`main` itself returns normally,
    for callers in Python.
    """
    import atexit

    try:
        code = main()
    except SystemExit as exc:  # argparse's --help, --version and usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":
    console_main()
