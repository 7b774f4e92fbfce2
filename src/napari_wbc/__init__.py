"""napari-wbc: find, classify and count white blood cells in blood smears.

The calls a script needs, as ``napari-wbc`` makes them:

======================  =======================================================
``read_smear``          open an image of any size lazily (:mod:`napari_wbc.images`)
``load_model``          a model as ``--model`` takes it: ``"auto"``, a built-in
                        name or a file (:mod:`napari_wbc.routing`)
``classify_smear``      find and classify the white cells of a smear (a table)
``classify_crops``      classify crop images (a table)
``evaluate``            score a model on labelled crops (:mod:`napari_wbc.prediction`)
``differential_count``  count and percentage per class (:mod:`napari_wbc.pipeline`)
``ClassifyConfig``      the options of ``classify_smear``
``load_sample``         a built-in sample image and its truth (:mod:`napari_wbc.samples`)
======================  =======================================================

Importing this package is cheap on purpose: it imports neither torch nor Qt,
so napari starts fast. Each name above is imported from its module the first
time it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first use).
_PUBLIC = {
    "read_smear": "napari_wbc.images",
    "load_model": "napari_wbc.routing",
    "classify_smear": "napari_wbc.api",
    "classify_crops": "napari_wbc.api",
    "evaluate": "napari_wbc.prediction",
    "differential_count": "napari_wbc.pipeline",
    "ClassifyConfig": "napari_wbc.pipeline",
    "load_sample": "napari_wbc.samples",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    """Import a public name from its module when it is first used (PEP 562)."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_wbc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
