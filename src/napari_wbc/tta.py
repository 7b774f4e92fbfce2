"""Test-time augmentation: the views of a crop that an ensemble averages over.

Blood-cell crops have no preferred orientation, so the dihedral group D4
(4 rotations × optional mirror) is the natural set of views
(arXiv 2603.01976: flips and 90° rotations, probability averaging).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class D4Transform:
    """An element of the dihedral group D4 acting on the last two axes.

    The image is first mirrored left-right (when ``flip``), then rotated by
    ``k`` quarter turns counter-clockwise. Works on NCHW tensors.
    """

    k: int = 0
    flip: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip:
            x = x.flip(-1)
        return torch.rot90(x, self.k % 4, dims=(-2, -1)) if self.k % 4 else x

    @property
    def name(self) -> str:
        names = {
            (0, False): "identity",
            (1, False): "rot90",
            (2, False): "rot180",
            (3, False): "rot270",
            (0, True): "hflip",
            (1, True): "hflip+rot90",
            (2, True): "vflip",
            (3, True): "hflip+rot270",
        }
        return names[(self.k % 4, self.flip)]


#: Named TTA sets: lists of transforms on NCHW tensors. "flips" holds the
#: identity, the two mirrors and their product (a half turn); "d4" all 8
#: symmetries of the square.
TTA_SETS: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
    "none": [D4Transform(0, False)],
    "flips": [D4Transform(0, False), D4Transform(0, True), D4Transform(2, True), D4Transform(2)],
    "d4": [D4Transform(k, f) for f in (False, True) for k in range(4)],
}
