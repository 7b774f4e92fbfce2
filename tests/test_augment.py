"""Domain randomization (napari_wbc.augment): the augmentation that makes the cross-lab models."""

import numpy as np
import pytest
import torch

from napari_wbc.augment import (
    DomainRandomization,
    measure_stain_pool,
    measure_stain_stats,
    randomize_batch,
)
from napari_wbc.errors import DataError

from .conftest import stained_image

# optical density per unit of haematoxylin (purple) and eosin (pink), columns
HE = np.array([[0.65, 0.07], [0.70, 0.99], [0.29, 0.11]])


def _crops(n=6, size=48, seed=0):
    image = stained_image(HE, shape=(size * 2, size * 4), seed=seed, blobs=60)
    x0 = 2 * size  # the left third is bare glass
    return np.stack([image[:size, x0 + i * 4 : x0 + i * 4 + size] for i in range(n)])


def test_stain_stats_find_the_two_stains_and_the_glass():
    stats = measure_stain_stats(stained_image(HE, seed=1, blobs=80))
    truth = HE / np.linalg.norm(HE, axis=0)
    # each true stain vector has a measured one pointing the same way (cosine > 0.95)
    cos = np.abs(truth.T @ stats.matrix)
    assert cos.max(axis=1).min() > 0.95
    assert np.allclose(np.linalg.norm(stats.matrix, axis=0), 1.0, atol=1e-6)
    assert np.allclose(stats.background, (240, 235, 238), atol=6)
    assert len(measure_stain_pool([stained_image(HE, seed=s) for s in range(3)])) == 3


def test_batches_are_reproducible_in_range_and_differ_between_seeds():
    crops = _crops()
    stats = [measure_stain_stats(c) for c in crops]
    pool = [measure_stain_stats(stained_image(HE[::-1], seed=2))]

    def batch(seed):
        return randomize_batch(crops, np.random.default_rng(seed), 32, None, stats, pool)

    a, b, c = batch(0), batch(0), batch(1)
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_mild_keeps_colours_and_strong_changes_them():
    crops = _crops(n=8)
    stats = [measure_stain_stats(c) for c in crops]
    pool = [measure_stain_stats(stained_image(HE[[2, 0, 1]], seed=3))]
    plain = torch.as_tensor(crops).permute(0, 3, 1, 2).float().div(255)
    plain = torch.nn.functional.interpolate(plain, size=(48, 48))

    def colour_shift(aug):
        out = randomize_batch(crops, np.random.default_rng(0), 48, aug, stats, pool)
        return float((out.mean(dim=(2, 3)) - plain.mean(dim=(2, 3))).abs().mean())

    mild, strong = colour_shift(DomainRandomization.mild()), colour_shift(DomainRandomization())
    # measured: mild moves a crop's mean colour by 0.05-0.08 (zoom and faint jitter), the
    # strong randomization (stain swap, tint, gamma) by 0.14-0.17
    assert mild < 0.1
    assert strong > 1.6 * mild


def test_bad_batches_say_what_was_expected():
    with pytest.raises(DataError, match="uint8 crops"):
        randomize_batch(np.zeros((2, 8, 8, 3), np.float32), np.random.default_rng(0), 8)
    crops = _crops(n=2)
    with pytest.raises(DataError, match="1 stain sources for 2 crops"):
        randomize_batch(crops, np.random.default_rng(0), 8, None, [measure_stain_stats(crops[0])])
