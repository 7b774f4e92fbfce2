"""Atomic saves: ordinary permissions, the old file kept when writing fails."""

import os
import stat

import pandas as pd
import pytest

from napari_wbc.atomic import atomic_write, atomic_write_stream
from napari_wbc.export import cells_to_csv


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_new_file_gets_the_umask_mode_not_mkstemps_private_one(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_stream(tmp_path / "sub" / "table.csv", lambda fh: fh.write("a,b\n"))
    finally:
        os.umask(old)
    assert path.read_text() == "a,b\n"
    assert _mode(path) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["table.csv"]


def test_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")
    path.chmod(0o640)
    atomic_write(path, lambda tmp: open(tmp, "wb").write(b"new"))
    assert path.read_bytes() == b"new"
    assert _mode(path) == 0o640


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "counts.csv"
    path.write_text("kept\n")

    def broken(fh):
        fh.write("half a ta")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_stream(path, broken)
    assert path.read_text() == "kept\n"
    assert [p.name for p in tmp_path.iterdir()] == ["counts.csv"]


def test_exported_cell_table_is_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        cells = pd.DataFrame({"y": [1.0], "x": [2.0], "class": ["neutrophil"]})
        path = cells_to_csv(cells, tmp_path / "cells.csv")
    finally:
        os.umask(old)
    assert _mode(path) & 0o044 == 0o044
