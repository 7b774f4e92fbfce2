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
    "napari_wbc.prediction",
    "napari_wbc.preprocess",
    "napari_wbc.pixels",
    "napari_wbc.tiling",
    "napari_wbc.annotations",
    "napari_wbc.detection",
    "napari_wbc.scale",
    "napari_wbc.pipeline",
    "napari_wbc.smears",
    "napari_wbc.export",
    "napari_wbc.training",
    "napari_wbc.cli_models",
    "napari_wbc.api",
]
GUI_PREFIXES = (
    "qtpy",
    "PyQt5",
    "PyQt6",
    "PySide2",
    "PySide6",
    "napari._qt",
    "napari.qt",
    "vispy.app",
)


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


def test_the_public_calls_are_resolved_without_importing_torch():
    # `import napari_wbc` names them; each is imported from its module when used,
    # and the module that defines classify_smear imports the pipeline only when it runs.
    mods = _imported_after("import napari_wbc\nnapari_wbc.classify_smear, napari_wbc.read_smear")
    assert "torch" not in mods
    assert "napari_wbc.pipeline" not in mods


def test_reader_and_sample_hooks_do_not_import_torch():
    mods = _imported_after("import napari_wbc._napari")
    assert "torch" not in mods


def test_classifying_crops_does_not_import_dask():
    # dask.array takes 0.3 s to import; crop files are never lazy images.
    mods = _imported_after(
        "import napari_wbc.cli, napari_wbc.cli_models, napari_wbc.prediction, napari_wbc.routing"
    )
    assert "napari_wbc.inference" in mods
    assert "dask.array" not in mods
    lazy = (
        "import numpy, napari_wbc.images\nnapari_wbc.images.as_rgb8(numpy.zeros((4, 4, 3), 'u1'))"
    )
    assert "dask.array" in _imported_after(lazy)  # where an image is made lazy, it is


def test_core_imports_no_gui():
    code = "\n".join(f"import {m}" for m in CORE_MODULES)
    mods = _imported_after(code)
    gui = sorted(m for m in mods if m.startswith(GUI_PREFIXES))
    assert gui == [], f"core pulled in GUI modules: {gui[:10]}"


def _package_imports() -> dict[str, set[str]]:
    """Every napari_wbc module and the napari_wbc modules it imports, at any depth of code."""
    import ast
    from pathlib import Path

    import napari_wbc

    root = Path(napari_wbc.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = ("napari_wbc", *path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        modules[name] = (path, is_package)
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def test_no_import_cycles_in_the_package():
    graph = _package_imports()
    assert "napari_wbc.inference" in graph["napari_wbc.pipeline"] | graph["napari_wbc.prediction"]
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == [], f"import cycles: {cycles}"
