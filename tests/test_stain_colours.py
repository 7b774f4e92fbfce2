"""A normalization that gives false colours is refused where a user looks at it (issue #33)."""

from __future__ import annotations

import numpy as np

from napari_wbc.progress import run
from napari_wbc.samples import load_sample
from napari_wbc.stain import iter_prepare_normalizer, normalize_array


def test_macenko_false_colours_on_bccd_are_refused_when_asked():
    image = np.asarray(load_sample("bccd").image)
    # Macenko's fit passes its own checks on these fields, but swaps the stains:
    # red cells violet, nuclei mint green.
    as_models_use_it = run(iter_prepare_normalizer([image], "macenko"))
    assert as_models_use_it.method == "macenko"  # models keep what they were validated with
    checked = run(iter_prepare_normalizer([image], "macenko", check_colours=True))
    assert checked.method == "regions" and checked.requested == "macenko"
    assert "false colours" in checked.fallback_reason
    # The fallback keeps nuclei darker than the glass and purple-blue, not green.
    out = normalize_array(image, checked)
    dark = out.reshape(-1, 3)[out.reshape(-1, 3).sum(1) < np.percentile(out.sum(-1), 2)]
    red, green, blue = dark.mean(0)
    assert green < red and green < blue


def test_a_plausible_macenko_is_kept_when_checked():
    image = np.asarray(load_sample("gallery").image)  # PBC's own cells
    checked = run(iter_prepare_normalizer([image], "macenko", check_colours=True))
    assert checked.method == "macenko" and checked.fallback_reason == ""
