"""Stain methods come from one registry: registering a method is the only step."""

import argparse

import numpy as np
import pytest

from napari_wbc.errors import StainError
from napari_wbc.stain import (
    DEFAULT_METHOD,
    StainMethod,
    StainNormalizer,
    default_reference,
    fit_stain_reference,
    get_stain_method,
    normalize,
    register_stain_method,
    stain_methods,
    unregister_stain_method,
)
from napari_wbc.synthetic import make_sample_smear


class Brighten(StainMethod):
    """A made-up method: scale stained pixels towards the reference's red-cell brightness."""

    name = "brighten"
    label = "test method"
    fallback = "none"

    def fit(self, regions, balanced):
        return {"mean": float(regions.pixels[regions.stained].mean())}

    def validate(self, stats):
        if not 0 < float(stats["mean"]) <= 255:
            raise StainError("mean must be in (0, 255]")
        return {"mean": float(stats["mean"])}

    def transform(self, source, target):
        gain = target.stats[self.name]["mean"] / source.stats[self.name]["mean"]

        def apply(pixels, od):
            return pixels * gain

        return apply


@pytest.fixture
def brighten():
    register_stain_method(Brighten)
    yield Brighten.name
    unregister_stain_method(Brighten.name)


def _cli_method_choices() -> tuple:
    from napari_wbc.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    normalize_parser = sub.choices["normalize"]
    action = next(a for a in normalize_parser._actions if a.dest == "method")
    return tuple(action.choices), action.default


def test_built_in_methods_and_default():
    assert stain_methods()[0] == DEFAULT_METHOD
    assert stain_methods()[-1] == "none"
    assert {"regions", "macenko", "reinhard", "none"} <= set(stain_methods())
    assert _cli_method_choices() == (stain_methods(), DEFAULT_METHOD)


def test_a_registered_method_reaches_the_cli_and_fits_and_normalizes(brighten):
    assert brighten in stain_methods()
    choices, _ = _cli_method_choices()
    assert brighten in choices
    image = make_sample_smear()[:400, :600].copy()
    source = fit_stain_reference(image)
    assert brighten in source.stats
    # Serialised with the reference like the built-in methods.
    from napari_wbc.stain import StainReference

    assert StainReference.from_dict(source.to_dict()).stats[brighten] == source.stats[brighten]
    target = fit_stain_reference(np.clip(image.astype(int) + 20, 0, 255).astype(np.uint8))
    out = normalize(image, brighten, target)
    stained = image.sum(axis=-1) < 600
    assert out[stained].mean() > image[stained].mean() + 5


def test_unregistered_method_is_gone_and_references_without_its_stats_fall_back(brighten):
    # The built-in reference was fitted before this method existed: fall back, not crash.
    source = fit_stain_reference(make_sample_smear()[:400, :600].copy())
    norm = StainNormalizer(brighten, source, default_reference())
    assert norm.method == "none" and norm.requested == brighten
    unregister_stain_method(brighten)
    assert brighten not in stain_methods()
    with pytest.raises(StainError, match="unknown stain method"):
        get_stain_method(brighten)


def test_method_names_are_checked():
    class Bad(StainMethod):
        name = "Not a name"

    with pytest.raises(StainError, match="identifier"):
        register_stain_method(Bad)


@pytest.mark.gui
def test_a_registered_method_appears_in_the_widget(make_napari_viewer, brighten):
    from napari_wbc._qt.normalize import StainNormalizeWidget

    widget = StainNormalizeWidget(make_napari_viewer())
    assert list(widget.method.choices) == list(stain_methods())
    assert brighten in widget.method.choices
    assert widget.method.value == DEFAULT_METHOD
