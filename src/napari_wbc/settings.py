"""Where napari-wbc finds things: the real-data folder and the model cache."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable naming the folder holding ``pbc/`` and ``bccd/``.
DATA_ENV = "NAPARI_WBC_DATA"


def data_root() -> Path:
    """Folder of real smear data (``$NAPARI_WBC_DATA``, default ``../shared/data``)."""
    return Path(os.environ.get(DATA_ENV, "../shared/data")).expanduser()
