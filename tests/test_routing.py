"""``--model auto``: the PBC specialist for images like its own, the three-lab model for others."""

import numpy as np
import pytest

from napari_wbc.errors import ModelFileError
from napari_wbc.models.files import builtin_model_path
from napari_wbc.routing import (
    GENERALIST,
    ROUTE_MAX_OOD_SHARE,
    ROUTE_MIN_CELLS,
    SPECIALIST,
    ModelRouter,
    load_router,
)

try:
    builtin_model_path(SPECIALIST), builtin_model_path(GENERALIST)
    SHIPPED = True
except ModelFileError:
    SHIPPED = False

pytestmark = pytest.mark.skipif(not SHIPPED, reason="this installation ships no built-in models")


@pytest.fixture(scope="module")
def router():
    return load_router()


def test_router_holds_both_built_in_models_with_one_class_list(router):
    assert router.specialist.path == builtin_model_path(SPECIALIST)
    assert router.generalist.path == builtin_model_path(GENERALIST)
    assert router.classes == router.specialist.classes == router.generalist.classes
    assert router.specialist.trust is not None  # the choice rests on its statistics


def test_sample_smear_goes_to_the_specialist_and_gets_its_exact_answer(router):
    # The sample is painted from PBC cells: like the specialist's training cells.
    from napari_wbc.inference import load_any
    from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear
    from napari_wbc.progress import run
    from napari_wbc.synthetic import make_sample_smear

    smear = make_sample_smear()
    specialist = load_any(builtin_model_path(SPECIALIST))
    config = ClassifyConfig(pixel_size_um=0.1, tta="none")
    routed = run(iter_classify_smear(smear, router, config))
    assert routed.attrs["model"] == SPECIALIST
    assert "specialist" in routed.attrs["route"]
    alone = run(iter_classify_smear(smear, specialist, config))
    assert list(routed["class"]) == list(alone["class"])
    # The choice saw every cell of this small smear with every member: its
    # passes are the classification's first (gated, a cell may then have
    # more members than it would have needed alone).
    assert (routed["passes"] >= len(specialist.members)).all()
    # Every pass taken: exactly the specialist's answer.
    config = ClassifyConfig(pixel_size_um=0.1, tta="none", exhaustive=True)
    routed = run(iter_classify_smear(smear, router, config))
    alone = run(iter_classify_smear(smear, specialist, config))
    np.testing.assert_allclose(routed["confidence"], alone["confidence"], atol=1e-5)
    np.testing.assert_allclose(routed.filter(like="p_"), alone.filter(like="p_"), atol=1e-5)


def test_the_blocks_cut_and_the_stain_fitted_to_choose_are_not_done_again(router, cut_and_run):
    from napari_wbc.panels import restrict_classes
    from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear
    from napari_wbc.progress import run
    from napari_wbc.synthetic import make_sample_smear

    cut, ran = cut_and_run
    config = ClassifyConfig(pixel_size_um=0.1, block=512, tta="none")
    # With every class, and answering with a count panel.
    for model in (router, restrict_classes(router, "5-part")):
        cut.clear()
        ran.clear()
        cells = run(iter_classify_smear(make_sample_smear(), model, config))
        assert cells.attrs["model"] == SPECIALIST
        assert len(cut) > 4 and len(cut) == len(set(cut))  # every block cut once
        assert "stain fit" not in cells.attrs["seconds"]  # the choice's fit is used
        # This small smear's cells were all seen by every member to choose
        # (each once, in the choice's two halves): with one view, nothing
        # is left to run for the classification.
        assert sum(ran) == len(cells) and (cells["passes"] == 3).all()


def test_too_few_cells_to_tell_go_to_the_three_lab_model(router):
    from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear
    from napari_wbc.progress import run
    from napari_wbc.synthetic import make_sample_smear, sample_smear_truth

    truth = sample_smear_truth()
    wbc = truth[truth.kind == "wbc"].head(ROUTE_MIN_CELLS - 1)
    cells = run(
        iter_classify_smear(
            make_sample_smear(),
            router,
            ClassifyConfig(pixel_size_um=0.1, tta="none"),
            points=wbc[["y", "x"]].to_numpy(float),
        )
    )
    assert len(cells) == ROUTE_MIN_CELLS - 1
    assert cells.attrs["model"] == GENERALIST
    assert "too few" in cells.attrs["route"]
    # The default adapts what goes to the three-lab model only with enough
    # cells, and says nothing when there are too few (it was not asked to).
    assert not cells.attrs.get("adapted_cells")
    assert "adapt" not in str(cells.attrs.get("warning") or "")


@pytest.mark.realdata
def test_crop_sets_are_routed_by_their_lab(data_dir, router):
    # PBC validation crops (never trained on by either model) go to the
    # specialist; LISC's and BCCD's cells, another stain and camera, do not.
    from napari_wbc.datasets import balanced_subset, load_lab_table, stratified_split
    from napari_wbc.prediction import evaluate

    table = load_lab_table("pbc", data_dir, classes=router.classes)
    _, validation = stratified_split(table["label"].tolist(), 0.2, seed=0)
    pbc = balanced_subset(table.iloc[validation], per_class=8, seed=1)
    metrics = evaluate(router, pbc)  # the defaults: the chosen model's TTA, gated
    assert metrics["tta"] == "d4"
    assert metrics["route"]["model"] == SPECIALIST
    assert metrics["route"]["specialist_ood_share"] <= 0.05  # measured 0.0
    assert metrics["model"] == f"auto → {SPECIALIST}"
    for lab in ("lisc", "bccd"):
        other = balanced_subset(load_lab_table(lab, data_dir), per_class=8, seed=1)
        m = evaluate(router, other, tta="none")
        assert m["route"]["model"] == GENERALIST, lab
        assert m["route"]["specialist_ood_share"] > ROUTE_MAX_OOD_SHARE + 0.3, lab


@pytest.mark.realdata
def test_the_gate_spends_few_passes_and_answers_as_every_view_does(data_dir, router):
    # Issue #15: by default the two cheapest members look first and more is
    # spent only where they are not sure; every view of every member
    # (exhaustive) gives the same predictions on these PBC and LISC cells.
    from napari_wbc.datasets import balanced_subset, load_lab_table, stratified_split
    from napari_wbc.prediction import evaluate

    table = load_lab_table("pbc", data_dir, classes=router.classes)
    _, validation = stratified_split(table["label"].tolist(), 0.2, seed=0)
    sets = {
        "pbc": balanced_subset(table.iloc[validation], per_class=10, seed=2),
        "lisc": balanced_subset(load_lab_table("lisc", data_dir), per_class=10, seed=2),
    }
    for name, data in sets.items():
        gated = evaluate(router, data)
        full = evaluate(router, data, exhaustive=True)
        chosen = router.specialist if full["route"]["model"] == SPECIALIST else router.generalist
        # every view (8) of every member of the chosen model
        assert full["passes_per_crop"] == 8 * len(chosen.members), name
        # measured 3.4 (PBC, three members) and 1.06 (LISC, one member)
        assert gated["passes_per_crop"] < min(8, full["passes_per_crop"] / 2), name
        assert abs(gated["macro_f1"] - full["macro_f1"]) <= 0.003, name


def test_router_refuses_models_with_different_classes(router):
    class Other:
        classes = ("a", "b")

    with pytest.raises(ValueError, match="share their classes"):
        ModelRouter(Other(), router.generalist)


def test_classify_command_records_the_model_each_image_went_to(tmp_path, capsys):
    # The default of `napari-wbc classify` is --model auto: the summary says
    # which built-in model classified each image.
    import pandas as pd

    from napari_wbc.cli import main as cli
    from napari_wbc.progress import run
    from napari_wbc.synthetic import make_sample_smear
    from napari_wbc.tiff import iter_write_pyramid_tiff

    run(iter_write_pyramid_tiff(tmp_path / "smear.tif", make_sample_smear(), 0.1))
    out = tmp_path / "out"
    assert (
        cli(["classify", str(tmp_path / "smear.tif"), "-o", str(out), "-q", "--tta", "none"]) == 0
    )
    summary = pd.read_csv(out / "summary.csv")
    assert summary.loc[summary.image == "smear.tif", "model"].item() == SPECIALIST


@pytest.mark.realdata
def test_the_specialists_look_is_not_run_again_and_the_other_model_loads_when_needed(
    data_dir, monkeypatch
):
    # The cells the specialist classified to decide (every member, the crop
    # as it is) are the first views of its D4 run: taken, not run again; the
    # three-lab model is loaded only when a source goes to it.
    from napari_wbc import passes
    from napari_wbc.datasets import balanced_subset, load_lab_table, stratified_split
    from napari_wbc.prediction import evaluate
    from napari_wbc.routing import ROUTE_CELLS

    router = load_router()
    assert router._generalist is None
    table = load_lab_table("pbc", data_dir, classes=router.classes)
    _, validation = stratified_split(table["label"].tolist(), 0.2, seed=0)
    data = balanced_subset(table.iloc[validation], per_class=12, seed=3)
    count = [0]
    real = passes.iter_add_views

    def counted(ensemble, prepared, crops, transforms, members, first, sums, rows, *rest):
        count[0] += len(rows) * len(transforms) * len(members)
        return (
            yield from real(
                ensemble, prepared, crops, transforms, members, first, sums, rows, *rest
            )
        )

    monkeypatch.setattr(passes, "iter_add_views", counted)
    full = evaluate(router, data, exhaustive=True)
    assert full["route"]["model"] == SPECIALIST
    assert router._generalist is None  # never needed
    members = len(router.specialist.members)
    # Routing ran ROUTE_CELLS crops once per member; classification every
    # view of every member of every crop except those.
    assert count[0] == ROUTE_CELLS * members + len(data) * members * 8 - ROUTE_CELLS * members
    assert full["passes_per_crop"] == 24
    lisc = balanced_subset(load_lab_table("lisc", data_dir), per_class=4, seed=1)
    route = evaluate(router, lisc, tta="none")["route"]
    assert route["model"] == GENERALIST
    assert router._generalist is not None
    # Half the sample beyond the threshold already decides: the rest is not run.
    assert route["cells"] == (len(lisc) + 1) // 2
    assert route["specialist_ood_share"] > ROUTE_MAX_OOD_SHARE


def test_a_count_panel_keeps_the_choice_and_answers_with_its_classes(router):
    from napari_wbc.inference import load_any
    from napari_wbc.panels import FIVE_PART, restrict_classes
    from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear
    from napari_wbc.progress import run
    from napari_wbc.routing import load_model
    from napari_wbc.synthetic import make_sample_smear

    five = load_model("auto", classes="5-part")
    assert isinstance(five, ModelRouter) and five.classes == FIVE_PART
    assert five.specialist.classes == router.classes  # the choice uses the whole model
    smear = make_sample_smear()
    config = ClassifyConfig(pixel_size_um=0.1, tta="none")
    routed = run(iter_classify_smear(smear, five, config))
    assert routed.attrs["model"] == SPECIALIST
    assert routed.attrs["classes"] == list(FIVE_PART)
    assert not [c for c in routed.columns if c.startswith("p_") and c[2:] not in FIVE_PART]
    assert set(routed["class"]) <= set(FIVE_PART)
    specialist = restrict_classes(load_any(builtin_model_path(SPECIALIST)), "5-part")
    alone = run(iter_classify_smear(smear, specialist, config))
    assert list(routed["class"]) == list(alone["class"])
    # Every pass taken (the choice's, carried over to the panel, among them):
    # exactly the restricted specialist's answer.
    config = ClassifyConfig(pixel_size_um=0.1, tta="none", exhaustive=True)
    routed = run(iter_classify_smear(smear, five, config))
    alone = run(iter_classify_smear(smear, specialist, config))
    np.testing.assert_allclose(routed["confidence"], alone["confidence"], atol=1e-5)
    # One restricted copy per model, however many sources choose it.
    assert five.answering(SPECIALIST) is five.answering(SPECIALIST)


@pytest.mark.realdata
def test_by_default_only_sets_given_to_the_three_lab_model_are_adapted(data_dir, router):
    # Leave one lab out, adaptation raised both held-out labs; on PBC it
    # costs, and PBC-like sets go to the specialist, unadapted.
    from napari_wbc.adapt import PROTOTYPE_MIN_CELLS
    from napari_wbc.datasets import balanced_subset, load_lab_table, stratified_split
    from napari_wbc.prediction import evaluate, iter_predict_crop_files
    from napari_wbc.progress import run

    lisc = balanced_subset(load_lab_table("lisc", data_dir), per_class=27, seed=1)
    assert len(lisc) >= PROTOTYPE_MIN_CELLS
    default = evaluate(router, lisc, tta="none")
    assert default["route"]["model"] == GENERALIST
    assert default["adapted"] == len(lisc)
    plain = evaluate(router, lisc, tta="none", adapt=False)
    assert plain["adapted"] is None
    # The adapted model answered: its probabilities differ from the plain model's.
    paths = lisc["path"].tolist()
    adapted = run(iter_predict_crop_files(router, paths, tta="none"))
    as_is = run(iter_predict_crop_files(router, paths, tta="none", adapt=False))
    assert adapted["adapted"] is not None and "adapted" not in as_is
    assert np.abs(np.asarray(adapted["probs"]) - np.asarray(as_is["probs"])).max() > 0.01
    # Too few crops: classified as they are.
    few = evaluate(router, lisc.head(PROTOTYPE_MIN_CELLS - 1), tta="none")
    assert few["route"]["model"] == GENERALIST and few["adapted"] is None
    table = load_lab_table("pbc", data_dir, classes=router.classes)
    _, validation = stratified_split(table["label"].tolist(), 0.2, seed=0)
    pbc = balanced_subset(table.iloc[validation], per_class=17, seed=1)
    assert len(pbc) >= PROTOTYPE_MIN_CELLS
    m = evaluate(router, pbc, tta="none")
    assert m["route"]["model"] == SPECIALIST and m["adapted"] is None


def test_the_bccd_sample_goes_to_the_three_lab_model_and_is_classified_right(router):
    # Six real BCCD cells: once only one of them lay beyond the specialist's threshold
    # and it classified them (1 of 6 right). Six cells are too few to tell a lab by.
    from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear
    from napari_wbc.progress import run
    from napari_wbc.samples import load_sample

    sample = load_sample("bccd")
    truth = sample.truth
    cells = run(
        iter_classify_smear(
            sample.image,
            router,
            ClassifyConfig(tta="none"),
            points=truth[["y", "x"]].to_numpy(float),
        )
    )
    assert cells.attrs["model"] == GENERALIST
    assert "too few" in cells.attrs["route"]
    # each cell against the truth at its place (the table is in the tiles' order)
    d = np.hypot(
        cells["y"].to_numpy()[:, None] - truth["y"].to_numpy()[None],
        cells["x"].to_numpy()[:, None] - truth["x"].to_numpy()[None],
    )
    expected = truth["class"].to_numpy()[d.argmin(axis=1)]
    assert len(cells) == 6 and len(set(d.argmin(axis=1))) == 6
    right = int((cells["class"].to_numpy() == expected).sum())
    assert right >= 5, list(zip(cells["class"], expected, strict=True))


def test_the_bccd_sample_is_not_called_unlike_the_training_labs():
    # wbc-lite trained on BCCD: its out-of-distribution threshold is set on
    # cells of all four labs, so BCCD's own cells do not raise the image
    # warning (with PBC's validation cells alone, 3 of the 6 did).
    from napari_wbc.api import classify_smear
    from napari_wbc.samples import load_sample

    cells = classify_smear(load_sample("bccd").image)
    assert cells.attrs["model"] == GENERALIST
    assert "warning" not in cells.attrs, cells.attrs.get("warning")
    assert int(cells["out_of_distribution"].sum()) <= 1


@pytest.mark.realdata
@pytest.mark.slow
def test_a_mosaic_of_bccd_fields_goes_to_the_three_lab_model(data_dir, router):
    from PIL import Image

    from napari_wbc.pipeline import ClassifyConfig, iter_classify_smear
    from napari_wbc.progress import run

    files = sorted((data_dir / "bccd" / "images").glob("*.jpg"))[:20]
    tiles = [np.asarray(Image.open(f).convert("RGB"))[:480, :640] for f in files]
    mosaic = np.concatenate([np.concatenate(tiles[r * 5 : r * 5 + 5], 1) for r in range(4)])
    cells = run(iter_classify_smear(mosaic, router, ClassifyConfig(tta="none")))
    assert len(cells) >= 15
    assert cells.attrs["model"] == GENERALIST
    assert "typical distance" in cells.attrs["route"]
