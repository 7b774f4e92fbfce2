"""Exceptions with messages a user can act on."""

from __future__ import annotations

from typing import ClassVar, Self


class WBCError(Exception):
    """Base class of every error napari-wbc raises on purpose."""


class ImageReadError(WBCError, ValueError):
    """An image file cannot be read or converted to RGB."""


class StainError(WBCError, ValueError):
    """Stain estimation or normalization cannot proceed on this input."""


class ModelFileError(WBCError, ValueError):
    """A model file is missing, corrupt, or of an unsupported format."""


class DataError(WBCError, ValueError):
    """A training or evaluation data set is malformed."""


class ScaleError(WBCError, ValueError):
    """The red-cell size cannot be measured, or a given scale is unusable."""


class Checked:
    """``validate`` for a settings dataclass that lists its own ``problems``.

    A subclass names the error it raises (``error``) and what it is called in
    the message (``label``, or :meth:`describe` for a name that depends on
    the instance); ``validate`` then raises one error naming every problem,
    so a user fixes them all at once.
    """

    error: ClassVar[type[WBCError]] = WBCError
    label: ClassVar[str] = "settings"

    def problems(self) -> list[str]:
        """Return what is wrong (empty when the object is usable)."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.label

    def validate(self) -> Self:
        """Raise ``error`` listing every problem; return self when fine."""
        problems = self.problems()
        if problems:
            raise self.error(f"invalid {self.describe()}: " + "; ".join(problems))
        return self
