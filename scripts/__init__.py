"""The maintained tools that make and check the shipped artefacts (see each file's docstring).

Run them as files (``python scripts/<name>.py``); the package marker only lets research/
reuse their helpers (``from scripts.fit_trust import ...``).
"""
