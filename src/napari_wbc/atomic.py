"""Atomic file writes: a crash, an error or a cancel never leaves half a file.

Every file napari-wbc saves (tables, GeoJSON, model files, checkpoints,
images) is written to a hidden temporary file in the destination folder,
flushed to disk, given the permissions a plainly created file would get (or
those of the file it replaces), and renamed over the destination in one step.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def temporary_beside(path: str | os.PathLike, suffix: str = ".part") -> Path:
    """Create an empty hidden temporary file in ``path``'s folder (made if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _default_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Flush ``tmp`` to disk, give it ordinary permissions and rename it over ``path``.

    ``mkstemp`` makes files private (0600); a saved table or model is meant to
    be shared like any other file, so ``tmp`` gets the mode of the file it
    replaces, or the one the umask gives a new file.
    """
    tmp, path = Path(tmp), Path(path)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else _default_mode())
    os.replace(tmp, path)
    # Persist the rename itself; not possible (nor needed) on every platform.
    with contextlib.suppress(OSError, AttributeError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def atomic_write(
    path: str | os.PathLike, write: Callable[[str], None], suffix: str = ".part"
) -> Path:
    """Save through ``write(tmp_path)``, then :func:`publish` it as ``path``.

    If ``write`` raises (or the process is interrupted), the temporary file is
    removed and ``path`` is left as it was.
    """
    tmp = temporary_beside(path, suffix)
    try:
        write(str(tmp))
        return publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_stream(
    path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False
) -> Path:
    """Like :func:`atomic_write`, with ``write`` given an open file (UTF-8 text or binary)."""

    def to_file(tmp: str) -> None:
        if binary:
            with open(tmp, "wb") as fh:
                write(fh)
        else:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                write(fh)

    return atomic_write(path, to_file)
