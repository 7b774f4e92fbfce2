"""Classify the white cells of a whole smear, block by block.

The data flow of :func:`iter_classify_smear`::

    image ─ scale (napari_wbc.scale.iter_resolve_scale: user > file > red cells)
          ─ model input (ensemble.preprocessor: crop side, stain fitted once)
          ─ detector, prepared once (napari_wbc.detection.Detector)
          ─ tiles (napari_wbc.tiling: block grid, halo, one ownership rule)
              per tile: read the window → detect (or take the given cells)
              → keep the cells the tile owns → cut and normalise their crops
              → ensemble with test-time augmentation → table rows
          ─ one table, with the scale in ``df.attrs``

Memory is bounded by one block with its halo, however large the slide; the
result does not depend on the block size.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from .errors import WBCError
from .pixels import as_dask_rgb
from .progress import Progress, ProgressGen, run
from .routing import ROUTE_CELLS, ModelRouter
from .scale import iter_resolve_scale
from .threads import Prefetched
from .tiling import Tile, tile_grid

log = logging.getLogger(__name__)

#: Cells classified together, across blocks (see ``iter_classify_smear``):
#: the gate's later stages take the cells still in doubt, and their batches
#: must stay large enough to run at the network's pace (on the 20,000² slide,
#: classification took 35 s with 128 cells or 4 blocks, 29 s with these).
CROSS_BLOCK_CELLS = 512
#: ... or this many blocks, whichever comes first, so the live count keeps
#: up on images with few cells (Cancel works inside a batch too).
CROSS_BLOCK_BLOCKS = 16
#: Blocks read, searched and cut ahead of the classification, on a
#: background thread (``napari_wbc.threads.Prefetched``): the next batch's.
PREFETCH_BLOCKS = CROSS_BLOCK_BLOCKS
#: Blocks in the first batch: classification starts while the next are cut.
FIRST_BATCH_BLOCKS = 4


@dataclass
class ClassifyConfig:
    """Parameters of a smear classification run.

    Attributes
    ----------
    pixel_size_um : float or None
        The user's micrometres per pixel; None takes the file's, else
        measures the red cells (:func:`napari_wbc.scale.iter_resolve_scale`).
    rbc_diameter_px : float or None
        Red-cell diameter in pixels, overriding ``pixel_size_um``.
    stain_normalize : bool
        Map the image's stains onto the model's reference before classifying.
    stain_method : str or None
        A stain method of :mod:`napari_wbc.stain`; None uses the default for
        smears (:data:`napari_wbc.stain.DEFAULT_METHOD`, fitted on the image's
        nuclei and red cells), whatever method normalised the training crops.
    tta : str or None
        Test-time augmentation ("none", "flips", "d4"); None uses the model's.
    block : int
        Edge of the processing blocks in pixels.
    batch_size : int
        Crops per forward pass.
    review_confidence : float
        Cells classified with less confidence are flagged ``needs_review``.
    review_disagreement : float
        Cells where more than this fraction of members disagree with the
        ensemble are flagged ``needs_review``.
    device : str
        "auto", "cpu", "cuda", "mps".
    adapt : bool or {"auto", "prototypes", "adabn"}
        Adapt the classifier to this smear's own cells first, without labels
        (:func:`napari_wbc.adapt.adapt_ensemble`; True: its default method,
        the prototype classifier): the cells are found
        and cut once for it, then classified by the adapted copy. With fewer
        cells than the method needs (:func:`napari_wbc.adapt.cells_needed`:
        128 for prototypes, 32 for AdaBN) the smear is classified
        without adaptation, and a warning says so. Not available on a cluster.
        The default, ``"auto"`` (:data:`napari_wbc.adapt.AUTO`), adapts only
        a smear that a :class:`~napari_wbc.routing.ModelRouter` gives the
        three-lab model, with enough cells, on this machine; else it
        classifies without adapting, quietly.
    exhaustive : bool
        Every TTA view of every member for every cell. By default members
        and views are spent in stages, the cheapest first, and a cell is
        settled at the first stage sure of it
        (``gate`` of :func:`napari_wbc.inference.iter_predict_crops`); the
        ``passes`` column says how many forward passes each cell took.
    """

    pixel_size_um: float | None = None
    rbc_diameter_px: float | None = None
    stain_normalize: bool = True
    stain_method: str | None = None
    tta: str | None = None
    block: int = 2048
    batch_size: int = 32
    review_confidence: float = 0.6
    review_disagreement: float = 0.0
    device: str = "auto"
    adapt: bool | str = "auto"
    exhaustive: bool = False
    extra: dict = field(default_factory=dict)


class StageTimer:
    """Seconds spent per stage of a run, summed over blocks (``df.attrs["seconds"]``)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


class _Prepared(NamedTuple):
    arr: Any
    scale: Any
    rbc_px: float
    given: pd.DataFrame | None
    detector: Any
    ensemble: Any
    route: Any
    model_input: Any
    side: int
    tiles: list
    #: What choosing the model did that classifying reuses (or None).
    head: Any = None


def _iter_prepare(image, ensemble, config, points, labels, file_pixel_size_um, detector, timer):
    """What every pass over a smear needs: scale, detector, model choice, stain, blocks."""
    if file_pixel_size_um is None and hasattr(image, "levels"):
        file_pixel_size_um = image.pixel_size_um
    arr = as_dask_rgb(image)
    height, width = arr.shape[:2]
    with timer("scale"):
        scale = yield from iter_resolve_scale(
            arr,
            config.pixel_size_um,
            file_pixel_size_um,
            config.rbc_diameter_px,
        )
    rbc_px = scale.rbc_diameter_px
    given = _given_cells(points, labels, height, width)
    if given is None:
        from .detection import ClassicalDetector

        # Prepared once for the whole image (threshold, glass colour): blocks agree.
        with timer("detector setup"):
            detector = yield from (detector or ClassicalDetector()).iter_prepare(arr, rbc_px)
    else:
        detector = None
    route = head = None
    if isinstance(ensemble, ModelRouter):
        with timer("model choice"):
            ensemble, route, head = yield from _iter_route(
                arr, rbc_px, given, detector, ensemble, config
            )
    if head is not None:
        model_input = head.model_input
    else:
        with timer("stain fit"):
            model_input = yield from ensemble.preprocessor.iter_prepare_smear(
                [arr], rbc_px, config.stain_normalize, config.stain_method
            )
    side = model_input.side
    yield Progress("scale", 1, 1, f"red cell ≈ {rbc_px:.0f} px ({scale.note}); crops {side} px")
    tiles = _tiles((height, width), side, rbc_px, detector, config)
    return _Prepared(
        arr, scale, rbc_px, given, detector, ensemble, route, model_input, side, tiles, head
    )


def iter_smear_blocks(
    image,
    ensemble,
    config: ClassifyConfig | None = None,
    file_pixel_size_um: float | None = None,
    detector=None,
) -> ProgressGen[tuple[Any, list]]:
    """Find and cut every white cell of a smear as the classifier will see them.

    For adapting one model to the cells of several images (a folder of
    camera fields, each with too few cells on its own; napari_wbc.smears).
    Returns the smear's preparation (scale, model choice, stain fit, block
    grid) and every block's ``(index, cells, crops)``, in the grid's order;
    give both to :func:`iter_classify_smear` (``prepared=``) to classify
    the smear without preparing and cutting it again.
    """
    config = config or ClassifyConfig()
    prep = yield from _iter_prepare(
        image, ensemble, config, None, None, file_pixel_size_um, detector, StageTimer()
    )
    blocks = list(prep.head.blocks) if prep.head is not None else []
    done = {k for k, _, _ in blocks}
    yield from _iter_cut_cells(
        prep.arr,
        prep.tiles,
        prep.given,
        prep.detector,
        prep.model_input,
        "adapt",
        "to adapt to",
        blocks=blocks,
        order=[k for k in range(len(prep.tiles)) if k not in done],
    )
    blocks.sort(key=lambda block: block[0])
    return prep, blocks


def _block_crops(blocks) -> list[np.ndarray]:
    """The crops of blocks ``(index, cells, crops)``, concatenated in their order."""
    return [crop for _, own, cut in blocks if own is not None for crop in cut]


def iter_classify_smear(
    image,
    ensemble,
    config: ClassifyConfig | None = None,
    points: np.ndarray | None = None,
    labels=None,
    client=None,
    source_path=None,
    file_pixel_size_um: float | None = None,
    detector=None,
    adapted: dict | None = None,
    prepared: tuple | None = None,
) -> ProgressGen[pd.DataFrame]:
    """Find and classify the white cells of a smear of any size.

    Parameters
    ----------
    image : ndarray, dask array or Smear
        Full-resolution (Y, X, 3) uint8 RGB.
    ensemble : napari_wbc.inference.Ensemble or napari_wbc.routing.ModelRouter
        The classifier (see :func:`napari_wbc.inference.load_any`); a router
        picks one of its ensembles for this smear first (``df.attrs``
        ``model`` and ``route`` say which and why).
    config : ClassifyConfig
    points : ndarray (N, 2), optional
        Cell centres (y, x) in pixels to classify instead of detecting.
    labels : array-like (Y, X), optional
        A label image of cell masks (0 = background), one cell per label, to
        classify instead of detecting.
    client : dask.distributed.Client, optional
        Run the blocks on this cluster. Workers read their windows from
        ``source_path`` and load the model from the ensemble's file, so both
        must be reachable from the workers.
    source_path : path, optional
        The image file, needed with ``client``.
    file_pixel_size_um : float, optional
        The pixel size the image file records; used when ``config`` gives no
        scale (see :func:`napari_wbc.scale.iter_resolve_scale`). Taken from
        ``image`` when it is a Smear.
    detector : napari_wbc.detection.Detector, optional
        What finds the cells; default the nuclear-stain
        :class:`~napari_wbc.detection.ClassicalDetector`.
    adapted : dict, optional
        Copies already adapted to a larger source (``id(ensemble)`` → the
        adapted ensemble; :func:`iter_smear_blocks` cut the cells): the model
        chosen for this smear is replaced by its copy, when it has one.
    prepared : tuple, optional
        ``(preparation, blocks, passes)``: this smear already prepared and
        cut by :func:`iter_smear_blocks` with the same ``config``, and the
        passes its adapted copy already ran on its cells
        (:class:`napari_wbc.inference.ViewSums`, rows among the blocks'
        crops; or None): nothing is prepared or cut again.

    Yields
    ------
    Progress
        Stages "scale", "stain", ("route" with ``--model auto``), "blocks"; each "blocks" event carries the
        running differential count in ``info["counts"]`` and the cells of the
        finished block in ``info["cells"]``.

    Returns
    -------
    DataFrame
        One row per cell: y, x, diameter, class, confidence, needs_review,
        disagreement, p_<class> for every class. ``df.attrs`` holds the scale
        used (``rbc_diameter_px``, ``pixel_size_um`` when known, ``scale``,
        ``scale_source``), ``crop_px``, ``stain_normalized`` and ``classes``;
        ``seconds``, the time this thread spent per stage ("scale",
        "detector setup", "model choice", "stain fit", "adapt", and summed
        over blocks "waiting for blocks", "classify", "table"; they add up
        to the run), and ``seconds_background``, the time the background
        thread spent reading, searching and cutting the blocks ahead ("read",
        "detect", "cut crops", overlapped with "classify"; on a cluster
        neither is recorded per block); with a router, ``model``
        and ``route`` (which model classified the smear, and why). The
        ``passes`` column holds each cell's forward passes.
    """
    config = config or ClassifyConfig()
    timer = StageTimer()
    background = StageTimer()  # the blocks' reading, detection and cutting
    if prepared is None:
        prep = yield from _iter_prepare(
            image, ensemble, config, points, labels, file_pixel_size_um, detector, timer
        )
    else:
        prep, blocks, passes = prepared
        if passes is None and prep.head is not None:
            passes = prep.head.passes  # the model choice's, on the first blocks
        prep = prep._replace(head=_Head(prep.model_input, blocks, passes))
    arr, scale, rbc_px, given, detector, ensemble, route, model_input, side, tiles, head = prep
    adapted_cells, notes = 0, []
    if adapted is not None and not config.adapt and id(ensemble) in adapted:
        # Adapted once to a larger source (a folder, napari_wbc.smears): the
        # chosen model's adapted copy classifies this image.
        ensemble = adapted[id(ensemble)]
        adapted_cells = int(ensemble.metrics["adapted"]["cells"])
    from .adapt import adapt_method, auto_adapts, is_auto

    method = adapt_method(config.adapt)
    quiet = is_auto(config.adapt)
    if quiet:
        from .routing import ROUTE_CELLS

        # Cells are cut for the model choice until ROUTE_CELLS are found;
        # when fewer were, that was every cell of the image.
        found = None if route is None else route.found
        seen = found if found is not None and found < ROUTE_CELLS else None
        if client is not None or not auto_adapts(route, seen):
            method = None
    if method:
        if client is not None:
            raise WBCError(
                "adaptation runs on this machine only; adapt once (napari-wbc predict --adapt "
                "--save-adapted) and give the cluster that model"
            )
        with timer("adapt"):
            ensemble, adapted_cells, note, head = yield from _iter_adapt(
                arr, tiles, given, detector, model_input, ensemble, method, quiet
            )
        if note:
            notes.append(note)
    classes = list(ensemble.classes)
    counts = dict.fromkeys(classes, 0)
    tables = []

    def jobs():
        for tile in tiles:
            own = None if given is None else tile.select(given)
            yield tile, own

    def local_results():
        # Crops of several blocks are classified together, in batches of
        # about CROSS_BLOCK_CELLS: a block holds a few dozen cells at most, and
        # with gated TTA its cells in doubt alone make batches of a few crops,
        # which run far below the network's throughput. One result per block,
        # in block order, as before; the live count lags by a few blocks.
        # Results are (block index, table).
        pending: list[tuple[int, pd.DataFrame | None, np.ndarray | None]] = []
        done: set[int] = set()
        known = None
        if head is not None and head.model_input is model_input:
            # Blocks cut, and cells seen, to choose the model or to adapt
            # it: they make the first batch.
            pending.extend(head.blocks)
            done = {k for k, _, _ in head.blocks}
            if head.passes is not None and ensemble is head.passes.ensemble:
                known = head.passes
        todo = ((k, *job) for k, job in enumerate(jobs()) if k not in done)

        def flush(known=None):
            found = [(own, crops) for _, own, crops in pending if own is not None]
            # Classification yields its progress (so Cancel works inside it),
            # then one result per block.
            tables = iter(
                (yield from iter_classify_cells(found, ensemble, config, timer, known))
                if found
                else []
            )
            out = [(k, None if own is None else next(tables)) for k, own, _ in pending]
            pending.clear()
            yield from out

        def cut(job):
            k, tile, own = job
            if own is not None and own.empty:
                return k, None, None
            y0, y1, x0, x1 = tile.window
            with background("read"):
                window = np.asarray(arr[y0:y1, x0:x1].compute())
            return (k, *find_tile_cells(window, tile, model_input, own, detector, background))

        # Blocks are read, searched and cut on a background thread while the
        # networks classify the blocks before them (both release the GIL).
        blocks = Prefetched(cut, todo, PREFETCH_BLOCKS)
        # The first batch is small, so the networks start while the
        # background thread cuts the next batch's blocks.
        most = FIRST_BATCH_BLOCKS
        try:
            if pending:
                yield from flush(known)
                most = CROSS_BLOCK_BLOCKS
            while True:
                with timer("waiting for blocks"):
                    block = next(blocks, None)
                if block is None:
                    break
                pending.append(block)
                cells = sum(len(o) for _, o, _ in pending if o is not None)
                if cells >= CROSS_BLOCK_CELLS or len(pending) >= most:
                    yield from flush()
                    most = CROSS_BLOCK_BLOCKS
        finally:
            blocks.close()  # on Cancel: no block is read after this
        yield from flush()

    if client is None:
        results = local_results()
    else:  # in the order they complete
        results = enumerate(
            _iter_remote(client, source_path, ensemble, model_input, config, jobs(), detector)
        )
    i = -1
    for item in results:
        if isinstance(item, Progress):  # classifying a batch of blocks' cells
            yield item
            continue
        k, table = item
        i += 1
        if table is not None and len(table):
            tables.append((k, table))
            for name in table["class"]:
                counts[name] += 1
        info = {"counts": dict(counts)}
        if table is not None and len(table):
            info["cells"] = table
        yield Progress("blocks", i + 1, len(tiles), f"{sum(counts.values())} cells", info)
    columns = ["y", "x", "diameter", "class", "confidence", "disagreement", "needs_review"]
    cells = (
        # In the grid's order (blocks cut to adapt to were classified first).
        pd.concat([t for _, t in sorted(tables, key=lambda kt: kt[0])], ignore_index=True)
        if tables
        else pd.DataFrame({c: [] for c in columns + [f"p_{n}" for n in classes]})
    )
    if "out_of_distribution" in cells and len(cells):
        from .trust import image_warning

        warning = image_warning(cells["out_of_distribution"].to_numpy(bool))
        if warning:
            notes.append(warning)
            log.warning("%s", warning)
    if notes:
        cells.attrs["warning"] = "; ".join(notes)
    cells.attrs.update(
        rbc_diameter_px=rbc_px,
        pixel_size_um=scale.pixel_size_um,
        scale=scale.note,
        scale_source=scale.source,
        crop_px=side,
        stain_normalized=model_input.normalizer is not None,
        classes=classes,
        adapted_cells=adapted_cells,
        # Seconds per stage on this machine (blocks summed; not on a cluster).
        seconds=timer.rounded(),
        # Overlapped with "classify": spent on the background thread.
        seconds_background=background.rounded(),
    )
    if route is not None:
        cells.attrs["model"] = route.model
        cells.attrs["route"] = route.note
    return cells


def _tiles(shape, side: int, rbc_px: float, detector, config: ClassifyConfig) -> list[Tile]:
    """The block grid for crops of ``side`` px: halo wide enough for a crop and the detector."""
    halo, align = math.ceil(side / 2 + 3 * rbc_px), 1
    if detector is not None:
        halo, align = max(halo, detector.halo), detector.align
    return tile_grid(shape, max(int(config.block), side), halo, align)


def _iter_route(arr, rbc_px, given, detector, router: ModelRouter, config: ClassifyConfig):
    """Cut the first cells of the smear for the PBC specialist, and let the router choose.

    Blocks are read until :data:`napari_wbc.routing.ROUTE_CELLS` cells are
    found (a small field: all of it), so a whole slide costs a few blocks.
    """
    from .models.build import get_device

    model_input = yield from router.specialist.preprocessor.iter_prepare_smear(
        [arr], rbc_px, config.stain_normalize, config.stain_method
    )
    tiles = _tiles(arr.shape[:2], model_input.side, rbc_px, detector, config)
    blocks: list = []
    crops = yield from _iter_cut_cells(
        arr,
        tiles,
        given,
        detector,
        model_input,
        "route",
        "to choose the model by",
        ROUTE_CELLS,
        blocks,
    )
    ensemble, route = yield from router.iter_choose(
        crops, device=get_device(config.device), batch_size=config.batch_size
    )
    head = None
    if route.passes is not None and ensemble is route.passes.ensemble:
        # The specialist was chosen: its stain fit, the blocks cut and the
        # passes run to choose are the first of the smear's classification.
        head = _Head(model_input, blocks, route.passes)
    return ensemble, route, head


class _Head(NamedTuple):
    """Blocks already cut, and passes already run, before classifying.

    By the model choice (the specialist's on the first blocks) or by the
    adaptation (the adapted model's on a sample of blocks).
    """

    model_input: Any
    #: ``(block index, cells, crops)`` of the blocks already cut.
    blocks: list
    #: The passes run on them (:class:`napari_wbc.inference.ViewSums`, rows:
    #: indices among the blocks' crops, concatenated in this order), or None.
    passes: Any


def _iter_cut_cells(
    arr, tiles, given, detector, model_input, stage, purpose, limit=None, blocks=None, order=None
):
    """Find and cut the cells of the smear block by block (all, or until ``limit``).

    ``order``: the blocks' indices in the order to visit them (default the
    grid's). ``blocks``, a list, receives each visited block's ``(index,
    cells, crops)`` (``(index, None, None)`` for a block without cells), to
    be classified later without cutting them again.
    """
    crops = []
    visit = range(len(tiles)) if order is None else list(order)
    for i, k in enumerate(visit):
        tile = tiles[k]
        own = None if given is None else tile.select(given)
        cut = None
        if own is None or not own.empty:
            y0, y1, x0, x1 = tile.window
            window = np.asarray(arr[y0:y1, x0:x1].compute())
            own, cut = find_tile_cells(window, tile, model_input, own, detector)
            if own is not None:
                crops.extend(cut)
        if blocks is not None:
            blocks.append((k, None, None) if own is None or own.empty else (k, own, cut))
        yield Progress(stage, i + 1, len(visit), f"{len(crops)} cells {purpose}")
        if limit is not None and len(crops) >= limit:
            break
    return crops


def _iter_adapt(arr, tiles, given, detector, model_input, ensemble, method, quiet=False):
    """Find and cut the cells of a sample of blocks, and adapt ``ensemble`` to them.

    Blocks are visited in a seeded random order until they hold
    :data:`napari_wbc.adapt.MAX_CELLS` cells (the most adaptation looks at;
    a smaller image: every block). Returns the ensemble to classify with,
    the number of cells it was adapted to (0: not adapted), a warning or
    None (always None when ``quiet``: the default's adaptation, which did
    not ask for it), and a :class:`_Head`: the blocks cut, and the adapted
    model's passes over the cells it looked at, for the classification.
    """
    from .adapt import MAX_CELLS, adapt_ensemble_and_passes, cells_needed

    blocks: list = []
    order = np.random.default_rng(0).permutation(len(tiles))
    yield from _iter_cut_cells(
        arr, tiles, given, detector, model_input, "adapt", "to adapt to", MAX_CELLS, blocks, order
    )
    blocks.sort(key=lambda block: block[0])  # the grid's order: as if all were cut
    crops = [crop for _, own, cut in blocks if own is not None for crop in cut]
    least = cells_needed(method)
    if len(crops) < least:
        note = (
            f"not adapted: {len(crops)} cells found, adaptation needs {least}; "
            "classified with the model as it is"
        )
        head = _Head(model_input, blocks, None)
        if quiet:
            log.info("%s", note)
            return ensemble, 0, None, head
        log.warning("%s", note)
        return ensemble, 0, note, head
    adapted, passes = adapt_ensemble_and_passes(ensemble, crops, method=method)
    head = _Head(model_input, blocks, passes)
    return adapted, adapted.metrics["adapted"]["cells"], None, head


def classify_tile(
    window: np.ndarray,
    tile: Tile,
    ensemble,
    model_input,
    config: ClassifyConfig,
    own: pd.DataFrame | None = None,
    detector=None,
    timer: StageTimer | None = None,
) -> pd.DataFrame | None:
    """Detect (unless ``own`` cells are given) and classify the cells one tile owns.

    ``window`` is the tile's window (the block with its halo) in memory.
    Returns the owned cells in full-image coordinates, or None when there are
    none.
    """
    timer = timer or StageTimer()
    own, crops = find_tile_cells(window, tile, model_input, own, detector, timer)
    if own is None:
        return None
    return classify_cells([(own, crops)], ensemble, config, timer)[0]


def find_tile_cells(window, tile: Tile, model_input, own=None, detector=None, timer=None):
    """The cells one tile owns and their crops, or (None, None) when it owns none."""
    timer = timer or StageTimer()
    if own is None:
        with timer("detect"):
            found = detector.detect(*_detector_window(window, tile, detector))
            if "kind" in found:
                found = found[found["kind"] == "wbc"]
            own = tile.select(found)
    if own.empty:
        return None, None
    with timer("cut crops"):
        crops = model_input.crops(window, tile.origin, own.y, own.x)
    return own, crops


def _detector_window(window, tile: Tile, detector) -> tuple[np.ndarray, tuple[int, int]]:
    """The part of a tile's window that its detector needs, and that part's origin.

    A block's window is as wide as a crop needs around the block's cells
    (half a crop and more), usually wider than the detector's own halo; the
    detector looks at its halo only, not at the rest (a fifth of the pixels
    of a 2,048 px block's window). Origins stay on the detector's grid.
    """
    halo, align = detector.halo, max(int(getattr(detector, "align", 1)), 1)
    wy0, wy1, wx0, wx1 = tile.window
    by0, by1, bx0, bx1 = tile.block
    y0 = max(wy0, wy0 + (by0 - halo - wy0) // align * align)
    x0 = max(wx0, wx0 + (bx0 - halo - wx0) // align * align)
    y1, x1 = min(wy1, by1 + halo), min(wx1, bx1 + halo)
    return window[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0], (y0, x0)


def classify_cells(
    found: list[tuple[pd.DataFrame, np.ndarray]],
    ensemble,
    config: ClassifyConfig,
    timer: StageTimer | None = None,
) -> list[pd.DataFrame]:
    """Classify the crops of several tiles in one go; one table per tile, in order."""
    return run(iter_classify_cells(found, ensemble, config, timer))


def iter_classify_cells(
    found: list[tuple[pd.DataFrame, np.ndarray]],
    ensemble,
    config: ClassifyConfig,
    timer: StageTimer | None = None,
    known=None,
) -> ProgressGen[list[pd.DataFrame]]:
    """:func:`classify_cells`, yielding the classification's progress.

    ``known``: passes already run on some of the crops (``known=`` of
    :func:`napari_wbc.inference.iter_predict_crops`; rows index the crops of
    ``found``, concatenated).
    """
    from .inference import iter_predict_crops
    from .models.build import get_device

    timer = timer or StageTimer()
    crops = np.concatenate([c for _, c in found]) if len(found) > 1 else found[0][1]
    steps = iter_predict_crops(
        ensemble,
        crops,
        config.batch_size,
        config.tta,
        get_device(config.device),
        gate=not config.exhaustive,
        known=known,
    )
    while True:  # timed between events: not the time the listener takes
        with timer("classify"):
            try:
                event = next(steps)
            except StopIteration as done:
                result = done.value
                break
        yield event
    tables = []
    start = 0
    with timer("table"):
        for own, _ in found:
            stop = start + len(own)
            part = {
                k: (v[:, start:stop] if k in _PER_MEMBER else v[start:stop])
                if isinstance(v, np.ndarray)
                else v
                for k, v in result.items()
            }
            tables.append(_cell_table(own, part, ensemble, config))
            start = stop
    return tables


#: Results of :func:`napari_wbc.inference.iter_predict_crops` indexed (member, cell).
_PER_MEMBER = ("member_probs", "member_logits", "views")


def _cell_table(own: pd.DataFrame, result: dict, ensemble, config: ClassifyConfig) -> pd.DataFrame:
    """The table rows of one tile's classified cells."""
    from .inference import disagreement

    classes = list(ensemble.classes)
    table = pd.DataFrame(
        {
            "y": own.y.to_numpy(float),
            "x": own.x.to_numpy(float),
            "diameter": own["diameter"].to_numpy(float) if "diameter" in own else np.nan,
            "class": [classes[k] for k in result["pred"]],
            "confidence": result["confidence"].astype(float),
        }
    )
    table["disagreement"] = disagreement(result["member_probs"], result["probs"])
    table["needs_review"] = (table["confidence"] < config.review_confidence) | (
        table["disagreement"] > config.review_disagreement
    )
    if "ood_distance" in result:
        # Distance to the training cells in units of the model's threshold
        # (the 99th percentile on its validation cells): above 1, unlike them.
        table["ood_score"] = result["ood_distance"].astype(float) / ensemble.trust.ood_threshold
        table["out_of_distribution"] = table["ood_score"] > 1.0
        table["needs_review"] |= table["out_of_distribution"]
    table["passes"] = result["passes"]
    for k, name in enumerate(classes):
        table[f"p_{name}"] = result["probs"][:, k].astype(float)
    return table


def _remote_tile(path, tile, model_path, model_input, config, own, detector, classes=None):
    """Run one tile on a dask worker: read its window from the file, classify.

    ``classes``: the count panel the model answers with (all of its classes
    when None or all of them).
    """
    from .images import read_smear
    from .inference import load_any
    from .panels import restrict_classes

    smear = read_smear(path)
    try:
        y0, y1, x0, x1 = tile.window
        window = np.asarray(smear.levels[0][y0:y1, x0:x1].compute(scheduler="sync"))
    finally:
        smear.close()
    ensemble = restrict_classes(load_any(model_path, device="cpu"), classes)
    return classify_tile(window, tile, ensemble, model_input, config, own, detector)


def _iter_remote(client, source_path, ensemble, model_input, config, jobs, detector):
    """Submit every tile to the cluster; yield tables as they complete."""
    from dask.distributed import as_completed

    if source_path is None or ensemble.path is None:
        raise WBCError("running on a cluster needs the image and the model as files")
    futures = [
        client.submit(
            _remote_tile,
            *(str(source_path), tile, str(ensemble.path), model_input, config, own, detector),
            classes=list(ensemble.classes),
            pure=False,
        )
        for tile, own in jobs
    ]
    try:
        for future in as_completed(futures, loop=client.loop):  # client: not the default
            yield future.result()
    finally:
        for future in futures:
            future.cancel()


def _given_cells(points, labels, height: int, width: int) -> pd.DataFrame | None:
    """User-supplied cells (points or a label image) as a y, x, diameter table."""
    if points is not None and labels is not None:
        raise WBCError("give cell points or a label image, not both")
    if points is not None:
        pts = np.asarray(points, dtype=float).reshape(-1, 2)
        inside = (pts[:, 0] >= 0) & (pts[:, 0] < height) & (pts[:, 1] >= 0) & (pts[:, 1] < width)
        if not inside.all():
            log.warning("%d points outside the image are ignored", int((~inside).sum()))
        pts = pts[inside]
        return pd.DataFrame({"y": pts[:, 0], "x": pts[:, 1], "diameter": np.nan})
    if labels is not None:
        from skimage.measure import regionprops_table

        lab = np.asarray(labels)
        if lab.shape[:2] != (height, width):
            raise WBCError(
                f"the label image is {lab.shape[:2]} but the smear is {(height, width)}; "
                "they must have the same size"
            )
        props = regionprops_table(
            lab.astype(np.int64), properties=("label", "centroid", "equivalent_diameter_area")
        )
        return pd.DataFrame(
            {
                "y": props["centroid-0"],
                "x": props["centroid-1"],
                "diameter": props["equivalent_diameter_area"],
                "label": props["label"],
            }
        )
    return None


def differential_count(cells: pd.DataFrame, classes=None) -> pd.DataFrame:
    """Count and percentage per class, plus a total row."""
    classes = list(classes) if classes is not None else sorted(cells["class"].unique())
    counts = cells["class"].value_counts().reindex(classes, fill_value=0)
    total = int(counts.sum())
    table = pd.DataFrame(
        {
            "class": classes,
            "count": counts.to_numpy(int),
            "percent": 100 * counts.to_numpy() / max(total, 1),
        }
    )
    review = cells.groupby("class")["needs_review"].sum() if "needs_review" in cells else None
    if review is not None:
        table["needs_review"] = review.reindex(classes, fill_value=0).to_numpy(int)
    total_row = {"class": "total", "count": total, "percent": 100.0 if total else 0.0}
    if review is not None:
        total_row["needs_review"] = int(table["needs_review"].sum())
    return pd.concat([table, pd.DataFrame([total_row])], ignore_index=True)
