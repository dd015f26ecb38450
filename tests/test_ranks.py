"""Per-layer low-rank budgets (``calibration.ranks``): the rank program against brute force, the cap
below each layer's size, the ranks in the recipe bit for bit, and the export's branch per layer."""

import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from quantface.calibration import CalibConfig, calibrate
from quantface.calibration.allocation import Option, allocate
from quantface.calibration.layers import QuantLayer
from quantface.calibration.methods import get_method
from quantface.calibration.ranks import (RANK_CANDIDATES, branch_time, candidates, energy_beyond, input_elements,
                                        rank_cap, rank_cost, rank_energy_errors, rank_output_errors, split_rank,
                                        uniform_rank)
from quantface.calibration.recipe import apply_recipe
from quantface.errors import ConfigError
from quantface.recipe import read_recipe, write_recipe


def _cfg(image_folder, tmp_path, weights, name="quantface", **kw):
    return CalibConfig(method=kw.pop("method", "quantface"), bits="W4A4", data=str(image_folder),
                       out=str(tmp_path / "recipes" / name), weights=str(weights), size=32, stat_images=4,
                       rank=2, batch_size=2, steps=kw.pop("steps", 2), mp_sweep_images=4, **kw)


@pytest.fixture(scope="module")
def budget_recipe(tmp_path_factory):
    """A tiny QuantFace W4A4 recipe calibrated with --rank-budget 0.5 --rank-cost both."""
    from tests.conftest import write_tiny_assets

    root = tmp_path_factory.mktemp("ranks")
    weights, faces = write_tiny_assets(root, 32)
    return calibrate(_cfg(faces, root, weights, rank_budget=0.5, rank_cost="both")), weights


def test_calibration_with_a_rank_budget_records_each_layers_rank_and_reproduces_bit_for_bit(budget_recipe,
                                                                                            tiny_model):
    result, _ = budget_recipe
    meta = json.loads((result.recipe / "recipe.json").read_text())
    alloc = meta["rank_allocation"]
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(apply_recipe(tiny_model, result.recipe)(x), result.model(x))
    assert alloc["branch_params"] <= 0.5 * alloc["uniform_branch_params"]
    assert alloc["branch_macs_per_image"] <= 0.5 * alloc["uniform_branch_macs_per_image"]
    ranks = {n: e["rank"] for n, e in alloc["layers"].items()}
    assert len(set(ranks.values())) > 1  # not one rank for all
    assert sorted(meta["layers"]) == sorted(n for n, r in ranks.items() if r != "fp")
    for name, entry in meta["layers"].items():
        assert entry["lowrank_rank"] == ranks[name] and ranks[name] in RANK_CANDIDATES
        assert ranks[name] < min(entry["weight_shape"][0], int(np.prod(entry["weight_shape"][1:])))
        assert ("lowrank" in entry) == bool(ranks[name])


def _brute_force(options, budget):
    best = None
    for combo in itertools.product(*options.values()):
        costs = [sum(o.cost[d] for o in combo) for d in range(len(budget))]
        if all(c <= b for c, b in zip(costs, budget)):
            err = sum(o.error for o in combo)
            best = err if best is None else min(best, err)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_two_dimensional_rank_program_returns_the_brute_force_optimum_within_budget(seed):
    """Random rank problems (5 layers, candidates below each size, parameters and MACs as two
    costs, errors decreasing with rank): CBC's choice is within both budgets and as good as brute force."""
    rng = np.random.default_rng(seed)
    options = {}
    for i in range(5):
        size = int(rng.choice([3, 8, 20, 40]))
        per_rank, positions = int(rng.integers(20, 400)), int(rng.choice([1, 64, 1024]))
        errs = np.sort(rng.uniform(0, 100, len(RANK_CANDIDATES)))[::-1]
        options[f"l{i}"] = [Option(r, float(errs[j]), (float(r * per_rank), float(r * per_rank * positions)))
                            for j, r in enumerate(RANK_CANDIDATES) if r < size]
    full = tuple(sum(max(o.cost[d] for o in opts) for opts in options.values()) for d in range(2))
    budget = (float(rng.uniform(0.2, 0.7)) * full[0], float(rng.uniform(0.2, 0.7)) * full[1])
    sol = allocate(options, budget)
    assert all(c <= b for c, b in zip(sol.cost, budget))
    assert sol.objective == pytest.approx(_brute_force(options, budget), rel=1e-9, abs=1e-9)


def test_allocated_ranks_are_capped_below_the_layer_size_and_uniform_ones_are_as_before():
    spec = get_method("quantface")
    cfg = CalibConfig(rank=8)
    out3 = QuantLayer(nn.Conv2d(32, 3, 3))  # the RGB output conv: n = 3
    out8 = QuantLayer(nn.Conv2d(96, 8, 3))  # the latent output convs: n = 8
    wide = QuantLayer(nn.Conv2d(96, 96, 3))
    # without --rank-budget: (svd + lora)·r as before (split_lowrank caps the SVD part at the matrix)
    assert [uniform_rank(spec, cfg, l) for l in (out3, out8, wide)] == [16, 16, 16]
    assert [split_rank(spec, r) for r in (2, 7, 16, 0)] == [(1, 1), (3, 4), (8, 8), (0, 0)]
    assert split_rank(get_method("svdquant"), 6) == (6, 0) and split_rank(get_method("efficientdm"), 6) == (0, 6)
    assert candidates(out3) == [0, 2] and candidates(out8) == [0, 2, 4] and rank_cap(wide) == 95


def test_rank_budget_is_checked_before_work(image_folder, tmp_path, tiny_weights):
    with pytest.raises(ConfigError, match="--rank-budget"):
        CalibConfig(rank_budget=0)
    with pytest.raises(ConfigError, match="--rank-cost"):
        CalibConfig(rank_cost="watts")
    with pytest.raises(ConfigError, match="--rank-error 'psnr' is not one of output, layer, energy"):
        CalibConfig(rank_error="psnr")
    with pytest.raises(ConfigError, match="--rank-time-budget needs a --rank-cost with time"):
        CalibConfig(rank_budget=0.5, rank_time_budget=0.6)
    with pytest.raises(ConfigError, match="--rank-time-budget -1"):
        CalibConfig(rank_budget=0.5, rank_cost="time", rank_time_budget=-1)
    with pytest.raises(ConfigError, match="method minmax has no branch"):
        calibrate(_cfg(image_folder, tmp_path, tiny_weights, method="minmax", rank_budget=0.5))


def test_ranks_round_trip_through_the_recipe_bit_for_bit(budget_recipe, tmp_path):
    result, _ = budget_recipe
    first = read_recipe(result.recipe)
    second = read_recipe(write_recipe(first, tmp_path / "copy"))
    assert second.tensors_sha256 == first.tensors_sha256
    assert second.sections["rank_allocation"] == first.sections["rank_allocation"]
    for name, layer in first.layers.items():
        again = second.layers[name]
        assert again.lowrank_rank == layer.lowrank_rank == first.sections["rank_allocation"]["layers"][name]["rank"]
        for factor in ("lowrank_down", "lowrank_up"):
            a, b = getattr(layer, factor), getattr(again, factor)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b))


def test_export_builds_each_layers_branch_at_its_own_rank(budget_recipe, tmp_path):
    """Per layer: rank 0 has no branch nodes or factors; rank R has a down conv / matmul to R channels
    and an up one back, fed by the layer's (rotated) input and added to its product."""
    import onnx
    from onnx import numpy_helper

    from quantface.export import ExportConfig, export_onnx

    result, weights = budget_recipe
    ranks = {n: e["rank"] for n, e in result_meta(result)["rank_allocation"]["layers"].items()}
    assert 0 in ranks.values() and len({r for r in ranks.values() if r}) > 1
    for profile in ("reference", "ort-cpu"):
        out = tmp_path / f"{profile}.onnx"
        exported = export_onnx(ExportConfig(weights=str(weights), recipe=str(result.recipe), profile=profile,
                                            out=str(out)))
        model = onnx.load(str(out))
        nodes = {n.name: n for n in model.graph.node}
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        suffix = "_fp16"  # float16-stored factors (+ Cast) in both profiles
        assert set(exported.constant_layers) < set(ranks)
        for name, rank in ranks.items():
            branch_nodes = [n for n in nodes if n.startswith(f"{name}_LowRank")]
            if rank == "fp":  # kept in full precision: a float layer, nothing of the exporter's
                assert name not in result_meta(result)["layers"] and not any(n.startswith(f"{name}_") for n in nodes)
                continue
            if name in exported.constant_layers:  # the timestep path, folded into constants with its branch
                assert not any(n.startswith(f"{name}_") for n in nodes)
                continue
            if not rank:
                assert not branch_nodes and not any(k.startswith(f"{name}.lowrank") for k in inits)
                continue
            assert sorted(branch_nodes) == [f"{name}_LowRankAdd", f"{name}_LowRankDown", f"{name}_LowRankUp"]
            down, up = inits[f"{name}.lowrank_down{suffix}"], inits[f"{name}.lowrank_up{suffix}"]
            conv = down.ndim == 4
            assert (down.shape[0] if conv else down.shape[1]) == rank  # (R, in, kh, kw) or (in, R)
            assert (up.shape[1] if conv else up.shape[0]) == rank  # (out, R, 1, 1) or (R, out)
            assert nodes[f"{name}_LowRankUp"].input[0] == nodes[f"{name}_LowRankDown"].output[0]
            assert nodes[f"{name}_LowRankAdd"].input[1] == nodes[f"{name}_LowRankUp"].output[0]


def _quantizable(model):
    from quantface.calibration.layers import wrap_layers
    from quantface.quant import act_qparams

    layers = wrap_layers(model)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    samples = {}

    def keep(name):
        def hook(module, args):
            samples[name] = module.transform_input(args[0].detach()).flatten()
        return hook

    hooks = [l.register_forward_pre_hook(keep(n)) for n, l in layers.items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    act = {n: act_qparams(s, 4, "mse") for n, s in samples.items()}
    return layers, x, act


def test_output_rank_errors_are_the_measured_change_of_the_output_error_and_leave_the_model_as_it_came(tiny_model):
    """Each layer's error at rank R is what the whole model's output MSE to FP becomes with that layer alone
    at R (everything else at its uniform rank, W4A4), less the layer's best: rebuilt here by hand through
    QuantLayer's own split for two layers, the full-precision option too; the FP model is unchanged afterwards."""
    from quantface.calibration.sensitivity import _to01
    from quantface.quant import weight_scale

    spec, cfg = get_method("quantface"), CalibConfig(bits="W4A4", rank=2)
    layers, x, act = _quantizable(tiny_model)
    with torch.no_grad():
        ref = tiny_model(x)
    stats = rank_output_errors(tiny_model, layers, x, act, cfg, spec)
    with torch.no_grad():
        assert torch.equal(tiny_model(x), ref)
    assert all(l.lowrank is None and l.weight_bits is None and l.act_bits is None for l in layers.values())
    for st in stats.values():
        assert min(st.sq_error.values()) == 0.0 and all(v >= 0 for v in st.sq_error.values())

    folded = {n: l.weight.clone() for n, l in layers.items()}

    def setup(name, rank):
        layer = layers[name]
        layer.weight, layer.lowrank = folded[name].clone(), None
        if rank == "fp":
            layer.set_weight_quant(None, None)
            layer.set_act_quant(None, None, None)
            return
        if rank:
            layer.split_lowrank(rank)
        layer.set_weight_quant(4, weight_scale(layer.weight, 4, spec.scale_init))
        layer.set_act_quant(4, *act[name])

    def mse():
        with torch.no_grad():
            return float(((_to01(tiny_model(x)) - _to01(ref)) ** 2).mean())

    uniform = {n: min(uniform_rank(spec, cfg, l), l.weight.flatten(1).shape[0], l.weight[0].numel())
               for n, l in layers.items()}
    checked = [n for n, l in layers.items() if len(candidates(l)) >= 3][:2]
    assert checked
    for name in checked:
        measured = {}
        for r in [*candidates(layers[name]), "fp"]:
            for n in layers:
                setup(n, r if n == name else uniform[n])
            measured[r] = mse()
        least = min(measured.values())
        for r, v in measured.items():
            assert stats[name].sq_error[r] == pytest.approx(v - least, rel=1e-6, abs=1e-12)


def test_energy_rank_errors_and_the_time_cost():
    """``energy``: QuantVSR's weight-energy share per candidate. ``time``: zero without a branch, and a
    branch costs at least what its layer's input and output take to read and write, whatever its rank."""
    conv = QuantLayer(nn.Conv2d(16, 24, 3, stride=2, padding=1))
    linear = QuantLayer(nn.Linear(20, 12))
    stats = rank_energy_errors({"c": conv, "l": linear}, {"c": 64, "l": 10})
    assert stats["c"].sq_error == {**dict(zip(candidates(conv), energy_beyond(conv.weight, candidates(conv)))), "fp": 0.0}
    assert stats["c"].sq_error[0] == pytest.approx(1.0) and stats["l"].positions == 10
    assert input_elements(conv, 64) == 16 * 64 * 4 and input_elements(linear, 10) == 200
    assert branch_time(conv, 0, 64) == 0.0
    times = [branch_time(conv, r, 64) for r in (2, 4, 8, 16)]
    assert times == sorted(times) and times[0] > 0
    fixed = branch_time(conv, 2, 64) - (branch_time(conv, 4, 64) - branch_time(conv, 2, 64))
    assert fixed > 0  # what does not shrink with the rank
    assert rank_cost(conv, 4, 64, "params+time") == (4.0 * (16 * 9 + 24), branch_time(conv, 4, 64))


@pytest.mark.parametrize("time_budget", [None, 0.3])
def test_a_params_and_time_budget_holds_both(image_folder, tmp_path, tiny_weights, time_budget):
    """Both constraints hold; ``rank_time_budget`` gives the time constraint its own fraction."""
    result = calibrate(_cfg(image_folder, tmp_path, tiny_weights, steps=0, rank_budget=0.5, rank_cost="params+time",
                            rank_error="energy", rank_time_budget=time_budget))
    alloc = result_meta(result)["rank_allocation"]
    t = 0.5 if time_budget is None else time_budget
    assert alloc["error"] == "energy" and alloc["cost"] == "params+time"
    assert alloc["budget_fractions"] == {"params": 0.5, "time": t}
    assert alloc["branch_params"] <= 0.5 * alloc["uniform_branch_params"]
    assert alloc["branch_time_ms"] <= t * alloc["uniform_branch_time_ms"] * (1 + 1e-9)
    assert alloc["achieved_fractions"]["time"] <= t * (1 + 1e-9)


def result_meta(result):
    return json.loads((result.recipe / "recipe.json").read_text())


def test_rank_errors_reused_from_a_recipe_give_the_freshly_measured_allocation(image_folder, tmp_path, tiny_weights):
    """--rank-errors-from: the lent errors are the measured ones, and the program on them picks what a fresh
    measurement at the new budget picks; a recipe measured under other settings is refused before work."""
    first = result_meta(calibrate(_cfg(image_folder, tmp_path, tiny_weights, "a", steps=0, rank_budget=0.5,
                                       rank_cost="params+time", rank_error="energy")))["rank_allocation"]
    kw = dict(steps=0, rank_budget=0.7, rank_cost="params", rank_error="energy")
    fresh = result_meta(calibrate(_cfg(image_folder, tmp_path, tiny_weights, "b", **kw)))["rank_allocation"]
    lent = result_meta(calibrate(_cfg(image_folder, tmp_path, tiny_weights, "c",
                                      rank_errors_from=str(tmp_path / "recipes" / "a"), **kw)))["rank_allocation"]
    assert lent["errors_from"] == str(tmp_path / "recipes" / "a") and fresh["errors_from"] is None
    for name, entry in lent["layers"].items():
        assert entry["errors"] == first["layers"][name]["errors"] == fresh["layers"][name]["errors"]
        assert entry["rank"] == fresh["layers"][name]["rank"]
    assert lent["budget_fractions"] == {"params": 0.7} and lent["objective"] == fresh["objective"]
    with pytest.raises(ConfigError, match="seed=0 there, 1 here"):
        calibrate(_cfg(image_folder, tmp_path, tiny_weights, "d", seed=1,
                       rank_errors_from=str(tmp_path / "recipes" / "a"), **kw))
    with pytest.raises(ConfigError, match="holds no measured rank errors"):
        uniform = calibrate(_cfg(image_folder, tmp_path, tiny_weights, "u", steps=0)).recipe
        calibrate(_cfg(image_folder, tmp_path, tiny_weights, "e", rank_errors_from=str(uniform), **kw))
    with pytest.raises(ConfigError, match="needs a --rank-budget"):
        CalibConfig(rank_errors_from=str(tmp_path / "recipes" / "a"))
    assert not (tmp_path / "recipes" / "d").exists() and not (tmp_path / "recipes" / "e").exists()


def test_a_bytes_budget_holds_and_prices_float_layers_by_their_float32_weight(image_folder, tmp_path, tiny_weights):
    """``--rank-cost bytes`` with ``--branch-bits 4``: the program's choices store at most the budget's share of
    the uniform branches' bytes, and a full-precision layer costs 3.5 bytes a W4 weight less its scales, where
    ``params`` counts it one parameter a weight."""
    from quantface.calibration.ranks import FULL_PRECISION, Storage, option_bytes

    result = calibrate(_cfg(image_folder, tmp_path, tiny_weights, steps=0, rank_budget=0.5, rank_cost="bytes",
                            rank_error="energy", branch_bits=4))
    alloc = result_meta(result)["rank_allocation"]
    assert alloc["cost_unit"] == "bytes of the reference export" and alloc["storage"] == {"weight_bits": 4,
                                                                                        "branch_bits": 4}
    assert alloc["branch_bytes"] == alloc["achieved_cost"] <= 0.5 * alloc["uniform_branch_bytes"]
    for entry in alloc["layers"].values():
        assert entry["costs"][entry["candidates"].index(0)] == 0.0
    conv = QuantLayer(nn.Conv2d(16, 24, 3))
    assert option_bytes(conv, FULL_PRECISION, Storage(4, 4)) == 16 * 24 * 9 * 3.5 - 4 * 24
    assert option_bytes(conv, 4, Storage(4, 4)) == 4 * (16 * 9 + 24) / 2 + 4 * (4 + 24)
    assert option_bytes(conv, 4, Storage(4, None)) == 2 * 4 * (16 * 9 + 24)
    assert option_bytes(conv, 4, Storage(4, 3)) == option_bytes(conv, 4, Storage(4, 4))  # an INT4 container
    assert option_bytes(conv, 4, Storage(4, 6)) == option_bytes(conv, 4, Storage(4, 8))  # an INT8 one
    assert rank_cost(conv, 4, 64, "bytes", Storage(4, 8)) == 4 * (16 * 9 + 24) + 4 * (4 + 24)
