"""Stain normalization across labs: colours of glass, red cells and nuclei before and after.

    python benchmarks/bench_stain_labs.py [--data ../shared/data] [--per-lab 24]
        [--grid docs/images/normalization-labs.png] [--classify]

For each lab in the data folder (PBC crops, BCCD fields, LISC crops, TXL
Raabin and BCD fields) and the built-in synthetic sample, every image is
normalized onto the built-in PBC reference by each registered method, fitted
on that image alone (as the Stain normalization widget does). Pixels are
assigned to glass, red cells and white-cell nuclei **once, on the original
image** (napari_wbc.stain.segment_pixels; nuclei only inside the annotated
white-cell boxes, the centre of a crop or the sample's true white cells), and
the same pixels are measured before and after, so a method cannot move the
goalposts. The reference colours are measured the same way on a separate
seeded set of PBC crops.

Prints, per lab and method: mean CIE-Lab and hue angle of each region,
mean ΔE2000 (skimage.color.deltaE_ciede2000) of each image's mean region
colour to the reference's, mean per-pixel ΔE2000 to the original, and how
many images have red cells outside pink-red or nuclei outside purple-violet
hues. Writes a before/after picture grid. ``--classify`` also counts how many
of the sample's white cells the default model classifies correctly with each
method and without normalization.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from skimage.color import deltaE_ciede2000, rgb2lab

from napari_wbc.settings import data_root
from napari_wbc.stain import (
    DEFAULT_METHOD,
    StainNormalizer,
    default_reference,
    segment_pixels,
    stain_methods,
)
from napari_wbc.synthetic import make_sample_smear, sample_smear_truth

REGIONS = ("glass", "rbc", "nucleus")
#: Hue angles (CIE-Lab h_ab, degrees) that read as pink-red for red cells and
#: purple-violet for nuclei; green, cyan, blue and brown lie outside.
RBC_HUES = (345.0, 60.0)
NUCLEUS_HUES = (280.0, 350.0)
DEFAULT_GRID = Path(__file__).resolve().parents[1] / "docs/images/normalization-labs.png"


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _box_mask(shape, boxes: pd.DataFrame) -> np.ndarray:
    mask = np.zeros(shape[:2], bool)
    for b in boxes.itertuples():
        mask[max(int(b.y), 0) : int(b.y + b.h), max(int(b.x), 0) : int(b.x + b.w)] = True
    return mask


def _centre_mask(shape, frac: float = 0.5) -> np.ndarray:
    h, w = shape[:2]
    yy, xx = np.mgrid[:h, :w]
    return (np.abs(yy - h / 2) < frac * h / 2) & (np.abs(xx - w / 2) < frac * w / 2)


def load_labs(
    root: Path, per_lab: int, seed: int
) -> dict[str, list[tuple[str, np.ndarray, np.ndarray]]]:
    """Per lab: (name, image, white-cell mask) for a seeded sample of images."""
    rng = np.random.default_rng(seed)
    labs: dict[str, list] = {}

    def pick(items, n):
        items = list(items)
        return [items[i] for i in sorted(rng.permutation(len(items))[:n])]

    pbc = pd.read_csv(root / "pbc/labels.csv")
    per_class = max(per_lab // pbc.label.nunique(), 1)
    crops = pbc.groupby("label", group_keys=False).sample(n=per_class, random_state=seed + 1)
    labs["pbc crops"] = [
        (p, img, _centre_mask(img.shape)) for p in crops.path for img in [_read(root / "pbc" / p)]
    ]
    lisc = pd.read_csv(root / "lisc/labels.csv")
    labs["lisc crops"] = [
        (p, img, _centre_mask(img.shape))
        for p in pick(lisc.path, per_lab)
        for img in [_read(root / "lisc" / p)]
    ]
    bccd = pd.read_csv(root / "bccd/boxes.csv")
    wbc = bccd[bccd.label == "WBC"]
    labs["bccd fields"] = [
        (p, img, _box_mask(img.shape, wbc[wbc.path == p]))
        for p in pick(sorted(wbc.path.unique()), per_lab)
        for img in [_read(root / "bccd" / p)]
    ]
    txl = pd.read_csv(root / "txl/wbc.csv")
    for source in ("raabin", "bcd"):
        part = txl[txl.path.str.contains(f"/{source}/")]
        labs[f"txl {source} fields"] = [
            (p, img, _box_mask(img.shape, part[part.path == p]))
            for p in pick(sorted(part.path.unique()), per_lab)
            for img in [_read(root / "txl" / p)]
        ]
    return labs


def sample_lab() -> list[tuple[str, np.ndarray, np.ndarray]]:
    image, truth = make_sample_smear(), sample_smear_truth()
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    mask = np.zeros(image.shape[:2], bool)
    for c in truth[truth.kind == "wbc"].itertuples():
        mask |= (yy - c.y) ** 2 + (xx - c.x) ** 2 < (c.diameter / 2) ** 2
    return [("built-in sample", image, mask)]


def region_masks(image: np.ndarray, wbc_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Glass, red-cell and nucleus pixels of the original image (flat boolean masks)."""
    seg = segment_pixels(image.reshape(-1, 3))
    wbc = wbc_mask.reshape(-1)
    return {"glass": seg.glass, "rbc": seg.rbc & ~wbc, "nucleus": seg.nucleus & wbc}


def mean_lab(image: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    if mask.sum() < 50:
        return None
    return rgb2lab(image.reshape(-1, 3)[mask][None] / 255.0)[0].mean(axis=0)


def hue(lab: np.ndarray) -> float:
    return float(np.degrees(np.arctan2(lab[2], lab[1])) % 360)


def _in_hues(h: float, span: tuple[float, float]) -> bool:
    lo, hi = span
    return lo <= h <= hi if lo <= hi else h >= lo or h <= hi


def reference_colours(root: Path, n: int, seed: int) -> dict[str, np.ndarray]:
    """Mean Lab of each region over a seeded set of PBC crops (not those measured)."""
    pbc = pd.read_csv(root / "pbc/labels.csv")
    crops = pbc.groupby("label", group_keys=False).sample(n=n, random_state=seed)
    sums = {r: [] for r in REGIONS}
    for p in crops.path:
        img = _read(root / "pbc" / p)
        for r, m in region_masks(img, _centre_mask(img.shape)).items():
            lab = mean_lab(img, m)
            if lab is not None:
                sums[r].append(lab)
    return {r: np.mean(v, axis=0) for r, v in sums.items()}


def measure(labs, methods, ref_colours):
    """Rows of (lab, method, region, statistics) and the normalized images for the grid."""
    from napari_wbc.stain import fit_stain_reference

    target = default_reference()
    rows, outputs, fallbacks = [], {}, {}
    for lab, items in labs.items():
        for name, image, wbc in items:
            masks = region_masks(image, wbc)
            source = fit_stain_reference(image, description=name)
            for method in methods:
                norm = StainNormalizer(method, source, target)
                if norm.method != method:
                    fallbacks.setdefault((lab, method), []).append(norm.method)
                out = norm(image)
                outputs[(lab, name, method)] = out
                for region in REGIONS:
                    m = masks[region]
                    before, after = mean_lab(image, m), mean_lab(out, m)
                    if before is None:
                        continue
                    px = image.reshape(-1, 3)[m][None] / 255.0
                    pxo = out.reshape(-1, 3)[m][None] / 255.0
                    rows.append(
                        {
                            "lab": lab,
                            "method": method,
                            "region": region,
                            "image": name,
                            "L_before": before[0],
                            "a_before": before[1],
                            "b_before": before[2],
                            "L_after": after[0],
                            "a_after": after[1],
                            "b_after": after[2],
                            "hue_before": hue(before),
                            "hue_after": hue(after),
                            "dE_ref_before": float(
                                deltaE_ciede2000(before[None], ref_colours[region][None])[0]
                            ),
                            "dE_ref_after": float(
                                deltaE_ciede2000(after[None], ref_colours[region][None])[0]
                            ),
                            "dE_original": float(
                                deltaE_ciede2000(rgb2lab(px), rgb2lab(pxo)).mean()
                            ),
                        }
                    )
    return pd.DataFrame(rows), outputs, fallbacks


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    def bad_hue(group):
        span = RBC_HUES if group.name[2] == "rbc" else NUCLEUS_HUES
        if group.name[2] == "glass":
            return 0
        return int(sum(not _in_hues(h, span) for h in group.hue_after))

    g = df.groupby(["lab", "method", "region"], sort=False)
    lab_columns = ["L_before", "a_before", "b_before", "L_after", "a_after", "b_after"]
    out = g[[*lab_columns, "dE_ref_before", "dE_ref_after", "dE_original"]].mean()
    # Hue of the mean colour (hues do not average).
    out["hue_before"] = [hue(v) for v in out[["L_before", "a_before", "b_before"]].to_numpy()]
    out["hue_after"] = [hue(v) for v in out[["L_after", "a_after", "b_after"]].to_numpy()]
    out["off_hue"] = g.apply(bad_hue, include_groups=False)
    out["images"] = g.size()
    return out.reset_index()


def print_table(summary: pd.DataFrame) -> None:
    print(
        "| lab | method | region | Lab before | hue before | Lab after | hue after "
        "| ΔE to ref. before | after | ΔE to original | off-hue images |"
    )
    print("|---|---|---|---|---:|---|---:|---:|---:|---:|---:|")
    for r in summary.itertuples():
        off = "" if r.region == "glass" else f"{r.off_hue}/{r.images}"
        print(
            f"| {r.lab} | {r.method} | {r.region} "
            f"| {r.L_before:.0f}, {r.a_before:.0f}, {r.b_before:.0f} | {r.hue_before:.0f}° "
            f"| {r.L_after:.0f}, {r.a_after:.0f}, {r.b_after:.0f} | {r.hue_after:.0f}° "
            f"| {r.dE_ref_before:.1f} | {r.dE_ref_after:.1f} | {r.dE_original:.1f} | {off} |"
        )


def _thumb(image: np.ndarray, centre, size: int, tile: int) -> np.ndarray:
    """A ``size`` square around ``centre`` (or the whole image), resized to ``tile``."""
    h, w = image.shape[:2]
    if centre is not None and max(h, w) > size:
        cy, cx = centre
        y0 = int(np.clip(cy - size / 2, 0, h - size))
        x0 = int(np.clip(cx - size / 2, 0, w - size))
        image = image[y0 : y0 + size, x0 : x0 + size]
    return np.asarray(Image.fromarray(image).resize((tile, tile), Image.LANCZOS))


def write_grid(labs, outputs, methods, path: Path, per_row: int = 2, tile: int = 150) -> None:
    """Rows: labs; per image, the original then each method."""
    cols = ["original", *methods]
    label_h = 18
    width = per_row * len(cols) * tile
    rows = []
    for lab, items in labs.items():
        chosen = items[:per_row]
        row = Image.new("RGB", (width, tile + label_h), "white")
        draw = ImageDraw.Draw(row)
        for i, (name, image, wbc) in enumerate(chosen):
            ys, xs = np.nonzero(wbc)
            centre = (ys.mean(), xs.mean()) if len(ys) else None
            size = min(image.shape[:2]) if lab != "built-in sample" else 400
            for j, col in enumerate(cols):
                img = image if col == "original" else outputs[(lab, name, col)]
                x = (i * len(cols) + j) * tile
                row.paste(Image.fromarray(_thumb(img, centre, size, tile)), (x, label_h))
                text = f"{lab}: {col}" if j == 0 else col
                draw.text((x + 3, 3), text, fill="black")
        rows.append(row)
    grid = Image.new("RGB", (width, sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, optimize=True)


def classify_sample(methods) -> None:
    """How many of the sample's white cells the default model gets right, per method."""
    from napari_wbc.inference import load_any
    from napari_wbc.models.files import default_model_path
    from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear
    from napari_wbc.progress import run

    image, truth = make_sample_smear(), sample_smear_truth()
    wbc = truth[truth.kind == "wbc"].reset_index(drop=True)
    model = load_any(default_model_path())
    print(f"\nBuilt-in sample, default model, {len(wbc)} white cells:\n")
    print("| stain normalization | cells found | true class |")
    print("|---|---:|---:|")
    for method in ["off", *methods]:
        config = ClassifyConfig(
            pixel_size_um=0.1,
            stain_normalize=method != "off",
            stain_method=None if method == "off" else method,
        )
        cells = run(iter_classify_smear(image, model, config))
        d = np.hypot(
            cells.x.to_numpy()[:, None] - wbc.x.to_numpy(),
            cells.y.to_numpy()[:, None] - wbc.y.to_numpy(),
        )
        found = d.min(axis=0) < 0.5 * wbc.diameter.min()
        nearest = d.argmin(axis=0)
        right = found & (cells["class"].to_numpy()[nearest] == wbc.label.to_numpy())
        print(f"| {method} | {found.sum()}/{len(wbc)} | {right.sum()}/{len(wbc)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=data_root())
    parser.add_argument("--per-lab", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--methods", nargs="+", default=[m for m in stain_methods() if m != "none"]
    )
    parser.add_argument("--grid", type=Path, default=DEFAULT_GRID)
    parser.add_argument("--classify", action="store_true")
    parser.add_argument("--csv", type=Path, help="also save the per-image rows")
    args = parser.parse_args()

    t = time.perf_counter()
    labs = {}
    if (args.data / "pbc/labels.csv").exists():
        labs.update(load_labs(args.data, args.per_lab, args.seed))
        ref_colours = reference_colours(args.data, 5, args.seed + 100)
    else:
        print(f"no data at {args.data}: measuring the built-in sample only")
        target = default_reference()
        ref_colours = None
        del target
    labs["built-in sample"] = sample_lab()
    if ref_colours is None:
        image, mask = labs["built-in sample"][0][1:]
        ref_colours = {r: mean_lab(image, m) for r, m in region_masks(image, mask).items()}
    df, outputs, fallbacks = measure(labs, args.methods, ref_colours)
    if args.csv:
        df.to_csv(args.csv, index=False)
    summary = summarise(df)
    ref_text = ", ".join(
        f"{r} {v[0]:.0f}/{v[1]:.0f}/{v[2]:.0f} ({hue(v):.0f}°)" for r, v in ref_colours.items()
    )
    print(f"Reference colours (PBC crops, L/a/b and hue): {ref_text}\n")
    print_table(summary)
    for (lab, method), used in fallbacks.items():
        print(
            f"- {lab}, {method}: fell back on {len(used)} images ({', '.join(sorted(set(used)))})"
        )
    write_grid(labs, outputs, args.methods, args.grid)
    print(
        f"\npicture grid: {args.grid}  (default method: {DEFAULT_METHOD}; {time.perf_counter() - t:.0f} s)"
    )
    if args.classify:
        classify_sample(args.methods)


if __name__ == "__main__":
    main()
