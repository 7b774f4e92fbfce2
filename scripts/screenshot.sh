#!/usr/bin/env bash
# Take the README's screenshot: napari at 1280 × 800 with the three napari-wbc
# widgets docked, after normalizing the real-cell gallery sample (24 PBC cells)
# and detecting and classifying its cells with the built-in model, under a
# virtual display.
#   bash scripts/screenshot.sh [OUT.png]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/images/napari-wbc.png}"
xvfb-run -a -s "-screen 0 1280x1024x24" python - "$out" <<'PY'
import sys
import time

import napari
from qtpy.QtWidgets import QApplication

out = sys.argv[1]
viewer = napari.Viewer()
layers = viewer.open_sample("napari-wbc", "gallery")
image = next(layer for layer in layers if layer._type_string == "image")
for layer in layers:
    if layer is not image:
        layer.visible = False  # the truth, one click away in the layer list
widgets = {}
for name in ("Stain normalization", "Classify white cells", "Train classifier from annotations"):
    widgets[name] = viewer.window.add_plugin_dock_widget("napari-wbc", name)[1]
window = viewer.window._qt_window
window.resize(1280, 800)
app = QApplication.instance()


def run_on_image(widget):
    """Run a widget on the gallery image and wait (at most 10 min) until it is done."""
    widget.image.value = image
    widget.run()
    deadline = time.monotonic() + 600
    while getattr(widget, "busy", widget.runner.running) and time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.05)


# The gallery normalized onto the built-in reference (a PBC-like image stays
# as it is), shown under the result; then classify the original.
run_on_image(widgets["Stain normalization"])
classify = widgets["Classify white cells"]
run_on_image(classify)
if f"{image.name} cells" not in viewer.layers:
    sys.exit(f"classification did not finish: {classify.status.value}")
train = widgets["Train classifier from annotations"]
train.review_button.clicked()  # centre on the least confident cell
viewer.reset_view()  # the whole smear, the reviewed cell selected
window.resize(1280, 800)
for _ in range(30):
    app.processEvents()
    time.sleep(0.02)
size = window.size()
print(f"window {size.width()} × {size.height()}, canvas {viewer.window._qt_viewer.canvas.native.width()} px wide")
viewer.screenshot(out, canvas_only=False, flash=False)
viewer.close()
PY
echo "wrote $out"
