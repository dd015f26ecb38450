"""QuantVSR (``calibration.quantvsr``) on tiny seeded models.

* LBA folds into the layer's bias exactly: every layer's output before and after ``fold_lba`` within
  1e-5 relative (a layer without a bias gets one), and the recipe stores the folded bias;
* STCA's ranks follow the complexity statistic (layers of the same weights: a more complex one never has a
  lower rank) and never exceed the budget; the statistic is the one the docstring states;
* the joint residual: the low-bit branch quantizes W′ − L1·L2 with the branch's current factors, and the
  factors' gradient reaches them through it;
* a quantvsr recipe reloads bit for bit, exports with every profile, and each quantized layer of the graph
  computes what the PyTorch simulation does (``tests.parity``), its calibrated bias included;
* user errors (bad budget, bad LBA options) are one sentence, before any work.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from quantface.calibration import CalibConfig, calibrate, get_method
from quantface.calibration.layers import QuantLayer, hooks_removed
from quantface.calibration.quantvsr import (LayerComplexity, allocate_stca, energy_beyond, mean_quantization_error,
                                            spatial_complexity, transformed_weight)
from quantface.calibration.ranks import branch_params
from quantface.calibration.recipe import apply_recipe
from quantface.calibration.run import CalibData, prepare
from quantface.cli import main
from quantface.errors import ConfigError
from quantface.export import ExportConfig, OnnxBackend, export_onnx
from quantface.metrics import output_psnr
from quantface.quant import fake_quantize, qrange
from quantface.recipe import read_recipe, write_recipe
from tests.parity import layer_parity

SIZE = 32
PROFILES = ["reference", "ort-cpu", "qnn"]
# Layers on the fixed-timestep path: folded into constants by the exporter (tests/test_export.py).
TIMESTEP_LAYERS = {"unet.time_in", "unet.time_out", "unet.down_blocks.0.temb_proj", "unet.mid_block1.temb_proj",
                   "unet.mid_block2.temb_proj", "unet.up_blocks.0.temb_proj"}


def _cfg(faces, root, weights, name="quantvsr", **kw):
    return CalibConfig(method="quantvsr", bits=kw.pop("bits", "W4A4"), data=str(faces),
                       out=str(root / "recipes" / name), weights=str(weights), size=SIZE, stat_images=4, rank=2,
                       batch_size=2, steps=kw.pop("steps", 3), lba_steps=kw.pop("lba_steps", 3), **kw)


def _input(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def quantvsr_case(tmp_path_factory):
    """A tiny QuantVSR W4A4 recipe (3 joint-refinement and 3 LBA steps), its weights and faces."""
    from tests.conftest import write_tiny_assets

    root = tmp_path_factory.mktemp("quantvsr")
    weights, faces = write_tiny_assets(root, SIZE)
    cfg = _cfg(faces, root, weights)
    return cfg, calibrate(cfg), weights, faces, root


def _prepared(tiny_model, cfg):
    data = CalibData.build(tiny_model, cfg, SIZE)
    qmodel = copy.deepcopy(tiny_model)
    layers = prepare(qmodel, data, cfg, get_method("quantvsr"))
    return qmodel, layers, data


def _layer_inputs(model: nn.Module, layers: dict[str, QuantLayer], x: torch.Tensor) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}
    with hooks_removed(l.register_forward_pre_hook(lambda m, a, n=n: got.setdefault(n, a[0].detach().clone()))
                       for n, l in layers.items()):
        with torch.no_grad():
            model(x)
    return got


# ------------------------------------------------------------------------------------------ LBA
def test_lba_folds_into_the_bias_exactly(quantvsr_case, tiny_model):
    cfg = quantvsr_case[0]
    qmodel, layers, _ = _prepared(tiny_model, cfg)
    g = torch.Generator().manual_seed(3)
    for layer in layers.values():
        if layer.lowrank is not None:
            layer.set_joint_residual()
        layer.add_lba(torch.randn(layer.out_channels, generator=g) * 0.1)
    inputs = _layer_inputs(qmodel, layers, _input())
    unbiased = [n for n, l in layers.items() if l.bias is None]
    assert unbiased  # the tiny model's attention projections have no bias: LBA gives them one
    with torch.no_grad():
        for name, layer in layers.items():
            before = layer(inputs[name])
            old_bias = None if layer.bias is None else layer.bias.clone()
            lba = layer.lba.detach().clone()
            layer.fold_lba()
            after = layer(inputs[name])
            assert layer.lba is None and layer.bias_calibrated
            assert torch.equal(layer.bias, lba if old_bias is None else old_bias + lba), name
            rel = float((after - before).norm() / before.norm())
            assert rel <= 1e-5, (name, rel)


def test_lba_starts_at_the_mean_quantization_error_and_the_recipe_stores_the_folded_bias(quantvsr_case, tiny_model):
    cfg, result = quantvsr_case[:2]
    qmodel, layers, data = _prepared(tiny_model, cfg)
    x = data.lq[:cfg.stat_images]
    init = mean_quantization_error(qmodel, layers, x)
    for name, layer in layers.items():
        layer.add_lba(init[name])
    # With the mean error added, each layer's own error has (near) zero mean on the inputs it was measured
    # on: the first layer's inputs do not depend on the others' biases.
    first = next(iter(layers))
    after = mean_quantization_error(qmodel, {first: layers[first]}, x)[first]
    with torch.no_grad():
        fp_scale = float(torch.as_tensor(init[first]).abs().max())
    assert fp_scale > 0 and float(after.abs().max()) <= 1e-4 * max(fp_scale, 1.0)
    # The recipe: every quantized layer's bias is the calibrated one (the FP bias plus its LBA), stored.
    recipe = read_recipe(result.recipe)
    fp_modules = dict(tiny_model.named_modules())
    moved = 0
    for name, entry in recipe.layers.items():
        assert entry.bias is not None and entry.bias.dtype == torch.float32, name
        fp_bias = fp_modules[name].bias
        moved += fp_bias is None or not torch.equal(entry.bias, fp_bias.detach())
    assert moved == len(recipe.layers)
    assert recipe.stats["lba_steps"] == 3 and len(recipe.stats["lba_loss"]) == 3


# ------------------------------------------------------------------------------------------ STCA
def test_spatial_complexity_is_the_mean_std_over_positions(tiny_model, quantvsr_case):
    cfg = quantvsr_case[0]
    qmodel = copy.deepcopy(tiny_model)
    from quantface.calibration.layers import wrap_layers

    layers = wrap_layers(qmodel)
    x = _input(3)
    stats = spatial_complexity(qmodel, layers, x)
    inputs = _layer_inputs(qmodel, layers, x)
    conv = "unet.conv_in"
    a = inputs[conv].double()
    want = float(a.flatten(2).std(dim=-1).mean())
    assert stats[conv].complexity == pytest.approx(want, rel=1e-9)
    assert stats[conv].positions == a.shape[-2] * a.shape[-1]  # a stride-1 conv: its input's positions
    linear = "unet.mid_attn.attn1.to_q"
    t = inputs[linear].double()
    assert stats[linear].complexity == pytest.approx(float(t.std(dim=1).mean()), rel=1e-9)  # over tokens
    assert stats["unet.time_in"].complexity == 0.0  # one vector per image: no spatial extent


def _same_layers(count: int) -> dict[str, QuantLayer]:
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 12, 3)
    return {f"l{i}": QuantLayer(copy.deepcopy(conv), f"l{i}") for i in range(count)}


@pytest.mark.parametrize("budget", [0.25, 0.5, 1.0, 1.5])
@pytest.mark.parametrize("cost", ["params", "both"])
def test_stca_ranks_follow_the_complexity_and_never_exceed_the_budget(budget, cost):
    layers = _same_layers(6)
    complexity = {f"l{i}": LayerComplexity(c, 100) for i, c in enumerate([0.05, 0.9, 0.3, 2.0, 0.6, 1.2])}
    cfg = CalibConfig(method="quantvsr", rank=2, rank_budget=budget, rank_cost=cost)  # uniform rank 4
    alloc = allocate_stca(complexity, layers, cfg, get_method("quantvsr"))
    ranks = alloc.ranks
    by_complexity = sorted(ranks, key=lambda n: complexity[n].complexity)
    assert [ranks[n] for n in by_complexity] == sorted(ranks.values())  # monotone in the statistic
    params = sum(branch_params(l, ranks[n]) for n, l in layers.items())
    uniform = sum(branch_params(l, 4) for l in layers.values())
    assert params <= budget * uniform and alloc.meta["branch_params"] == params
    assert alloc.meta["uniform_branch_params"] == uniform
    if cost == "both":
        assert alloc.meta["branch_macs_per_image"] <= budget * alloc.meta["uniform_branch_macs_per_image"]
    assert len(set(ranks.values())) > 1  # not one rank for all: the statistic decides
    for name, entry in alloc.meta["layers"].items():
        assert entry["rank"] == ranks[name] and entry["complexity"] == complexity[name].complexity


def test_stca_error_is_the_complexity_weighted_energy_left_to_the_low_bit_branch():
    layers = _same_layers(2)
    complexity = {"l0": LayerComplexity(1.0, 10), "l1": LayerComplexity(3.0, 10)}
    alloc = allocate_stca(complexity, layers, CalibConfig(method="quantvsr", rank=2), get_method("quantvsr"))
    energy = energy_beyond(layers["l0"].weight, alloc.meta["layers"]["l0"]["candidates"])
    assert energy[0] == 1.0 and all(a >= b for a, b in zip(energy, energy[1:]))
    assert alloc.meta["layers"]["l0"]["errors"] == pytest.approx([0.5 * e for e in energy])  # C / mean C = 0.5
    assert alloc.meta["layers"]["l1"]["errors"] == pytest.approx([1.5 * e for e in energy])


def test_calibrated_recipe_records_each_layers_rank_within_the_uniform_total(quantvsr_case, tiny_model, tmp_path):
    cfg, result, weights, faces, _ = quantvsr_case
    meta = json.loads((result.recipe / "recipe.json").read_text())
    alloc = meta["rank_allocation"]
    assert alloc["budget"] == 1.0 and alloc["branch_params"] <= alloc["uniform_branch_params"]
    for name, entry in meta["layers"].items():
        assert entry["lowrank_rank"] == alloc["layers"][name]["rank"], name
        assert entry["lowrank_rank"] <= alloc["layers"][name]["size"]
    assert len({e["rank"] for e in alloc["layers"].values()}) > 1
    # The timestep MLP's inputs have no spatial extent (no statistic): it keeps the uniform rank.
    time_in = alloc["layers"]["unet.time_in"]
    assert time_in["candidates"] == [time_in["uniform_rank"]] == [time_in["rank"]] == [4]
    # The output convs may keep their whole weight in the branch, as the uniform branches do (rank = size).
    conv_out = alloc["layers"]["decoder.conv_out"]
    assert conv_out["size"] == 3 and conv_out["uniform_rank"] == 3 and 3 in conv_out["candidates"]
    # Round trip: the ranks and the calibrated biases bit for bit.
    first = read_recipe(result.recipe)
    second = read_recipe(write_recipe(first, tmp_path / "copy"))
    assert second.tensors_sha256 == first.tensors_sha256
    assert all(torch.equal(first.layers[n].bias, second.layers[n].bias) for n in first.layers)
    # A smaller budget: fewer branch parameters, still recorded per layer.
    half = calibrate(_cfg(faces, tmp_path, weights, name="half", rank_budget=0.5, steps=1, lba_steps=1))
    half_alloc = json.loads((half.recipe / "recipe.json").read_text())["rank_allocation"]
    assert half_alloc["branch_params"] <= 0.5 * half_alloc["uniform_branch_params"]
    assert half_alloc["uniform_branch_params"] == alloc["uniform_branch_params"]


# ------------------------------------------------------------------------------------------ joint refinement
def test_joint_residual_follows_the_trained_branch(quantvsr_case, tiny_model):
    cfg = quantvsr_case[0]
    _, layers, _ = _prepared(tiny_model, cfg)
    layer = next(l for l in layers.values() if l.lowrank is not None and l.conv_args is not None)
    w_full = (layer.weight + layer.lowrank.product()).detach()
    layer.set_joint_residual()
    assert torch.equal(layer.full_weight, w_full) and torch.equal(transformed_weight(layer), w_full)
    qmin, qmax = qrange(4, signed=True)
    scale = layer.w_scale.detach().view(-1, 1, 1, 1)
    with torch.no_grad():
        layer.lowrank.up.mul_(1.5)  # the branch moves: the low-bit branch quantizes what is left
    want = fake_quantize(w_full - layer.lowrank.product().detach(), scale, 0.0, qmin, qmax)
    assert torch.equal(layer.quantized_weight().detach(), want)
    # The factors' gradient reaches them through the FP branch and the residual (STE): the difference of
    # the unquantized and the quantized input's contribution, not zero.
    x = torch.rand(2, layer.in_channels, 8, 8) * 2
    layer.lowrank.up.requires_grad_(True)
    layer(x).square().sum().backward()
    assert layer.lowrank.up.grad is not None and float(layer.lowrank.up.grad.abs().sum()) > 0
    # Freezing fixes the residual from the float16 factors the recipe stores.
    layer.freeze()
    assert layer.full_weight is None
    assert torch.equal(layer.weight, w_full - layer.lowrank.product().detach())


# ------------------------------------------------------------------------------------------ recipe, export
def test_quantvsr_recipe_reloads_bit_for_bit(quantvsr_case, tiny_model):
    _, result = quantvsr_case[:2]
    x = _input()
    with torch.no_grad():
        assert torch.equal(apply_recipe(tiny_model, result.recipe)(x), result.model(x))
    assert sorted(p.name for p in result.recipe.parent.iterdir()) == ["quantvsr"]  # no checkpoint left


@pytest.mark.parametrize("profile", PROFILES)
def test_quantvsr_exports_with_every_profile_and_matches_the_simulation(quantvsr_case, tiny_model, profile, tmp_path):
    """Each quantized layer of the graph computes what the PyTorch layer does on ORT's own input
    (``tests.parity``, the bar of tests/test_export.py), its bias the recipe's calibrated one."""
    cfg, result, weights = quantvsr_case[:3]
    out = tmp_path / f"{profile}.onnx"
    exported = export_onnx(ExportConfig(weights=str(weights), recipe=str(result.recipe), profile=profile,
                                        out=str(out)))
    onnx.checker.check_model(str(out), full_check=True)
    recipe = read_recipe(result.recipe)
    qmodel = apply_recipe(tiny_model, recipe, requant_outputs=profile != "reference")
    x = _input().numpy()
    for i in range(len(x)):
        layers = layer_parity(out, qmodel, x[i:i + 1])
        assert len(layers) == len(recipe.layers) - len(TIMESTEP_LAYERS)
        worst = max(layers, key=lambda n: layers[n].rel_l2)
        print(f"quantvsr {profile} input {i}: worst layer {worst} {layers[worst]}")
        assert all(p.rel_l2 <= 1e-4 and p.exact_fraction >= 0.99 for p in layers.values()), worst
    with torch.no_grad():
        ref = qmodel(torch.from_numpy(x)).numpy()
        fp = tiny_model(torch.from_numpy(x)).numpy()
    got = OnnxBackend(out, threads=1)(x)
    assert output_psnr(got, ref) > output_psnr(got, fp)  # it is the quantized model, not the FP one
    if profile == "reference":  # a layer whose FP model has no bias: the graph adds the calibrated one
        inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer}
        name = "unet.mid_attn.attn1.to_q"
        assert name not in exported.constant_layers and tiny_model.get_submodule(name).bias is None
        assert np.array_equal(inits[f"{name}.bias"], recipe.layers[name].bias.numpy())


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("field,value,flag", [("rank_budget", 0.0, "--rank-budget"), ("rank_budget", -1.0, "--rank-budget"),
                                              ("rank_budget", float("inf"), "--rank-budget"),
                                              ("lba_steps", -2, "--lba-steps"), ("lba_lr", 0.0, "--lba-lr")])
def test_quantvsr_options_are_one_sentence(field, value, flag):
    with pytest.raises(ConfigError, match=flag) as info:
        CalibConfig(method="quantvsr", **{field: value})
    message = str(info.value)
    assert "\n" not in message and message.count(". ") == 0


def test_bad_budget_on_the_command_line_is_one_line_before_work(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["calibrate", "--method", "quantvsr", "--rank-budget", "-0.5", "--out", "r"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --rank-budget -0.5 must be a positive number")
    assert not (tmp_path / "r").exists()
