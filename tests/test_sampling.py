"""Class-aware and instance-balanced samplers."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from napari_wbc.errors import DataError
from napari_wbc.sampling import ClassAwareSampler, instance_balanced_sampler

LABELS = np.array([0] * 1000 + [1] * 100 + [2] * 10)


def test_class_aware_sampler_balances_classes():
    sampler = ClassAwareSampler(LABELS, num_samples=30_000, seed=0)
    drawn = np.fromiter(iter(sampler), dtype=np.int64)

    assert len(drawn) == len(sampler) == 30_000
    freq = np.bincount(LABELS[drawn], minlength=3)
    assert chisquare(freq).pvalue > 0.01
    # Uniform over classes, not over items: the rarest class is about a third.
    assert abs(freq[2] / 30_000 - 1 / 3) < 0.02
    assert set(drawn[LABELS[drawn] == 2]) == set(np.flatnonzero(LABELS == 2))
    assert set(drawn[LABELS[drawn] == 1]) == set(np.flatnonzero(LABELS == 1))


def test_class_aware_sampler_cycles_through_a_class_before_repeating():
    labels = ["a"] * 5 + ["b"] * 50
    drawn = list(ClassAwareSampler(labels, num_samples=400, seed=3))
    rare = [i for i in drawn if i < 5]
    # Each run of 5 consecutive rare draws is one full shuffled pass.
    for start in range(0, len(rare) - 4, 5):
        assert sorted(rare[start : start + 5]) == [0, 1, 2, 3, 4]


def test_class_aware_sampler_is_deterministic_per_seed_and_epoch():
    a = ClassAwareSampler(LABELS, seed=7)
    b = ClassAwareSampler(LABELS, seed=7)
    assert list(a) == list(b)
    assert list(a) == list(a)  # re-iterating the same epoch repeats it

    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 != list(b)
    b.set_epoch(1)
    assert epoch1 == list(b)
    assert list(ClassAwareSampler(LABELS, seed=8)) != list(ClassAwareSampler(LABELS, seed=7))


def test_class_aware_sampler_default_length_and_string_labels():
    sampler = ClassAwareSampler(["x", "y", "y", "z"])
    assert len(sampler) == 4
    assert sampler.classes == ["x", "y", "z"]
    assert all(0 <= i < 4 for i in sampler)
    assert len(list(ClassAwareSampler([1, 2], num_samples=0))) == 0
    with pytest.raises(DataError):
        ClassAwareSampler([])


def test_class_aware_sampler_feeds_a_dataloader():
    data = torch.utils.data.TensorDataset(torch.as_tensor(LABELS))
    loader = torch.utils.data.DataLoader(
        data, batch_size=300, sampler=ClassAwareSampler(LABELS, num_samples=3000, seed=1)
    )
    seen = torch.cat([batch[0] for batch in loader]).numpy()
    assert len(seen) == 3000
    assert np.bincount(seen, minlength=3).min() > 850


def test_instance_balanced_sampler_is_a_seeded_permutation_per_epoch():
    sampler = instance_balanced_sampler(50, seed=0)
    first = list(sampler)
    assert sorted(first) == list(range(50))
    assert first != list(range(50))
    assert list(instance_balanced_sampler(50, seed=0)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(50))
    assert second != first
    assert len(sampler) == 50
