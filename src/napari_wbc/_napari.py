"""npe2 hooks: the reader and the sample data. No Qt here."""

from __future__ import annotations

from pathlib import Path

from .images import is_supported, read_smear

#: Image formats read whole into memory (TIFF is read lazily, tile by tile).
DECODED_WHOLE = (".jpg", ".jpeg", ".png", ".bmp")

#: The BCCD fields' red cells measure 107.5 px (69 cells, scale.iter_resolve_scale):
#: about 0.07 µm per pixel. Used only to show the sample in µm beside the others;
#: the layer's metadata keeps no pixel size, so classifying measures the red cells.
BCCD_RBC_PX = 107.5

#: Where each built-in sample sits in the world (µm, top-left corner): side by
#: side, so that opening several shows them all instead of one above another.
SAMPLE_ORIGIN_UM = {"smear": (0.0, 0.0), "gallery": (0.0, 220.0), "bccd": (0.0, 450.0)}


def smear_layer_data(smear, name: str | None = None) -> tuple:
    """Layer-data tuple for a :class:`~napari_wbc.images.Smear` (scale in µm when known)."""
    meta = {
        "pixel_size_um": smear.pixel_size_um,
        "path": str(smear.path) if smear.path else None,
        "conversions": list(smear.conversions),
    }
    kwargs = {
        "name": name or (smear.path.stem if smear.path else "smear"),
        "rgb": True,
        "multiscale": smear.multiscale,
        "metadata": meta,
    }
    if smear.pixel_size_um:
        kwargs["scale"] = (smear.pixel_size_um, smear.pixel_size_um)
        kwargs["units"] = ("µm", "µm")
    data = smear.levels if smear.multiscale else smear.levels[0]
    if not smear.multiscale and smear.path and smear.path.suffix.lower() in DECODED_WHOLE:
        # These formats are decoded whole when opened: hand napari the array it
        # already is, so widgets treat it as in memory (not as a lazy, tiled image).
        data = data.compute()
    return (data, kwargs, "image")


def get_reader(path):
    """Return a reader for one supported image path, else None (napari tries others)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not is_supported(path):
        return None
    return _read


def _read(path):
    paths = path if isinstance(path, list) else [path]
    layers = []
    for p in paths:
        smear = read_smear(p)
        layers.append(smear_layer_data(smear, Path(p).stem))
    return layers


def make_sample_data():
    """The built-in synthetic smear (generated, works offline)."""
    from .scale import RBC_DIAMETER_UM
    from .synthetic import SmearParams, make_sample_smear

    image = make_sample_smear()
    # A red cell is about 7.5 µm across; the generator draws it rbc_diameter px wide.
    pixel_size = RBC_DIAMETER_UM / SmearParams().rbc_diameter
    return [
        (
            image,
            {
                "name": "synthetic smear",
                "rgb": True,
                "scale": (pixel_size, pixel_size),
                "units": ("µm", "µm"),
                "metadata": {"pixel_size_um": pixel_size, "synthetic": True},
            },
            "image",
        )
    ]


def _real_sample(name: str) -> list:
    """A real sample as an image layer and its truth as a Points layer with a ``class``."""
    import numpy as np

    from .samples import load_sample
    from .scale import RBC_DIAMETER_UM

    sample = load_sample(name)
    # Every sample in µm (napari warns of inconsistent units across layers
    # otherwise), each at its own place.
    shown = sample.pixel_size_um or RBC_DIAMETER_UM / BCCD_RBC_PX
    common = {
        "scale": (shown, shown),
        "units": ("µm", "µm"),
        "translate": SAMPLE_ORIGIN_UM.get(name, (0.0, 0.0)),
    }
    meta = {"pixel_size_um": sample.pixel_size_um, "sample": name, "licence": sample.info.licence}
    truth = sample.truth
    points = np.column_stack([truth["y"], truth["x"]]).astype(float)
    # Hollow rings a white cell across, so the cell stays visible under its truth label.
    if {"width", "height"} <= set(truth.columns):  # boxes: a ring round each box
        size = truth[["width", "height"]].max(axis=1).to_numpy(float)
    else:  # a white cell is at most ~14 µm across
        size = np.full(len(truth), 14.0 / shown)
    return [
        (
            sample.image,
            {"name": sample.info.title, "rgb": True, "metadata": meta, **common},
            "image",
        ),
        (
            points,
            {
                "name": f"{sample.info.title} truth",
                "features": truth.drop(columns=["x", "y"]),
                "face_color": "transparent",
                "border_color": "#ffff00",
                "border_width": 0.05,
                "size": size,
                # The class written above each ring, clear of the cell.
                "text": {
                    "string": "{class}",
                    "color": "black",
                    "size": 9,
                    "anchor": "center",
                    "translation": [-0.6 * float(size.max()), 0],
                },
                "metadata": {"pixel_size_um": sample.pixel_size_um, "truth": True},
                **common,
            },
            "points",
        ),
    ]


def make_bccd_sample():
    """Six real BCCD smear fields (MIT) with their white cells' truth."""
    return _real_sample("bccd")


def make_gallery_sample():
    """A gallery of 24 real PBC cells (CC BY 4.0), three per class, with their truth."""
    return _real_sample("gallery")


def _cells_from_layer(data, meta):
    """A cell table (x, y, class, ...) from a Points layer's data and state."""
    import numpy as np
    import pandas as pd

    from .errors import WBCError

    points = np.asarray(data, dtype=float).reshape(-1, 2)
    features = meta.get("features")
    features = (
        pd.DataFrame(features) if features is not None else pd.DataFrame(index=range(len(points)))
    )
    if "class" not in features.columns:
        raise WBCError(
            "this Points layer has no 'class' feature; classify it with the napari-wbc "
            "Classify widget first"
        )
    cells = features.reset_index(drop=True).copy()
    cells["y"], cells["x"] = points[:, 0], points[:, 1]
    return cells


def write_points_csv(path: str, data, meta: dict) -> list[str]:
    """napari writer: a classified Points layer to CSV (pixels, and µm when known)."""
    from .export import cells_to_csv

    pixel = (meta.get("metadata") or {}).get("pixel_size_um")
    return [str(cells_to_csv(_cells_from_layer(data, meta), path, pixel_size_um=pixel))]


def write_points_geojson(path: str, data, meta: dict) -> list[str]:
    """napari writer: a classified Points layer to GeoJSON that QuPath imports."""
    from .export import cells_to_geojson

    shape = (meta.get("metadata") or {}).get("image_shape")
    cells_to_geojson(_cells_from_layer(data, meta), path, image_shape=shape)
    return [str(path)]
