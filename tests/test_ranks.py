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
from quantface.calibration.ranks import RANK_CANDIDATES, candidates, rank_cap, split_rank, uniform_rank
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
        CalibConfig(rank_cost="bytes")
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


def result_meta(result):
    return json.loads((result.recipe / "recipe.json").read_text())
