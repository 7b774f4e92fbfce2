"""Shared fixtures."""

from __future__ import annotations

import numpy as np
import pytest

from napari_wbc.settings import DATA_ENV, data_root


@pytest.fixture
def data_dir():
    """Root of the real smear data; skips the test when it is absent."""
    root = data_root()
    if not (root / "pbc" / "labels.csv").exists():
        pytest.skip(f"real smear data not found at {root} (set {DATA_ENV} to the folder)")
    return root


def stained_image(
    stains: np.ndarray,
    background=(240.0, 235.0, 238.0),
    shape=(200, 260),
    seed: int = 0,
    blobs: int = 40,
) -> np.ndarray:
    """An RGB image made by Beer–Lambert mixing of two stains drawn as random discs.

    ``stains`` is 3×2 (optical density per unit concentration of each stain).
    A third of the image stays bare glass.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    conc = np.zeros((2, h, w))
    for _ in range(blobs):
        k = rng.integers(0, 2)
        cy, cx = rng.uniform(0, h), rng.uniform(w / 3, w)
        r = rng.uniform(6, 18)
        conc[k] += rng.uniform(0.4, 1.2) * ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
    od = np.einsum("cs,shw->hwc", np.asarray(stains, float), conc)
    img = np.asarray(background)[None, None, :] * np.exp(-od)
    img += rng.normal(0, 1.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@pytest.fixture
def make_stained():
    return stained_image


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A random-initialised tiny model with the PBC classes and the built-in stain reference."""
    import torch

    from napari_wbc.models.build import build_model
    from napari_wbc.models.files import ModelConfig, save_model
    from napari_wbc.models.registry import get_spec
    from napari_wbc.stain import default_reference

    torch.manual_seed(0)
    spec = get_spec("tiny-resnet")
    model, _ = build_model(spec, pretrained=False)
    config = ModelConfig(
        spec=spec,
        stain=default_reference().to_dict(),
        training={"stain_method": "macenko"},
        notes="random weights, for tests",
    )
    return save_model(tmp_path_factory.mktemp("models") / "tiny.safetensors", model, config)


@pytest.fixture
def cut_and_run(monkeypatch):
    """What a run cuts and runs: ``(windows, rows)``, filled as it goes.

    ``windows``: the window of every block whose cells are found and cut
    (``napari_wbc.pipeline.find_tile_cells``); ``rows``: the number of crops
    of each call that runs the networks (``napari_wbc.passes.iter_add_views``).
    Clear them between runs.
    """
    import napari_wbc.passes as passes
    import napari_wbc.pipeline as pipeline

    windows, rows = [], []
    real_cut, real_views = pipeline.find_tile_cells, passes.iter_add_views

    def counted_cut(window, tile, *args, **kwargs):
        windows.append(tile.window)
        return real_cut(window, tile, *args, **kwargs)

    def counted_views(*args, **kwargs):
        rows.append(len(args[7]))
        return (yield from real_views(*args, **kwargs))

    monkeypatch.setattr(pipeline, "find_tile_cells", counted_cut)
    monkeypatch.setattr(passes, "iter_add_views", counted_views)
    return windows, rows
