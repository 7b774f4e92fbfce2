"""How a model wants its input, in one place: stain, field of view and input size.

A :class:`Preprocessor` is built from the model files' configs (an
:class:`~napari_wbc.inference.Ensemble` owns one as ``ensemble.preprocessor``)
and turns raw material into the crops the ensemble classifies:

* a smear and cell centres (:meth:`Preprocessor.iter_prepare_smear`, then
  :meth:`SmearInput.crops` per block): crops of the model's field of view at
  the image's scale, stain-normalised from the image's own statistics to the
  model's reference;
* crop image files (:meth:`Preprocessor.iter_read_crop_files`): decoded,
  squared, stain-normalised from the crops' pooled statistics or from the
  training set's (``stain_source``).

Each member then resizes the crops to its own input size and applies its own
mean and standard deviation (:func:`napari_wbc.inference.iter_predict_crops`).
Training writes what this module reads: the stain method and the source
statistics of the training crops in ``config.training``, the target reference
in ``config.stain``. Nothing here imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import StainError, WBCError
from .images import cut_square
from .progress import Progress, ProgressGen

if TYPE_CHECKING:
    from .models.files import ModelConfig
    from .stain import StainNormalizer

logger = logging.getLogger(__name__)


__all__ = [
    "CROP_SCALES",
    "CROP_SCALE_MIN_CROPS",
    "STAIN_MIN_CROPS",
    "STAIN_SAMPLE_CROPS",
    "STAIN_SOURCES",
    "Preprocessor",
    "SmearInput",
    "crop_side",
]

#: How the scale of crop files is found (see :meth:`Preprocessor.resolve_crop_scale`).
CROP_SCALES = ("auto", "measure", "as-is")
#: Fewest crops whose scale "auto" measures: a handful of crops of one or two
#: classes gives a white-cell ruler biased by the class mix.
CROP_SCALE_MIN_CROPS = 8
#: Where the source stain statistics of crops come from (see
#: :meth:`Preprocessor.crop_normalizer`).
STAIN_SOURCES = ("auto", "fit", "training")
#: Fewer crops than this give unstable pooled stain statistics ("auto" then
#: uses the training set's).
STAIN_MIN_CROPS = 32
#: Crops pooled to fit stain statistics (of a training set or of crops to classify).
STAIN_SAMPLE_CROPS = 64
#: Stain method of model files that do not name theirs (written before the
#: method was recorded; they were all trained with Macenko's).
LEGACY_STAIN_METHOD = "macenko"


def crop_side(fov_rbc: float, rbc_diameter_px: float) -> int:
    """Side of one crop in image pixels: a field of ``fov_rbc`` red cells at this scale."""
    return max(round(fov_rbc * rbc_diameter_px), 8)


@dataclass(frozen=True)
class SmearInput:
    """What one smear needs to become model input: the crop side and the stain transform.

    Made once per image by :meth:`Preprocessor.iter_prepare_smear`; small and
    picklable, so dask workers get a copy.
    """

    side: int
    normalizer: StainNormalizer | None = None
    #: Applied after ``normalizer``: the fixed transform the training crops
    #: went through (their lab's stains onto the reference, with the model's
    #: method), so that crops mapped onto the reference's colours look as the
    #: training crops did.
    then: StainNormalizer | None = None

    def crops(self, window: np.ndarray, origin: tuple[int, int], ys, xs) -> np.ndarray:
        """Crops (N, side, side, 3) uint8 centred on (``ys``, ``xs``), normalised.

        ``window`` is an in-memory part of the image whose top-left pixel is
        ``origin``; centres are in full-image pixels.
        """
        oy, ox = origin
        crops = [
            cut_square(window, cy - oy, cx - ox, self.side) for cy, cx in zip(ys, xs, strict=True)
        ]
        out = np.stack(crops) if crops else np.zeros((0, self.side, self.side, 3), np.uint8)
        if self.normalizer is not None and len(out):
            out = self.normalizer(out)
        if self.then is not None and len(out):
            out = self.then(out)
        return out


@dataclass(frozen=True)
class Preprocessor:
    """The input rule of an ensemble (taken from its first member, as classes are).

    Attributes
    ----------
    fov_rbc : float
        Crop side in red-cell diameters (shared by every member).
    input_size : int
        Largest member input side (px); crops are prepared at least this large.
    cache_size : int
        Side (px) at which crop files are decoded, as training decoded them.
    stain_method : str
        The stain normalization method the model was trained with.
    stain_target : dict or None
        The reference crops are normalised to (``None``: the model was trained
        on raw colours, and crops are left as they are).
    stain_training_source : dict or None
        Stain statistics of the training crops, for crops from the same lab.
    """

    fov_rbc: float
    input_size: int
    cache_size: int
    stain_method: str = LEGACY_STAIN_METHOD
    stain_target: dict[str, Any] | None = None
    stain_training_source: dict[str, Any] | None = None
    #: ``fov_rbc`` relative to the field of view the models were trained at.
    fov_scale: float = 1.0

    @classmethod
    def from_configs(cls, configs: Sequence[ModelConfig], fov_scale: float = 1.0) -> Preprocessor:
        """The rule of models with these configs (the first one's stain, the largest input).

        ``fov_scale``: the field of view to classify at, relative to the
        members' training one (an ensemble file's ``fov_scale``).
        """
        first = configs[0]
        training = first.training or {}
        input_size = max(c.spec.input_size for c in configs)
        cache_size = max(
            int((c.training or {}).get("cache_size") or round(c.spec.input_size * 1.25))
            for c in configs
        )
        return cls(
            fov_rbc=first.spec.fov_rbc * fov_scale,
            input_size=input_size,
            cache_size=max(cache_size, input_size),
            stain_method=training.get("stain_method") or LEGACY_STAIN_METHOD,
            stain_target=first.stain,
            stain_training_source=training.get("stain_source"),
            fov_scale=fov_scale,
        )

    def crop_side(self, rbc_diameter_px: float) -> int:
        """Side of one crop in image pixels at this scale (see :func:`crop_side`)."""
        return crop_side(self.fov_rbc, rbc_diameter_px)

    # -- smears

    def iter_prepare_smear(
        self,
        levels,
        rbc_diameter_px: float,
        stain_normalize: bool = True,
        stain_method: str | None = None,
    ) -> ProgressGen[SmearInput]:
        """Fit the image's stains once and fix the crop side for a smear.

        Parameters
        ----------
        levels : sequence of arrays
            The smear's resolution levels (or a one-item list); the stain
            statistics are fitted on a coarse one.
        rbc_diameter_px : float
            The smear's scale (:func:`napari_wbc.scale.iter_resolve_scale`).
        stain_normalize : bool
            False leaves colours as they are.
        stain_method : str, optional
            The method that maps the smear's stains onto the model's
            reference; default :data:`napari_wbc.stain.DEFAULT_METHOD`
            (``regions``), not the method the crops were normalised with in
            training: a whole field is mostly red cells and glass, and a
            two-stain fit on it (Macenko) turns nuclei and red cells to false
            colours (docs/results.md: the built-in sample, 1/13 cells right
            with Macenko, 8/13 with ``regions`` and without normalization).

        Raises
        ------
        WBCError
            When the image's stains cannot be fitted.
        """
        side = self.crop_side(rbc_diameter_px)
        if not stain_normalize or self.stain_target is None:
            return SmearInput(side)
        from .stain import DEFAULT_METHOD, BlankImageError, StainReference, iter_prepare_normalizer

        try:
            normalizer = yield from iter_prepare_normalizer(
                list(levels),
                stain_method or DEFAULT_METHOD,
                StainReference.from_dict(self.stain_target),
            )
        except BlankImageError as exc:
            # Bare glass (an empty field of a batch): nothing to normalize and
            # no cell to find; its colours are left as they are.
            logger.warning("stain normalization skipped: %s", exc)
            return SmearInput(side)
        except WBCError as exc:
            raise WBCError(f"{exc}; or classify without stain normalization") from exc
        then = None
        if stain_method is None and normalizer.method != self.stain_method:
            # The smear's colours now match the reference's (PBC's own); the
            # training crops, also PBC's, then went through the model's method.
            then = self.training_normalizer()
        return SmearInput(side, normalizer, then)

    # -- crop files

    def training_normalizer(self) -> StainNormalizer | None:
        """From the training crops' stain statistics to the reference (None without them)."""
        if self.stain_target is None or self.stain_training_source is None:
            return None
        from .stain import StainNormalizer, StainReference

        return StainNormalizer(
            self.stain_method,
            StainReference.from_dict(self.stain_training_source),
            StainReference.from_dict(self.stain_target),
        )

    def crop_normalizer(
        self, read: Callable[[int], np.ndarray], n: int, how: str = "auto"
    ) -> StainNormalizer | None:
        """Normaliser from ``n`` crops' stains (or the training set's) to the reference.

        Parameters
        ----------
        read : callable
            ``read(i)`` returns crop ``i`` (uint8 RGB), for the crops pooled.
        n : int
            Number of crops.
        how : {"auto", "fit", "training"}
            "fit": statistics pooled over a seeded sample of the crops, as
            training did for its crops (right for crops from another lab, but
            it assumes a mix of cells). "training": the training crops'
            statistics (right for crops from the same scanner and stain).
            "auto": "fit" for at least :data:`STAIN_MIN_CROPS` crops (or when
            the model does not record its training statistics), else
            "training", and "training" when fitting finds too little stain.
        """
        if how not in STAIN_SOURCES:
            raise WBCError(f"stain_source must be one of {', '.join(STAIN_SOURCES)}, got {how!r}")
        if self.stain_target is None:
            return None
        from .stain import StainNormalizer, StainReference, fit_stain_reference

        trained_on = self.stain_training_source
        source = None
        if how == "fit" or (how == "auto" and (n >= STAIN_MIN_CROPS or trained_on is None)):
            pick = np.random.default_rng(0).permutation(n)[:STAIN_SAMPLE_CROPS]
            pixels = np.concatenate([read(int(i)).reshape(-1, 3) for i in pick])
            try:
                source = fit_stain_reference(pixels, description=f"{len(pick)} crops to classify")
                if self.stain_method not in source.stats:
                    reason = source.refused.get(self.stain_method, "no statistics fitted")
                    raise StainError(f"{self.stain_method} refused: {reason}")
            except StainError as exc:
                source = None
                if how == "fit" or trained_on is None:
                    raise StainError(f"cannot normalise these crops: {exc}") from exc
                logger.warning("%s; using the training set's stain statistics instead", exc)
        if source is None:
            if trained_on is None:
                raise WBCError(
                    "the model does not record its training stain statistics; use 'fit'"
                )
            source = StainReference.from_dict(trained_on)
        return StainNormalizer(
            self.stain_method, source, StainReference.from_dict(self.stain_target)
        )

    def resolve_crop_scale(self, paths: Sequence[str], scale: str | float = "auto"):
        """The red-cell diameter (px) of a set of crop files, or None to take them as they are.

        Parameters
        ----------
        paths : sequence of str
            The crops, all from one microscope and magnification.
        scale : {"auto", "measure", "as-is"} or float
            "as-is": the crops already show the model's field of view (as
            the training crops did); they are only squared and resized.
            "measure": measured on the crops (red cells, else white-cell
            nuclei; :func:`napari_wbc.crop_scale.measure_crop_scale`), an error
            when impossible. "auto" (default): "measure" for at least
            :data:`CROP_SCALE_MIN_CROPS` crops, falling back to "as-is" with a
            warning when the scale cannot be measured; "as-is" for fewer
            crops. A number is the red-cell diameter in pixels.

        Returns
        -------
        napari_wbc.crop_scale.CropScale or None
        """
        from .crop_scale import CropScale, CropScaleError, measure_crop_scale
        from .datasets import decode_image
        from .threads import thread_map

        if not isinstance(scale, str):
            value = float(scale)
            if not np.isfinite(value) or value <= 0:
                raise WBCError(f"the red-cell diameter must be a positive number, got {scale!r}")
            return CropScale(value, "given", len(paths))
        if scale not in CROP_SCALES:
            raise WBCError(
                f"crop scale must be one of {', '.join(CROP_SCALES)} or a red-cell diameter "
                f"in px, got {scale!r}"
            )
        if scale == "as-is" or (scale == "auto" and len(paths) < CROP_SCALE_MIN_CROPS):
            return None
        rng = np.random.default_rng(0)
        pick = sorted(rng.choice(len(paths), size=min(24, len(paths)), replace=False))
        try:
            return measure_crop_scale(thread_map(decode_image, [paths[int(i)] for i in pick]))
        except CropScaleError as exc:
            if scale == "measure":
                raise
            logger.warning("%s; classifying the crops as they are", exc)
            return None

    def crop_file_reader(self, rbc_diameter_px: float | None) -> Callable[[str], np.ndarray]:
        """``read(path)``: a crop file decoded, at the model's field of view, memoised.

        One reader shared by :meth:`crop_files_normalizer` and
        :meth:`iter_read_crop_files` (``reader=``) decodes each file once.
        """
        from .crop_scale import to_field_of_view
        from .datasets import CropCache, decode_image

        if rbc_diameter_px is None and self.fov_scale == 1:
            return CropCache(self.cache_size).get
        memo: dict[str, np.ndarray] = {}

        def read(path: str) -> np.ndarray:
            if path not in memo:
                image = decode_image(path)
                # Taken as it is, a crop's shorter side spans the training
                # field of view; a model classifying at another one cuts
                # its centre (or pads it) to that.
                rbc = rbc_diameter_px or min(image.shape[:2]) * self.fov_scale / self.fov_rbc
                memo[path] = to_field_of_view(image, rbc, self.fov_rbc, self.cache_size)
            return memo[path]

        return read

    def crop_files_normalizer(
        self,
        paths: Sequence[str],
        stain_source: str = "auto",
        rbc_diameter_px: float | None = None,
        *,
        reader: Callable[[str], np.ndarray] | None = None,
    ) -> StainNormalizer | None:
        """:meth:`crop_normalizer` for a set of crop files, read as :meth:`iter_read_crop_files` does.

        ``reader``: a :meth:`crop_file_reader` for ``rbc_diameter_px`` to share.
        """
        paths = [str(p) for p in paths]
        read = reader or self.crop_file_reader(rbc_diameter_px)
        return self.crop_normalizer(lambda i: read(paths[i]), len(paths), stain_source)

    def iter_read_crop_files(
        self,
        paths: Sequence[str],
        stain_source: str = "auto",
        rbc_diameter_px: float | None = None,
        normalizer: StainNormalizer | str | None = "fit",
        *,
        reader: Callable[[str], np.ndarray] | None = None,
    ) -> ProgressGen[np.ndarray]:
        """Decode crop files as training did and normalise their stains; (N, S, S, 3) uint8.

        Yields stage "read" events. ``stain_source`` is that of
        :meth:`crop_normalizer`. With ``rbc_diameter_px`` (from
        :meth:`resolve_crop_scale`) every crop is first brought to the model's
        field of view (:func:`napari_wbc.crop_scale.to_field_of_view`);
        without it, crops are squared and resized as they are. ``normalizer``:
        "fit" (default) finds it for these files (:meth:`crop_files_normalizer`);
        pass one already found for the set (or None) when reading part of it.
        ``reader``: a :meth:`crop_file_reader` for ``rbc_diameter_px`` to
        share (files it has read are not decoded again).
        """
        paths = [str(p) for p in paths]
        read = reader or self.crop_file_reader(rbc_diameter_px)
        if isinstance(normalizer, str):
            if normalizer != "fit":
                raise WBCError(
                    f"normalizer must be 'fit', None or a normalizer, got {normalizer!r}"
                )
            normalizer = self.crop_normalizer(lambda i: read(paths[i]), len(paths), stain_source)

        def prepared(path: str) -> np.ndarray:
            crop = read(path)
            return normalizer(crop) if normalizer is not None else crop

        # Decoding, resizing and the colour lookup release the GIL: crops are
        # read by as many threads as the computation uses (napari_wbc.threads),
        # in order, a chunk at a time (progress and cancel between chunks).
        from .threads import compute_threads

        workers = min(compute_threads(), 8)
        crops: list[np.ndarray] = []
        step = max(16, len(paths) // 100)
        with ThreadPoolExecutor(workers) as pool:
            for start in range(0, len(paths), step):
                crops.extend(pool.map(prepared, paths[start : start + step]))
                done = len(crops)
                yield Progress("read", done, len(paths), f"read {done}/{len(paths)} crops")
        return np.stack(crops)
