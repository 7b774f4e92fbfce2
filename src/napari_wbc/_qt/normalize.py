"""The Stain normalization widget: parameters in, one core call, a layer out."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, ProgressBar, PushButton
from qtpy.QtWidgets import QSizePolicy

from ._common import (
    DockPage,
    WorkerRunner,
    button_row,
    image_levels,
    output_layer,
    rgb_image_layers,
    wrapping_label,
)

if TYPE_CHECKING:
    import napari

REFERENCE_DEFAULT = "built-in (PBC)"
REFERENCE_LAYER = "another layer"
REFERENCE_VIEW = "region in view"


class StainNormalizeWidget(DockPage):
    """Normalize the stain of an image layer into a new, lazily computed layer."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.image = ComboBox(label="image", choices=self._image_choices, nullable=False)
        self.method = ComboBox(label="method", choices=self._method_choices)
        self.reference = ComboBox(
            label="reference", choices=[REFERENCE_DEFAULT, REFERENCE_LAYER, REFERENCE_VIEW]
        )
        self.reference_layer = ComboBox(
            label="reference layer", choices=self._image_choices, visible=False
        )
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", value=0, max=1)
        self.status = wrapping_label(label="", value="")
        self.add_form([self.image, self.method, self.reference, self.reference_layer])
        self.finish()
        # Always in view: Run, the progress and the status (which says when
        # the method asked for could not be used).
        self.add_footer(button_row(self.run_button, self.cancel_button, self.progress))
        self.add_footer(self.status.native)
        # Docked above the Classify and Train widgets, take no more height than needed.
        self.native.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Maximum)
        self.reference.changed.connect(self._on_reference_changed)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.runner = WorkerRunner(self, description="stain normalization")
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._refresh_layers)

    # -- helpers ---------------------------------------------------------
    @staticmethod
    def _method_choices(_widget=None):
        from ..stain import stain_methods

        return list(stain_methods())

    def _image_choices(self, _widget=None):
        return [(layer.name, layer) for layer in rgb_image_layers(self.viewer)]

    def _refresh_layers(self, _event=None):
        self.image.reset_choices()
        self.reference_layer.reset_choices()

    def _on_reference_changed(self, value):
        self.reference_layer.visible = value != REFERENCE_DEFAULT

    def _reference_source(self):
        """The array the reference is fitted on, or None for the built-in one."""
        choice = self.reference.value
        if choice == REFERENCE_DEFAULT:
            return None, ""
        layer = self.reference_layer.value
        if layer is None:
            raise ValueError("choose the layer to take the reference stain from")
        levels = image_levels(layer)
        if choice == REFERENCE_LAYER:
            return levels, f"layer {layer.name!r}"
        level = layer.data_level if layer.multiscale else 0
        (y0, x0), (y1, x1) = layer.corner_pixels[:, -2:]
        region = levels[level][int(y0) : int(y1) + 1, int(x0) : int(x1) + 1]
        return [region], f"region in view of {layer.name!r}"

    # -- actions ---------------------------------------------------------
    def run(self):
        """Start normalization in a worker thread."""
        from ..progress import Progress
        from ..stain import iter_fit_stain_reference, iter_prepare_normalizer, normalize_array

        layer = self.image.value
        if layer is None:
            self.runner.notify_error("open an RGB image first")
            return
        method = self.method.value
        levels = image_levels(layer)
        try:
            ref_levels, ref_text = self._reference_source()
        except ValueError as exc:
            self.runner.notify_error(str(exc))
            return

        def work():
            reference = None
            if ref_levels is not None:
                reference = yield from iter_fit_stain_reference(
                    ref_levels[-1] if len(ref_levels) > 1 else ref_levels[0],
                    description=ref_text,
                )
            # Refuse false colours too: this image is for the user's eyes.
            normalizer = yield from iter_prepare_normalizer(
                levels, method, reference, check_colours=True
            )
            # In-memory images are normalized here, off the main thread; dask
            # levels stay lazy and are computed tile by tile as napari shows them.
            yield Progress("apply", 0, 1, "applying")
            return [normalize_array(level, normalizer) for level in levels], normalizer

        def done(result):
            out, normalizer = result
            used = normalizer.method
            name = f"{layer.name} ({used})"
            output_layer(
                self.viewer,
                name,
                out if len(out) > 1 else out[0],
                source=layer,
                metadata={"stain_method": used, "stain_source": layer.name},
            )
            lazy = (
                " (computed lazily as you view it)" if not isinstance(out[0], np.ndarray) else ""
            )
            self.status.value = f"Done: {name}{lazy}"
            if used != method:
                # The fit, or the colours it gives, are implausible for this
                # method on this image: say so, and what was done instead.
                from napari.utils.notifications import show_warning

                instead = "left as it was" if used == "none" else f"normalized with {used} instead"
                self.status.value = (
                    f"⚠ {method} could not be used on this image: "
                    f"{normalizer.fallback_reason}. It was {instead}: {name}."
                )
                show_warning(self.status.value)

        self.runner.start(work(), on_done=done)

    def cancel(self):
        """Stop the running worker; nothing is added."""
        self.runner.cancel()
