"""Samplers for the two stages of decoupled long-tailed training.

Stage 1 trains the whole network on instance-balanced batches (every image
equally likely, so classes appear in proportion to their counts). Stage 2
retrains the classifier on class-aware batches (Shen et al., "Relay
Backpropagation", ECCV 2016): each draw first picks a class uniformly, then an
item of that class, so rare classes are seen as often as common ones.

Both samplers are deterministic given ``(seed, epoch)``; call
``set_epoch(epoch)`` before each epoch (as with
``torch.utils.data.DistributedSampler``) to get a fresh, reproducible order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from napari_wbc.errors import DataError

__all__ = ["ClassAwareSampler", "InstanceBalancedSampler", "instance_balanced_sampler"]


def _rng(seed: int, epoch: int) -> np.random.Generator:
    """A numpy generator that depends on both seed and epoch."""
    return np.random.default_rng([int(seed), int(epoch)])


class ClassAwareSampler(torch.utils.data.Sampler[int]):
    """Draw indices so that every class present is equally likely.

    Each draw picks a class uniformly among the classes present in ``labels``
    and then the next item of that class from a shuffled per-class list,
    which is reshuffled each time it is used up. Cycling (instead of
    independent draws within a class) means a class with ``k`` items and at
    least ``k`` draws has every one of its items drawn.

    Parameters
    ----------
    labels : sequence
        Class label (any hashable: int or str) of every item of the data set.
    num_samples : int, optional
        Indices yielded per epoch; defaults to ``len(labels)``.
    seed : int
        Seed; together with the epoch (see :meth:`set_epoch`) it fixes the order.

    Attributes
    ----------
    classes : list
        The distinct labels, sorted.
    epoch : int
    """

    def __init__(self, labels: Sequence, num_samples: int | None = None, seed: int = 0):
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise DataError("ClassAwareSampler needs a non-empty 1-D sequence of labels")
        classes, inverse = np.unique(labels, return_inverse=True)
        self.classes = classes.tolist()
        self._members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
        self.num_samples = len(labels) if num_samples is None else int(num_samples)
        if self.num_samples < 0:
            raise DataError(f"num_samples must be >= 0; got {num_samples}")
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next ``iter()`` yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        rng = _rng(self.seed, self.epoch)
        drawn_class = rng.integers(len(self._members), size=self.num_samples)
        order = np.empty(self.num_samples, dtype=np.int64)
        for c, members in enumerate(self._members):
            slots = np.flatnonzero(drawn_class == c)
            cycles = -(-len(slots) // len(members))
            stream = np.concatenate([rng.permutation(members) for _ in range(cycles)] or [members])
            order[slots] = stream[: len(slots)]
        return iter(order.tolist())


class InstanceBalancedSampler(torch.utils.data.Sampler[int]):
    """A seeded random permutation of ``range(n)``, fresh for each epoch.

    Parameters
    ----------
    n : int
        Size of the data set.
    seed : int
        Seed; together with the epoch (see :meth:`set_epoch`) it fixes the order.
    """

    def __init__(self, n: int, seed: int = 0):
        if n < 0:
            raise DataError(f"data set size must be >= 0; got {n}")
        self.n = int(n)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next ``iter()`` yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(_rng(self.seed, self.epoch).permutation(self.n).tolist())


def instance_balanced_sampler(n: int, seed: int = 0) -> InstanceBalancedSampler:
    """Sampler for stage 1: every item once per epoch, in a seeded random order.

    Parameters
    ----------
    n : int
        Size of the data set.
    seed : int
        Seed of the permutation (combined with the epoch set by ``set_epoch``).

    Returns
    -------
    InstanceBalancedSampler
    """
    return InstanceBalancedSampler(n, seed=seed)
