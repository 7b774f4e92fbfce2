"""A fresh napari session, as a user starts one: viewer first, then the plugin.

napari draws with OpenGL before any plugin code runs. Under Mesa's software
driver that loads Mesa's own LLVM into the process, and loading a second LLVM
(triton's, pulled in by torch._dynamo through timm → torchvision.ops) used to
kill the process at the first Classify › Run. The test suite imports torch
before any viewer exists, so only a fresh interpreter shows the problem.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.gui, pytest.mark.slow]

SESSION = textwrap.dedent(
    """
    import sys, time

    import napari
    from qtpy.QtWidgets import QApplication

    assert "torch" not in sys.modules and "triton" not in sys.modules
    viewer = napari.Viewer()
    viewer.open_sample("napari-wbc", "smear")
    app = QApplication.instance()
    for _ in range(10):
        app.processEvents()
    viewer.screenshot(flash=False)  # the canvas has drawn: the GL driver is loaded
    maps = open("/proc/self/maps").read() if sys.platform.startswith("linux") else ""
    print("gl llvm loaded:", "libLLVM" in maps, flush=True)

    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wbc", "Classify white cells")
    widget.model.value = "model file…"
    widget.model_file.value = sys.argv[1]
    widget.run_button.native.click()
    deadline = time.monotonic() + 240
    while widget.busy and time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.02)
    for _ in range(10):
        app.processEvents()
    viewer.screenshot(flash=False)  # and it still draws
    print("status:", widget.status.value, flush=True)
    print("layers:", "|".join(layer.name for layer in viewer.layers), flush=True)
    viewer.close()
    """
)


def test_classify_run_in_a_fresh_session_keeps_napari_alive(tmp_path, tiny_model_path):
    script = tmp_path / "session.py"
    script.write_text(SESSION)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_model_path)],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    out = done.stdout + done.stderr[-3000:]
    assert done.returncode == 0, f"napari died (exit {done.returncode}):\n{out}"
    layers = next(line for line in done.stdout.splitlines() if line.startswith("layers:"))
    assert "synthetic smear cells" in layers.split("|"), out
