"""Calibration on tiny seeded models: exact equivalence of the transforms, branch merging, every
method end to end, and the recipe reproducing the calibrated model bit for bit."""

import copy
import json
import re

import pytest
from safetensors.torch import load_file
import torch
from torch import nn

from quantface.calibration import METHODS, CalibConfig, calibrate, parse_bits
from quantface.calibration.run import CalibData, smoothing_scale
from quantface.calibration.layers import QuantLayer, wrap_layers
from quantface.calibration.methods import get_method
from quantface.calibration.recipe import apply_recipe
from quantface.recipe import HadamardSpec, RecipeError, read_recipe
from quantface.errors import ConfigError
from quantface.models.reference import ReferenceRestorer
from quantface.models.store import load_weights
from tests.conftest import TINY


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("layer", [nn.Conv2d(6, 5, 3, padding=1, stride=2), nn.Linear(12, 7)])
def test_unconfigured_quant_layer_is_the_layer(layer):
    x = torch.randn(2, 6, 9, 9) if isinstance(layer, nn.Conv2d) else torch.randn(2, 4, 12)
    assert torch.equal(QuantLayer(layer)(x), layer(x))


def test_rotation_scaling_and_svd_split_preserve_the_model(tiny_model):
    """Before quantization the balanced model equals the original: max relative error ≤ 1e-4."""
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = tiny_model(x)
    model = copy.deepcopy(tiny_model)
    g = torch.Generator().manual_seed(0)
    for i, layer in enumerate(wrap_layers(model).values()):
        act_max = torch.rand(layer.in_channels, generator=g) * 10 + 0.1
        layer.fold_smoothing(smoothing_scale(act_max, layer.weight, 0.5))
        layer.fold_rotation(HadamardSpec.draw(layer.in_channels, i))
        layer.split_lowrank(2)
        layer.add_lora(2, g)
    with torch.no_grad():
        assert _rel_err(model(x), ref) <= 1e-4


def test_merged_branches_match_unmerged_to_1e5():
    layer = QuantLayer(nn.Conv2d(8, 6, 3, padding=1))
    g = torch.Generator().manual_seed(0)
    layer.split_lowrank(3)
    layer.add_lora(3, g)
    with torch.no_grad():
        layer.lora.up.normal_(generator=g)  # a trained-looking LoRA branch
        x = torch.randn(2, 8, 10, 10)
        before = layer(x)
        layer.merge_branches()
        assert layer.lora is None and layer.lowrank.rank == 6
        assert (layer(x) - before).abs().max() <= 1e-5


def _cfg(image_folder, tmp_path, method, **kw):
    return CalibConfig(method=method, bits=kw.pop("bits", "W4A4"), data=str(image_folder),
                       out=str(tmp_path / "recipes" / method), weights=str(kw.pop("weights")), size=32, stat_images=4,
                       rank=2, batch_size=2, steps=kw.pop("steps", 2), **kw)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_calibrates_and_its_recipe_reproduces_it_bit_for_bit(method, image_folder, tmp_path,
                                                                         tiny_weights, tiny_model):
    result = calibrate(_cfg(image_folder, tmp_path, method, weights=tiny_weights))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    reloaded = apply_recipe(tiny_model, result.recipe)
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))
    meta = json.loads((result.recipe / "recipe.json").read_text())
    spec = get_method(method)
    layers = meta["layers"]
    assert meta["method"] == method and meta["bits"] == "W4A4"
    assert len(layers) == len([m for m in tiny_model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    for name, entry in layers.items():
        assert entry["weight_bits"] == 4 and entry["act_bits"] == 4
        rgb_input = entry["weight_shape"][1] < 4  # not rotated by default (CalibConfig.rotate_min_channels)
        assert (entry["hadamard"] is not None) == (spec.hadamard and not rgb_input)
        assert (entry["smoothing"] is not None) == spec.smoothing
        out_ch, fan_in = entry["weight_shape"][0], int(torch.tensor(entry["weight_shape"][1:]).prod())
        if spec.rank_allocation:  # QuantVSR's STCA: each layer's own rank, recorded with its allocation
            assert entry["lowrank_rank"] == meta["rank_allocation"]["layers"][name]["rank"]
            assert entry["lowrank_rank"] <= min(out_ch, fan_in)
            continue
        svd = min(2 * spec.svd_rank, out_ch, fan_in)  # r = 2; the SVD rank is capped by the matrix
        assert entry["lowrank_rank"] == svd + 2 * spec.lora_rank  # merged into one branch
        assert 0 <= entry["act_zero_point"] <= 15
    # Nothing but the recipe is left in the output's parent (no temp folder, no checkpoint).
    assert sorted(p.name for p in result.recipe.parent.iterdir()) == [method]


def test_rotation_skips_layers_below_rotate_min_channels(image_folder, tmp_path, tiny_weights):
    def rotated(cfg):
        layers = json.loads((calibrate(cfg).recipe / "recipe.json").read_text())["layers"]
        return {name: e["weight_shape"][1] for name, e in layers.items() if e["hadamard"]}, layers

    default, layers = rotated(_cfg(image_folder, tmp_path, "hadamard", weights=tiny_weights))
    rgb = {name for name, e in layers.items() if e["weight_shape"][1] == 3}
    assert rgb and not rgb & set(default) and len(default) == len(layers) - len(rgb)
    every, _ = rotated(_cfg(image_folder, tmp_path / "all", "hadamard", weights=tiny_weights, rotate_min_channels=1))
    assert set(every) == set(layers)
    wide, _ = rotated(_cfg(image_folder, tmp_path / "wide", "hadamard", weights=tiny_weights, rotate_min_channels=64))
    assert wide and all(c >= 64 for c in wide.values()) and len(wide) < len(default)


def test_fp_layers_are_left_alone(image_folder, tmp_path, tiny_weights):
    result = calibrate(_cfg(image_folder, tmp_path, "minmax", weights=tiny_weights, fp_layers=("encoder.*",)))
    layers = json.loads((result.recipe / "recipe.json").read_text())["layers"]
    assert layers and not any(name.startswith("encoder.") for name in layers)
    with pytest.raises(ConfigError, match="no layer is left"):
        calibrate(_cfg(image_folder, tmp_path, "minmax", weights=tiny_weights, fp_layers=("*",)))


def test_distillation_resumes_to_the_same_result(image_folder, tmp_path, tiny_weights):
    straight = calibrate(_cfg(image_folder, tmp_path / "a", "quantface", weights=tiny_weights, steps=4, lr=1e-3))
    # Interrupt after the checkpoint at step 2 by running 2 steps with a checkpoint kept...
    cfg = _cfg(image_folder, tmp_path / "b", "quantface", weights=tiny_weights, steps=4, lr=1e-3,
               checkpoint_every=2)
    from quantface.calibration import distill as distill_mod

    real = distill_mod.distill

    def interrupted(qmodel, layers, data, cfg_, spec, steps):
        real(qmodel, layers, data, cfg_, spec, 3)  # checkpoint written at step 2, then "crash"
        raise KeyboardInterrupt

    distill_mod.distill = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            calibrate(cfg)
    finally:
        distill_mod.distill = real
    resumed = calibrate(cfg)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(straight.model(x), resumed.model(x))


def test_distillation_moves_towards_the_fp_model(image_folder, tmp_path, tiny_weights):
    """Training the branches must reduce the distance to the FP output on the calibration inputs."""
    kw = dict(weights=tiny_weights, lr=1e-2, bits="W4A4")
    before = calibrate(_cfg(image_folder, tmp_path / "0", "quantface", steps=0, **kw)).model
    after = calibrate(_cfg(image_folder, tmp_path / "1", "quantface", steps=30, **kw)).model
    data = CalibData.build(load_weights(tiny_weights), _cfg(image_folder, tmp_path, "quantface", **kw), 32)
    with torch.no_grad():
        err = [float(((m(data.lq) - data.fp_out) ** 2).mean()) for m in (before, after)]
    assert err[1] < err[0]


def test_each_trained_group_gets_its_learning_rate(tmp_path):
    """--lr drives the SVD-initialised branch, --lora-lr the LoRA-initialised one, --scale-lr the scales."""
    from quantface.calibration.distill import distill, learning_rates

    torch.manual_seed(0)
    layer = QuantLayer(nn.Conv2d(3, 3, 3, padding=1))
    layer.split_lowrank(1)
    layer.add_lora(1, torch.Generator().manual_seed(0))
    model = nn.Sequential(layer)
    data = CalibData(lq=torch.rand(4, 3, 16, 16) * 2 - 1, fp_out=torch.rand(4, 3, 16, 16) * 2 - 1)
    cfg = CalibConfig(out=str(tmp_path / "r"), lr=1e-12, lora_lr=1e-2, scale_lr=1e-3, batch_size=2)
    assert learning_rates(cfg) == {"svd": 1e-12, "lora": 1e-2, "scales": 1e-3}
    same = CalibConfig(lr=3e-5, lora_lr=None, scale_lr=None)  # None: --lr
    assert learning_rates(same) == dict.fromkeys(("svd", "lora", "scales"), 3e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    distill(model, {"0": layer}, data, cfg, get_method("quantface"), steps=3)
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    assert moved["0.lowrank.down"] < 1e-9 and moved["0.lowrank.up"] < 1e-9
    assert moved["0.lora.up"] > 1e-3  # zero-initialised, left zero at --lr


def test_recipe_errors(image_folder, tmp_path, tiny_weights, tiny_model):
    path = calibrate(_cfg(image_folder, tmp_path, "minmax", weights=tiny_weights)).recipe
    meta = json.loads((path / "recipe.json").read_text())

    def write(m):
        (path / "recipe.json").write_text(json.dumps(m))

    other = ReferenceRestorer(TINY)  # same shapes, other weights
    with pytest.raises(RecipeError, match="other model weights"):
        apply_recipe(other, path)
    write({**meta, "version": 99})
    with pytest.raises(RecipeError, match="version 99"):
        read_recipe(path)
    bad_layer = dict(meta["layers"])
    first = next(iter(bad_layer))
    bad_layer[first] = {**bad_layer[first], "weight_scale": "nope"}
    write({**meta, "layers": bad_layer})
    with pytest.raises(RecipeError, match="lacks tensor nope"):
        read_recipe(path)
    write(meta)
    blob = (path / "recipe.safetensors").read_bytes()
    (path / "recipe.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(RecipeError, match="truncated or modified"):
        read_recipe(path)
    (path / "recipe.json").write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        read_recipe(path)
    with pytest.raises(RecipeError, match="nowhere does not exist"):
        read_recipe(tmp_path / "nowhere")


def test_calib_config_round_trip_and_validation():
    cfg = CalibConfig(method="svdquant", bits="W6A6", fp_layers=("decoder.conv_out",))
    assert CalibConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="not one of the accepted forms"):
        CalibConfig(bits="W4")
    with pytest.raises(ConfigError, match="--fold-lowrank 'sometimes' is not one of auto, never, always"):
        CalibConfig(fold_lowrank="sometimes")
    with pytest.raises(ConfigError, match="unknown calibration method"):
        get_method("gptq")
    with pytest.raises(ConfigError, match="--lora-lr 0.0 must be positive"):
        CalibConfig(lora_lr=0.0)


@pytest.mark.parametrize("bits, expected", [("W8A8", (8, 8)), ("W4A8", (4, 8)), ("W4A16", (4, 16)), ("W8A16", (8, 16)),
                                            ("W6A6", (6, 6)), ("W4A4", (4, 4)), ("W2A2", (2, 2))])
def test_parse_bits_accepts_the_documented_forms(bits, expected):
    assert parse_bits(bits) == expected
    assert CalibConfig(bits=bits).act_bits == expected[1]


@pytest.mark.parametrize("bits", ["W9A4", "W16A8", "W16A16", "W4A9", "W4A12", "W1A4", "W4A1", "W08A8", "w4a4",
                                  "W4A4 ", "W4", "A4W4", ""])
def test_parse_bits_refuses_other_forms_in_one_sentence(bits):
    with pytest.raises(ConfigError) as info:
        parse_bits(bits)
    message = str(info.value)
    assert message.startswith(f"--bits {bits!r} is not one of the accepted forms") and "\n" not in message


def test_default_learning_rates_are_the_measured_best(tmp_path):
    """CalibConfig's defaults are the rates of docs/calibration_notes.md; the CLI and calibrate_all use them."""
    import tools.calibrate_all as calibrate_all
    from quantface.cli import build_parser

    cfg = CalibConfig()
    assert (cfg.lr, cfg.lora_lr, cfg.scale_lr) == (1e-5, 1e-3, 1e-4)
    a = build_parser().parse_args(["calibrate", "--out", str(tmp_path / "r")])
    assert (a.lr, a.lora_lr, a.scale_lr) == (cfg.lr, cfg.lora_lr, cfg.scale_lr)
    b = calibrate_all.build_parser().parse_args([])
    assert (b.lr, b.lora_lr, b.scale_lr) == (cfg.lr, cfg.lora_lr, cfg.scale_lr)


def _branchy_layer(layer: nn.Module, bits: int, x: torch.Tensor) -> QuantLayer:
    """A QuantLayer with an SVD branch, a trained-looking LoRA branch and ``bits``-bit quantizers."""
    from quantface.quant import act_qparams, weight_scale

    g = torch.Generator().manual_seed(0)
    q = QuantLayer(layer)
    q.split_lowrank(2)
    q.add_lora(2, g)
    with torch.no_grad():
        q.lora.up.normal_(generator=g).mul_(0.05)
    q.set_weight_quant(bits, weight_scale(q.weight, bits))
    q.set_act_quant(bits, *act_qparams(x, bits))
    return q


def _snr_db(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(10 * torch.log10((ref**2).mean() / ((y - ref) ** 2).mean()))


@pytest.mark.parametrize("make_layer, shape", [(lambda: nn.Conv2d(16, 12, 3, padding=1), (2, 16, 12, 12)),
                                               (lambda: nn.Linear(24, 20), (2, 9, 24))], ids=["conv", "linear"])
def test_fold_lowrank_drops_the_branch_and_keeps_the_output_close(make_layer, shape):
    """At W8A8 the folded layer's output is within 1.5 % (of its max) of the unfolded frozen layer's,
    and its SNR against the float layer (same branches, no quantizers) is at least 38 dB and at most
    2 dB below the unfolded one's (measured: 41.1 vs 41.9 dB conv, 41.9 vs 43.2 linear): the branch
    now sees the 8-bit input, and the whole weight, whose range the branch no longer takes, is
    re-rounded on a coarser grid. The folded layer is a plain 8-bit layer. (The layer is built here,
    seeded: built at collection, its weights depended on what other test modules drew first.)"""
    torch.manual_seed(0)
    layer = make_layer()
    x = torch.randn(shape)
    with torch.no_grad():
        exact = _branchy_layer(layer, 8, x)
        exact.set_weight_quant(None, None)
        exact.set_act_quant(None, None, None)
        ref = exact(x)
        kept = _branchy_layer(layer, 8, x)
        kept.freeze()
        before = kept(x)
        folded = _branchy_layer(layer, 8, x)
        folded.fold_lowrank()
        folded.freeze()
        after = folded(x)
    assert kept.lowrank is not None
    assert folded.lowrank is None and folded.lora is None and folded.weight_codes.dtype == torch.int8
    codes = folded.weight_codes.float()
    assert torch.equal(folded.weight_dq, codes * folded.w_scale.view(-1, *[1] * (codes.dim() - 1)))
    assert _rel_err(after, before) <= 0.015
    assert _snr_db(after, ref) >= max(38.0, _snr_db(before, ref) - 2.0)


def test_fold_lowrank_needs_an_unfrozen_quantized_layer():
    layer = QuantLayer(nn.Conv2d(4, 4, 1))
    with pytest.raises(ConfigError, match="only an unfrozen layer with quantized weights"):
        layer.fold_lowrank()


@pytest.mark.parametrize("bits, policy, folded", [("W8A8", "auto", True), ("W8A8", "never", False),
                                                  ("W4A8", "auto", False), ("W4A4", "always", True)])
def test_fold_policy_and_a8_choice_shape_the_recipe(bits, policy, folded, image_folder, tmp_path, tiny_weights,
                                                    tiny_model):
    """The fold policy decides which recipes keep a branch (folded ones hold no low-rank tensor and
    still reproduce bit for bit); QuantFace folds smoothing and rotation unless weights and activations
    both have 8 or more bits."""
    result = calibrate(_cfg(image_folder, tmp_path, "quantface", weights=tiny_weights, bits=bits,
                            fold_lowrank=policy))
    layers = json.loads((result.recipe / "recipe.json").read_text())["layers"]
    ranks = [e["lowrank_rank"] for e in layers.values()]
    lowrank_tensors = [k for k in load_file(str(result.recipe / "recipe.safetensors")) if "lowrank" in k]
    if folded:
        assert set(ranks) == {0} and not lowrank_tensors
    else:
        assert min(ranks) > 0 and lowrank_tensors
    balanced = min(parse_bits(bits)) < 8
    assert any(e["hadamard"] for e in layers.values()) == balanced
    assert all((e["smoothing"] is not None) == balanced for e in layers.values())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(apply_recipe(tiny_model, result.recipe)(x), result.model(x))


def test_quantface_balances_unless_weights_and_activations_have_8_bits():
    """With 8-bit weights and 8-bit (or 16-bit) activations QuantFace folds no smoothing and no rotation
    (their online nodes' cost, docs/calibration_notes.md); otherwise it does, as the committed recipes
    (W4A4, W4A6, W6A6, OSDFace's W4A8) were made; the baselines do what their papers do at every width."""
    spec = get_method("quantface")
    assert [spec.balances(8, a) for a in (4, 6, 7, 8, 16)] == [True] * 3 + [False] * 2
    assert [spec.balances(w, 8) for w in (2, 4, 6, 7)] == [True] * 4 and spec.balances(4, 16)
    assert all(get_method(m).balances(8, 8) for m in METHODS if m != "quantface")


def test_reduce_range_gives_w8_layers_7_bit_codes(image_folder, tmp_path, tiny_weights, tiny_model):
    """``--reduce-range``: the W8A8 recipe's weights are 7-bit codes in [-64, 63] (what x86 CPUs without
    VNNI run exactly), everything else as in W8A8: the branch folded, no smoothing or rotation, and the
    recipe reproduces bit for bit; the full-range recipe does use codes outside [-64, 63]."""
    full = calibrate(_cfg(image_folder, tmp_path / "full", "quantface", weights=tiny_weights, bits="W8A8"))
    reduced = calibrate(_cfg(image_folder, tmp_path / "reduced", "quantface", weights=tiny_weights, bits="W8A8",
                             reduce_range=True))

    def codes(result):
        tensors = load_file(str(result.recipe / "recipe.safetensors"))
        return [t for k, t in tensors.items() if k.endswith("weight_codes")]

    assert codes(reduced) and max(int(c.abs().max()) for c in codes(full)) > 64
    assert all(int(c.min()) >= -64 and int(c.max()) <= 63 for c in codes(reduced))
    layers = json.loads((reduced.recipe / "recipe.json").read_text())["layers"]
    assert {e["weight_bits"] for e in layers.values()} == {7}
    assert {e["lowrank_rank"] for e in layers.values()} == {0}
    assert not any(e["hadamard"] or e["smoothing"] is not None for e in layers.values())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(apply_recipe(tiny_model, reduced.recipe)(x), reduced.model(x))


@pytest.mark.parametrize("given, message", [
    (dict(bits="W4A8", reduce_range=True), "--reduce-range applies to 8-bit weights; --bits W4A8 has 4-bit ones"),
    (dict(bits="W8A8", reduce_range=True, target="qnn", mp_budget=0.5), "--reduce-range is for x86 CPUs without VNNI"),
])
def test_reduce_range_is_refused_where_it_does_not_apply(given, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        CalibConfig(**given)


def test_16_bit_activation_ranges_cover_every_observed_value(image_folder, tmp_path, tiny_weights, tiny_model):
    """At 16 bits an activation range is the observed min/max (quant.act_range_method): a clipping search
    on a sample of positions would clip the extremes it never saw. At 8 bits QuantFace's MSE search still
    shrinks ranges (some layer's range ends inside its observed values by more than the half step the
    rounded zero point may shift the grid)."""
    from quantface.calibration.run import prepare
    from quantface.calibration.sensitivity import QParams
    from quantface.quant import act_range_method

    assert act_range_method(16, "mse") == "minmax" and act_range_method(8, "mse") == "mse"
    assert act_range_method(4, "minmax") == "minmax"
    clipped = {}
    for bits in ("W8A16", "W8A8"):
        cfg = _cfg(image_folder, tmp_path / bits, "quantface", weights=tiny_weights, bits=bits, steps=0)
        model = copy.deepcopy(tiny_model)
        data = CalibData.build(tiny_model, cfg, 32)
        observed = QParams()
        layers = prepare(model, data, cfg, get_method("quantface"), observed)
        samples = observed.samples
        a_bits = parse_bits(bits)[1]
        clipped[bits] = []
        for name, layer in layers.items():
            s, z = float(layer.a_scale), float(layer.a_zero_point)
            lo, hi = (0 - z) * s, (2 ** a_bits - 1 - z) * s
            seen = samples[name]
            slack = 0.5 * s * (1 + 1e-5)  # the rounded zero point shifts the grid by up to half a step
            if not (lo <= float(seen.min()) + slack and float(seen.max()) <= hi + slack):
                clipped[bits].append(name)
    assert clipped["W8A16"] == []
    assert clipped["W8A8"]
