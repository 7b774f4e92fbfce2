"""The public API of ``import napari_wbc``: the README's example gives the CLI's count.

(That importing it stays light is checked in tests/test_import.py.)
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pandas as pd
import pytest

import napari_wbc

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The first python block of the README's "Python API" section."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Python API\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Python API' section"
    block = re.search(r"^```python\n(.*?)^```", section.group(1), re.S | re.M)
    assert block, "the README's Python API section has no python block"
    return block.group(1)


def test_every_public_name_resolves_and_is_documented():
    for name in napari_wbc.__all__:
        value = getattr(napari_wbc, name)
        if name != "__version__":
            assert callable(value), name
            assert value.__doc__ and len(value.__doc__.strip()) > 20, f"{name} has no docstring"
    assert set(napari_wbc.__all__) <= set(dir(napari_wbc))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        napari_wbc.nope  # noqa: B018


@pytest.mark.slow
def test_readme_example_gives_the_count_of_napari_wbc_classify(tmp_path, monkeypatch):
    from napari_wbc.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sample", "smear", "-o", "smear.tif"]) == 0
    assert main(["classify", "smear.tif", "-o", "out", "-q"]) == 0
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("image")

    namespace: dict = {"__name__": "readme_example"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_example(), "README.md (Python API)", "exec"), namespace)
    cells, model = namespace["cells"], namespace["model"]
    counts = napari_wbc.differential_count(cells, model.classes).set_index("class")["count"]

    classes = list(model.classes)
    cli_counts = summary.loc["smear.tif", classes].astype(int)
    assert counts[classes].to_dict() == cli_counts.to_dict()
    assert counts["total"] == summary.loc["smear.tif", "total"] > 0
    assert cells.attrs.get("model") == summary.loc["smear.tif", "model"]
    # The example prints the count table: one line per class, plus the total.
    assert all(name in printed.getvalue() for name in [*classes, "total"])
