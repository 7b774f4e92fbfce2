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
    assert [s.key for s in manifest.contributions.sample_data] == ["smear"]
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


@pytest.mark.slow
def test_wheel_contains_manifest_and_resources(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), "-q"],
        check=True,
    )
    (wheel,) = tmp_path.glob("napari_wbc-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert zf.read("napari_wbc/napari.yaml") == (ROOT / "napari.yaml").read_bytes()
        assert "napari_wbc/resources/pbc_stain_reference.json" in names
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        text = zf.read(entry_points).decode()
    assert "napari-wbc = napari_wbc:napari.yaml" in text
    assert "napari-wbc = napari_wbc.cli:main" in text
