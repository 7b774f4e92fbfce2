"""Self-describing model files and ensemble files: round trips and refusals."""

import dataclasses
import datetime
import json
import os
import shutil

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

import napari_wbc
from napari_wbc.errors import ModelFileError
from napari_wbc.inference import Ensemble, load_any, load_ensemble
from napari_wbc.models import files
from napari_wbc.models.build import build_model
from napari_wbc.models.files import (
    ModelConfig,
    clear_model_cache,
    load_network,
    read_ensemble,
    read_model_config,
    save_ensemble,
    save_model,
)
from napari_wbc.models.registry import get_preset

TINY = {s.arch: s for s in get_preset("tiny")}


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_model_cache()
    yield
    clear_model_cache()


def make_model(arch="test_resnet", seed=0, **spec_changes):
    """A tiny model with non-default weights and batch-norm statistics, and its config."""
    spec = dataclasses.replace(TINY[arch], **spec_changes)
    torch.manual_seed(seed)
    model, _ = build_model(spec)
    model.train()
    with torch.no_grad():  # move BN running stats away from their init values
        model(torch.rand(4, 3, spec.input_size, spec.input_size))
    model.eval()
    config = ModelConfig(
        spec=spec,
        name=f"tiny {arch}",
        stain={"method": "macenko", "he": [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]]},
        training={"epochs": 3, "lr": 1e-3},
        history=[{"epoch": 1, "loss": 1.5}, {"epoch": 2, "loss": 0.9}],
        metrics={"macro_f1": np.float32(0.75), "per_class": np.array([0.5, 1.0])},
        notes="made in a test",
    )
    return model, config


def sample_input(spec, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, 3, spec.input_size, spec.input_size, generator=g)


# --- round trips ----------------------------------------------------------------


@pytest.mark.parametrize("arch", list(TINY))
def test_float32_round_trip_is_bit_exact(tmp_path, arch):
    model, config = make_model(arch)
    path = save_model(tmp_path / "m.safetensors", model, config)
    loaded, _ = load_network(path, cache=False)
    assert loaded is not model
    original, again = model.state_dict(), loaded.state_dict()
    assert original.keys() == again.keys()
    for key in original:
        assert original[key].dtype == again[key].dtype, key
        assert torch.equal(original[key], again[key]), key
    x = sample_input(config.spec)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not loaded.training


def test_config_survives_the_round_trip(tmp_path):
    model, config = make_model()
    path = save_model(tmp_path / "m.safetensors", model, config)
    _, loaded = load_network(path)
    for cfg in (loaded, read_model_config(path)):
        assert cfg.spec == config.spec
        assert cfg.name == "tiny test_resnet"
        assert cfg.stain == config.stain
        assert cfg.training == config.training
        assert cfg.history == config.history
        assert cfg.metrics["macro_f1"] == pytest.approx(0.75)
        assert cfg.metrics["per_class"] == [0.5, 1.0]
        assert cfg.notes == "made in a test"
        assert cfg.format_version == files.FORMAT_VERSION
        assert cfg.package_version == napari_wbc.__version__
        assert cfg.timm_version == timm.__version__
        assert cfg.torch_version == torch.__version__
        assert datetime.datetime.fromisoformat(cfg.created).tzinfo is not None
    # save_model fills versions on a copy, never on the caller's config
    assert config.package_version == "" and config.created == ""


def test_name_defaults_to_the_file_stem(tmp_path):
    model, config = make_model()
    config.name = ""
    path = save_model(tmp_path / "my-model.safetensors", model, config)
    assert read_model_config(path).name == "my-model"


def test_half_storage_is_smaller_and_close(tmp_path):
    model, config = make_model("test_efficientnet")
    full = save_model(tmp_path / "full.safetensors", model, config)
    half = save_model(tmp_path / "half.safetensors", model, config, half=True)
    assert half.stat().st_size < 0.65 * full.stat().st_size
    loaded, _ = load_network(half, cache=False)
    for key, value in model.state_dict().items():
        restored = loaded.state_dict()[key]
        assert restored.dtype == value.dtype, key  # float32 again after loading
        if value.is_floating_point():
            torch.testing.assert_close(restored, value, rtol=2e-3, atol=1e-4)
        else:
            assert torch.equal(restored, value)
    x = sample_input(config.spec)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-2, atol=1e-2)


def test_read_model_config_does_not_read_the_weights(tmp_path, monkeypatch):
    model, config = make_model()
    path = save_model(tmp_path / "m.safetensors", model, config)

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    assert read_model_config(path).spec == config.spec


def test_model_config_validation_names_the_problem():
    _, config = make_model()
    config.history = [1, 2]
    with pytest.raises(ModelFileError, match="history"):
        config.validate()
    _, config = make_model()
    config.metrics = {"when": object()}
    with pytest.raises(ModelFileError, match="JSON"):
        config.validate()
    _, config = make_model()
    config.spec.classes = ("a", "a")
    with pytest.raises(ModelFileError, match="unique"):
        config.validate()


def test_config_json_round_trip():
    _, config = make_model()
    again = ModelConfig.from_json(config.to_json())
    assert again.spec == config.spec and again.history == config.history


# --- the cache ------------------------------------------------------------------


def test_repeated_loads_come_from_the_cache_until_the_file_changes(tmp_path):
    model, config = make_model()
    path = save_model(tmp_path / "m.safetensors", model, config)
    first, cfg1 = load_network(path)
    second, cfg2 = load_network(str(path))
    assert first is second
    cfg1.notes = "changed by the caller"
    assert cfg2.notes == "made in a test" and load_network(path)[1].notes == "made in a test"
    assert load_network(path, cache=False)[0] is not first

    other, _ = make_model(seed=5)
    save_model(path, other, config)
    third, _ = load_network(path)
    assert third is not first
    key = "conv1.0.weight"
    assert torch.equal(third.state_dict()[key], other.state_dict()[key])

    clear_model_cache()
    assert load_network(path)[0] is not third


def test_cache_is_least_recently_used(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "MODEL_CACHE_SIZE", 2)
    a, b, c = (
        save_model(tmp_path / f"{n}.safetensors", *make_model(seed=i)) for i, n in enumerate("abc")
    )
    model_a, model_b = load_network(a)[0], load_network(b)[0]
    assert load_network(a)[0] is model_a  # a is now the most recently used
    load_network(c)  # evicts b, the least recently used
    assert load_network(a)[0] is model_a
    assert load_network(b)[0] is not model_b


# --- refusals -------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model, config = make_model()
    return save_model(tmp_path / "m.safetensors", model, config)


def assert_refused(path, *fragments):
    for reader in (lambda p: load_network(p, cache=False), read_model_config):
        with pytest.raises(ModelFileError) as err:
            reader(path)
        msg = str(err.value)
        for fragment in fragments:
            assert fragment in msg, msg


def test_missing_file_is_refused(tmp_path):
    assert_refused(tmp_path / "nothing.safetensors", "not found")


def test_folder_is_refused(tmp_path):
    assert_refused(tmp_path, "folder")


def test_truncated_file_is_refused(saved, tmp_path):
    data = saved.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    assert_refused(cut, "truncated")
    cut.write_bytes(data[:50])  # inside the header
    assert_refused(cut, "truncated")
    cut.write_bytes(data[:5])
    assert_refused(cut, "truncated")


def test_empty_and_junk_files_are_refused(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert_refused(empty, "empty")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert_refused(junk, "not a napari-wbc model")
    text = tmp_path / "text.safetensors"
    text.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert_refused(text, "corrupt")


def test_corrupt_weight_bytes_are_refused(saved):
    data = bytearray(saved.read_bytes())
    for offset in (len(data) - 10, len(data) // 2 + 101):
        data[offset] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupt"):
        load_network(saved, cache=False)


def test_corrupt_config_bytes_are_refused(saved):
    data = saved.read_bytes()
    # A class name changed in place: still valid JSON, so only the checksum sees it.
    assert data.count(b"monocyte") == 1
    saved.write_bytes(data.replace(b"monocyte", b"monocytf"))
    assert read_model_config(saved).classes[5] == "monocytf"
    with pytest.raises(ModelFileError, match="checksum"):
        load_network(saved, cache=False)
    # Broken JSON in the config (the header stays valid) is refused even by the
    # cheap reader. The config is an escaped string inside the header.
    key = b'classes\\": ['
    assert data.count(key) == 1
    saved.write_bytes(data.replace(key, key[:-1] + b"{"))
    assert_refused(saved, "JSON")


def test_safetensors_without_our_metadata_is_refused(tmp_path):
    model, _ = make_model()
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path), metadata={"format": "pt"})
    assert_refused(path, "not a napari-wbc model", "save_model")


def _rewrite_config(path, change):
    """Rewrite the config inside a model file (checksum kept as it was)."""
    with safetensors.safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    data = json.loads(meta[files.CONFIG_KEY])
    change(data)
    meta[files.CONFIG_KEY] = json.dumps(data)
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


def test_newer_format_version_is_refused(saved):
    _rewrite_config(saved, lambda d: d.update(format_version=files.FORMAT_VERSION + 1))
    assert_refused(saved, f"newer napari-wbc (format {files.FORMAT_VERSION + 1})", "upgrade")


def test_invalid_config_in_file_is_refused(saved):
    _rewrite_config(saved, lambda d: d["spec"].update(classes=["a", "a"]))
    assert_refused(saved, "unique")
    _rewrite_config(saved, lambda d: d.pop("spec"))
    assert_refused(saved, "spec")


def test_weights_that_do_not_fit_the_architecture_are_refused(tmp_path, monkeypatch):
    model, _ = make_model("test_efficientnet")
    _, config = make_model("test_resnet")
    monkeypatch.setattr(files, "_check_model_matches", lambda *a: None)
    path = save_model(tmp_path / "m.safetensors", model, config)
    with pytest.raises(ModelFileError, match="do not fit"):
        load_network(path, cache=False)


def test_save_refuses_a_model_its_spec_cannot_rebuild(tmp_path):
    model, _ = make_model("test_efficientnet")
    _, config = make_model("test_resnet")
    with pytest.raises(ModelFileError, match="test_efficientnet"):
        save_model(tmp_path / "m.safetensors", model, config)
    model, config = make_model("test_resnet")
    config.spec.classes = ("a", "b")
    with pytest.raises(ModelFileError, match="8 outputs"):
        save_model(tmp_path / "m.safetensors", model, config)
    assert list(tmp_path.iterdir()) == []


# --- atomic saving --------------------------------------------------------------


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch, exc):
    old_model, config = make_model(seed=0)
    path = save_model(tmp_path / "m.safetensors", old_model, config)
    real_save = safetensors.torch.save_file

    def crash(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:  # half-written: cut it and die
            fh.truncate(1000)
        raise exc

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    new_model, _ = make_model(seed=3)
    with pytest.raises(type(exc)):
        save_model(path, new_model, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    loaded, _ = load_network(path, cache=False)
    key = "conv1.0.weight"
    assert torch.equal(loaded.state_dict()[key], old_model.state_dict()[key])
    assert not torch.equal(loaded.state_dict()[key], new_model.state_dict()[key])


def test_saved_file_is_readable_by_others(tmp_path):
    path = save_model(tmp_path / "m.safetensors", *make_model())
    if os.name == "posix":
        assert path.stat().st_mode & 0o044 == 0o044


# --- ensembles ------------------------------------------------------------------


@pytest.fixture
def members(tmp_path):
    folder = tmp_path / "project" / "models"
    folder.mkdir(parents=True)
    paths = []
    for i, arch in enumerate(TINY):
        model, config = make_model(arch, seed=i)
        paths.append(save_model(folder / f"{arch}.safetensors", model, config))
    return paths


def test_ensemble_round_trip_with_relative_paths(members, tmp_path):
    ens_path = tmp_path / "project" / "ensemble.json"
    save_ensemble(
        ens_path, members, weights=[1, 2, 3], tta="flips", name="trio",
        metrics={"macro_f1": 0.8}, notes="n",
    )  # fmt: skip
    data = json.loads(ens_path.read_text())
    assert data["format"] == "napari-wbc-ensemble" and data["format_version"] == 1
    assert [m["path"] for m in data["members"]] == [f"models/{p.name}" for p in members]

    # Moving the whole folder keeps the ensemble usable.
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "project", moved)
    ens = load_ensemble(moved / "ensemble.json")
    assert isinstance(ens, Ensemble)
    assert [m.weight for m in ens.members] == [1.0, 2.0, 3.0]
    assert [m.config.spec.arch for m in ens.members] == list(TINY)
    assert ens.tta == "flips" and ens.name == "trio" and ens.notes == "n"
    assert ens.metrics == {"macro_f1": 0.8}
    assert ens.classes == get_preset("tiny")[0].classes
    cfg = read_ensemble(moved / "ensemble.json")
    assert [m.path.resolve() for m in cfg.members] == [
        (moved / "models" / p.name).resolve() for p in members
    ]


def test_ensemble_accepts_absolute_member_paths(members, tmp_path):
    ens_path = tmp_path / "ens.json"
    data = {
        "format": "napari-wbc-ensemble",
        "format_version": 1,
        "members": [{"path": str(p.resolve())} for p in members],
    }
    ens_path.write_text(json.dumps(data))
    ens = load_ensemble(ens_path)
    assert len(ens.members) == 3 and ens.tta == "d4"
    assert all(m.weight == 1.0 for m in ens.members)


def test_ensemble_members_must_share_classes(members, tmp_path):
    spec = TINY["test_resnet"]
    model, config = make_model("test_resnet", classes=tuple(reversed(spec.classes)))
    reordered = save_model(tmp_path / "reordered.safetensors", model, config)
    with pytest.raises(ModelFileError, match="different order"):
        save_ensemble(tmp_path / "e.json", [members[0], reordered])

    model, config = make_model("test_resnet", classes=(*spec.classes[:-1], "smudge"))
    other = save_model(tmp_path / "other.safetensors", model, config)
    with pytest.raises(ModelFileError, match="smudge"):
        save_ensemble(tmp_path / "e.json", [members[0], other])

    # A hand-written ensemble file is checked on load as well.
    (tmp_path / "hand.json").write_text(
        json.dumps(
            {
                "format": "napari-wbc-ensemble",
                "format_version": 1,
                "members": [{"path": str(members[0])}, {"path": "other.safetensors"}],
            }
        )
    )
    with pytest.raises(ModelFileError, match="smudge"):
        load_ensemble(tmp_path / "hand.json")
    assert not (tmp_path / "e.json").exists()


def test_ensemble_members_must_share_the_field_of_view(members, tmp_path):
    model, config = make_model("test_resnet", fov_px=200)
    other = save_model(tmp_path / "fov.safetensors", model, config)
    with pytest.raises(ModelFileError, match="field"):
        save_ensemble(tmp_path / "e.json", [members[0], other])


def _write_ensemble(path, **changes):
    data = {
        "format": "napari-wbc-ensemble",
        "format_version": 1,
        "members": [{"path": "a.safetensors", "weight": 1.0}],
        "tta": "d4",
    }
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"format": "something-else"}, "not a napari-wbc ensemble"),
        ({"format_version": 99}, "newer napari-wbc"),
        ({"members": []}, "non-empty"),
        ({"members": [{"weight": 1}]}, "path"),
        ({"members": [{"path": "a.safetensors", "weight": -1}]}, "positive"),
        ({"tta": "spin"}, "spin"),
        ({"fov_scale": 0.1}, "fov_scale must be a number from 0.5 to 2.0"),
        ({"fov_scale": "tight"}, "fov_scale"),
    ],
)
def test_invalid_ensemble_files_are_refused(tmp_path, changes, fragment):
    path = _write_ensemble(tmp_path / "e.json", **changes)
    with pytest.raises(ModelFileError, match=fragment):
        read_ensemble(path)


def test_ensemble_with_a_missing_member_names_it(tmp_path):
    path = _write_ensemble(tmp_path / "e.json")
    with pytest.raises(ModelFileError, match=r"a\.safetensors"):
        load_ensemble(path)


def test_ensemble_file_that_is_not_json_is_refused(tmp_path):
    path = tmp_path / "e.json"
    path.write_text("{not json")
    with pytest.raises(ModelFileError, match="JSON"):
        read_ensemble(path)
    with pytest.raises(ModelFileError, match="not found"):
        read_ensemble(tmp_path / "missing.json")


def test_save_ensemble_checks_its_arguments(members, tmp_path):
    with pytest.raises(ModelFileError, match="weights"):
        save_ensemble(tmp_path / "e.json", members, weights=[1, 2])
    with pytest.raises(ModelFileError, match="positive"):
        save_ensemble(tmp_path / "e.json", members, weights=[1, 0, 1])
    with pytest.raises(ModelFileError, match="spin"):
        save_ensemble(tmp_path / "e.json", members, tta="spin")
    with pytest.raises(ModelFileError, match="at least one"):
        save_ensemble(tmp_path / "e.json", [])
    assert not (tmp_path / "e.json").exists()


def test_load_any_accepts_models_and_ensembles(members, tmp_path):
    single = load_any(members[1])
    assert isinstance(single, Ensemble) and len(single.members) == 1
    assert single.tta == "d4" and single.members[0].config.spec.arch == "test_efficientnet"
    assert load_any(members[1], tta="none").tta == "none"
    ens_path = save_ensemble(tmp_path / "e.json", members, tta="none")
    ens = load_any(ens_path)
    assert len(ens.members) == 3 and ens.tta == "none"
    # Members come from the model cache: loading again builds nothing new.
    assert load_any(ens_path).members[0].model is ens.members[0].model


def test_an_ensembles_field_of_view_travels_with_its_file_and_cuts_its_crops(members, tmp_path):
    plain = save_ensemble(tmp_path / "plain.json", members)
    tight = save_ensemble(tmp_path / "tight.json", members, fov_scale=0.8)
    # A file without one stays readable by releases that predate it.
    assert json.loads(plain.read_text())["format_version"] == 1
    assert "fov_scale" not in json.loads(plain.read_text())
    assert json.loads(tight.read_text())["format_version"] == 2
    a, b = load_ensemble(plain), load_ensemble(tight)
    assert (a.fov_scale, b.fov_scale) == (1.0, 0.8)
    assert b.fov_rbc == pytest.approx(0.8 * a.fov_rbc)
    # Crops are cut at the tighter field: for the same smear scale, 0.8x the side.
    assert b.preprocessor.crop_side(50.0) == round(0.8 * a.fov_rbc * 50.0)
    assert a.preprocessor.crop_side(50.0) == round(a.fov_rbc * 50.0)
    with pytest.raises(ModelFileError, match="fov_scale"):
        save_ensemble(tmp_path / "bad.json", members, fov_scale=3.0)
    assert not (tmp_path / "bad.json").exists()
