"""Widget tests in a real viewer (run under Xvfb with Mesa OpenGL)."""

import dask.array as da
import numpy as np
import pytest

from napari_wbc._qt.normalize import REFERENCE_LAYER, StainNormalizeWidget
from napari_wbc.stain import DEFAULT_METHOD

pytestmark = pytest.mark.gui


@pytest.fixture
def viewer_with_sample(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample("napari-wbc", "smear")
    assert len(layers) == 1 and layers[0].rgb
    return viewer


def _wait(qtbot, widget, timeout=60_000):
    qtbot.waitUntil(lambda: not getattr(widget, "busy", widget.runner.running), timeout=timeout)


def test_plugin_widget_and_sample_are_listed(make_napari_viewer):
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wbc", "Stain normalization")
    assert isinstance(widget, StainNormalizeWidget)
    # napari builds Plugins › … and File › Open Sample › … from these registrations.
    from npe2 import PluginManager

    pm = PluginManager.instance()
    widgets = {w.display_name for w in pm.iter_widgets() if w.plugin_name == "napari-wbc"}
    assert {
        "Stain normalization",
        "Classify white cells",
        "Train classifier from annotations",
    } <= widgets
    assert any(
        plugin == "napari-wbc" and sample.key == "smear"
        for plugin, samples in pm.iter_sample_data()
        for sample in samples
    )
    for name in widgets:
        viewer.window.add_plugin_dock_widget("napari-wbc", name)


def test_normalize_widget_adds_then_replaces_a_lazy_layer(viewer_with_sample, qtbot):
    viewer = viewer_with_sample
    source = viewer.layers[0]
    widget = StainNormalizeWidget(viewer)
    widget.image.value = source
    widget.method.value = "reinhard"
    widget.run()
    _wait(qtbot, widget)
    name = f"{source.name} (reinhard)"
    assert name in viewer.layers
    out = viewer.layers[name]
    assert out.rgb and out.data.shape == source.data.shape
    assert isinstance(out.data, np.ndarray)  # in-memory input, computed in the worker
    assert tuple(out.scale) == tuple(source.scale)
    assert not np.array_equal(np.asarray(out.data[:256, :256]), source.data[:256, :256])
    n_layers = len(viewer.layers)
    widget.run()
    _wait(qtbot, widget)
    assert len(viewer.layers) == n_layers  # re-run replaced, did not pile up


def test_reference_from_another_layer(viewer_with_sample, qtbot):
    viewer = viewer_with_sample
    source = viewer.layers[0]
    ref = viewer.add_image(np.ascontiguousarray(source.data[::-1]), rgb=True, name="reference")
    widget = StainNormalizeWidget(viewer)
    widget.image.value = source
    widget.reference.value = REFERENCE_LAYER
    assert not widget.reference_layer.native.isHidden()
    widget.reference_layer.value = ref
    widget.run()
    _wait(qtbot, widget)
    assert f"{source.name} ({DEFAULT_METHOD})" in viewer.layers


def test_cancel_leaves_viewer_usable_and_no_layer(viewer_with_sample, qtbot):
    viewer = viewer_with_sample
    base = viewer.layers[0].data
    big = viewer.add_image(da.from_array(base, chunks=(64, 64, 3)), rgb=True, name="tiled")
    n_layers = len(viewer.layers)
    widget = StainNormalizeWidget(viewer)
    widget.image.value = big
    widget.run()
    widget.runner.worker.yielded.connect(lambda _event: widget.cancel())
    _wait(qtbot, widget)
    assert len(viewer.layers) == n_layers
    assert "cancel" in widget.status.value
    assert widget.run_button.enabled and not widget.cancel_button.enabled
    # Still usable: a new run completes.
    widget.run()
    _wait(qtbot, widget)
    assert f"tiled ({DEFAULT_METHOD})" in viewer.layers
    assert isinstance(viewer.layers[f"tiled ({DEFAULT_METHOD})"].data, da.Array)  # lazy output


def test_blank_image_error_is_reported_not_raised(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(np.full((256, 256, 3), 255, np.uint8), rgb=True, name="blank")
    widget = StainNormalizeWidget(viewer)
    widget.run()
    _wait(qtbot, widget)
    assert "blank" in widget.status.value and "failed" in widget.status.value
    assert len(viewer.layers) == 1


def test_multiscale_in_multiscale_out_with_reference_in_view(viewer_with_sample, qtbot):
    from napari_wbc._qt.normalize import REFERENCE_VIEW

    viewer = viewer_with_sample
    base = viewer.layers[0].data
    pyramid = [
        da.from_array(base, chunks=(256, 256, 3)),
        da.from_array(base[::2, ::2], chunks=(256, 256, 3)),
    ]
    layer = viewer.add_image(pyramid, rgb=True, multiscale=True, name="pyramid")
    widget = StainNormalizeWidget(viewer)
    widget.image.value = layer
    widget.reference.value = REFERENCE_VIEW
    widget.reference_layer.value = viewer.layers[0]
    widget.run()
    _wait(qtbot, widget)
    out = viewer.layers[f"pyramid ({DEFAULT_METHOD})"]
    assert out.multiscale
    assert [lvl.shape for lvl in out.data] == [lvl.shape for lvl in pyramid]
    assert all(isinstance(lvl, da.Array) for lvl in out.data)


def test_png_opens_in_memory_and_is_not_called_lazy(make_napari_viewer, qtbot, tmp_path):
    from PIL import Image

    from napari_wbc._napari import make_sample_data

    image = make_sample_data()[0][0][:512, :768]
    Image.fromarray(image).save(tmp_path / "field.png")
    viewer = make_napari_viewer()
    (layer,) = viewer.open(tmp_path / "field.png", plugin="napari-wbc")
    assert isinstance(layer.data, np.ndarray)  # decoded whole: no lazy wrapper
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wbc", "Stain normalization")
    widget.image.value = viewer.layers["field"]
    widget.method.value = "reinhard"
    widget.run()
    _wait(qtbot, widget)
    assert "field (reinhard)" in viewer.layers, widget.status.value
    assert "Done" in widget.status.value and "lazily" not in widget.status.value


def test_false_colours_are_refused_and_the_widget_says_so(make_napari_viewer, qtbot):
    """Issue #33: Macenko turned a BCCD field's red cells violet and nuclei green, silently."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-wbc", "bccd")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-wbc", "Stain normalization")
    widget.method.value = "macenko"
    widget.run()
    _wait(qtbot, widget, timeout=120_000)
    out = [layer for layer in viewer.layers if layer.metadata.get("stain_source")]
    assert len(out) == 1
    assert out[0].metadata["stain_method"] != "macenko"
    assert "macenko could not be used" in widget.status.value
    assert "false colours" in widget.status.value
