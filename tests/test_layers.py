"""The layers of docs/architecture.md, enforced: no module imports from a layer above its own.

The table is read from the document itself, so the document and the code
cannot drift apart: a new module goes into the table's row of its layer.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "napari_wbc"
DOC = ROOT / "docs" / "architecture.md"


def read_layers(text: str) -> list[tuple[str, list[str]]]:
    """``(layer, [module names])`` from the bottom up, from the table under "## Layers".

    Names are as the table writes them (``stain``, ``models.files``); the
    package itself is ``napari_wbc``, and ``_qt/*`` stands for ``_qt`` and
    everything under it.
    """
    section = re.search(r"^## Layers\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, f"{DOC.name} has no '## Layers' section"
    layers = []
    for line in section.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[0] in ("layer", "") or set(cells[0]) <= set("-: "):
            continue
        layers.append((cells[0], re.findall(r"`([^`]+)`", cells[1])))
    assert layers, f"no layer table found under '## Layers' in {DOC.name}"
    return layers


def package_modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package's ``__init__``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("napari_wbc", *path.relative_to(PACKAGE).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def imports_of(name: str, path: Path, is_package: bool, modules) -> list[tuple[str, int]]:
    """The package's modules that ``name`` imports, anywhere in its code: (module, line)."""
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            # ``from pkg import mod`` imports the module; ``from mod import name``, mod.
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                for alias in node.names
            ]
        else:
            continue
        found += [(t, node.lineno) for t in dict.fromkeys(targets) if t in modules and t != name]
    return found


def layer_index(layers) -> dict[str, int]:
    """Module name or ``prefix.*`` pattern -> its layer's position (0 = the bottom)."""
    index = {}
    for i, (_, names) in enumerate(layers):
        for written in names:
            full = "napari_wbc" if written == "napari_wbc" else f"napari_wbc.{written}"
            full = full.replace("/", ".")
            assert full not in index, f"{written} is in two rows of the layer table"
            index[full] = i
    return index


def layer_of(module: str, index: dict[str, int]) -> int | None:
    if module in index:
        return index[module]
    for pattern, i in index.items():
        if pattern.endswith(".*") and (module == pattern[:-2] or module.startswith(pattern[:-1])):
            return i
    return None


@pytest.fixture(scope="module")
def layers():
    return read_layers(DOC.read_text(encoding="utf-8"))


def test_the_table_is_read(layers):
    names = [name for name, _ in layers]
    assert names[0] == "basics" and names[-1] == "front ends", names
    assert len(names) >= 5


def test_every_module_has_a_layer_and_every_name_is_a_module(layers):
    index = layer_index(layers)
    modules = package_modules()
    unplaced = sorted(m for m in modules if layer_of(m, index) is None)
    assert not unplaced, (
        f"modules in no layer of {DOC.relative_to(ROOT)}: {', '.join(unplaced)}; add each "
        "to the table's row of the layer it belongs to (the lowest whose modules it "
        "needs), naming it without 'napari_wbc.' (e.g. `stain`, `models.files`)"
    )
    stale = sorted(p for p in index if not any(layer_of(m, {p: 0}) == 0 for m in modules))
    assert not stale, (
        f"names in the layer table of {DOC.relative_to(ROOT)} that are no module of "
        f"src/napari_wbc: {', '.join(stale)}; remove or rename them"
    )


def test_no_module_imports_from_a_higher_layer(layers):
    index = layer_index(layers)
    modules = package_modules()
    names = [name for name, _ in layers]
    upward = []
    for module, (path, is_package) in modules.items():
        own = layer_of(module, index)
        if own is None:
            continue  # reported by the test above
        for target, line in imports_of(module, path, is_package, modules):
            theirs = layer_of(target, index)
            if theirs is not None and theirs > own:
                upward.append(
                    f"{path.relative_to(ROOT)}:{line}: {module} ({names[own]}) imports "
                    f"{target} ({names[theirs]})"
                )
    assert not upward, (
        "imports from a higher layer (docs/architecture.md, '## Layers'): move the code "
        "concerned down, or the module to the layer it honestly belongs to:\n" + "\n".join(upward)
    )


def test_the_checker_sees_imports_inside_functions_and_relative_ones(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "from .errors import WBCError\n"
        "import napari_wbc.progress as progress\n"
        "def f():\n"
        "    from .models import files\n"
        "    import numpy\n",
        encoding="utf-8",
    )
    modules = package_modules()
    found = {t for t, _ in imports_of("napari_wbc.probe", source, False, modules)}
    assert found == {
        "napari_wbc.errors",
        "napari_wbc.progress",
        "napari_wbc.models.files",
    }
    layers = read_layers(
        "## Layers\n\n| layer | modules | what |\n| --- | --- | --- |\n"
        "| basics | `errors` | x |\n| front ends | `cli`, `_qt/*` | y |\n"
    )
    index = layer_index(layers)
    assert layer_of("napari_wbc._qt.classify", index) == 1
    assert layer_of("napari_wbc._qt", index) == 1
    assert layer_of("napari_wbc.stain", index) is None
