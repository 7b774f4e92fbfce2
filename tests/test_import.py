"""Import hygiene: napari starts fast and the core runs without Qt."""

import subprocess
import sys

CORE_MODULES = [
    "napari_wbc",
    "napari_wbc.images",
    "napari_wbc.stain",
    "napari_wbc.tiff",
    "napari_wbc.synthetic",
    "napari_wbc.progress",
    "napari_wbc.cli",
    "napari_wbc._napari",
    "napari_wbc.losses",
    "napari_wbc.sampling",
    "napari_wbc.metrics",
    "napari_wbc.datasets",
    "napari_wbc.models.registry",
    "napari_wbc.models.files",
    "napari_wbc.models.build",
    "napari_wbc.inference",
    "napari_wbc.annotations",
    "napari_wbc.detection",
    "napari_wbc.scale",
    "napari_wbc.pipeline",
    "napari_wbc.smears",
    "napari_wbc.export",
    "napari_wbc.training",
    "napari_wbc.cli_models",
]
GUI_PREFIXES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari._qt", "napari.qt", "vispy.app")


def _imported_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_package_import_is_light():
    mods = _imported_after("import napari_wbc")
    assert "torch" not in mods
    assert not [m for m in mods if m.startswith(GUI_PREFIXES)]
    assert "napari" not in mods


def test_reader_and_sample_hooks_do_not_import_torch():
    mods = _imported_after("import napari_wbc._napari")
    assert "torch" not in mods


def test_core_imports_no_gui():
    code = "\n".join(f"import {m}" for m in CORE_MODULES)
    mods = _imported_after(code)
    gui = sorted(m for m in mods if m.startswith(GUI_PREFIXES))
    assert gui == [], f"core pulled in GUI modules: {gui[:10]}"
