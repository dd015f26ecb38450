"""Low-rank branch factors on an integer grid (``--branch-bits``): trained through their fake-quant,
rounded at freeze, stored as int8 codes + per-row scales in the recipe, exported as codes cast to
float and multiplied by their scales, and computed by ONNX Runtime as the fake-quant model computes them.

Tiny seeded model (32×32), a few distillation steps; every check is against values the code computes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from safetensors.torch import load_file, save_file

from quantface.calibration import CalibConfig, calibrate
from quantface.calibration.layers import quant_layers
from quantface.calibration.recipe import apply_recipe
from quantface.errors import ConfigError
from quantface.export import ExportConfig, export_onnx
from quantface.models.reference import ReferenceRestorer
from quantface.quant import factor_codes, factor_quantize, qrange
from quantface.recipe import RecipeError, read_recipe
from tests.conftest import TINY, write_tiny_assets
from tests.parity import layer_parity

SIZE = 32


def _fp() -> ReferenceRestorer:
    torch.manual_seed(0)
    return ReferenceRestorer(TINY).eval()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("branch_bits")
    stem, faces = write_tiny_assets(root, SIZE)
    recipes = {}
    for bits in (8, 4):
        cfg = CalibConfig(method="quantface", bits="W4A4", data=str(faces), out=str(root / f"b{bits}"),
                          weights=str(stem), size=SIZE, stat_images=4, rank=2, batch_size=2, steps=2,
                          branch_bits=bits)
        result = calibrate(cfg)
        recipes[bits] = (result.recipe, result.model)
    return root, stem, recipes


def _x(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1


def test_factor_grid_round_trips_exactly():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(6, 5, 3, 3, generator=g)
    for bits in (2, 4, 8):
        codes, scale = factor_quantize(f, bits)
        qmin, qmax = qrange(bits, signed=True)
        assert codes.min() >= qmin and codes.max() <= qmax and scale.shape == (6,)
        values = codes * scale.view(-1, 1, 1, 1)
        assert torch.equal(factor_codes(values, scale, bits).float(), codes)
    with pytest.raises(ValueError):
        factor_codes(f, scale, 8)  # not on the grid


@pytest.mark.parametrize("bits", [8, 4])
def test_frozen_branches_are_on_their_grid_and_the_recipe_reproduces_the_model(assets, bits):
    _, _, recipes = assets
    path, model = recipes[bits]
    layers = {n: l for n, l in quant_layers(model).items() if l.lowrank is not None}
    assert layers
    for layer in layers.values():
        assert layer.lowrank.bits == bits
        for p, s in ((layer.lowrank.down, layer.lowrank.down_scale), (layer.lowrank.up, layer.lowrank.up_scale)):
            factor_codes(p.detach(), s, bits)  # raises unless codes · scale, bit for bit
    tensors = load_file(str(Path(path) / "recipe.safetensors"))
    meta = json.loads((Path(path) / "recipe.json").read_text())
    for name in layers:
        entry = meta["layers"][name]["lowrank"]
        assert entry["bits"] == bits
        assert tensors[entry["down"]].dtype == torch.int8 and tensors[entry["up"]].dtype == torch.int8
    recipe = read_recipe(path)
    for name, layer in layers.items():
        e = recipe.layers[name]
        assert e.lowrank_bits == bits
        assert torch.equal(e.lowrank_down, layer.lowrank.down.detach()) and torch.equal(e.lowrank_up, layer.lowrank.up.detach())
    again = apply_recipe(_fp(), path)
    with torch.no_grad():
        assert torch.equal(again(_x()), model(_x()))


def test_training_sees_the_grid_the_freeze_rounds_to(assets):
    """Before freeze, a layer with ``branch_bits`` computes its branches as the merged branch on the grid:
    freezing it (which merges and rounds) leaves the layer's output unchanged to float rounding."""
    from quantface.calibration.layers import QuantLayer

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 6, 3, padding=1)
    layer = QuantLayer(conv, "c")
    layer.split_lowrank(2)
    layer.add_lora(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora.up.normal_()
    layer.branch_bits = 4
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        before = layer(x)
        plain = layer.quantized_product(layer.transform_input(x)) + layer.lowrank(x) + layer.lora(x)
        layer.freeze()
        after = layer(x)
    assert layer.lowrank.rank == 4 and layer.lowrank.bits == 4
    assert torch.allclose(before, after, rtol=0, atol=1e-5)
    assert not torch.allclose(before, plain, rtol=0, atol=1e-3)  # the float branches would give another output


@pytest.mark.parametrize("profile", ["reference", "ort-cpu"])
@pytest.mark.parametrize("bits", [8, 4])
def test_export_stores_codes_and_matches_the_fake_quant_model(assets, bits, profile):
    root, stem, recipes = assets
    path, _ = recipes[bits]
    out = root / f"b{bits}_{profile}.onnx"
    export_onnx(ExportConfig(weights=str(stem), recipe=str(path), profile=profile, out=str(out)))
    m = onnx.load(str(out))
    types = {i.name: i.data_type for i in m.graph.initializer}
    nodes = {n.name: n for n in m.graph.node}
    recipe = read_recipe(path)
    branched = [n for n, e in recipe.layers.items() if e.lowrank_down is not None]
    want = TensorProto.INT4 if bits <= 4 else TensorProto.INT8
    checked = 0
    for name in branched:
        if f"{name}_LowRankDown" not in nodes:  # a timestep-path layer folded to a constant
            continue
        checked += 1
        for factor in ("down", "up"):
            key = f"{name}.lowrank_{factor}_codes"
            assert types.get(key) == want, (key, types.get(key))
            cast, mul = nodes[f"{name}_LowRank{factor.capitalize()}_Cast"], nodes[f"{name}_LowRank{factor.capitalize()}_Scale"]
            assert list(cast.input) == [key] and mul.input[0] == cast.output[0]
            assert mul.input[1] == f"{name}.lowrank_{factor}_scale"
            assert f"{name}.lowrank_{factor}_fp16" not in types and f"{name}.lowrank_{factor}" not in types
    assert checked
    qmodel = apply_recipe(_fp(), path, requant_outputs=profile != "reference")
    layers = layer_parity(out, qmodel, _x().numpy())
    worst = max(layers, key=lambda n: layers[n].rel_l2)
    assert all(p.rel_l2 <= 1e-4 and p.exact_fraction >= 0.99 for p in layers.values()), (worst, layers[worst])


def test_reader_refuses_codes_beyond_the_recorded_bits(assets, tmp_path):
    import shutil

    _, _, recipes = assets
    path, _ = recipes[4]
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    meta = json.loads((bad / "recipe.json").read_text())
    name = next(n for n, e in meta["layers"].items() if e.get("lowrank"))
    tensors = load_file(str(bad / "recipe.safetensors"))
    key = meta["layers"][name]["lowrank"]["down"]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = 100  # outside [-8, 7]
    save_file(tensors, str(bad / "recipe.safetensors"))
    meta["tensors_sha256"] = hashlib.sha256((bad / "recipe.safetensors").read_bytes()).hexdigest()
    (bad / "recipe.json").write_text(json.dumps(meta))
    with pytest.raises(RecipeError, match="exceed 4 bits"):
        read_recipe(bad)


@pytest.mark.parametrize("bits", [1, 9, 4.0, True])
def test_branch_bits_outside_2_to_8_is_one_clear_error(bits):
    with pytest.raises(ConfigError, match="--branch-bits"):
        CalibConfig(method="quantface", bits="W4A4", data="x", out="y", branch_bits=bits).check()


@pytest.mark.parametrize("bits", [8, 4])
def test_the_bytes_cost_counts_what_the_reference_export_stores(assets, bits):
    """``--rank-cost bytes`` prices a rank-R branch as the bytes its factors' codes and scales take in the
    reference export, and a full-precision layer as its float32 weight less the codes and scales a quantized
    layer stores instead (one byte of slack per INT4 tensor: an odd count of codes pads its last byte)."""
    from quantface.calibration.ranks import FULL_PRECISION, Storage, option_bytes

    root, stem, recipes = assets
    path, model = recipes[bits]
    out = root / f"bytes_b{bits}.onnx"
    export_onnx(ExportConfig(weights=str(stem), recipe=str(path), profile="reference", out=str(out)))
    stored = {t.name: len(t.raw_data) for t in onnx.load(str(out)).graph.initializer}
    assert all(stored.values())  # every initializer is raw bytes: the lengths below are what the file holds
    recipe, layers, storage = read_recipe(path), quant_layers(model), Storage(4, bits)
    slack = 1 if bits <= 4 else 0
    branches = 0
    for name, entry in recipe.layers.items():
        layer = layers[name]
        codes = stored.get(f"{name}.weight_codes")
        if codes is None:  # a timestep-path layer folded to a constant
            continue
        quantized = codes + stored[f"{name}.weight_scale"]
        assert abs(layer.weight.numel() * 4 - quantized - option_bytes(layer, FULL_PRECISION, storage)) <= slack
        if entry.lowrank_down is None:
            assert option_bytes(layer, 0, storage) == 0
            continue
        branches += 1
        keys = [f"{name}.lowrank_{f}_{k}" for f in ("down", "up") for k in ("codes", "scale")]
        assert abs(sum(stored[k] for k in keys) - option_bytes(layer, entry.lowrank_rank, storage)) <= 2 * slack
    assert branches
