"""Where napari-wbc finds things: the real-data folder and the model cache."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable naming the folder holding ``pbc/`` and ``bccd/``.
DATA_ENV = "NAPARI_WBC_DATA"


def data_root() -> Path:
    """Folder of real smear data (``$NAPARI_WBC_DATA``, default ``../shared/data``)."""
    return Path(os.environ.get(DATA_ENV, "../shared/data")).expanduser()


# -- label-free adaptation (napari_wbc.adapt; kept here so the CLI needs no torch)

#: Fewest cells accepted for adaptation. Batch-norm statistics of a few cells
#: describe those cells, not the lab: adapted on 8 or 16 random cells of a
#: held-out lab, the fold models' macro-F1 on that lab scattered over 0.35-0.64
#: (BCCD) and 0.60-0.69 (LISC); the worst of 5 samples was 0.35 and 0.60 at 8
#: cells, 0.49 and 0.63 at 32, 0.52 and 0.67 at 256 (benchmarks/bench_adapt_cells.py,
#: docs/crosslab/adapt-cells.md). 32 is where the worst case stops falling apart.
ADAPT_MIN_CELLS = 32
#: Fewest cells for the prototype adaptation (the default method). Built
#: from 5 random draws of a held-out lab's cells and scored on all of them
#: (scripts/crosslab_t3a.py --cells; base 0.574 BCCD, 0.621 LISC): at 32
#: cells the draws scattered over 0.44-0.67 and 0.54-0.68 (worse than not
#: adapting in 2 and 4 of 5), at 64 over 0.46-0.64 and 0.67-0.75, at 128
#: over 0.61-0.64 and 0.70-0.74 (every draw better than not adapting).
ADAPT_PROTOTYPE_MIN_CELLS = 128
#: Most cells the statistics are estimated on (a seeded sample of larger
#: sets): more adds time, not accuracy. Held-out LISC (1,218 cells, two-seed
#: fold ensembles) adapted on 512 of them: 0.817 macro-F1, on all: 0.812;
#: the default then runs 3.31 passes a cell there instead of 3.76
#: (docs/benchmarks.md). 256 lost a BCCD basophil (in-lab 0.76 → 0.66).
ADAPT_MAX_CELLS = 512
