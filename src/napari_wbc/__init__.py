"""napari-wbc: find, classify and count white blood cells in blood smears.

Importing this package is cheap on purpose: it imports neither torch nor Qt,
so napari starts fast. Heavy modules are imported where they are used.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
