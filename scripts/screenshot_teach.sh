#!/usr/bin/env bash
# Take the README's Teach screenshot: napari at 1280 × 800 with the three
# napari-wbc widgets docked; the BCCD sample classified with the built-in
# models, then "Teach this lab" asking about its third cell (two answered: one
# confirmed, one corrected), under a virtual display.
#   bash scripts/screenshot_teach.sh [OUT.png]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/images/teach.png}"
xvfb-run -a -s "-screen 0 1280x1024x24" python - "$out" <<'PY'
import sys
import time

import napari
from qtpy.QtWidgets import QApplication

out = sys.argv[1]
viewer = napari.Viewer()
layers = viewer.open_sample("napari-wbc", "bccd")
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


def settle(seconds: float = 0.5) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.02)


classify = widgets["Classify white cells"]
classify.image.value = image
classify.run()
deadline = time.monotonic() + 600
while classify.busy and time.monotonic() < deadline:
    settle(0.05)
if f"{image.name} cells" not in viewer.layers:
    sys.exit(f"classification did not finish: {classify.status.value}")
teacher = classify.teacher
teacher.teach_button.clicked()
teacher.right_button.clicked()  # the first cell: right
layer = teacher.layer
shown = str(layer.features["class"].iloc[teacher.current()])
teacher.pick.value = next(c for c in teacher.pick.choices if c not in (shown, "exclude"))
teacher.set_class_button.clicked()  # the second: corrected
viewer.camera.zoom = viewer.camera.zoom * 1.4  # the cell asked about, centred, up close
teacher.show_cell()
window.resize(1280, 800)
settle(1.0)
size = window.size()
print(f"window {size.width()} × {size.height()}: {classify.status.value}")
viewer.screenshot(out, canvas_only=False, flash=False)
viewer.close()
PY
echo "wrote $out"
