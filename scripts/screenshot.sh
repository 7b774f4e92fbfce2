#!/usr/bin/env bash
# Take the README's screenshot: napari with the plugin on the sample smear,
# under a virtual display.  bash scripts/screenshot.sh [OUT.png]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/images/napari-wbc.png}"
xvfb-run -a -s "-screen 0 1600x1000x24" napari-wbc view --screenshot "$out"
echo "wrote $out"
