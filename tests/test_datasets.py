"""Reading labelled crop sets, splitting and subsetting them, caching and feeding crops."""

import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from napari_wbc import datasets
from napari_wbc.datasets import (
    Augmentation,
    CropCache,
    CropDataset,
    balanced_subset,
    class_counts,
    load_labelled_crops,
    long_tailed_subset,
    perturb_stain,
    stratified_split,
)
from napari_wbc.errors import DataError
from napari_wbc.settings import data_root

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NO_AUG = Augmentation(
    flip=False, rotate90=False, max_angle=0, scale=(1.0, 1.0), translate=0,
    brightness=0, contrast=0, saturation=0, hue=0, stain_scale=0, stain_shift=0,
)  # fmt: skip


def write_image(path, seed=0, size=(24, 24), color=None):
    """A small textured (or constant-colour) RGB image file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    else:
        pixels = np.full((*size, 3), color, dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def class_folder(tmp_path):
    root = tmp_path / "crops"
    write_image(root / "lymphocyte" / "b.png", 1)
    write_image(root / "lymphocyte" / "a.JPG", 2)
    write_image(root / "neutrophil" / "c.bmp", 3)
    (root / "neutrophil" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return root


# ---------------------------------------------------------------- reading


def test_csv_with_relative_and_absolute_paths_keeps_extra_columns(tmp_path):
    write_image(tmp_path / "set" / "img" / "x.png", 1)
    absolute = write_image(tmp_path / "elsewhere" / "y.jpg", 2)
    csv = tmp_path / "set" / "labels.csv"
    csv.write_text(f"path,label,subtype\nimg/x.png,ig,myelocyte\n{absolute},basophil,basophil\n")

    df = load_labelled_crops(csv)

    assert list(df.columns) == ["path", "label", "subtype"]
    assert df["path"].tolist() == [str(tmp_path / "set" / "img" / "x.png"), str(absolute)]
    assert all(os.path.isabs(p) for p in df["path"])
    assert df["label"].tolist() == ["ig", "basophil"]
    assert df["subtype"].tolist() == ["myelocyte", "basophil"]
    # A folder holding labels.csv is read through it.
    assert load_labelled_crops(tmp_path / "set").equals(df)


def test_class_folders_become_labels(class_folder):
    df = load_labelled_crops(class_folder)
    assert list(df.columns) == ["path", "label"]
    assert df["label"].tolist() == ["lymphocyte", "lymphocyte", "neutrophil"]
    assert [os.path.basename(p) for p in df["path"]] == ["a.JPG", "b.png", "c.bmp"]
    assert all(os.path.isfile(p) for p in df["path"])


def test_reading_errors_say_what_is_wrong(tmp_path, class_folder):
    with pytest.raises(DataError, match="does not exist"):
        load_labelled_crops(tmp_path / "nope.csv")

    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.png,x\n")
    with pytest.raises(DataError, match="lacks the column"):
        load_labelled_crops(bad)

    bad.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_labelled_crops(bad)

    bad.write_text("path,label\n")
    with pytest.raises(DataError, match="no rows"):
        load_labelled_crops(bad)

    write_image(tmp_path / "ok.png")
    bad.write_text("path,label\nok.png,a\nmissing1.png,a\nmissing2.png,b\n")
    with pytest.raises(DataError, match=r"2 of 3 images .*missing1\.png.*missing2\.png"):
        load_labelled_crops(bad)

    bad.write_text("path,label\nok.png,\n")
    with pytest.raises(DataError, match="empty path or label"):
        load_labelled_crops(bad)

    (class_folder / "monocyte").mkdir()
    with pytest.raises(DataError, match="monocyte holds no images"):
        load_labelled_crops(class_folder)

    flat = tmp_path / "flat"
    write_image(flat / "a.png")
    with pytest.raises(DataError, match="no class subfolders"):
        load_labelled_crops(flat)


# ---------------------------------------------------------------- choosing rows


def test_stratified_split_keeps_every_class_in_validation():
    labels = np.array(["a"] * 50 + ["b"] * 10 + ["c"] * 2)
    train, val = stratified_split(labels, val_fraction=0.2, seed=0)

    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(62))
    val_counts = pd.Series(labels[val]).value_counts().to_dict()
    assert val_counts == {"a": 10, "b": 2, "c": 1}
    assert set(labels[train]) == {"a", "b", "c"}
    assert train.dtype == val.dtype == np.int64

    again = stratified_split(labels, val_fraction=0.2, seed=0)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(stratified_split(labels, val_fraction=0.2, seed=1)[1], val)


def test_stratified_split_refuses_singleton_class():
    with pytest.raises(DataError, match="rare"):
        stratified_split(["a", "a", "a", "rare"], seed=0)
    with pytest.raises(DataError):
        stratified_split(["a", "a"], val_fraction=1.0)


def make_table(counts):
    labels = [c for c, n in counts.items() for _ in range(n)]
    return pd.DataFrame({"path": [f"{i}.png" for i in range(len(labels))], "label": labels})


def test_long_tailed_subset_follows_exponential_profile():
    df = make_table({"d": 100, "a": 200, "c": 120, "b": 150})
    # Ranked a, b, c, d; n_i = 200 * 10 ** (-i / 3): 200, 92.8, 43.1, 20.
    sub = long_tailed_subset(df, "label", imbalance_ratio=10, seed=0)
    counts = sub["label"].value_counts().to_dict()
    assert counts == {"a": 200, "b": 93, "c": 43, "d": 20}
    assert counts["a"] / counts["d"] == 10

    capped = long_tailed_subset(df, "label", imbalance_ratio=10, max_per_class=100, seed=0)
    # 100 * 10 ** (-1/3) = 46.4, 100 * 10 ** (-2/3) = 21.5
    assert capped["label"].value_counts().to_dict() == {"a": 100, "b": 46, "c": 22, "d": 10}

    assert sub.index.is_monotonic_increasing
    assert sub.equals(df.loc[sub.index])
    assert sub.index.equals(long_tailed_subset(df, "label", 10, seed=0).index)
    assert not sub.index.equals(long_tailed_subset(df, "label", 10, seed=1).index)


def test_long_tailed_subset_keeps_all_of_a_too_small_class():
    df = make_table({"a": 100, "b": 99, "c": 5})
    counts = long_tailed_subset(df, "label", imbalance_ratio=2)["label"].value_counts()
    # targets 100, 70.7, 50; "c" has only 5
    assert counts.to_dict() == {"a": 100, "b": 71, "c": 5}


def test_balanced_subset_and_class_counts():
    df = make_table({"a": 200, "b": 20})
    sub = balanced_subset(df, "label", per_class=30, seed=0)
    assert sub["label"].value_counts().to_dict() == {"a": 30, "b": 20}
    assert class_counts([0, 2, 2, 0, 2], 4) == [2, 0, 3, 0]
    with pytest.raises(DataError, match="no column"):
        balanced_subset(df, "kind", per_class=3)


# ---------------------------------------------------------------- cache


def test_decode_converts_rgba_like_whole_smears(tmp_path):
    pixels = np.zeros((8, 8, 4), dtype=np.uint8)
    pixels[..., 0] = 255
    pixels[:4, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(pixels).save(tmp_path / "rgba.png")
    rgb = datasets.decode_image(tmp_path / "rgba.png")
    assert rgb.shape == (8, 8, 3)
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[7, 0].tolist() == [255, 255, 255]  # transparent = glass = white


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    original = datasets.decode_image

    def counting(path):
        calls.append(str(path))
        return original(path)

    monkeypatch.setattr(datasets, "decode_image", counting)
    return calls


def test_cache_centre_crops_and_resizes(tmp_path):
    pixels = np.zeros((30, 50, 3), dtype=np.uint8)
    pixels[:, :10] = (255, 0, 0)
    pixels[:, 10:40] = (0, 255, 0)
    pixels[:, 40:] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "wide.png")

    crop = CropCache(cache_size=16).get(tmp_path / "wide.png")

    assert crop.shape == (16, 16, 3)
    assert crop.dtype == np.uint8
    # The centre square (columns 10..40) is all green.
    assert np.array_equal(np.unique(crop.reshape(-1, 3), axis=0), [[0, 255, 0]])


def test_cache_decodes_once_in_memory_and_across_runs_on_disk(tmp_path, count_decodes):
    paths = [write_image(tmp_path / f"{i}.png", i) for i in range(3)]
    cache = CropCache(cache_size=20, cache_dir=tmp_path / "cache")

    first = [cache.get(p) for p in paths]
    second = [cache.get(p) for p in paths]  # second epoch
    assert len(count_decodes) == 3
    assert cache.memory_hits == 3
    assert all(a is b for a, b in zip(first, second, strict=True))
    assert not first[0].flags.writeable

    later = CropCache(cache_size=20, cache_dir=tmp_path / "cache", in_memory=False)
    again = [later.get(p) for p in paths]
    assert len(count_decodes) == 3
    assert later.disk_hits == 3
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))

    # Another working size or a changed file is decoded again.
    CropCache(cache_size=24, cache_dir=tmp_path / "cache").get(paths[0])
    assert len(count_decodes) == 4
    write_image(paths[1], seed=99, size=(30, 30))
    changed = later.get(paths[1])
    assert len(count_decodes) == 5
    assert not np.array_equal(changed, first[1])


def test_cache_fill_reports_progress(tmp_path, count_decodes):
    from napari_wbc.progress import run

    paths = [write_image(tmp_path / f"{i}.png", i) for i in range(5)]
    events = []
    decoded = run(CropCache(16).iter_fill(paths), events.append)
    assert decoded == 5
    assert events[-1].done == events[-1].total == 5
    assert len(count_decodes) == 5


def test_stain_normalizer_runs_once_per_crop(tmp_path, count_decodes):
    paths = [write_image(tmp_path / f"{i}.png", i) for i in range(2)]
    calls = []

    def darken(crop):
        calls.append(1)
        return (crop // 2).astype(np.uint8)

    ds = CropDataset(paths, [0, 1], CropCache(24), 24, MEAN, STD, train=True,
                     stain_normalizer=darken)  # fmt: skip
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            ds[i]
    assert len(calls) == 2
    assert len(count_decodes) == 2
    raw = np.asarray(Image.open(paths[0]))
    assert np.array_equal(ds.crop(0), raw // 2)


def test_stain_normalizer_output_reaches_disk_only_with_a_key(tmp_path, count_decodes):
    path = write_image(tmp_path / "a.png")

    def invert(crop):
        return 255 - crop

    cache_dir = tmp_path / "cache"
    CropCache(24, cache_dir).get(path, invert)
    files_without_key = len(list(cache_dir.rglob("*.npy")))
    CropCache(24, cache_dir).get(path, invert, transform_key="invert-v1")
    assert len(list(cache_dir.rglob("*.npy"))) == files_without_key + 1

    fresh = CropCache(24, cache_dir)
    decodes = len(count_decodes)
    out = fresh.get(path, invert, transform_key="invert-v1")
    assert len(count_decodes) == decodes
    assert np.array_equal(out, 255 - np.asarray(Image.open(path)))


def test_bad_normalizer_output_is_refused(tmp_path):
    path = write_image(tmp_path / "a.png")
    with pytest.raises(DataError, match="stain normalizer"):
        CropCache(24).get(path, lambda c: c.astype(np.float32))


# ---------------------------------------------------------------- dataset


def test_eval_items_are_resized_and_normalised(tmp_path):
    color = (200, 100, 50)
    paths = [write_image(tmp_path / "c.png", color=color, size=(40, 44))]
    ds = CropDataset(paths, [3], CropCache(32), 16, MEAN, STD, train=False)

    x, y = ds[0]
    assert x.shape == (3, 16, 16)
    assert x.dtype == torch.float32
    assert y == 3 and isinstance(y, int)
    expected = [(c / 255 - m) / s for c, m, s in zip(color, MEAN, STD, strict=True)]
    assert x.mean(dim=(1, 2)).tolist() == pytest.approx(expected, abs=1e-5)
    assert torch.equal(ds[0][0], x)


def test_train_items_are_reproducible_per_epoch_and_index(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", i, size=(40, 40)) for i in range(2)]
    make = lambda: CropDataset(paths, [0, 1], CropCache(36), 32, MEAN, STD, train=True, seed=5)  # noqa: E731
    a, b = make(), make()
    x0 = a[0][0]

    assert x0.shape == (3, 32, 32) and x0.dtype == torch.float32
    assert torch.equal(x0, b[0][0])
    b.set_epoch(1)
    assert not torch.equal(x0, b[0][0])
    assert not torch.equal(a[0][0], a[1][0])
    a.set_epoch(1)
    assert torch.equal(a[0][0], b[0][0])
    # Values stay inside the normalised [0, 1] range.
    low = [(0 - m) / s for m, s in zip(MEAN, STD, strict=True)]
    high = [(1 - m) / s for m, s in zip(MEAN, STD, strict=True)]
    for c in range(3):
        assert low[c] - 1e-5 <= x0[c].min() and x0[c].max() <= high[c] + 1e-5


def test_augmentation_geometry(tmp_path):
    paths = [write_image(tmp_path / "t.png", 7, size=(24, 24))]
    plain = CropDataset(paths, [0], CropCache(24), 24, MEAN, STD, train=False)[0][0]

    off = CropDataset(paths, [0], CropCache(24), 24, MEAN, STD, train=True, augmentation=NO_AUG)
    torch.testing.assert_close(off[0][0], plain, atol=1e-5, rtol=0)

    turns = Augmentation(**{**NO_AUG.__dict__, "rotate90": True, "flip": True})
    ds = CropDataset(paths, [0], CropCache(24), 24, MEAN, STD, train=True, augmentation=turns)
    symmetries = [torch.rot90(f, k, dims=(1, 2))
                  for f in (plain, plain.flip(1), plain.flip(2), plain.flip(1).flip(2))
                  for k in range(4)]  # fmt: skip
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        x = ds[0][0]
        match = [i for i, s in enumerate(symmetries) if torch.allclose(x, s, atol=1e-4)]
        assert match, "a 90° turn or flip must map pixels exactly onto pixels"
        seen.add(match[0])
    assert len(seen) > 2


def test_stain_perturbation_is_identity_at_rest_and_shifts_colour():
    x = torch.rand(3, 8, 8) * 0.8 + 0.1
    torch.testing.assert_close(perturb_stain(x, (1, 1, 1), (0, 0, 0)), x, atol=1e-5, rtol=0)
    more_haematoxylin = perturb_stain(x, (1, 1, 1), (0.2, 0, 0))
    assert (more_haematoxylin < x + 1e-6).all()
    assert (more_haematoxylin.mean() < x.mean() - 0.01).item()


def test_dataset_feeds_a_dataloader(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", i) for i in range(6)]
    ds = CropDataset(paths, [0, 1, 2, 0, 1, 2], CropCache(20), 16, MEAN, STD, train=True)
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0)))
    assert xb.shape == (4, 3, 16, 16)
    assert yb.tolist() == [0, 1, 2, 0]
    with pytest.raises(DataError):
        CropDataset(paths, [0, 1], CropCache(20), 16, MEAN, STD, train=False)


# ---------------------------------------------------------------- real data


@pytest.mark.realdata
def test_pbc_labels_load():
    csv = data_root() / "pbc" / "labels.csv"
    if not csv.is_file():
        pytest.skip(f"PBC data not found at {csv} (set NAPARI_WBC_DATA)")
    df = load_labelled_crops(csv)
    assert len(df) == 12_756
    assert df["label"].nunique() == 8
    assert df["label"].value_counts()["neutrophil"] == 2504
    assert "subtype" in df.columns
    train, val = stratified_split(df["label"], 0.2, seed=0)
    assert len(val) == pytest.approx(0.2 * len(df), abs=8)
    assert len(train) + len(val) == len(df)
    x, _ = CropDataset(df["path"][:1], [0], CropCache(256), 224, MEAN, STD, train=True)[0]
    assert x.shape == (3, 224, 224)
