"""The typed recipe (quantface.recipe): the committed recipes load bit for bit, the rotation signs are
stored (no random stream is needed to read a recipe), version-1 recipes still read, and every
malformed field is one RecipeError naming the file, the layer and the field."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from quantface.calibration import CalibConfig, calibrate
from quantface.calibration.recipe import apply_recipe
from quantface.hadamard import random_signs
from quantface.models import load_model
from quantface.recipe import (JSON_NAME, TENSORS_NAME, VERSION, RecipeError, read_recipe, upgrade_recipe,
                              write_recipe)

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = sorted(p for p in (ROOT / "recipes").iterdir() if (p / JSON_NAME).is_file())


def _downgrade(src: Path, dst: Path) -> Path:
    """A version-1 copy of a version-2 recipe: signs dropped from the tensors and the JSON."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / JSON_NAME).read_text())
    tensors = load_file(str(dst / TENSORS_NAME))
    for e in meta["layers"].values():
        if e["hadamard"]:
            del tensors[e["hadamard"].pop("signs")]
    save_file(tensors, str(dst / TENSORS_NAME))
    import hashlib

    meta["version"] = 1
    meta["tensors_sha256"] = hashlib.sha256((dst / TENSORS_NAME).read_bytes()).hexdigest()
    (dst / JSON_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    return dst


@pytest.fixture(scope="module")
def reference():
    return load_model("reference")


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> tuple[Path, Path]:
    """A QuantFace W4A4 recipe (rotations, smoothing, low-rank) of a tiny model, and the weights stem."""
    from tests.conftest import TINY, smooth_image
    from quantface.data import write_image
    from quantface.models.reference import ReferenceRestorer
    from quantface.models.store import save_weights

    root = tmp_path_factory.mktemp("recipe")
    torch.manual_seed(0)
    stem = root / "tiny"
    save_weights(ReferenceRestorer(TINY).eval(), stem)
    rng = np.random.default_rng(0)
    for i in range(4):
        write_image(root / "faces" / f"{i}.png", smooth_image(rng, 32))
    cfg = CalibConfig(method="quantface", bits="W4A4", data=str(root / "faces"), out=str(root / "r"),
                      weights=str(stem), size=32, stat_images=4, rank=2, batch_size=2, steps=1)
    return calibrate(cfg).recipe, stem


@pytest.mark.parametrize("folder", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_recipes_are_version_2_with_the_signs_their_seeds_drew(folder):
    recipe = read_recipe(folder)
    assert recipe.version == VERSION
    rotated = [(n, l.hadamard) for n, l in recipe.layers.items() if l.hadamard is not None]
    from quantface.calibration import parse_bits
    from quantface.calibration.methods import get_method

    from quantface.calibration.targets import get_target

    # rotating methods (quantface, hadamard, quantvsr) rotate, except QuantFace where weights and
    # activations both have >= 8 bits, and none for --target cpu (no online node)
    spec = get_method(recipe.method)
    assert bool(rotated) == (spec.hadamard and spec.balances(*parse_bits(recipe.bits))
                             and not get_target(recipe.calibration.get("target")).lean)
    for name, h in rotated:  # upgraded from version 1 exactly: the signs are the seed's draw
        assert torch.equal(h.signs, torch.from_numpy(random_signs(h.order, h.seed))), name


def test_a_recipe_loads_without_numpy_random_streams(monkeypatch, reference, tmp_path):
    """Version 2 needs no random stream: with NumPy's generator replaced, the committed recipe still
    rebuilds the same model; a version-1 copy (signs from the seed) is exactly what breaks."""
    folder = ROOT / "recipes" / "quantface_w4a4"
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want = apply_recipe(reference, folder)(x)
    v1 = _downgrade(folder, tmp_path / "v1")

    class Other:  # another stream: every draw differs
        def __init__(self, seed):
            self.g = np.random.Generator(np.random.PCG64(int(seed) + 12345))

        def choice(self, *a, **k):
            return self.g.choice(*a, **k)

    monkeypatch.setattr(np.random, "default_rng", Other)
    with torch.no_grad():
        assert torch.equal(apply_recipe(reference, folder)(x), want)
        assert not torch.equal(apply_recipe(reference, v1)(x), want)
    monkeypatch.undo()
    with torch.no_grad():  # and with NumPy's own stream the version-1 reader gives the same model
        assert torch.equal(apply_recipe(reference, v1)(x), want)


def test_upgrade_keeps_every_tensor_field_and_file(tiny_recipe, tmp_path):
    src, _ = tiny_recipe
    v1 = _downgrade(src, tmp_path / "v1")
    (v1 / "notes.txt").write_text("kept")
    assert upgrade_recipe(v1) is True and upgrade_recipe(v1) is False
    a, b = read_recipe(src), read_recipe(v1)
    assert (v1 / "notes.txt").read_text() == "kept"
    assert json.loads((v1 / JSON_NAME).read_text())["layers"] == json.loads((src / JSON_NAME).read_text())["layers"]
    ta, tb = load_file(str(src / TENSORS_NAME)), load_file(str(v1 / TENSORS_NAME))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a.sha256 == b.sha256  # the same safetensors bytes
    assert (a.method, a.bits, a.calibration, a.stats, a.sections) == (b.method, b.bits, b.calibration, b.stats, b.sections)


def test_write_read_round_trip_is_exact(tiny_recipe, tmp_path):
    src, _ = tiny_recipe
    a = read_recipe(src)
    write_recipe(a, tmp_path / "copy")
    b = read_recipe(tmp_path / "copy")
    assert a.layers.keys() == b.layers.keys()
    for name in a.layers:
        la, lb = a.layers[name], b.layers[name]
        for field in ("kind", "weight_shape", "weight_bits", "act_bits", "act_scale", "act_zero_point", "output_range"):
            assert getattr(la, field) == getattr(lb, field), (name, field)
        for field in ("weight_codes", "weight_scale", "smooth", "lowrank_down", "lowrank_up"):
            ta, tb = getattr(la, field), getattr(lb, field)
            assert (ta is None and tb is None) or (ta.dtype == tb.dtype and torch.equal(ta, tb)), (name, field)
        assert (la.hadamard is None) == (lb.hadamard is None)
        if la.hadamard is not None:
            assert torch.equal(la.hadamard.signs, lb.hadamard.signs) and la.hadamard.seed == lb.hadamard.seed


def test_rewriting_a_recipe_keeps_the_old_one_until_the_new_one_is_in_place(tiny_recipe, tmp_path, monkeypatch):
    src, _ = tiny_recipe
    out = tmp_path / "r"
    shutil.copytree(src, out)
    before = (out / JSON_NAME).read_bytes()
    real = os.replace
    calls = []

    def crash_on_second(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # after the old folder moved aside, before the new one moves in
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        write_recipe(read_recipe(src), out)
    monkeypatch.undo()
    kept = [p for p in tmp_path.rglob(JSON_NAME) if p.read_bytes() == before]
    assert kept, "the old recipe must survive a crash between the two renames"


def _mutate(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / JSON_NAME).read_text())
    edit(meta)
    (dst / JSON_NAME).write_text(json.dumps(meta))
    return dst


def _first(meta):
    return next(iter(meta["layers"].values()))


def _rotated(meta):
    return next(e for e in meta["layers"].values() if e["hadamard"])


SCHEMA_CASES = {
    "no layers": (lambda m: m.pop("layers"), "has no field 'layers'"),
    "layers as a list": (lambda m: m.update(layers=list(m["layers"])), "field 'layers' of the recipe has the wrong type"),
    "a layer as a string": (lambda m: m["layers"].update({next(iter(m["layers"])): "conv"}), "is not a JSON object"),
    "no weight_shape": (lambda m: _first(m).pop("weight_shape"), "has no field 'weight_shape'"),
    "bad weight_shape": (lambda m: _first(m).update(weight_shape=[0, 3]), "invalid weight_shape"),
    "unknown kind": (lambda m: _first(m).update(kind="attention"), "has kind 'attention'"),
    "bits out of range": (lambda m: _first(m).update(weight_bits=12), "outside the supported range"),
    "bits as text": (lambda m: _first(m).update(act_bits="4"), "field 'act_bits'"),
    "per-group weights": (lambda m: _first(m).update(weight_granularity="per_group"), "reads only 'per_channel'"),
    "no act scale": (lambda m: _first(m).pop("act_scale"), "has no field 'act_scale'"),
    "zero point out of grid": (lambda m: _first(m).update(act_zero_point=99), "invalid activation scale or zero point"),
    "missing tensor": (lambda m: _first(m).update(weight_scale="nope"), "lacks tensor nope"),
    "codes under another name": (lambda m: _first(m).update(weight_codes=_first(m)["weight_scale"]), "has dtype"),
    "rotation order": (lambda m: _rotated(m)["hadamard"].update(order=3), "rotation of order 3"),
    "rotation without signs": (lambda m: _rotated(m)["hadamard"].pop("signs"), "has no field 'signs'"),
    "rank without factors": (lambda m: next(e for e in m["layers"].values() if e["lowrank_rank"]).pop("lowrank"),
                             "but no lowrank entry"),
    "rank mismatch": (lambda m: next(e for e in m["layers"].values() if e["lowrank_rank"]).update(lowrank_rank=1),
                      "do not have rank 1"),
    "bad output range": (lambda m: _first(m).update(output_range=[1.0]), "invalid output_range"),
    "no model": (lambda m: m.pop("model"), "has no field 'model'"),
    "future version": (lambda m: m.update(version=9), "has version 9"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
def test_malformed_recipes_are_one_recipe_error_naming_the_field(tiny_recipe, tmp_path, case):
    src, _ = tiny_recipe
    edit, message = SCHEMA_CASES[case]
    bad = _mutate(src, tmp_path / "bad", edit)
    with pytest.raises(RecipeError, match=message) as info:
        read_recipe(bad)
    assert "\n" not in str(info.value)


def test_a_recipe_path_that_is_a_file_or_missing(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        read_recipe(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RecipeError, match="is not a folder"):
        read_recipe(tmp_path / "file")
