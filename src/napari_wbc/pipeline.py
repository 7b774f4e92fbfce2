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
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from .errors import WBCError
from .pixels import as_dask_rgb
from .progress import Progress, ProgressGen, run
from .routing import ROUTE_CELLS
from .scale import iter_resolve_scale
from .session import ClassifySession
from .threads import Prefetched
from .tiling import Tile, tile_grid
from .trust import REVIEW_CONFIDENCE, REVIEW_DISAGREEMENT

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
        Cells classified with less confidence are flagged ``needs_review``
        (:func:`napari_wbc.trust.review_flags`, the review rule).
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
    review_confidence: float = REVIEW_CONFIDENCE
    review_disagreement: float = REVIEW_DISAGREEMENT
    device: str = "auto"
    adapt: bool | str = "auto"
    exhaustive: bool = False


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
    """What every pass over a smear needs: its pixels, scale, cells or detector, input, grid."""

    arr: Any
    scale: Any
    rbc_px: float
    given: pd.DataFrame | None
    detector: Any
    model_input: Any
    side: int
    tiles: list


class _Cut(NamedTuple):
    """Blocks already cut (to choose the model or to adapt it), classified first.

    ``blocks``: ``(block index, cells, crops)`` in the grid's order; the
    session's passes index their crops, concatenated in this order.
    """

    model_input: Any
    blocks: list


def _iter_prepare(image, session, config, points, labels, file_pixel_size_um, detector, timer):
    """Scale, detector, model choice and stain fit of a smear: ``session.prepared``."""
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
    if session.router is not None:
        with timer("model choice"):
            yield from session.iter_choose(
                lambda specialist: _iter_route_sample(
                    arr, rbc_px, given, detector, specialist, config
                )
            )
    if session.cut is not None:
        model_input = session.cut.model_input
    else:
        with timer("stain fit"):
            model_input = yield from session.ensemble.preprocessor.iter_prepare_smear(
                [arr], rbc_px, config.stain_normalize, config.stain_method
            )
    side = model_input.side
    yield Progress("scale", 1, 1, f"red cell ≈ {rbc_px:.0f} px ({scale.note}); crops {side} px")
    tiles = _tiles((height, width), side, rbc_px, detector, config)
    session.prepared = _Prepared(arr, scale, rbc_px, given, detector, model_input, side, tiles)
    return session.prepared


def iter_smear_blocks(
    image,
    session: ClassifySession,
    config: ClassifyConfig | None = None,
    file_pixel_size_um: float | None = None,
    detector=None,
) -> ProgressGen[ClassifySession]:
    """Find and cut every white cell of a smear as the classifier will see them.

    For adapting one model to the cells of several images (a folder of
    camera fields, each with too few cells on its own; napari_wbc.smears).
    Returns ``session`` holding the smear's preparation (scale, model
    choice, stain fit, block grid) and every block's ``(index, cells,
    crops)`` in the grid's order (``session.cut``); give it to
    :func:`iter_classify_smear` (``session=``) to classify the smear
    without preparing and cutting it again.
    """
    config = config or ClassifyConfig()
    prep = yield from _iter_prepare(
        image, session, config, None, None, file_pixel_size_um, detector, StageTimer()
    )
    blocks = list(session.cut.blocks) if session.cut is not None else []
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
    session.cut = _Cut(prep.model_input, blocks)
    return session


def block_crops(blocks) -> list[np.ndarray]:
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
    session: ClassifySession | None = None,
) -> ProgressGen[pd.DataFrame]:
    """Find and classify the white cells of a smear of any size.

    ``image``: full-resolution (Y, X, 3) uint8 RGB, as an array, a dask array
    or a Smear (whose pixel size is then ``file_pixel_size_um``). ``ensemble``:
    an :class:`~napari_wbc.inference.Ensemble`, or a
    :class:`~napari_wbc.routing.ModelRouter` that picks one for this smear
    (``df.attrs`` ``model`` and ``route``). ``points`` (N, 2) cell centres or
    ``labels``, a label image of cell masks, are classified instead of
    detected; ``detector`` finds the cells otherwise (default the
    :class:`~napari_wbc.detection.ClassicalDetector`). ``client``: a
    dask.distributed Client running the blocks, whose workers read
    ``source_path`` and the ensemble's file. ``session``: the model's
    :class:`~napari_wbc.session.ClassifySession` for this smear, already
    prepared and cut by :func:`iter_smear_blocks` (a folder adapted once).

    Yields "scale", "stain", ("route"), ("adapt"), "classify" and "blocks"
    progress; each "blocks" event carries the running differential count in
    ``info["counts"]`` and the finished block's cells in ``info["cells"]``.

    Returns one row per cell (y, x, diameter, class, confidence,
    disagreement, needs_review, passes, p_<class>; with trust statistics
    ood_score, out_of_distribution). ``df.attrs``: the scale
    (``rbc_diameter_px``, ``pixel_size_um``, ``scale``, ``scale_source``),
    ``crop_px``, ``stain_normalized``, ``classes``, ``adapted_cells``,
    ``seconds`` per stage of this thread and ``seconds_background`` of the
    thread reading, searching and cutting blocks ahead, and with a router
    ``model`` and ``route``.
    """
    config = config or ClassifyConfig()
    timer, background = StageTimer(), StageTimer()  # background: reading, detecting, cutting
    if session is None:
        local = client is None
        session = ClassifySession(ensemble, config.adapt, config.device, config.batch_size, local)
    if session.prepared is None:
        yield from _iter_prepare(
            image, session, config, points, labels, file_pixel_size_um, detector, timer
        )
    prep = session.prepared
    session.take_adapted()  # a folder's copy adapted to all its images
    # Cells are cut for the model choice until ROUTE_CELLS are found: fewer, every cell.
    found = None if session.route is None else session.route.found
    method = session.adapt_method(found if found is not None and found < ROUTE_CELLS else None)
    if method:
        with timer("adapt"):
            yield from _iter_adapt(prep, session, method)
    if client is None:
        results = _iter_local_blocks(prep, session, config, timer, background)
    else:  # in the order they complete
        jobs = [(t, None if prep.given is None else t.select(prep.given)) for t in prep.tiles]
        remote = (session.ensemble, prep.model_input, config, jobs, prep.detector)
        results = enumerate(_iter_remote(client, source_path, *remote))
    tables = yield from _iter_count(results, list(session.ensemble.classes), len(prep.tiles))
    return _smear_table(tables, prep, session, timer, background)


def _iter_local_blocks(prep: _Prepared, session, config, timer, background):
    """Classify the smear's blocks on this machine: ``(block index, table)`` and progress.

    Crops of several blocks are classified together, in batches of about
    :data:`CROSS_BLOCK_CELLS`: a block holds a few dozen cells at most, and
    with gated TTA its cells in doubt alone make batches of a few crops,
    which run far below the network's throughput. One result per block, in
    block order; the live count lags by a few blocks.
    """
    ensemble, head = session.ensemble, session.cut
    pending: list[tuple[int, pd.DataFrame | None, np.ndarray | None]] = []
    done: set[int] = set()
    known = None
    if head is not None and head.model_input is prep.model_input:
        # Blocks cut, and cells seen, to choose the model or to adapt
        # it: they make the first batch.
        pending.extend(head.blocks)
        done = {k for k, _, _ in head.blocks}
        if session.passes is not None and ensemble is session.passes.ensemble:
            known = session.passes
    todo = (
        (k, tile, None if prep.given is None else tile.select(prep.given))
        for k, tile in enumerate(prep.tiles)
        if k not in done
    )

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
            window = np.asarray(prep.arr[y0:y1, x0:x1].compute())
        return (
            k,
            *find_tile_cells(window, tile, prep.model_input, own, prep.detector, background),
        )

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


def _iter_count(results, classes: list[str], n_blocks: int) -> ProgressGen[list]:
    """Pass on the classification's progress; count each block's cells as it comes.

    ``results``: progress events and ``(block index, table or None)``.
    Returns the ``(block index, table)`` of the blocks with cells.
    """
    counts = dict.fromkeys(classes, 0)
    tables = []
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
        yield Progress("blocks", i + 1, n_blocks, f"{sum(counts.values())} cells", info)
    return tables


def _smear_table(tables, prep: _Prepared, session, timer, background) -> pd.DataFrame:
    """The smear's cells in the grid's order, with what the run used in ``df.attrs``."""
    classes = list(session.ensemble.classes)
    notes = list(session.notes)
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
        rbc_diameter_px=prep.rbc_px,
        pixel_size_um=prep.scale.pixel_size_um,
        scale=prep.scale.note,
        scale_source=prep.scale.source,
        crop_px=prep.side,
        stain_normalized=prep.model_input.normalizer is not None,
        classes=classes,
        adapted_cells=session.adapted_cells,
        # Seconds per stage on this machine (blocks summed; not on a cluster).
        seconds=timer.rounded(),
        # Overlapped with "classify": spent on the background thread.
        seconds_background=background.rounded(),
    )
    if session.route is not None:
        cells.attrs["model"] = session.route.model
        cells.attrs["route"] = session.route.note
    return cells


def _tiles(shape, side: int, rbc_px: float, detector, config: ClassifyConfig) -> list[Tile]:
    """The block grid for crops of ``side`` px: halo wide enough for a crop and the detector."""
    halo, align = math.ceil(side / 2 + 3 * rbc_px), 1
    if detector is not None:
        halo, align = max(halo, detector.halo), detector.align
    return tile_grid(shape, max(int(config.block), side), halo, align)


def _iter_route_sample(arr, rbc_px, given, detector, specialist, config: ClassifyConfig):
    """The first cells of the smear cut for the PBC specialist, to choose the model by.

    Blocks are read until :data:`napari_wbc.routing.ROUTE_CELLS` cells are
    found (a small field: all of it), so a whole slide costs a few blocks.
    Returns the crops and the blocks cut (:class:`_Cut`).
    """
    model_input = yield from specialist.preprocessor.iter_prepare_smear(
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
    return crops, _Cut(model_input, blocks)


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


def _iter_adapt(prep: _Prepared, session, method: str):
    """Find and cut the cells of a sample of blocks, and adapt the session's model to them.

    Blocks are visited in a seeded random order until they hold
    :data:`napari_wbc.adapt.MAX_CELLS` cells (the most adaptation looks at;
    a smaller image: every block). The blocks cut, and the adapted model's
    passes over the cells it looked at, are kept for the classification
    (:meth:`~napari_wbc.session.ClassifySession.adapt_to`; with too few
    cells, the model as it is, and a warning unless the default's
    adaptation, which was not asked for).
    """
    from .adapt import MAX_CELLS, is_auto

    blocks: list = []
    order = np.random.default_rng(0).permutation(len(prep.tiles))
    yield from _iter_cut_cells(
        prep.arr,
        prep.tiles,
        prep.given,
        prep.detector,
        prep.model_input,
        "adapt",
        "to adapt to",
        MAX_CELLS,
        blocks,
        order,
    )
    blocks.sort(key=lambda block: block[0])  # the grid's order: as if all were cut
    cut = _Cut(prep.model_input, blocks)
    session.adapt_to(block_crops(blocks), method, cut, quiet=is_auto(session.adapt))


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
    from .trust import review_flags

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
    flags = review_flags(
        table["confidence"].to_numpy(),
        table["disagreement"].to_numpy(),
        result.get("ood_distance"),
        ensemble.trust,
        config.review_confidence,
        config.review_disagreement,
    )
    table["needs_review"] = flags["needs_review"]
    if flags["ood_score"] is not None:
        table["ood_score"] = flags["ood_score"]
        table["out_of_distribution"] = flags["out_of_distribution"]
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
