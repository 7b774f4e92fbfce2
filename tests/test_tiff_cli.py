"""Streaming pyramidal TIFF output and the normalize command."""

import json
import subprocess
import sys

import dask.array as da
import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_wbc.cli import main
from napari_wbc.images import read_smear
from napari_wbc.progress import run
from napari_wbc.stain import DEFAULT_METHOD, StainReference, fit_stain_reference, normalize
from napari_wbc.tiff import iter_write_pyramid_tiff, pyramid_shapes
from tests.test_stain import SRC, TGT


def test_pyramid_round_trip(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (2500, 1300, 3), dtype=np.uint8)
    events = []
    path = run(
        iter_write_pyramid_tiff(
            tmp_path / "out.tif", da.from_array(img, chunks=(700, 500, 3)), 0.5
        ),
        events.append,
    )
    smear = read_smear(path)
    assert [lvl.shape[:2] for lvl in smear.levels] == pyramid_shapes((2500, 1300))
    np.testing.assert_array_equal(smear.levels[0].compute(), img)
    # Level 1 is a 2×2 mean of level 0.
    expected = img[:2500:2, ::2].astype(int) + img[1::2, ::2] + img[::2, 1::2] + img[1::2, 1::2]
    np.testing.assert_allclose(smear.levels[1].compute(), (expected + 2) // 4, atol=0)
    assert smear.pixel_size_um == pytest.approx(0.5)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages.first.is_tiled
    assert events[-1].done == events[-1].total


def test_pyramid_with_metadata_reads_back_without_a_warning(tmp_path, caplog):
    img = np.random.default_rng(1).integers(0, 256, (1300, 1100, 3), dtype=np.uint8)
    meta = {"napari_wbc": {"stain_method": "macenko", "source": "x.tif"}}
    path = run(iter_write_pyramid_tiff(tmp_path / "out.tif", img, 0.25, metadata=meta))
    caplog.set_level("WARNING")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.series[0].levels) == 2
        assert json.loads(tif.pages.first.description) == meta
    smear = read_smear(path)
    assert len(smear.levels) == 2 and smear.pixel_size_um == pytest.approx(0.25)
    # tifffile said "invalid shaped series metadata or corrupted file" before.
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]


def test_cancel_leaves_no_file(tmp_path):
    img = np.zeros((3000, 600, 3), np.uint8)
    target = tmp_path / "out.tif"
    gen = iter_write_pyramid_tiff(target, img)
    next(gen)
    next(gen)
    gen.close()
    assert list(tmp_path.iterdir()) == []


def test_cancel_keeps_an_existing_output(tmp_path):
    target = tmp_path / "out.tif"
    target.write_bytes(b"previous result")
    gen = iter_write_pyramid_tiff(target, np.zeros((3000, 600, 3), np.uint8))
    next(gen)
    gen.close()
    assert target.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]


def test_cli_normalize_writes_a_normalized_pyramid(tmp_path, make_stained, capsys):
    img = make_stained(SRC, shape=(1500, 1400), seed=2, blobs=400)
    src = tmp_path / "smear.png"
    Image.fromarray(img).save(src)
    ref_img = tmp_path / "ref.png"
    Image.fromarray(make_stained(TGT, shape=(400, 400), seed=3, blobs=120)).save(ref_img)
    out = tmp_path / "norm.tif"
    code = main(["normalize", str(src), "-o", str(out), "--reference", str(ref_img), "-q"])
    assert code == 0
    smear = read_smear(out)
    assert smear.multiscale
    result = smear.levels[0].compute()
    target = fit_stain_reference(np.asarray(Image.open(ref_img)))
    expected = normalize(img, DEFAULT_METHOD, target)
    assert np.abs(result.astype(int) - expected).max() <= 1
    assert "wrote" in capsys.readouterr().out


def test_cli_reference_json_round_trip(tmp_path, make_stained):
    img = tmp_path / "ref.png"
    Image.fromarray(make_stained(TGT, shape=(300, 300))).save(img)
    ref_json = tmp_path / "ref.json"
    assert main(["reference", str(img), "-o", str(ref_json)]) == 0
    ref = StainReference.from_dict(json.loads(ref_json.read_text()))
    assert ref.n_pixels > 0
    src = tmp_path / "src.png"
    Image.fromarray(make_stained(SRC, shape=(300, 300))).save(src)
    assert (
        main(
            [
                "normalize",
                str(src),
                "-o",
                str(tmp_path / "o.tif"),
                "--reference",
                str(ref_json),
                "-q",
            ]
        )
        == 0
    )


def test_cli_bad_input_is_one_clear_line(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_wbc.cli",
            "normalize",
            str(bad),
            "-o",
            str(tmp_path / "o.tif"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "error: notes.png is not an image" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.tif").exists()


def test_cli_blank_image_explains(tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((200, 200, 3), 255, np.uint8)).save(blank)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_wbc.cli",
            "normalize",
            str(blank),
            "-o",
            str(tmp_path / "o.tif"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "looks blank" in proc.stderr
