"""Benchmarks of the product; run each as a file (``python benchmarks/<name>.py``).

The package marker lets research/ reuse their helpers (``from benchmarks.bench_crosslab import ...``).
"""
