"""One-off studies behind the figures in docs/log/; not part of the napari-wbc product.

Run one from the repository root as ``python -m research.<name>``; see research/README.md.
"""
