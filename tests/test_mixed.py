"""Adaptive bit-width allocation (calibration.mixed): the integer program against known optima and
brute force, the budget, the restartable sensitivity sweep, the layer errors, mixed bits surviving
a recipe bit for bit (16-bit QNN activations included, through export), and the CLI's errors."""

from __future__ import annotations

import copy
import itertools
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from quantface.calibration import CalibConfig, calibrate
from quantface.calibration import sensitivity
from quantface.calibration.layers import wrap_layers
from quantface.calibration.methods import get_method
from quantface.calibration.allocation import Option, allocate, minimum_cost
from quantface.calibration.sensitivity import QParams, layer_errors, sensitivity_sweep
from quantface.calibration.recipe import apply_recipe
from quantface.calibration.run import CalibData, prepare
from quantface.cli import main
from quantface.errors import ConfigError
from quantface.quant import act_qparams, act_qparams_from_range, check_bits, dequantize, qrange, quantize, weight_scale


FP_UNET = ("encoder.*", "prompt_embedder.*", "unet.*")


def _options(table: dict[str, list[tuple[float, float]]]) -> dict[str, list[Option]]:
    return {n: [Option(j, e, c) for j, (e, c) in enumerate(opts)] for n, opts in table.items()}


def _brute_force(options: dict[str, list[Option]], budget: float) -> float:
    best = float("inf")
    for combo in itertools.product(*options.values()):
        if sum(o.cost for o in combo) <= budget:
            best = min(best, sum(o.error for o in combo))
    return best


# ---------------------------------------------------------------------------------- the program
def test_hand_made_problem_has_its_known_optimum():
    # 4 units to spend above the cheapest choice. Greedy by error saved per unit takes b's upgrade
    # (7 for 2) and can then afford nothing else (objective 23); the optimum is a's alone (12 for 4).
    opts = _options({"a": [(15, 1), (3, 5)], "b": [(9, 1), (2, 3)], "c": [(6, 1), (2, 4)]})
    sol = allocate(opts, budget=7)
    assert sol.choice == {"a": 1, "b": 0, "c": 0}
    assert sol.objective == 3 + 9 + 6 and sol.cost == 7 and sol.status == "Optimal" and sol.seconds > 0
    # A budget that affords everything takes every best option; the minimum takes every cheapest.
    assert allocate(opts, budget=100).choice == {"a": 1, "b": 1, "c": 1}
    assert allocate(opts, budget=3).choice == {"a": 0, "b": 0, "c": 0}


def test_cbc_preprocessing_bug_is_avoided():
    # With CBC 2.10.3's preprocessing on, CBC fixes variables wrongly here and reports objective
    # 220.38 (l1 at its 220 option) as optimal; the optimum is 0.98.
    opts = _options({"l0": [(0.08246571351942532, 34), (0.030435289028190295, 38)],
                     "l1": [(220.17938531225144, 16), (299.82667649189517, 32), (0.7298523924873057, 22)],
                     "l2": [(596.94425477108, 17), (0.16630295795253436, 6)]})
    sol = allocate(opts, 65.43407683761662)
    assert sol.choice == {"l0": 0, "l1": 2, "l2": 1} and sol.objective == pytest.approx(0.9786210639592654)


@pytest.mark.parametrize("seed", range(40))
def test_program_matches_brute_force_and_never_exceeds_the_budget(seed):
    rng = random.Random(seed)
    table = {}
    for i in range(rng.randint(2, 7)):
        table[f"l{i}"] = [(rng.uniform(0, 100) * 10 ** rng.randint(-3, 3), rng.randint(1, 50))
                          for _ in range(rng.randint(2, 4))]
    opts = _options(table)
    lo, hi = minimum_cost(opts), sum(max(o.cost for o in v) for v in opts.values())
    budget = rng.uniform(lo, hi) if seed % 3 else float(lo)  # the minimum itself is feasible
    sol = allocate(opts, budget)
    assert sol.cost <= budget
    assert sol.cost == sum(opts[n][j].cost for n, j in sol.choice.items())
    assert sol.objective == pytest.approx(_brute_force(opts, budget), rel=1e-9, abs=1e-12)


def test_infeasible_budget_is_one_clear_config_error():
    opts = _options({"a": [(3, 3), (1, 5)], "b": [(4, 2), (0, 6)]})
    with pytest.raises(ConfigError, match=r"^the bit budget 4 is infeasible: the minimum achievable is 5 "):
        allocate(opts, 4)
    with pytest.raises(ConfigError, match="4.000 units"):
        allocate(opts, 4, describe=lambda c: f"{c:.3f} units")


def test_costs_and_budgets_of_each_mode():
    from quantface.calibration.allocation import check_budget
    from quantface.calibration.mixed import build_problem, candidate_choices
    from quantface.calibration.sensitivity import LayerStats

    def stats(choices):
        return {"a": LayerStats(elements=100, macs=1000, weights=50, sq_error={c: 1.0 for c in choices}),
                "b": LayerStats(elements=300, macs=500, weights=10, sq_error={c: 2.0 for c in choices})}

    sens = {"a": 3, "b": 2}
    cfg = CalibConfig(mp_budget=4.0)  # elements: M = b · E, budget = 4 · ΣE
    choices = candidate_choices(cfg, 4)
    opts, budget, describe, _ = build_problem(stats(choices), sens, choices, cfg, 4)
    assert [o.cost for o in opts["b"]] == [900, 1200, 1500, 1800] and budget == 4.0 * 400
    assert [o.error for o in opts["a"]] == [49.0] * 4 and [o.error for o in opts["b"]] == [18.0] * 4  # w² · ‖·‖²
    cfg = CalibConfig(mp_budget=4.0, mp_cost="bops")  # M = b · w_bits · MACs
    opts, budget, _, _ = build_problem(stats(choices), sens, choices, cfg, 4)
    assert [o.cost for o in opts["a"]] == [12000, 16000, 20000, 24000] and budget == 4.0 * 4 * 1500
    # --target qnn: options at or above --bits; costs (weight bytes P·w/8, latency proxy MACs·a/8); budgets
    # fractions of the all-W8 bytes and multiples of the proxy at --bits' activations.
    from quantface.calibration.targets import get_target

    qnn = get_target("qnn")
    cfg = CalibConfig(bits="W4A8", target="qnn", mp_budget=0.6, mp_latency_budget=1.2)
    assert qnn.choices(cfg, 4) == [(4, 8), (4, 16), (8, 8), (8, 16)] and qnn.baseline(qnn.choices(cfg, 4)) == (8, 8)
    assert qnn.choices(CalibConfig(bits="W8A8", target="qnn"), 8) == [(8, 8), (8, 16)]
    assert qnn.choices(CalibConfig(bits="W4A16", target="qnn"), 4) == [(4, 16), (8, 16)]
    layers = stats([])
    assert qnn.cost(cfg).of(layers["a"], 4, 16) == (25.0, 2000.0)
    budget, reference = qnn.budget(cfg, list(layers.values()))
    assert reference == (60.0, 1500.0) and budget == pytest.approx((0.6 * 60, 1.2 * 1500))
    assert CalibConfig(bits="W4A8", target="qnn").mp_budget == 0.55  # the defaults
    assert CalibConfig(bits="W4A8", target="qnn").mp_latency_budget == 1.25
    assert CalibConfig(bits="W8A8", target="qnn").mp_budget == 1.0  # nothing to save on W8 weights


# ---------------------------------------------------------------------------------- measurements
def test_layer_error_is_the_quantized_product_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    layers = wrap_layers(model)
    layer = layers["0"]
    layer.set_weight_quant(4, weight_scale(layer.weight, 4))
    x = torch.randn(3, 5, 8)
    qp = QParams({"0": x.flatten()})
    stats = layer_errors(model, layers, x, [(4, 3), (8, 16)], qp, get_method("quantface"))["0"]
    assert stats.elements == 5 * 8 and stats.macs == 5 * 6 * 8 and stats.weights == 48
    s, z = act_qparams(x.flatten(), 3)
    xq = dequantize(quantize(x, s, z, *qrange(3, False)), s, z)
    with torch.no_grad():
        expected = float(((xq @ layer.quantized_weight().T - x @ layer.weight.T).double() ** 2).sum()) / 3
    assert stats.sq_error[4, 3] == pytest.approx(expected, rel=1e-12)
    assert stats.sq_error[8, 16] < stats.sq_error[4, 3] / 100
    assert layer.weight_bits == 4 and layer.act_bits is None  # quantizer state restored


def test_option_errors_are_image_errors_one_width_at_a_time(tmp_path):
    """Each layer alone at an option, the rest at the baseline: the change of the output's MSE to FP; a coarser
    option floored at 0, a finer one signed; an option differing in both widths the sum of its two; layer
    sizes from one pass; the baseline state left behind; a second call reuses the cache."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 1))
    layers = wrap_layers(model)
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    samples = {n: torch.rand(500) * 4 - 2 for n in layers}
    ranges = {n: (torch.tensor(-2.5), torch.tensor(2.5)) for n in layers}
    qp = QParams(samples, ranges)
    assert torch.equal(qp("0", 16, "minmax")[0], act_qparams_from_range(-2.5, 2.5, 16)[0])
    for name, layer in layers.items():
        layer.set_weight_quant(4, weight_scale(layer.weight, 4))
        layer.set_act_quant(8, *qp(name, 8))
    cfg = CalibConfig(bits="W4A8", target="qnn", out=str(tmp_path / "r"))
    spec = get_method("quantface").lean()
    options = [(4, 8), (4, 16), (8, 8), (8, 16)]
    errors = sensitivity.option_errors(model, layers, x, options, (8, 8), qp, spec, cfg, "sha")
    sizes = sensitivity.layer_sizes(model, layers, x)
    assert sizes["0"].macs == 8 * 8 * 8 * 27 and sizes["0"].elements == 3 * 8 * 8 and sizes["2"].weights == 24

    def mse() -> float:
        with torch.no_grad():
            with sensitivity.quantizers_off(layers):
                ref = model(x)
            return float(((((model(x).clamp(-1, 1) + 1) / 2).double() - ((ref.clamp(-1, 1) + 1) / 2).double()) ** 2
                          ).mean())

    assert all((l.weight_bits, l.act_bits) == (8, 8) for l in layers.values())  # left at the baseline
    base = mse()
    layer = layers["0"]
    layer.set_weight_quant(4, weight_scale(layer.weight, 4))
    assert errors["0"][4, 8] == pytest.approx(max(mse() - base, 0.0), rel=1e-9, abs=1e-15)
    layer.set_weight_quant(8, weight_scale(layer.weight, 8))
    layer.set_act_quant(16, *qp("0", 16, "minmax"))
    assert errors["0"][8, 16] == pytest.approx(mse() - base, rel=1e-9, abs=1e-15)
    assert all(e[8, 8] == 0.0 and e[4, 8] >= 0 and e[4, 16] == e[4, 8] + e[8, 16] for e in errors.values())
    cache = tmp_path / ".r.mp_cache" / "option_errors.json"
    assert cache.is_file()
    with torch.no_grad():
        layers["2"].weight.mul_(2)  # a changed model under the same fingerprint: only a reused cache matches
    again = sensitivity.option_errors(model, layers, x, options, (8, 8), qp, spec, cfg, "sha")
    assert again == errors


@pytest.mark.parametrize("metric", ["ssim", "psnr", "lpips"])
def test_deviation_metrics(metric, tmp_path):
    kw = {}
    if metric == "lpips":
        from tests.test_lpips import _random_lpips, _split_files

        backbone, lin = _split_files(_random_lpips("alex"), tmp_path, ".safetensors")
        kw = dict(lpips_backbone=str(backbone), lpips_lin=str(lin), lpips_net="alex")
    cfg = CalibConfig(mp_budget=4.0, mp_metric=metric, **kw)
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    near, far = ref + 0.01 * torch.randn(ref.shape, generator=g), ref + 0.2 * torch.randn(ref.shape, generator=g)
    deviation = sensitivity.deviation_fn(cfg)
    same, d_near, d_far = (deviation(x, ref) for x in (ref, near, far))
    assert same.shape == (2,) and float(same.abs().max()) < 1e-6
    assert (0 < d_near).all() and (d_near < d_far).all()
    if metric == "psnr":  # the MSE of images in [0, 1]
        assert d_near == pytest.approx((((near.clamp(-1, 1) - ref) / 2) ** 2).flatten(1).mean(1).double())


def _prepared(tiny_model, image_folder, tmp_path, **kw):
    cfg = CalibConfig(data=str(image_folder), out=str(tmp_path / "recipe"), size=32, stat_images=4,
                      mp_budget=4.0, mp_sweep_images=2, **kw)
    data = CalibData.build(tiny_model, cfg, 32)
    model = copy.deepcopy(tiny_model)
    observed = QParams()
    layers = prepare(model, data, cfg, get_method("quantface"), observed)
    return cfg, data, model, layers, observed


def test_sweep_is_cached_and_resumes_where_it_stopped(tiny_model, image_folder, tmp_path, monkeypatch):
    # The decoder's 7 layers only, to keep the five sweeps below quick.
    cfg, data, model, layers, qp = _prepared(tiny_model, image_folder, tmp_path, mp_epsilon=1e-4, fp_layers=FP_UNET)
    x = data.lq[:cfg.mp_sweep_images]
    real = sensitivity.deviation_fn
    calls = []

    def counting(cfg_, stop_after=None):
        f = real(cfg_)

        def g(out, ref):
            calls.append(1)
            if stop_after is not None and len(calls) > stop_after:
                raise KeyboardInterrupt
            return f(out, ref)
        return g

    monkeypatch.setattr(sensitivity, "deviation_fn", counting)
    straight_cfg = CalibConfig.from_dict({**cfg.to_dict(), "out": str(tmp_path / "other")})
    straight = sensitivity_sweep(model, layers, x, straight_cfg, qp, "sha")
    total = len(calls)
    assert total == sum(r["bits"] - 1 for r in straight.values())
    assert {r["bits"] for r in straight.values()} <= set(range(2, 9))
    assert all(len(r["deviation"]) == r["bits"] - 1 for r in straight.values())

    calls.clear()
    monkeypatch.setattr(sensitivity, "deviation_fn", lambda c: counting(c, stop_after=total // 2))
    with pytest.raises(KeyboardInterrupt):
        sensitivity_sweep(model, layers, x, cfg, qp, "sha")
    cache = json.loads((sensitivity.cache_dir(cfg) / "sensitivity.json").read_text())
    done = cache["layers"]
    assert 0 < len(done) < len(layers)
    assert [layer.act_bits for layer in layers.values()] == [4] * len(layers)  # restored after the crash

    calls.clear()
    monkeypatch.setattr(sensitivity, "deviation_fn", counting)
    resumed = sensitivity_sweep(model, layers, x, cfg, qp, "sha")
    assert resumed == straight
    assert len(calls) == sum(r["bits"] - 1 for n, r in straight.items() if n not in done)

    # Another ε (or other weights) does not reuse the cache.
    calls.clear()
    other = CalibConfig.from_dict({**cfg.to_dict(), "mp_epsilon": 2e-4})
    sensitivity_sweep(model, layers, x, other, qp, "sha")
    assert len(calls) > 0 and len(calls) >= len(layers)
    calls.clear()
    sensitivity_sweep(model, layers, x, other, qp, "other-weights")
    assert len(calls) >= len(layers)


# ---------------------------------------------------------------------------------- end to end
def _mp_cfg(image_folder, tmp_path, tiny_weights, name, **kw):
    # The UNet stays FP (19 quantized layers left) to keep the sweeps quick.
    return CalibConfig(**{**dict(method="quantface", bits="W4A4", data=str(image_folder),
                                 out=str(tmp_path / "recipes" / name), weights=str(tiny_weights), size=32,
                                 stat_images=4, rank=2, batch_size=2, steps=2, mp_sweep_images=2, mp_epsilon=1e-3,
                                 fp_layers=("unet.*",)), **kw})


def test_mixed_bits_round_trip_through_the_recipe(image_folder, tmp_path, tiny_weights, tiny_model):
    result = calibrate(_mp_cfg(image_folder, tmp_path, tiny_weights, "mp", mp_budget=4.0, mp_candidates=(3, 5)))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(apply_recipe(tiny_model, result.recipe)(x), result.model(x))
    meta = json.loads((result.recipe / "recipe.json").read_text())
    alloc, layers = meta["allocation"], meta["layers"]
    bits = [e["act_bits"] for e in layers.values()]
    assert set(bits) == {3, 5}  # a mean of 4 from 3 and 5 needs both
    assert all(e["weight_bits"] == 4 for e in layers.values())
    assert list(alloc["layers"]) == list(layers)
    for name, e in alloc["layers"].items():
        assert e["act_bits"] == layers[name]["act_bits"] == alloc["candidates"][e["choice"]]
        assert e["weight"] == 2 ** e["sensitivity_bits"] - 1
        assert e["costs"] == [b * e["input_elements"] for b in alloc["candidates"]]
        assert e["errors"] == pytest.approx([e["weight"] ** 2 * s for s in e["sq_error"]], rel=1e-12)
        assert 0 <= layers[name]["act_zero_point"] <= 2 ** layers[name]["act_bits"] - 1
    total = sum(e["input_elements"] for e in alloc["layers"].values())
    mean = sum(e["act_bits"] * e["input_elements"] for e in alloc["layers"].values()) / total
    assert alloc["achieved_mean_act_bits"] == pytest.approx(mean) and mean <= 4.0
    assert alloc["budget"] == 4.0 and alloc["achieved_cost"] <= alloc["budget_cost"] == 4.0 * total
    for key in ("metric", "epsilon", "solve_seconds", "objective", "candidates", "label"):
        assert key in alloc
    assert alloc["metric"] == "ssim" and alloc["epsilon"] == 1e-3 and alloc["label"] == f"W4A{mean:.2f}"
    for png in ("sensitivity.png", "allocation.png"):
        assert Image.open(result.recipe / png).size[0] > 300
    sens = json.loads((result.recipe / "sensitivity.json").read_text())
    assert {n: s["bits"] for n, s in sens["layers"].items()} == {n: e["sensitivity_bits"]
                                                                for n, e in alloc["layers"].items()}
    # Nothing but the recipe is left beside it (the sweep cache and checkpoint are removed).
    assert sorted(p.name for p in result.recipe.parent.iterdir()) == ["mp"]
    # Export takes each layer's own bits: 3-bit codes in UINT4, 5-bit codes in UINT8 (both behind a
    # Clip to their own range, the containers being wider).
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from quantface.export import ExportConfig, export_onnx

    out = tmp_path / "mp.onnx"
    export_onnx(ExportConfig(weights=str(tiny_weights), recipe=str(result.recipe), profile="reference", out=str(out)))
    graph = onnx.load(str(out)).graph
    types = {i.name: i.data_type for i in graph.initializer}
    init = {i.name: i for i in graph.initializer}
    nodes = {n.name for n in graph.node}
    for name, e in layers.items():
        if f"{name}.act_zero_point" in types:  # (layers on the constant timestep path are folded away)
            assert types[f"{name}.act_zero_point"] == (onnx.TensorProto.UINT4 if e["act_bits"] == 3
                                                       else onnx.TensorProto.UINT8)
            lo, hi = (numpy_helper.to_array(init[f"{name}.act_{k}"]) for k in ("min", "max"))
            assert f"{name}_Clip" in nodes
            assert (hi - lo) / e["act_scale"] == pytest.approx(2 ** e["act_bits"] - 1, rel=1e-5)


def test_qnn_target_mixes_w4_w8_and_a8_a16_within_both_budgets_and_exports(image_folder, tmp_path, tiny_weights,
                                                                            tiny_model):
    """--target qnn: (W4/W8) x (A8/A16) per layer, no smoothing, rotation or branch, weight bytes and latency
    proxy each within its budget; 16-bit activations export as UINT16 in every profile, the qnn graph passes the
    static QNN check, and each profile matches the PyTorch simulation layer by layer."""
    onnx = pytest.importorskip("onnx")
    from quantface.export import ExportConfig, OnnxBackend, export_onnx, qnn_report
    from quantface.onnx_runtime import cpu_has_vnni
    from tests.parity import layer_parity

    result = calibrate(_mp_cfg(image_folder, tmp_path, tiny_weights, "qnn", bits="W4A8", target="qnn",
                               mp_budget=0.7, mp_latency_budget=1.5, steps=0))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ours = result.model(x)
        assert torch.equal(apply_recipe(tiny_model, result.recipe)(x), ours)
    meta = json.loads((result.recipe / "recipe.json").read_text())
    alloc, layers = meta["allocation"], meta["layers"]
    pairs = {(e["weight_bits"], e["act_bits"]) for e in layers.values()}
    assert pairs <= {(4, 8), (4, 16), (8, 8), (8, 16)}
    assert {w for w, _ in pairs} == {4, 8} and {a for _, a in pairs} == {8, 16}
    assert all(not e["smoothing"] and not e["hadamard"] and e["lowrank_rank"] == 0 for e in layers.values())
    a = alloc["layers"]
    spent = (sum(a[n]["weight_params"] * layers[n]["weight_bits"] / 8 for n in layers),
             sum(a[n]["macs"] * layers[n]["act_bits"] / 8 for n in layers))
    assert spent == pytest.approx(tuple(alloc["achieved_cost"]))
    assert spent[0] <= 0.7 * sum(a[n]["weight_params"] for n in layers) + 1e-6
    assert spent[1] <= 1.5 * sum(a[n]["macs"] for n in layers) + 1e-6
    # 16-bit activations help (negative error) where the program took them; W4 never helps.
    assert all(a[n]["option_errors"]["W8A16"] <= 0 or layers[n]["act_bits"] == 8 for n in layers)
    assert all(a[n]["option_errors"]["W4A8"] >= 0 for n in layers)
    for profile in ("qnn", "reference", "ort-cpu"):
        out = tmp_path / f"{profile}.onnx"
        export_onnx(ExportConfig(weights=str(tiny_weights), recipe=str(result.recipe), profile=profile, out=str(out)))
        model = onnx.load(str(out))
        zp_types = {i.name[: -len(".act_zero_point")]: i.data_type for i in model.graph.initializer
                    if i.name.endswith(".act_zero_point")}
        for name, t in zp_types.items():
            bits = layers[name]["act_bits"]
            assert t == (onnx.TensorProto.UINT16 if bits == 16 else onnx.TensorProto.UINT8)
        assert onnx.TensorProto.UINT16 in zp_types.values()
        if profile == "qnn":
            assert qnn_report(out) == []
        # ort-cpu and qnn requantize the outputs of 8-bit-input convs: simulated too. Parity layer by layer
        # (tests.parity); end to end only "the quantized model, not the FP one" (code flips cascade).
        qmodel = apply_recipe(tiny_model, result.recipe, requant_outputs=profile != "reference")
        parity = layer_parity(out, qmodel, x[:1].numpy())
        # On x86 CPUs without VNNI, ONNX Runtime's U8S8 integer kernels saturate int16 pair sums when 8-bit
        # weight codes meet 8-bit activation codes (tools/check_u8s8_saturation.py): those layers cannot be
        # bit-exact there; every other layer must be.
        exact = {n: p for n, p in parity.items() if cpu_has_vnni() is not False
                 or (layers[n]["weight_bits"], layers[n]["act_bits"]) != (8, 8)}
        assert exact and all(p.rel_l2 <= 1e-4 and p.exact_fraction >= 0.99 for p in exact.values())
        got = OnnxBackend(out)(x.numpy())
        with torch.no_grad():
            want, fp = qmodel(x).numpy(), tiny_model(x).numpy()
        assert np.abs(got - want).mean() < np.abs(got - fp).mean()


def test_cpu_target_chooses_w4_or_w8_per_layer_with_no_online_node(image_folder, tmp_path, tiny_weights,
                                                                     tiny_model):
    """--target cpu: weights W4 or W8 per layer under A8, within the byte budget, the program's errors the
    measured image errors; no smoothing, rotation or branch; the ort-cpu export stores the W4 codes as INT4
    (smaller than the all-W8 graph) and matches the PyTorch simulation layer by layer."""
    onnx = pytest.importorskip("onnx")
    from quantface.export import ExportConfig, export_onnx
    from quantface.export.fold import int4_storage
    from quantface.export.api import OnnxBackend
    from quantface.onnx_runtime import cpu_has_vnni, u8s8_saturates
    from quantface.validate import saturating_layers
    from tests.parity import layer_parity

    cfg = _mp_cfg(image_folder, tmp_path, tiny_weights, "cpu", bits="W4A8", target="cpu", mp_budget=0.7, steps=0)
    result = calibrate(cfg)
    meta = json.loads((result.recipe / "recipe.json").read_text())
    alloc, layers = meta["allocation"], meta["layers"]
    assert {e["weight_bits"] for e in layers.values()} == {4, 8} and {e["act_bits"] for e in layers.values()} == {8}
    assert all(not e["smoothing"] and not e["hadamard"] and e["lowrank_rank"] == 0 for e in layers.values())
    params = {n: e["weight_params"] for n, e in alloc["layers"].items()}
    spent = sum(params[n] * layers[n]["weight_bits"] / 8 for n in layers)
    assert spent == pytest.approx(alloc["achieved_cost"]) and spent <= 0.7 * sum(params.values()) + 1e-6
    # The program's optimum: no W8 layer could move to W4 within the budget at a smaller error than a W4 one.
    w4 = [n for n in layers if layers[n]["weight_bits"] == 4]
    assert all(alloc["layers"][n]["errors"][0] >= 0 for n in layers) and w4
    name = max(layers, key=lambda n: alloc["layers"][n]["option_errors"]["W4A8"])
    assert alloc["layers"][name]["option_errors"]["W4A8"] > 0 and alloc["layers"][name]["option_errors"]["W8A8"] == 0
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    qmodel = apply_recipe(tiny_model, result.recipe, requant_outputs=True)
    paths, constant = {}, set()
    for tag, budget in (("mixed", None), ("w8", 1.0)):
        recipe = result.recipe
        if budget is not None:
            recipe = calibrate(_mp_cfg(image_folder, tmp_path, tiny_weights, "cpu_w8", bits="W4A8", target="cpu",
                                       mp_budget=budget, steps=0)).recipe
            assert {e["weight_bits"] for e in json.loads((recipe / "recipe.json").read_text())["layers"].values()} == {8}
        paths[tag] = tmp_path / f"{tag}.onnx"
        exported = export_onnx(ExportConfig(weights=str(tiny_weights), recipe=str(recipe), profile="ort-cpu",
                                            out=str(paths[tag])))
        constant |= set(exported.constant_layers)  # the timestep path, folded into constants
    stored = int4_storage(onnx.load(str(paths["mixed"])))
    assert {k[: -len(".weight_codes_int4")] for k in stored} == set(w4) - constant
    assert paths["mixed"].stat().st_size < paths["w8"].stat().st_size
    parity = layer_parity(paths["mixed"], qmodel, x.numpy())
    exact = {n: p for n, p in parity.items() if cpu_has_vnni() is not False or layers[n]["weight_bits"] != 8}
    # validate names the layers this CPU's kernels saturate (its FAIL line then says --reduce-range)
    w8 = sorted(n for n in layers if layers[n]["weight_bits"] == 8)
    assert saturating_layers(OnnxBackend(paths["mixed"])) == (w8 if u8s8_saturates() else [])
    assert exact and all(p.rel_l2 <= 1e-4 and p.exact_fraction >= 0.99 for p in exact.values())


def test_target_cpu_with_reduce_range_gives_its_w8_layers_7_bit_codes_that_onnx_runtime_runs_exactly(
        image_folder, tmp_path, tiny_weights, tiny_model):
    """``--target cpu --reduce-range``: the W8 layers of the W4/W8 allocation take 7-bit codes in their INT8
    container (priced as INT8 bytes), the W4 ones stay 4-bit, and the ort-cpu graph matches the simulation
    layer by layer on every CPU, x86 without VNNI included (where full-range W8A8 codes saturate)."""
    from quantface.export import ExportConfig, export_onnx
    from quantface.export.api import OnnxBackend
    from quantface.validate import saturating_layers
    from safetensors.torch import load_file
    from tests.parity import layer_parity

    cfg = _mp_cfg(image_folder, tmp_path, tiny_weights, "cpu_rr", bits="W4A8", target="cpu", mp_budget=0.7, steps=0,
                  reduce_range=True)
    result = calibrate(cfg)
    meta = json.loads((result.recipe / "recipe.json").read_text())
    alloc, layers = meta["allocation"], meta["layers"]
    assert {e["weight_bits"] for e in layers.values()} == {4, 7}
    params = {n: e["weight_params"] for n, e in alloc["layers"].items()}
    spent = sum(params[n] * (1 if layers[n]["weight_bits"] == 7 else 0.5) for n in layers)
    assert spent == pytest.approx(alloc["achieved_cost"]) and spent <= 0.7 * sum(params.values()) + 1e-6
    tensors = load_file(str(result.recipe / "recipe.safetensors"))
    for n, e in layers.items():  # (4-bit codes are stored packed, as INT4)
        if e["weight_bits"] == 7:
            c = tensors[f"{n}.weight_codes"]
            assert -64 <= int(c.min()) and int(c.max()) <= 63, n
        else:
            assert f"{n}.weight_codes_int4" in tensors, n
    path = tmp_path / "cpu_rr.onnx"
    export_onnx(ExportConfig(weights=str(tiny_weights), recipe=str(result.recipe), profile="ort-cpu", out=str(path)))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    parity = layer_parity(path, apply_recipe(tiny_model, result.recipe, requant_outputs=True), x.numpy())
    assert any(layers[n]["weight_bits"] == 7 for n in parity) and saturating_layers(OnnxBackend(path)) == []
    assert all(p.rel_l2 <= 1e-4 and p.exact_fraction >= 0.99 for p in parity.values()), \
        {n: p for n, p in parity.items() if p.rel_l2 > 1e-4 or p.exact_fraction < 0.99}


def test_validate_names_the_saturated_layers_only_where_this_cpu_saturates_them(monkeypatch):
    import quantface.onnx_runtime as onnx_runtime
    from quantface.validate import saturating_layers

    bits = {"a": (8, 8), "b": (7, 8), "c": (8, 16), "d": (4, 8)}
    meta = {"quantface.layer_bits": json.dumps({n: {"weight_bits": w, "act_bits": a} for n, (w, a) in bits.items()})}
    for saturates, exact, want in ((True, False, ["a"]), (True, True, []), (False, False, [])):
        monkeypatch.setattr(onnx_runtime, "u8s8_saturates", lambda: saturates)
        assert saturating_layers(SimpleNamespace(exact_qdq=exact, metadata=meta)) == want


def test_sixteen_bits_only_for_activations():
    assert qrange(16, signed=False) == (0, 65535)
    for bad in (9, 16):
        with pytest.raises(ConfigError, match="outside the supported range"):
            check_bits(bad)
    with pytest.raises(ConfigError, match="outside the supported range"):
        qrange(16, signed=True)
    x = torch.linspace(-3, 5, 10001)
    s, z = act_qparams(x, 16, "minmax")
    q = quantize(x, s, z, *qrange(16, False))
    assert torch.equal(q, torch.round(q)) and float((dequantize(q, s, z) - x).abs().max()) <= float(s) / 2 + 1e-6


# ---------------------------------------------------------------------------------- config and CLI
def test_config_round_trip_and_validation():
    cfg = CalibConfig(mp_budget=3.5, mp_candidates=(2, 3, 4, 8), mp_epsilon=1e-3, mp_metric="psnr",
                      mp_cost="bops", mp_sweep_images=4)
    assert CalibConfig.from_json(cfg.to_json()) == cfg
    qnn = CalibConfig(bits="W4A8", mp_budget=0.5, mp_latency_budget=1.3, target="qnn")
    assert CalibConfig.from_json(qnn.to_json()) == qnn
    cpu = CalibConfig(bits="W4A8", target="cpu")  # its default budget
    assert cpu.mp_budget == 0.55 and CalibConfig.from_json(cpu.to_json()) == cpu
    for kw, message in [
        (dict(mp_budget=2.5),
         "--mp-budget 2.5 mean activation bits is infeasible: the smallest candidate bit width is 3"),
        (dict(mp_budget=0.0), "--mp-budget 0.0 must be a positive number"),
        (dict(mp_budget=4.0, mp_candidates=(3, 9)), "outside the supported range"),
        (dict(mp_budget=4.0, mp_candidates=(3, 3)), "lists a bit width twice"),
        (dict(mp_budget=4.0, mp_metric="lpips"), "needs local LPIPS weights"),
        (dict(mp_budget=4.0, mp_metric="mse"), "is not one of ssim, psnr, lpips"),
        (dict(bits="W4A8", mp_budget=1.5, target="qnn"), "must be a fraction in \\[0.5, 1\\] of the all-W8 weight"),
        (dict(bits="W4A8", mp_budget=0.4, target="qnn"), "must be a fraction in \\[0.5, 1\\]"),
        (dict(bits="W4A8", mp_latency_budget=0.9, target="qnn"), "--mp-latency-budget 0.9 must be at least 1"),
        (dict(bits="W4A4", target="qnn"), "use W4A8, W4A16 or W8A8 \\(not W4A4\\)"),
        (dict(bits="W8A16", target="qnn"), "leaves --target qnn nothing to choose"),
        (dict(bits="W4A8", target="qnn", method="quantvsr"), "--target qnn keeps no low-rank branch"),
        (dict(mp_budget=4.0, mp_latency_budget=1.2), "--mp-latency-budget applies to --target qnn"),
        (dict(bits="W4A8", target="cpu", mp_latency_budget=1.2), "--mp-latency-budget applies to --target qnn"),
        (dict(bits="W4A8", target="cpu", mp_budget=0.4), "infeasible with --target cpu: every layer at W4 is 0.5"),
        (dict(bits="W4A8", target="cpu", mp_budget=1.5), "must be a fraction in \\(0, 1\\] of the all-W8 weight"),
        (dict(bits="W4A4", target="cpu"), "use --bits W4A8 \\(not W4A4\\)"),
        (dict(mp_budget=4.0, mp_sweep_images=0), "must be a positive integer"),
    ]:
        with pytest.raises(ConfigError, match=message):
            CalibConfig(**kw)


@pytest.mark.parametrize("extra, message", [
    (["--mp-budget", "4", "--mp-candidates", "3,four"],
     "--mp-candidates '3,four' must be comma-separated bit widths, e.g. 3,4,5,6"),
    (["--mp-budget", "4", "--mp-candidates", "3,12"], "bit width 12 is outside the supported range 2..8"),
    (["--mp-candidates", "3,4"], "--mp-candidates only applies to adaptive bit widths; give --mp-budget too"),
    (["--mp-budget", "2", "--mp-candidates", "3,4"],
     "--mp-budget 2.0 mean activation bits is infeasible: the smallest candidate bit width is 3"),
    (["--mp-budget", "0.5", "--target", "qnn", "--bits", "W4A8", "--mp-candidates", "3,4"],
     "--mp-candidates does not apply with --target qnn, whose options are W4/W8 x A8/A16"),
    (["--mp-latency-budget", "1.2"], "--mp-latency-budget applies to --target qnn"),
    (["--target", "qnn", "--bits", "W4A4"], "--target qnn chooses 4- or 8-bit weights and 8- or 16-bit activations "
     "per layer, at or above --bits; use W4A8, W4A16 or W8A8 (not W4A4)"),
    (["--target", "cpu", "--bits", "W4A4"], "--target cpu chooses 4- or 8-bit weights per layer under 8-bit "
     "activations (the CPU kernels' container); use --bits W4A8 (not W4A4)"),
    (["--target", "cpu", "--bits", "W4A8", "--method", "quantvsr"], "--target cpu keeps no low-rank branch, which "
     "is what --method quantvsr allocates and trains; use another method"),
])
def test_cli_errors_are_one_line(extra, message, tmp_path, capsys):
    assert main(["calibrate", "--out", str(tmp_path / "r"), "--data", str(tmp_path)] + extra) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "r").exists()


def test_cli_calibrates_with_an_allocation(image_folder, tiny_weights, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["calibrate", "--weights", str(tiny_weights), "--data", str(image_folder), "--out", str(out),
                 "--size", "32", "--stat-images", "4", "--rank", "2", "--steps", "1", "--fp-layers", "unet.*",
                 "--mp-budget", "4.5", "--mp-candidates", "4,5", "--mp-epsilon", "1e-3", "--mp-metric", "psnr",
                 "--mp-sweep-images", "2", "--mp-cost", "bops"]) == 0
    alloc = json.loads((out / "recipe.json").read_text())["allocation"]
    assert (alloc["candidates"], alloc["metric"], alloc["epsilon"], alloc["sweep_images"], alloc["cost"]) == \
        ([4, 5], "psnr", 1e-3, 2, "bops")
    assert alloc["achieved_cost"] <= alloc["budget_cost"]
    assert "bit allocation: W4A" in capsys.readouterr().out
