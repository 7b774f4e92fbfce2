"""Exceptions with messages a user can act on."""


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
