"""The plugin as napari sees it: manifest, entry point, packaged files."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from npe2 import PluginManifest

ROOT = Path(__file__).resolve().parents[1]


def test_manifest_validates_and_lists_contributions():
    manifest = PluginManifest.from_file(ROOT / "napari.yaml")
    assert manifest.name == "napari-wbc"
    widgets = {w.display_name for w in manifest.contributions.widgets}
    assert "Stain normalization" in widgets
    assert [s.key for s in manifest.contributions.sample_data] == ["smear", "bccd", "gallery"]
    patterns = set(manifest.contributions.readers[0].filename_patterns)
    assert {"*.tif", "*.svs", "*.jpg", "*.png"} <= patterns
    # Every command points at an importable Python object.
    for command in manifest.contributions.commands:
        module, _, attr = command.python_name.partition(":")
        mod = __import__(module, fromlist=[attr])
        assert callable(getattr(mod, attr)), command.id


def test_installed_entry_point_finds_the_same_manifest():
    manifest = PluginManifest.from_distribution("napari-wbc")
    assert manifest == PluginManifest.from_file(ROOT / "napari.yaml")


def test_package_manifest_is_the_top_level_file():
    packaged = ROOT / "src" / "napari_wbc" / "napari.yaml"
    assert packaged.read_bytes() == (ROOT / "napari.yaml").read_bytes()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(folder),
            "-q",
        ],
        check=True,
    )
    (path,) = folder.glob("napari_wbc-*.whl")
    return path


@pytest.mark.slow
def test_wheel_contains_manifest_and_resources(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert zf.read("napari_wbc/napari.yaml") == (ROOT / "napari.yaml").read_bytes()
        assert "napari_wbc/resources/pbc_stain_reference.json" in names
        samples = {n for n in names if n.startswith("napari_wbc/resources/samples/")}
        sizes = sum(zf.getinfo(n).file_size for n in samples)
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        text = zf.read(entry_points).decode()
    assert "napari-wbc = napari_wbc:napari.yaml" in text
    assert "napari-wbc = napari_wbc.cli:console_main" in text
    models = {n for n in names if n.startswith("napari_wbc/resources/models/")}
    assert "napari_wbc/resources/models/wbc-lite.json" in models
    assert "napari_wbc/resources/models/wbc-pbc.json" in models
    # Every member either ensemble file names: wbc-lite's one and the PBC specialist's three.
    assert sum(n.endswith(".safetensors") for n in models) == 4
    assert "napari_wbc/resources/models/wbc-lite-0.safetensors" in models
    # The real samples travel with their licences, within 1 MB.
    for name in ("bccd-fields.jpg", "bccd-fields.csv", "LICENSE-BCCD.txt"):
        assert f"napari_wbc/resources/samples/{name}" in samples
    for name in ("pbc-gallery.jpg", "pbc-gallery.csv", "ATTRIBUTION-PBC.txt"):
        assert f"napari_wbc/resources/samples/{name}" in samples
    assert sizes <= 1_000_000


@pytest.mark.slow
def test_installed_wheel_classifies_offline_with_only_its_own_files(wheel, tmp_path):
    # The wheel unpacked as a fresh install; the source tree is not on the path.
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    code = (
        "import napari_wbc, numpy as np\n"
        "from napari_wbc.inference import load_any\n"
        "from napari_wbc.models.files import default_model_path\n"
        "from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear\n"
        "from napari_wbc.progress import run\n"
        "from napari_wbc.synthetic import make_sample_smear\n"
        "print(napari_wbc.__file__)\n"
        "print(default_model_path())\n"
        "cells = run(iter_classify_smear(make_sample_smear(), load_any(default_model_path()),"
        " ClassifyConfig(pixel_size_um=0.1, tta='none')))\n"
        "print(len(cells))\n"
        "from napari_wbc.samples import load_sample\n"
        "print(sum(len(load_sample(n).truth) for n in ('bccd', 'gallery')))\n"
    )
    env = {
        "PYTHONPATH": str(site),
        "HF_HUB_OFFLINE": "1",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    package_file, model_path, n, n_truth = out.stdout.split()
    assert int(n_truth) == 6 + 24  # the real samples open from the wheel's own files
    assert Path(package_file).is_relative_to(site)
    assert Path(model_path).is_relative_to(site)
    assert int(n) >= 13
