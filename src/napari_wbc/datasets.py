"""Labelled single-cell crops: reading, splitting, subsetting, caching, feeding.

A labelled crop set is a table with one row per image, ``path`` (absolute)
and ``label``; :func:`load_labelled_crops` reads it from a CSV or from a
folder with one subfolder per class. :func:`stratified_split`,
:func:`long_tailed_subset` and :func:`balanced_subset` choose rows, seeded.

For training, :class:`CropCache` decodes each image once and keeps a square
uint8 crop of fixed size (in memory, and optionally on disk across runs), and
:class:`CropDataset` turns cached crops into normalised tensors, with
augmentation suited to blood cells when training.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from napari_wbc.errors import DataError, ImageReadError
from napari_wbc.progress import Progress, ProgressGen

__all__ = [
    "IMAGE_SUFFIXES",
    "LABS",
    "LAB_RBC_DIAMETER_PX",
    "SHARED_CLASSES",
    "Augmentation",
    "CropCache",
    "CropDataset",
    "balanced_subset",
    "cached_lab_crops",
    "class_counts",
    "decode_image",
    "load_lab_table",
    "load_labelled_crops",
    "long_tailed_subset",
    "perturb_stain",
    "read_lab_crops",
    "stratified_split",
]

log = logging.getLogger(__name__)

#: File name endings recognised as images in a class-per-folder layout.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

_SHOW = 5  # how many offending items an error message lists


# ---------------------------------------------------------------- reading


def load_labelled_crops(source: str | os.PathLike) -> pd.DataFrame:
    """Read a labelled crop set.

    Parameters
    ----------
    source : str or Path
        Either a CSV file with columns ``path`` and ``label`` (paths relative
        to the CSV's folder, or absolute; other columns such as ``subtype``
        are kept), or a folder. A folder holding ``labels.csv`` is read
        through that file; otherwise each subfolder is a class named after
        it, holding images (see :data:`IMAGE_SUFFIXES`; hidden entries are
        ignored, subfolders of class folders are not searched).

    Returns
    -------
    pandas.DataFrame
        Columns ``path`` (absolute, str) and ``label`` (str), then any extra
        CSV columns; one row per image, in file (or sorted folder) order.

    Raises
    ------
    DataError
        If the source is missing, empty or malformed, a class folder holds no
        image, or listed images do not exist.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(
            f"{source} does not exist; give a CSV with path,label columns "
            "or a folder with one subfolder of images per class"
        )
    if source.is_dir():
        csv = source / "labels.csv"
        return _crops_from_csv(csv) if csv.is_file() else _crops_from_folder(source)
    return _crops_from_csv(source)


def _crops_from_csv(csv: Path) -> pd.DataFrame:
    """Rows of a ``path,label`` CSV with paths made absolute and checked."""
    try:
        df = pd.read_csv(csv, dtype={"path": str, "label": str}, keep_default_na=False)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{csv} is empty; expected a header line 'path,label' and rows") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv} is not a readable CSV file ({exc})") from exc
    missing = [c for c in ("path", "label") if c not in df.columns]
    if missing:
        raise DataError(
            f"{csv} lacks the column(s) {', '.join(missing)}; "
            f"it has {', '.join(map(str, df.columns))}"
        )
    if df.empty:
        raise DataError(f"{csv} has a header but no rows")
    df["path"] = df["path"].str.strip()
    df["label"] = df["label"].str.strip()
    blank = df.index[(df["path"] == "") | (df["label"] == "")]
    if len(blank):
        lines = [int(i) + 2 for i in blank[:_SHOW]]  # +2: header line, 1-based
        raise DataError(
            f"{csv}: {len(blank)} row(s) with an empty path or label, e.g. lines {lines}"
        )
    base = csv.parent.absolute()
    df["path"] = [os.path.normpath(base / p) for p in df["path"]]
    absent = [p for p in df["path"] if not os.path.isfile(p)]
    if absent:
        raise DataError(
            f"{len(absent)} of {len(df)} images listed in {csv} were not found "
            f"(paths are read relative to {base}), e.g. {absent[:_SHOW]}"
        )
    columns = ["path", "label"] + [c for c in df.columns if c not in ("path", "label")]
    return df[columns].reset_index(drop=True)


def _crops_from_folder(folder: Path) -> pd.DataFrame:
    """Rows of a class-per-subfolder image tree."""
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"{folder} has no class subfolders; put each class's images in a "
            "subfolder named after the class, or give a CSV with path,label"
        )
    rows = []
    for d in class_dirs:
        images = sorted(
            f
            for f in d.iterdir()
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES
        )
        if not images:
            raise DataError(
                f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                "remove it or add images"
            )
        rows += [(os.path.normpath(f.absolute()), d.name) for f in images]
    return pd.DataFrame(rows, columns=["path", "label"])


# ---------------------------------------------------------------- choosing rows


def stratified_split(
    labels: Sequence, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into training and validation sets, class by class.

    Parameters
    ----------
    labels : sequence
        Label of every item.
    val_fraction : float
        Fraction of each class put in validation, in ``(0, 1)``. Each class
        gets ``round(n * val_fraction)`` validation items, but at least one
        and at most ``n - 1``, so it appears on both sides.
    seed : int
        Seed of the shuffle within each class.

    Returns
    -------
    train_idx, val_idx : numpy.ndarray
        Sorted int64 indices into ``labels``, disjoint, covering all items.

    Raises
    ------
    DataError
        If ``val_fraction`` is out of range or a class has fewer than 2 items.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1; got {val_fraction}")
    labels = np.asarray(labels)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    small = [f"{c!s} ({n})" for c, n in zip(classes, counts, strict=True) if n < 2]
    if small:
        raise DataError(
            f"classes with fewer than 2 items cannot be split into training and "
            f"validation: {', '.join(small)}; add images or drop these classes"
        )
    rng = np.random.default_rng(seed)
    val = []
    for c, n in enumerate(counts):
        members = rng.permutation(np.flatnonzero(inverse == c))
        n_val = min(max(round(n * val_fraction), 1), n - 1)
        val.append(members[:n_val])
    val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels), dtype=np.int64), val_idx)
    return train_idx, val_idx


def long_tailed_subset(
    df: pd.DataFrame,
    label_col: str = "label",
    imbalance_ratio: float = 100,
    max_per_class: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Draw a long-tailed subset with an exponential class-size profile.

    Classes are ranked by how many rows they have (largest first, ties by
    name); class ``i`` of ``C`` keeps ``round(n_max * ratio ** (-i / (C - 1)))``
    rows (at least 1), where ``n_max`` is the largest class's count, capped by
    ``max_per_class``. This is the profile of the CIFAR-LT benchmarks (Cui et
    al. 2019). A class with fewer rows than its target keeps all of them.

    Parameters
    ----------
    df : pandas.DataFrame
        The rows to choose from.
    label_col : str
        Column holding the class label.
    imbalance_ratio : float
        Ratio of the largest to the smallest class size, ``>= 1``.
    max_per_class : int, optional
        Cap on the largest class.
    seed : int
        Seed of the random choice of rows within each class.

    Returns
    -------
    pandas.DataFrame
        The chosen rows, in their original order, with their original index.
    """
    if imbalance_ratio < 1:
        raise DataError(f"imbalance_ratio must be >= 1; got {imbalance_ratio}")
    counts = _class_counts(df, label_col)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    n_max = ranked[0][1] if max_per_class is None else min(ranked[0][1], int(max_per_class))
    steps = max(len(ranked) - 1, 1)
    targets = {}
    for i, (label, available) in enumerate(ranked):
        want = max(round(n_max * imbalance_ratio ** (-i / steps)), 1)
        if want > available:
            log.info("class %s has %d rows, fewer than the %d asked for", label, available, want)
        targets[label] = min(want, available)
    return _choose_per_class(df, label_col, targets, seed)


def balanced_subset(
    df: pd.DataFrame, label_col: str = "label", per_class: int = 100, seed: int = 0
) -> pd.DataFrame:
    """Draw up to ``per_class`` rows of every class, seeded.

    Parameters
    ----------
    df : pandas.DataFrame
    label_col : str
        Column holding the class label.
    per_class : int
        Rows kept per class (all of them for smaller classes).
    seed : int

    Returns
    -------
    pandas.DataFrame
        The chosen rows, in their original order, with their original index.
    """
    if per_class < 1:
        raise DataError(f"per_class must be >= 1; got {per_class}")
    counts = _class_counts(df, label_col)
    return _choose_per_class(
        df, label_col, {c: min(n, per_class) for c, n in counts.items()}, seed
    )


def _class_counts(df: pd.DataFrame, label_col: str) -> dict:
    """Rows per class, with a clear error for a bad column or empty table."""
    if label_col not in df.columns:
        raise DataError(f"no column {label_col!r}; the table has {list(df.columns)}")
    if df.empty:
        raise DataError("the table has no rows")
    return df[label_col].value_counts(sort=False).to_dict()


def _choose_per_class(df: pd.DataFrame, label_col: str, targets: dict, seed: int) -> pd.DataFrame:
    """Rows chosen at random within each class, ``targets[label]`` of each."""
    rng = np.random.default_rng(seed)
    labels = df[label_col].to_numpy()
    keep = []
    for label in sorted(targets, key=str):
        members = np.flatnonzero(labels == label)
        keep.append(rng.choice(members, size=targets[label], replace=False))
    return df.iloc[np.sort(np.concatenate(keep))]


# ---------------------------------------------------------------- decoding and caching


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to a ``(Y, X, 3)`` uint8 RGB array.

    8-bit RGB and grayscale JPEG/PNG/BMP go through Pillow directly (fast);
    anything else through :func:`napari_wbc.images.read_smear`, so crops get
    the same conversions (16-bit, RGBA, palette, TIFF) as whole smears.

    Raises
    ------
    ImageReadError
        If the file cannot be read.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        try:
            with Image.open(path) as im:
                if im.mode in ("RGB", "L"):
                    return np.asarray(im.convert("RGB"))
        except UnidentifiedImageError as exc:
            raise ImageReadError(f"{path} is not an image napari-wbc can read") from exc
        except OSError as exc:
            raise ImageReadError(f"{path} cannot be decoded ({exc})") from exc
    from napari_wbc.images import read_smear

    smear = read_smear(path)
    try:
        return np.asarray(smear.data.compute())
    finally:
        smear.close()


def _square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop (side = shorter side), resized to ``size`` px."""
    from PIL import Image

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = np.ascontiguousarray(image[top : top + side, left : left + side])
    if side == size:
        return square
    # Pillow's resampling filters are antialiased when shrinking; cropping
    # first keeps pixels outside the square from bleeding in at its edges.
    return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR))


class CropCache:
    """Decode each crop once and keep it as a square uint8 array.

    Every image is centre-cropped to a square (its shorter side) and resized
    to ``cache_size`` px; pick ``cache_size`` slightly above the model input
    so augmentation can zoom in without upsampling. Crops are kept in memory
    (``in_memory``) and, with ``cache_dir``, as ``.npy`` files keyed by (file
    path, modification time, file size, ``cache_size``), so later epochs and
    later runs skip JPEG decoding; a changed file gets a new key.

    A transform (a stain normalizer) may be applied once at cache time. Its
    output is written to disk only when it comes with a ``transform_key``
    naming it (two normalizers must never share a key); without one the
    transformed crop is kept in memory only.

    With a DataLoader, ``num_workers=0`` shares the memory layer across
    epochs; worker processes each fill their own copy, which the disk layer
    makes cheap.

    Parameters
    ----------
    cache_size : int
        Side of the cached square crops, in pixels.
    cache_dir : str or Path, optional
        Folder for the disk layer; created when needed.
    in_memory : bool
        Keep crops in memory (about ``3 * cache_size**2`` bytes each).

    Attributes
    ----------
    decoded, disk_hits, memory_hits : int
        How often an image was decoded, read from disk or found in memory.
    """

    def __init__(
        self,
        cache_size: int = 256,
        cache_dir: str | os.PathLike | None = None,
        in_memory: bool = True,
    ):
        if cache_size < 8:
            raise DataError(f"cache_size must be at least 8 px; got {cache_size}")
        self.cache_size = int(cache_size)
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self.in_memory = in_memory
        self.decoded = self.disk_hits = self.memory_hits = 0
        self._memory: dict[tuple, np.ndarray] = {}
        # Strong references keep id(transform) unique while it is a memory key.
        self._transforms: dict[int, Callable] = {}

    def get(
        self,
        path: str | os.PathLike,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        transform_key: str | None = None,
    ) -> np.ndarray:
        """The cached ``(cache_size, cache_size, 3)`` uint8 crop of ``path``.

        Parameters
        ----------
        path : str or Path
            Image file.
        transform : callable, optional
            uint8 HxWx3 -> uint8 HxWx3, applied once to the resized crop.
        transform_key : str, optional
            Stable name of ``transform`` for the disk layer.

        Returns
        -------
        numpy.ndarray
            Treat as read-only: it is shared with the cache.
        """
        file_key = self._file_key(path)
        if transform is None:
            return self._lookup((*file_key, None), file_key, lambda: self._decode(path))
        if transform_key is None:
            self._transforms[id(transform)] = transform
            memory_key, disk_key = (*file_key, "id", id(transform)), None
        else:
            memory_key = disk_key = (*file_key, "key", str(transform_key))
        return self._lookup(
            memory_key,
            disk_key,
            lambda: self._apply(transform, self._raw(path, file_key), path),
        )

    def iter_fill(
        self,
        paths: Sequence[str | os.PathLike],
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        transform_key: str | None = None,
    ) -> ProgressGen[int]:
        """Put every path in the cache, yielding progress; returns how many were decoded."""
        total = len(paths)
        before = self.decoded
        step = max(1, total // 100)
        yield Progress("cache", 0, total, "caching crops")
        for i, p in enumerate(paths, 1):
            self.get(p, transform, transform_key)
            if i % step == 0 or i == total:
                yield Progress("cache", i, total, f"cached {i}/{total} crops")
        return self.decoded - before

    def clear_memory(self) -> None:
        """Drop the in-memory layer (the disk layer stays)."""
        self._memory.clear()
        self._transforms.clear()

    # -- internals

    def _file_key(self, path: str | os.PathLike) -> tuple:
        """(absolute path, mtime_ns, size, cache_size): changes when the file does."""
        path = os.path.abspath(path)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ImageReadError(f"{path} cannot be read ({exc.strerror})") from exc
        return (path, st.st_mtime_ns, st.st_size, self.cache_size)

    def _raw(self, path, file_key: tuple) -> np.ndarray:
        """The untransformed crop, from disk or decoded (kept in memory only if asked)."""
        if self.in_memory and (*file_key, None) in self._memory:
            self.memory_hits += 1
            return self._memory[(*file_key, None)]
        return self._from_disk_or(file_key, lambda: self._decode(path))

    def _lookup(self, memory_key: tuple, disk_key: tuple | None, make) -> np.ndarray:
        """Memory, then disk (unless ``disk_key`` is None), then ``make()``; stores back."""
        if self.in_memory and memory_key in self._memory:
            self.memory_hits += 1
            return self._memory[memory_key]
        crop = make() if disk_key is None else self._from_disk_or(disk_key, make)
        crop.setflags(write=False)  # shared between epochs: nobody may edit it in place
        if self.in_memory:
            self._memory[memory_key] = crop
        return crop

    def _from_disk_or(self, key: tuple, make) -> np.ndarray:
        """Read ``key`` from the disk layer, or ``make()`` it and write it there."""
        file = None if self.cache_dir is None else self._disk_path(key)
        if file is not None and file.is_file():
            try:
                crop = np.load(file, allow_pickle=False)
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable cache file %s (%s)", file, exc)
            else:
                if crop.shape == (self.cache_size, self.cache_size, 3) and crop.dtype == np.uint8:
                    self.disk_hits += 1
                    return crop
                log.warning("ignoring cache file %s of shape %s", file, crop.shape)
        crop = make()
        if file is not None:
            self._write(file, crop)
        return crop

    def _disk_path(self, key: tuple) -> Path:
        digest = hashlib.sha1("\0".join(map(str, key)).encode()).hexdigest()
        return self.cache_dir / digest[:2] / f"{digest}.npy"

    def _write(self, file: Path, crop: np.ndarray) -> None:
        """Atomic write, so a crash or a parallel worker never leaves half a file."""
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=file.parent)
            with os.fdopen(fd, "wb") as f:
                np.save(f, crop, allow_pickle=False)
            os.replace(tmp, file)
        except OSError as exc:
            # A full or read-only disk slows later runs down but breaks nothing.
            log.warning("cannot write crop cache file %s (%s)", file, exc)

    def _decode(self, path) -> np.ndarray:
        self.decoded += 1
        return _square_resize(decode_image(path), self.cache_size)

    def _apply(self, transform, crop: np.ndarray, path) -> np.ndarray:
        out = np.asarray(transform(crop))
        if out.dtype != np.uint8 or out.shape != crop.shape:
            raise DataError(
                f"the stain normalizer turned a {crop.shape} uint8 crop of {path} into "
                f"{out.dtype} {out.shape}; it must return uint8 of the same shape"
            )
        return out


# ---------------------------------------------------------------- training data


@dataclass(frozen=True)
class Augmentation:
    """Strength of the training-time augmentation of :class:`CropDataset`.

    Geometric changes are safe for blood cells because a cell has no
    preferred orientation; colour changes stay mild because colour (granules,
    cytoplasm tint) separates the classes.

    Attributes
    ----------
    flip : bool
        Random horizontal and vertical flips.
    rotate90 : bool
        Random multiples of 90°.
    max_angle : float
        Extra rotation drawn from ``[-max_angle, max_angle]`` degrees.
    scale : tuple of float
        Zoom range (log-uniform); 1 shows the whole cached crop.
    translate : float
        Shift range as a fraction of the side.
    brightness, contrast, saturation : float
        Factors drawn from ``[1 - x, 1 + x]``.
    hue : float
        Hue shift drawn from ``[-hue, hue]`` (fraction of the hue circle).
    stain_scale, stain_shift : float
        Haematoxylin/eosin/residual optical densities are scaled by
        ``[1 - stain_scale, 1 + stain_scale]`` and shifted by
        ``[-stain_shift, stain_shift]`` (OD units), per channel, as in the
        HED augmentation of Tellez et al. (2018), mimicking stain variation.
    """

    flip: bool = True
    rotate90: bool = True
    max_angle: float = 10.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02
    stain_scale: float = 0.05
    stain_shift: float = 0.03


def _hed_matrices() -> tuple[torch.Tensor, torch.Tensor]:
    """RGB optical density <-> HED (Ruifrok & Johnston) as float32 tensors."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    return (
        torch.as_tensor(hed_from_rgb, dtype=torch.float32),
        torch.as_tensor(rgb_from_hed, dtype=torch.float32),
    )


def perturb_stain(
    image: torch.Tensor, scale: Sequence[float], shift: Sequence[float]
) -> torch.Tensor:
    """Scale and shift the H, E and residual optical densities of an RGB image.

    ``image`` is ``(3, H, W)`` float in [0, 1]; ``scale = shift = (1, 1, 1),
    (0, 0, 0)`` returns it unchanged (up to rounding).
    """
    hed_from_rgb, rgb_from_hed = _hed_matrices()
    od = -torch.log(image.clamp_min(1e-6)).permute(1, 2, 0)  # H, W, 3
    hed = od @ hed_from_rgb
    hed = hed * torch.as_tensor(scale, dtype=hed.dtype) + torch.as_tensor(shift, dtype=hed.dtype)
    return torch.exp(-(hed @ rgb_from_hed)).clamp(0.0, 1.0).permute(2, 0, 1)


class CropDataset(torch.utils.data.Dataset):
    """Labelled crops as normalised tensors, augmented when training.

    Parameters
    ----------
    paths : sequence of str or Path
        Image files.
    labels : array of int
        Class index of every image.
    cache : CropCache
        Where decoded crops are kept.
    input_size : int
        Side of the model input in pixels.
    mean, std : sequence of 3 float
        Per-channel normalisation, in 0–1 units (timm convention).
    train : bool
        Augment (see :class:`Augmentation`); otherwise just resize and normalise.
    stain_normalizer : callable, optional
        uint8 HxWx3 -> uint8 HxWx3, applied once per crop at cache time. If it
        has a string attribute ``cache_key`` (or ``stain_key`` is given), its
        output is also cached on disk.
    seed : int
        With the epoch (:meth:`set_epoch`) and the index, fixes the
        augmentation of every item, whatever the loading order or worker.
    augmentation : Augmentation, optional
        Augmentation strengths; defaults to ``Augmentation()``.
    stain_key : str, optional
        Stable name of ``stain_normalizer`` for the disk cache.

    Notes
    -----
    ``__getitem__`` returns ``(image, label)``: a float32 ``(3, input_size,
    input_size)`` tensor and a Python int. Evaluation shows the whole cached
    crop resized (antialiased) to ``input_size``; training shows it zoomed by
    ``augmentation.scale`` around a slightly shifted centre, rotated and
    flipped, resampled bilinearly with reflected borders, then stain- and
    colour-jittered.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int] | np.ndarray,
        cache: CropCache,
        input_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        stain_normalizer: Callable[[np.ndarray], np.ndarray] | None = None,
        seed: int = 0,
        augmentation: Augmentation | None = None,
        stain_key: str | None = None,
    ):
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        if self.labels.shape != (len(self.paths),):
            raise DataError(f"{len(self.paths)} paths but labels of shape {self.labels.shape}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise DataError(f"mean and std need 3 values each, std > 0; got {mean}, {std}")
        self.cache = cache
        self.input_size = int(input_size)
        self.mean = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.as_tensor(std, dtype=torch.float32)[:, None, None]
        self.train = bool(train)
        self.stain_normalizer = stain_normalizer
        self.stain_key = (
            stain_key if stain_key is not None else getattr(stain_normalizer, "cache_key", None)
        )
        self.seed = int(seed)
        self.epoch = 0
        self.augmentation = augmentation or Augmentation()

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch, which changes the training augmentation."""
        self.epoch = int(epoch)

    def crop(self, index: int) -> np.ndarray:
        """The cached (stain-normalised) uint8 crop of item ``index``."""
        return self.cache.get(self.paths[index], self.stain_normalizer, self.stain_key)

    def iter_fill_cache(self) -> ProgressGen[int]:
        """Decode every crop into the cache ahead of training, yielding progress."""
        return self.cache.iter_fill(self.paths, self.stain_normalizer, self.stain_key)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.transforms.v2 import functional as TF

        image = torch.from_numpy(np.array(self.crop(index))).permute(2, 0, 1)  # 3, S, S uint8
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, int(index)])
            x = self._augment(image, rng)
        else:
            if image.shape[-1] != self.input_size:
                image = TF.resize(image, [self.input_size] * 2, antialias=True)
            x = image.float() / 255.0
        return (x - self.mean) / self.std, int(self.labels[index])

    def _augment(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Geometric, stain and colour augmentation of a 3xSxS uint8 crop."""
        from torchvision.transforms.v2 import functional as TF

        aug = self.augmentation
        lo, hi = aug.scale
        # Shrink big caches first (antialiased) so the bilinear warp below
        # does not alias; keep enough pixels for the strongest zoom.
        needed = math.ceil(self.input_size * max(hi, 1.0))
        if image.shape[-1] > needed * 1.25:
            image = TF.resize(image, [needed] * 2, antialias=True)
        x = image.float()[None] / 255.0

        zoom = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        angle = math.radians(rng.uniform(-aug.max_angle, aug.max_angle))
        if aug.rotate90:
            angle += math.pi / 2 * int(rng.integers(4))
        fx, fy = rng.choice([-1.0, 1.0], size=2) if aug.flip else (1.0, 1.0)
        tx, ty = rng.uniform(-2 * aug.translate, 2 * aug.translate, size=2)
        c, s = math.cos(angle), math.sin(angle)
        # affine_grid maps output to input coordinates (both in [-1, 1]):
        # rotate, flip, then divide by the zoom to show a smaller region.
        theta = torch.tensor(
            [[c * fx / zoom, -s * fy / zoom, tx], [s * fx / zoom, c * fy / zoom, ty]],
            dtype=torch.float32,
        )[None]
        grid = torch.nn.functional.affine_grid(
            theta, [1, 3, self.input_size, self.input_size], align_corners=False
        )
        x = torch.nn.functional.grid_sample(
            x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )[0]

        if aug.stain_scale or aug.stain_shift:
            x = perturb_stain(
                x,
                rng.uniform(1 - aug.stain_scale, 1 + aug.stain_scale, size=3),
                rng.uniform(-aug.stain_shift, aug.stain_shift, size=3),
            )
        if aug.brightness:
            x = TF.adjust_brightness(x, float(rng.uniform(1 - aug.brightness, 1 + aug.brightness)))
        if aug.contrast:
            x = TF.adjust_contrast(x, float(rng.uniform(1 - aug.contrast, 1 + aug.contrast)))
        if aug.saturation:
            x = TF.adjust_saturation(x, float(rng.uniform(1 - aug.saturation, 1 + aug.saturation)))
        if aug.hue:
            x = TF.adjust_hue(x, float(rng.uniform(-aug.hue, aug.hue)))
        return x.clamp(0.0, 1.0)


def class_counts(labels: Iterable[int], num_classes: int) -> list[int]:
    """Items per class index ``0 .. num_classes - 1`` (for the class-balanced loss)."""
    return np.bincount(np.asarray(list(labels), dtype=np.int64), minlength=num_classes).tolist()


# ---------------------------------------------------------------- labelled labs

#: The white-cell classes every labelled lab of the shared data has.
SHARED_CLASSES: tuple[str, ...] = (
    "basophil",
    "eosinophil",
    "lymphocyte",
    "monocyte",
    "neutrophil",
)
#: Labelled labs of the shared data folder (see its README).
LABS: tuple[str, ...] = ("pbc", "lisc", "bccd", "raabin")
#: Red-cell diameter in pixels of each lab, as documented in the data's README
#: (PBC ~70-80 px, LISC ~40-50 px, BCCD ~100-110 px, Raabin ~35-60 px at 224): the
#: scale "given". Raabin's magnification varies between smears; its 224 px crops
#: span about 4.8 red-cell diameters, the models' field of view.
LAB_RBC_DIAMETER_PX: dict[str, float] = {"pbc": 75.0, "lisc": 45.0, "bccd": 104.0, "raabin": 47.0}


def load_lab_table(
    lab: str, root: str | os.PathLike | None = None, classes: Sequence[str] = SHARED_CLASSES
) -> pd.DataFrame:
    """The labelled white cells of one lab of the shared data, one row per cell.

    Parameters
    ----------
    lab : {"pbc", "lisc", "bccd", "raabin"}
        PBC, LISC and Raabin are crops centred on the cell; BCCD is whole fields, with
        the cell's box.
    root : path, optional
        The shared data folder; default :func:`napari_wbc.settings.data_root`.
    classes : sequence of str
        Labels kept (BCCD's "ambiguous"/"unlabeled" boxes and PBC's other
        classes are dropped by the default).

    Returns
    -------
    pandas.DataFrame
        ``path`` (absolute), ``label``, ``lab``, ``cy``, ``cx`` (the cell's
        centre in the image, NaN for the image centre) and ``rbc_px`` (red-cell
        diameter of the lab, :data:`LAB_RBC_DIAMETER_PX`).

    Raises
    ------
    DataError
        For an unknown lab or when its files are missing.
    """
    from napari_wbc.settings import data_root

    if lab not in LABS:
        raise DataError(f"unknown lab {lab!r}; choose one of {', '.join(LABS)}")
    folder = Path(root if root is not None else data_root()) / lab
    if lab == "bccd":
        df = _crops_from_csv(folder / "wbc.csv")
        df["cy"] = df["y"].astype(float) + df["h"].astype(float) / 2
        df["cx"] = df["x"].astype(float) + df["w"].astype(float) / 2
    else:
        df = load_labelled_crops(folder)
        df["cy"] = df["cx"] = np.nan
    df = df[df["label"].isin(list(classes))].reset_index(drop=True)
    if df.empty:
        raise DataError(f"{folder} holds no cell of the classes {', '.join(classes)}")
    df["lab"] = lab
    df["rbc_px"] = LAB_RBC_DIAMETER_PX[lab]
    return df[["path", "label", "lab", "cy", "cx", "rbc_px"]]


def read_lab_crops(
    table: pd.DataFrame, size: int, fov_rbc: float = 4.8, rbc_px: float | None = None
) -> np.ndarray:
    """Cut every cell of a lab table at one field of view, as ``(N, size, size, 3)`` uint8.

    Each crop is a square of ``fov_rbc`` red-cell diameters centred on the
    cell (``cy``, ``cx``; the image centre when NaN), resized (antialiased) to
    ``size`` px. Parts past the image's border take the colour of its glass
    (see :func:`napari_wbc.stain.estimate_background`), not white, so a
    field's edge does not look like a different lab's padding.

    Parameters
    ----------
    table : pandas.DataFrame
        From :func:`load_lab_table`.
    size : int
        Side of the returned crops.
    fov_rbc : float
        Field of view in red-cell diameters (the model's ``fov_px /
        rbc_diameter_px``; 4.8 for the built-in models).
    rbc_px : float, optional
        Red-cell diameter in px; default the table's ``rbc_px`` column.
    """
    from PIL import Image

    from napari_wbc.pixels import estimate_background

    out = np.empty((len(table), size, size, 3), np.uint8)
    for i, row in enumerate(table.itertuples(index=False)):
        image = decode_image(row.path)
        h, w = image.shape[:2]
        diameter = float(rbc_px if rbc_px is not None else row.rbc_px)
        side = max(round(fov_rbc * diameter), 8)
        cy = h / 2 if math.isnan(row.cy) else row.cy
        cx = w / 2 if math.isnan(row.cx) else row.cx
        half = side // 2
        y0, x0 = round(cy) - half, round(cx) - half
        crop = np.empty((side, side, 3), np.uint8)
        crop[:] = np.round(estimate_background(image[::4, ::4])).astype(np.uint8)
        ys0, xs0, ys1, xs1 = max(y0, 0), max(x0, 0), min(y0 + side, h), min(x0 + side, w)
        if ys1 > ys0 and xs1 > xs0:
            crop[ys0 - y0 : ys1 - y0, xs0 - x0 : xs1 - x0] = image[ys0:ys1, xs0:xs1]
        out[i] = np.asarray(
            Image.fromarray(crop).resize(
                (size, size), Image.Resampling.BILINEAR, reducing_gap=None
            )
        )
    return out


def cached_lab_crops(
    lab: str,
    cache_dir: str | os.PathLike,
    size: int = 128,
    fov_rbc: float = 4.8,
    classes: Sequence[str] = SHARED_CLASSES,
) -> tuple[pd.DataFrame, np.ndarray]:
    """:func:`load_lab_table` and :func:`read_lab_crops`, the crops kept in ``cache_dir``.

    The cache file (``<lab>-<size>-<fov_rbc>.npz``, with ``-<n>c`` added for
    classes other than :data:`SHARED_CLASSES`) is used only when it lists
    exactly the table's paths, in order. It is written atomically, so two
    processes filling the same cache never leave a torn file.
    """
    from napari_wbc.atomic import atomic_write_stream

    classes = tuple(classes)
    table = load_lab_table(lab, classes=classes)
    tag = "" if classes == SHARED_CLASSES else f"-{len(classes)}c"
    file = Path(cache_dir) / f"{lab}-{size}-{fov_rbc}{tag}.npz"
    if file.is_file():
        saved = np.load(file, allow_pickle=False)
        if list(saved["paths"]) == list(table["path"]):
            return table, saved["crops"]
    crops = read_lab_crops(table, size, fov_rbc)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    paths = np.asarray(table["path"], dtype=str)
    atomic_write_stream(file, lambda fh: np.savez(fh, crops=crops, paths=paths), binary=True)
    return table, crops
