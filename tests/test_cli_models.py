"""The train, evaluate and predict subcommands."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from napari_wbc import cli as main_cli
from napari_wbc.cli_models import add_model_commands, member_paths
from napari_wbc.errors import WBCError
from napari_wbc.models import read_ensemble, read_model_config

from .test_training import DISC_CLASSES, write_disc_crops

FAST = [
    "--epochs1",
    "4",
    "--epochs2",
    "2",
    "--batch-size",
    "16",
    "--lr1",
    "3e-3",
    "--lr2",
    "3e-3",
    "--input-size",
    "32",
    "--threads",
    "2",
    "-q",
]


def _wired() -> bool:
    """Whether napari_wbc.cli already offers the model commands."""
    parser = main_cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return "train" in sub.choices


def cli(argv: list[str]) -> int:
    """Run the command line (the real one once it is wired; else the same commands)."""
    if _wired():
        return main_cli.main(argv)
    parser = argparse.ArgumentParser(prog="napari-wbc")
    add_model_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except WBCError as exc:
        print(f"napari-wbc {args.command}: error: {exc}", file=sys.stderr)
        return 2


@pytest.fixture(scope="module")
def disc_dir(tmp_path_factory):
    return write_disc_crops(tmp_path_factory.mktemp("discs"))


@pytest.fixture(scope="module")
def model_path(disc_dir, tmp_path_factory):
    """One tiny member trained through the command line."""
    out = tmp_path_factory.mktemp("model") / "discs.safetensors"
    argv = ["train", str(disc_dir), "--preset", "tiny", "--member", "tiny-resnet", "-o", str(out)]
    assert cli(argv + FAST) == 0
    return out


def test_train_writes_a_model_and_prints_epochs(disc_dir, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    argv = ["train", str(disc_dir), "--preset", "tiny", "--member", "tiny-resnet", "-o", str(out)]
    argv += [*FAST, "--seed", "3", "--no-stain-normalization", "--stages", "stage1"]
    assert cli(argv) == 0
    text = capsys.readouterr().out
    assert "tiny-resnet stage1 epoch 1:" in text and "tiny-resnet stage1 epoch 4:" in text
    assert "stage2 epoch" not in text
    assert "validation n=" in text
    config = read_model_config(out)
    assert config.stain is None
    assert config.training["seed"] == 3
    assert config.training["stages"] == "stage1"
    assert config.classes == tuple(sorted(DISC_CLASSES))


def test_preset_with_several_members_writes_an_ensemble(disc_dir, tmp_path, capsys):
    out = tmp_path / "ens.json"
    fast = FAST.copy()
    fast[fast.index("--epochs1") + 1] = "1"
    fast[fast.index("--epochs2") + 1] = "1"
    assert cli(["train", str(disc_dir), "--preset", "tiny", "-o", str(out), *fast]) == 0
    ensemble = read_ensemble(out)
    names = ["tiny-resnet", "tiny-efficientnet", "tiny-vit"]
    assert [m.path.name for m in ensemble.members] == [f"ens-{n}.safetensors" for n in names]
    assert all(m.path.parent == tmp_path for m in ensemble.members)
    assert ensemble.tta == "d4"
    assert {"n", "accuracy", "macro_f1", "balanced_accuracy"} <= set(ensemble.metrics)
    assert "ensemble" in capsys.readouterr().out


def test_member_paths():
    files, ens = member_paths(Path("out/model"), ["a"])
    assert [f.as_posix() for f in files] == ["out/model.safetensors"] and ens is None
    files, ens = member_paths(Path("out/e.json"), ["a", "b"])
    assert ens.as_posix() == "out/e.json"
    assert [f.name for f in files] == ["e-a.safetensors", "e-b.safetensors"]


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return path


def test_evaluate_json_contract(model_path, disc_dir, capsys):
    rows = [
        (p.relative_to(disc_dir).as_posix(), p.parent.name)
        for p in sorted(disc_dir.rglob("*.png"))
    ]
    data = _write_csv(disc_dir / "all.csv", rows)
    capsys.readouterr()
    assert cli(["evaluate", str(data), "--model", str(model_path), "--json", "--tta", "none"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads(out)  # exactly one JSON object on stdout
    for key in (
        "n",
        "accuracy",
        "macro_f1",
        "balanced_accuracy",
        "per_class",
        "confusion",
        "classes",
    ):
        assert key in metrics, key
    assert metrics["n"] == len(rows)
    assert metrics["classes"] == sorted(DISC_CLASSES)
    assert np.asarray(metrics["confusion"]).sum() == len(rows)
    assert metrics["macro_f1"] >= 0.8  # chance is 0.25


def test_evaluate_json_on_a_subset_of_classes(model_path, disc_dir, tmp_path, capsys):
    # Absolute paths this time, and only two of the model's four classes.
    rows = [(str(p), p.parent.name) for p in sorted(disc_dir.rglob("*.png"))]
    rows = [r for r in rows if r[1] in ("big_purple", "small_pink")]
    data = _write_csv(tmp_path / "part.csv", rows)
    capsys.readouterr()
    assert cli(["evaluate", str(data), "--model", str(model_path), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == len(rows)
    assert metrics["classes"] == ["big_purple", "small_pink"]
    assert set(metrics["per_class"]) == {"big_purple", "small_pink"}
    per_class_f1 = [metrics["per_class"][c]["f1"] for c in metrics["classes"]]
    assert metrics["macro_f1"] == pytest.approx(np.mean(per_class_f1))
    assert metrics["tta"] == "d4"  # a model file's default


def test_evaluate_prints_a_table(model_path, disc_dir, capsys):
    capsys.readouterr()
    assert cli(["evaluate", str(disc_dir), "--model", str(model_path), "--tta", "none", "-q"]) == 0
    out = capsys.readouterr().out
    assert "macro-F1=" in out
    for name in DISC_CLASSES:
        assert name in out


def test_evaluate_without_a_model_says_what_to_do(disc_dir, capsys, monkeypatch):
    import napari_wbc.models.files as files

    missing = {name: "resources/models/missing.json" for name in files.BUILTIN_MODELS}
    monkeypatch.setattr(files, "BUILTIN_MODELS", missing)
    monkeypatch.setattr(files, "DEFAULT_MODEL_RESOURCE", "resources/models/missing.json")
    # The default (--model auto) needs both built-in models.
    assert cli(["evaluate", str(disc_dir), "--json"]) == 2
    err = capsys.readouterr().err
    assert "needs the built-in models" in err and "pass a model file" in err
    assert cli(["evaluate", str(disc_dir), "--json", "--model", "wbc-lite"]) == 2
    assert "does not ship wbc-lite" in capsys.readouterr().err


def test_predict_writes_a_table(model_path, disc_dir, tmp_path, capsys):
    table = tmp_path / "pred.csv"
    files = sorted((disc_dir / "small_pink").glob("*.png"))
    argv = ["predict", str(disc_dir / "small_pink"), str(files[0]), "--model", str(model_path)]
    assert cli([*argv, "-o", str(table), "--tta", "none", "-q"]) == 0
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    classes = sorted(DISC_CLASSES)
    # no trust statistics in this model: the review rule's confidence and disagreement only
    assert list(rows[0]) == ["path", "class", "confidence", "needs_review", "passes", *classes]
    assert len(rows) == len(files) + 1
    for row in rows:
        probs = np.array([float(row[c]) for c in classes])
        assert probs.sum() == pytest.approx(1.0, abs=1e-4)
        assert row["class"] == classes[int(probs.argmax())]
        assert float(row["confidence"]) == pytest.approx(probs.max(), abs=1e-6)
        assert row["needs_review"] == str(float(row["confidence"]) < 0.6)
    hits = np.mean([row["class"] == "small_pink" for row in rows])
    assert hits >= 0.8


def test_predict_gates_the_views_unless_exhaustive(model_path, disc_dir, capsys):
    # One model, D4: a crop takes 1 pass when settled on its first view and
    # 4 (the rotations) when in doubt; --exhaustive gives every crop all 8.
    # At one scale: the synthetic discs' scale is unsure, which would triple them
    # (tests/test_unsure_scale.py).
    folder = str(disc_dir / "big_purple")
    tables = {}
    for flag in ([], ["--exhaustive"], ["--tta", "none"]):
        capsys.readouterr()
        tta = [] if flag[:1] == ["--tta"] else ["--tta", "d4"]
        one = ["--crop-scale", "as-is"]
        assert cli(["predict", folder, "--model", str(model_path), *one, *tta, *flag]) == 0
        tables[" ".join(flag)] = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    gated, full, first = tables[""], tables["--exhaustive"], tables["--tta none"]
    assert {int(r["passes"]) for r in full} == {8}
    assert {int(r["passes"]) for r in gated} <= {1, 4}
    for g, f, one in zip(gated, full, first, strict=True):
        assert g["path"] == f["path"] == one["path"]
        if int(g["passes"]) == 1:  # settled on the crop as it is
            assert g["class"] == one["class"]
            assert float(g["confidence"]) == pytest.approx(float(one["confidence"]), abs=1e-5)


def test_predict_to_stdout(model_path, disc_dir, capsys):
    capsys.readouterr()
    assert cli(["predict", str(disc_dir / "big_pink"), "--model", str(model_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("path,class,confidence,needs_review,passes,")
    assert len(lines) == 1 + len(list((disc_dir / "big_pink").glob("*.png")))


def test_predict_missing_input(model_path, tmp_path, capsys):
    assert cli(["predict", str(tmp_path / "nothing.png"), "--model", str(model_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_predict_adapt_saves_a_new_model_and_keeps_the_base(
    model_path, disc_dir, tmp_path, capsys
):
    import hashlib

    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    out = tmp_path / "adapted.safetensors"
    argv = ["predict", str(disc_dir), "--model", str(model_path), "--tta", "none", "-q"]
    plain = tmp_path / "plain.csv"
    assert cli([*argv, "-o", str(plain)]) == 0
    table = tmp_path / "adapted.csv"
    assert cli([*argv, "--adapt", "--save-adapted", str(out), "-o", str(table)]) == 0
    assert hashlib.sha256(model_path.read_bytes()).hexdigest() == digest
    adapted = read_model_config(out)
    assert adapted.training["adapted"]["cells"] == len(list(disc_dir.rglob("*.png")))
    assert adapted.training["adapted"]["method"] == "prototypes"  # --adapt's default
    assert plain.read_text() != table.read_text()
    bn = tmp_path / "adabn.safetensors"
    assert cli([*argv, "--adapt", "--adapt-method", "adabn", "--save-adapted", str(bn)]) == 0
    assert read_model_config(bn).training["adapted"]["method"] == "adabn"
    capsys.readouterr()
    # Never over an existing file, and only with --adapt.
    assert cli([*argv, "--adapt", "--save-adapted", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli([*argv, "--save-adapted", str(tmp_path / "other.safetensors")]) == 2
    assert "needs --adapt" in capsys.readouterr().err


def test_predict_takes_the_crops_scale(model_path, disc_dir, tmp_path):
    # The same crops said to be at half the model's magnification (red cell
    # half its size) are enlarged 2x before classification: other answers.
    folder = disc_dir / "big_pink"
    as_is, halved = tmp_path / "as-is.csv", tmp_path / "halved.csv"
    argv = ["predict", str(folder), "--model", str(model_path), "--tta", "none", "-q"]
    assert cli([*argv, "--crop-scale", "as-is", "-o", str(as_is)]) == 0
    from napari_wbc.models import read_model_config as config_of

    spec = config_of(model_path).spec
    rbc = spec.rbc_diameter_px * 40 / spec.fov_px / 2  # the 40 px crops seen at half scale
    assert cli([*argv, "--rbc-diameter-px", str(rbc), "-o", str(halved)]) == 0
    assert as_is.read_text() != halved.read_text()
    assert cli([*argv, "--rbc-diameter-px", "-3"]) == 2


def test_predict_with_a_count_panel_answers_with_its_classes_only(model_path, disc_dir, capsys):
    folder = str(disc_dir / "big_pink")
    tables = {}
    for panel in ([], ["--classes", "small_pink,big_pink"]):
        capsys.readouterr()
        argv = ["predict", folder, "--model", str(model_path), "--tta", "none", *panel]
        assert cli(argv) == 0
        tables[bool(panel)] = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    full, two = tables[False], tables[True]
    header = ["path", "class", "confidence", "needs_review", "passes", "big_pink", "small_pink"]
    assert list(two[0]) == header
    for f, t in zip(full, two, strict=True):
        kept = np.array([float(f["big_pink"]), float(f["small_pink"])])
        np.testing.assert_allclose(
            [float(t["big_pink"]), float(t["small_pink"])], kept / kept.sum(), atol=1e-4
        )
        assert t["class"] in ("big_pink", "small_pink")


def test_a_count_panel_is_checked_against_the_model_and_the_data(
    model_path, disc_dir, tmp_path, capsys
):
    folder = str(disc_dir / "big_pink")
    assert cli(["predict", folder, "--model", str(model_path), "--classes", "band,big_pink"]) == 2
    err = capsys.readouterr().err
    assert "no class 'band'" in err and "small_purple" in err
    # Labelled cells of a class the panel leaves out cannot be scored by it.
    rows = [(str(p), p.parent.name) for p in sorted(disc_dir.rglob("*.png"))]
    data = _write_csv(tmp_path / "all.csv", rows)
    argv = ["evaluate", str(data), "--model", str(model_path), "--classes", "big_pink,small_pink"]
    assert cli(argv) == 2
    assert "outside the count panel" in capsys.readouterr().err


def test_adaptation_is_automatic_unless_asked_for_or_refused(capsys):
    from napari_wbc.adapt import AUTO
    from napari_wbc.cli_models import adapt_of

    parser = main_cli.build_parser()
    for flags, expected in (
        ([], AUTO),
        (["--adapt"], "prototypes"),
        (["--adapt", "--adapt-method", "adabn"], "adabn"),
        (["--no-adapt"], False),
    ):
        for command in ("evaluate", "predict", "classify"):
            args = parser.parse_args([command, "x.csv", *flags])
            assert adapt_of(args) == expected, (command, flags)
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "x.csv", "--adapt", "--no-adapt"])
    assert "not allowed with" in capsys.readouterr().err


def test_teach_writes_a_model_that_works_with_model_everywhere(
    model_path, disc_dir, tmp_path, capsys
):
    few = tmp_path / "few.csv"
    rows = [f"{disc_dir / c / f'{i}.png'},{c}" for c in sorted(DISC_CLASSES) for i in range(3)]
    few.write_text("path,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "my-lab.json"
    argv = ["teach", str(few), "-o", str(out), "--model", str(model_path), "-q"]
    assert cli([*argv, "--crop-scale", "as-is"]) == 0
    printed = capsys.readouterr().out
    assert "with 12 cells" in printed and f"--model {out}" in printed
    taught = read_ensemble(out)
    assert taught.metrics["taught"]["cells"] == {c: 3 for c in sorted(DISC_CLASSES)}
    assert cli(["evaluate", str(disc_dir), "--model", str(out), "--json", "-q"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 4 * 40 and metrics["macro_f1"] > 0.5
    # never overwrites; says what to do
    assert cli(argv) == 2
    assert "choose another name" in capsys.readouterr().err


def test_teach_refuses_a_class_the_model_does_not_know(model_path, disc_dir, tmp_path, capsys):
    few = tmp_path / "few.csv"
    few.write_text(f"path,label\n{disc_dir / 'big_pink' / '0.png'},blast\n")
    out = tmp_path / "x.json"
    assert cli(["teach", str(few), "-o", str(out), "--model", str(model_path), "-q"]) == 2
    assert "knows no class 'blast'" in capsys.readouterr().err
    assert not out.exists()
