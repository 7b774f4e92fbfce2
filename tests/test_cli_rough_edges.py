"""The rough edges a new user hits on the command line (issue #13)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_wbc.cli import main


def test_view_without_a_display_says_what_to_do(monkeypatch, capsys):
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert main(["view"]) == 2
    err = capsys.readouterr().err
    assert "needs a display" in err and "xvfb-run" in err
    assert len(err.strip().splitlines()) == 1


def test_help_and_input_errors_do_not_import_torch():
    code = (
        "import sys\n"
        "from napari_wbc.cli import main\n"
        "for argv in (['classify', '--help'], ['train', '--help'], ['predict', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert main(['classify', 'no-such-folder', '-o', 'out']) == 2\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_a_16_bit_grey_tiff_is_converted_with_a_word(tmp_path, caplog):
    from napari_wbc.images import read_smear

    path = tmp_path / "grey16.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(path, rng.integers(0, 60000, (64, 64), dtype=np.uint16))
    with caplog.at_level(logging.WARNING, logger="napari_wbc"):
        smear = read_smear(path)
    smear.close()
    notes = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("grey16.tif" in n and "grey" in n.lower() for n in notes), notes
    assert any("16" in n for n in notes), notes


def test_train_refuses_box_tables_with_what_to_do(tmp_path, capsys):
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("path,label,x,y,w,h\nfield.jpg,neutrophil,10,10,50,50\n")
    assert main(["train", str(boxes), "-o", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "boxes on whole smears" in err and "crops" in err


def test_train_and_reference_help_describe_themselves(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "detection" not in text  # the evaluate command's text, once
    with pytest.raises(SystemExit):
        main(["reference", "--help"])
    assert "Fit the stain statistics" in capsys.readouterr().out


def test_one_thread_count_for_torch_blas_and_dask(monkeypatch):
    import dask
    import torch

    from napari_wbc.threads import configure_threads, default_threads

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(name, "8")
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1
        assert torch.get_num_threads() == 1
        assert os.environ["OMP_NUM_THREADS"] == os.environ["OPENBLAS_NUM_THREADS"] == "1"
        assert dask.config.get("num_workers") == 1
    finally:
        torch.set_num_threads(before)
        dask.config.set(num_workers=None)
    # The default leaves the cores other work keeps busy.
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    monkeypatch.setattr("napari_wbc.threads.available_cores", lambda: 4)
    monkeypatch.setattr("napari_wbc.threads.running_elsewhere", lambda: None)
    assert default_threads() == 3
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert default_threads() == 1
    # Work still running keeps its cores; work that has just ended (still in
    # the load average) does not.
    monkeypatch.setattr("napari_wbc.threads.running_elsewhere", lambda: 2)
    assert default_threads() == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (1.4, 1.4, 1.4))
    monkeypatch.setattr("napari_wbc.threads.running_elsewhere", lambda: 0)
    assert default_threads() == 4


def test_the_command_ends_with_mains_code_and_all_its_output(tmp_path):
    # `napari-wbc` skips the interpreter's slow teardown: its exit code, its
    # output (even a large one, into a pipe) and exit handlers must survive.
    script = (
        "import atexit, sys\n"
        "from pathlib import Path\n"
        "import napari_wbc.cli as cli\n"
        "atexit.register(lambda: Path(sys.argv[1]).write_text('ran'))\n"
        "cli.main = lambda: (print('x' * 200_000), print('bad', file=sys.stderr), 2)[-1]\n"
        "cli.console_main()\n"
    )
    marker = tmp_path / "exit-handler"
    out = subprocess.run(
        [sys.executable, "-c", script, str(marker)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert out.stdout == "x" * 200_000 + "\n"
    assert out.stderr == "bad\n"
    assert marker.read_text() == "ran"
    for argv, code in ((["--version"], 0), (["evaluate"], 2)):
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "from napari_wbc.cli import console_main; console_main()",
                *argv,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == code, out.stderr
    assert "required" in out.stderr
