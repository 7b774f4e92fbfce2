"""`napari-wbc classify` on folders, on a dask cluster, and `evaluate` on smears with boxes."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from napari_wbc.cli import main
from napari_wbc.synthetic import make_smear, smear_truth

SHAPE = (900, 1100)


@pytest.fixture(scope="module")
def smear_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smears")
    rows = []
    for seed in (3, 4):
        path = folder / f"field{seed}.png"
        Image.fromarray(make_smear(SHAPE, seed=seed, wbc_per_mpx=6)).save(path)
        truth = smear_truth(SHAPE, seed=seed, wbc_per_mpx=6)
        for t in truth[truth.kind == "wbc"].itertuples():
            r = t.diameter / 2
            rows.append(
                {
                    "path": path.name,
                    "label": t.label,
                    "x": t.x - r,
                    "y": t.y - r,
                    "w": 2 * r,
                    "h": 2 * r,
                }
            )
    (folder / "notes.txt").write_text("not an image")
    boxes = folder / "boxes.csv"
    pd.DataFrame(rows).to_csv(boxes, index=False)
    return folder


def _valid_qupath_geojson(doc):
    assert doc["type"] == "FeatureCollection"
    for feat in doc["features"]:
        assert feat["type"] == "Feature"
        assert feat["geometry"]["type"] in ("Point", "Polygon")
        assert isinstance(feat["properties"]["classification"]["name"], str)


def test_classify_folder_writes_per_image_results_and_summary(
    smear_dir, tiny_model_path, tmp_path, capsys
):
    out = tmp_path / "results"
    code = main(
        [
            "classify",
            str(smear_dir),
            "--model",
            str(tiny_model_path),
            "-o",
            str(out),
            "--pixel-size",
            "0.1",
            "-q",
        ]
    )
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["field3.csv", "field3.geojson", "field4.csv", "field4.geojson", "summary.csv"]
    summary = pd.read_csv(out / "summary.csv")
    assert summary["image"].tolist() == ["field3.png", "field4.png", "all images"]
    for stem in ("field3", "field4"):
        cells = pd.read_csv(out / f"{stem}.csv")
        doc = json.loads((out / f"{stem}.geojson").read_text())
        _valid_qupath_geojson(doc)
        assert len(doc["features"]) == len(cells) > 0
        np.testing.assert_allclose(cells["x_um"], cells["x"] * 0.1)
        row = summary[summary.image == f"{stem}.png"].iloc[0]
        assert row["total"] == len(cells)
    assert summary.iloc[-1]["total"] == summary.iloc[:-1]["total"].sum()
    assert "results in" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("panel", [[], ["--classes", "5-part"]])
def test_classify_on_a_dask_cluster_matches_local(smear_dir, tiny_model_path, tmp_path, panel):
    from dask.distributed import LocalCluster

    local = tmp_path / "local"
    args = [
        "--model",
        str(tiny_model_path),
        "--pixel-size",
        "0.1",
        "--format",
        "csv",
        "--block",
        "512",
        "-q",
        *panel,
    ]
    assert main(["classify", str(smear_dir / "field3.png"), "-o", str(local), *args]) == 0
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        remote = tmp_path / "remote"
        assert (
            main(
                [
                    "classify",
                    str(smear_dir / "field3.png"),
                    "-o",
                    str(remote),
                    "--scheduler",
                    cluster.scheduler_address,
                    *args,
                ]
            )
            == 0
        )
    a = pd.read_csv(local / "field3.csv").sort_values(["y", "x"]).reset_index(drop=True)
    b = pd.read_csv(remote / "field3.csv").sort_values(["y", "x"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-5)
    # The workers answer with the count panel too (they load the model file).
    p_columns = [c for c in a.columns if c.startswith("p_")]
    assert len(p_columns) == (5 if panel else 8)


@pytest.mark.slow
def test_a_tiled_tiff_on_a_dask_cluster_matches_local(smear_dir, tiny_model_path, tmp_path):
    # A scanner's slide is a tiled TIFF: this process reads parts of it (scale,
    # stain, model choice) while the cluster classifies the blocks.
    import tifffile
    from dask.distributed import LocalCluster
    from PIL import Image

    tiff = tmp_path / "slide.tif"
    image = np.asarray(Image.open(smear_dir / "field3.png").convert("RGB"))
    tifffile.imwrite(tiff, image, tile=(256, 256), photometric="rgb", compression="zlib")
    args = ["--model", str(tiny_model_path), "--pixel-size", "0.1", "--format", "csv"]
    args += ["--block", "512", "-q"]
    assert main(["classify", str(tiff), "-o", str(tmp_path / "local"), *args]) == 0
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        out = tmp_path / "remote"
        remote = ["classify", str(tiff), "-o", str(out), "--scheduler", cluster.scheduler_address]
        assert main([*remote, *args]) == 0
    a = pd.read_csv(tmp_path / "local" / "slide.csv").sort_values(["y", "x"])
    b = pd.read_csv(out / "slide.csv").sort_values(["y", "x"])
    assert len(a) > 0
    pd.testing.assert_frame_equal(
        a.reset_index(drop=True), b.reset_index(drop=True), check_exact=False, atol=1e-5
    )


def test_bad_scheduler_address_is_one_clear_line(smear_dir, tiny_model_path, tmp_path, capsys):
    code = main(
        [
            "classify",
            str(smear_dir / "field3.png"),
            "--model",
            str(tiny_model_path),
            "-o",
            str(tmp_path),
            "--scheduler",
            "tcp://127.0.0.1:9",
            "-q",
        ]
    )
    assert code == 2
    assert "cannot reach the dask scheduler" in capsys.readouterr().err


def test_evaluate_smears_reports_detection_and_classification(smear_dir, tiny_model_path, capsys):
    code = main(
        [
            "evaluate",
            str(smear_dir / "boxes.csv"),
            "--model",
            str(tiny_model_path),
            "--json",
            "--pixel-size",
            "0.1",
            "--tta",
            "none",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    det = result["detection"]
    assert det["recall"] == 1.0 and det["fn"] == 0
    assert det["precision"] >= 0.9
    assert det["images"] == 2
    assert result["n"] == det["tp"]
    for key in ("accuracy", "macro_f1", "balanced_accuracy", "per_class", "confusion", "classes"):
        assert key in result
    assert set(result["classes"]) <= {
        "neutrophil",
        "lymphocyte",
        "monocyte",
        "eosinophil",
        "basophil",
    }


def test_user_pixel_size_wins_over_the_files_in_every_column(tiny_model_path, tmp_path):
    from napari_wbc.images import read_smear

    path = tmp_path / "field.png"
    # The file says 0.5 µm/px (as PNG pixels per metre); the user knows better.
    Image.fromarray(make_smear((700, 800), seed=3, wbc_per_mpx=9)).save(path, dpi=(50800, 50800))
    smear = read_smear(path)
    assert smear.pixel_size_um == pytest.approx(0.5, rel=1e-3)
    smear.close()
    out = tmp_path / "results"
    args = ["classify", str(path), "--model", str(tiny_model_path), "-o", str(out)]
    assert main([*args, "--pixel-size", "0.1", "-q"]) == 0
    cells = pd.read_csv(out / "field.csv")
    assert len(cells) > 0
    np.testing.assert_allclose(cells["x_um"], cells["x"] * 0.1)
    np.testing.assert_allclose(cells["y_um"], cells["y"] * 0.1)
    summary = pd.read_csv(out / "summary.csv")
    assert summary.iloc[0]["rbc_diameter_px"] == pytest.approx(75.0)


def test_classify_batch_goes_past_bad_files_and_uses_the_batch_scale(
    tiny_model_path, tmp_path, capsys
):
    folder = tmp_path / "batch"
    folder.mkdir()
    for seed in (3, 4):
        Image.fromarray(make_smear(SHAPE, seed=seed, wbc_per_mpx=6)).save(folder / f"f{seed}.png")
    # Bare glass, no red cells to measure: classified at the scale of the other fields.
    glass = np.zeros((*SHAPE, 3), np.uint8) + np.array([236, 226, 230], np.uint8)
    Image.fromarray(glass).save(folder / "f5-no-red-cells.png")
    (folder / "f6-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    out = tmp_path / "out"
    code = main(["classify", str(folder), "--model", str(tiny_model_path), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 1
    assert "f6-broken.png" in err and "1 of 4 images failed" in err
    summary = pd.read_csv(out / "summary.csv")
    assert summary["image"].tolist() == [
        "f3.png",
        "f4.png",
        "f5-no-red-cells.png",
        "all images",
    ]
    # Every field is classified at the folder's median red cell (the two
    # measured fields are at one magnification); the glass at that scale too.
    diameters = summary.loc[:2, "rbc_diameter_px"]
    assert diameters.nunique() == 1
    assert summary.loc[0, "scale"].startswith("the median of 2 measured images in the folder")
    assert "this image alone" in summary.loc[0, "scale"]
    assert "too few red cells here" in summary.loc[2, "scale"]
    failures = pd.read_csv(out / "failures.csv")
    assert failures["image"].tolist() == ["f6-broken.png"]
    assert failures["reason"].str.len().min() > 10
    assert (out / "f5-no-red-cells.csv").exists()


def test_classify_checks_its_inputs_before_loading_a_model(tmp_path, capsys):
    code = main(["classify", str(tmp_path / "missing"), "-o", str(tmp_path / "out")])
    assert code == 2
    assert "missing" in capsys.readouterr().err


def test_rbc_diameter_px_gives_the_scale(smear_dir, tiny_model_path, tmp_path):
    out = tmp_path / "results"
    args = ["classify", str(smear_dir / "field3.png"), "--model", str(tiny_model_path)]
    assert main([*args, "-o", str(out), "--rbc-diameter-px", "75", "-q", "--threads", "1"]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert summary.loc[0, "rbc_diameter_px"] == 75.0
    assert "x_um" not in pd.read_csv(out / "field3.csv").columns  # no pixel size: no µm
