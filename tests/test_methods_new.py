"""Q-Diffusion (block reconstruction with AdaRound) and QArtSR (TRQ, RPQ, end to end) on tiny seeded models.

* AdaRound's hardened codes are integers on the grid, each the floor or the ceiling of w/s (the only two
  choices AdaRound has), not all the nearest ones, and the recipe reloads bit for bit;
* TRQ's tuned timestep round-trips through the recipe exactly, and the exported graph is the fake-quant
  model at the tuned timestep: its folded timestep constants are PyTorch's at the tuned t, not at 399,
  and every quantized layer matches PyTorch's (``tests.parity``);
* RPQ and the end-to-end stage leave every original weight (and the FP model) bit for bit untouched.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from quantface.calibration import CalibConfig, calibrate, get_method
from quantface.calibration.layers import quant_layers
from quantface.calibration.qartsr import full_precision, module_groups, qartsr_calibrate
from quantface.calibration.recipe import apply_recipe
from quantface.calibration.run import CalibData, prepare
from quantface.errors import ConfigError
from quantface.export import ExportConfig, export_onnx
from quantface.export.save import read_metadata
from quantface.metrics import output_psnr
from quantface.models.timesteps import model_timestep, set_timestep
from quantface.onnx_runtime import cpu_session
from quantface.quant import (adaround_codes, adaround_fake_quantize, adaround_init, adaround_regularizer, qrange,
                             rectified_sigmoid)
from quantface.recipe import RecipeError, read_recipe
from tests.parity import layer_parity

SIZE = 32


def _cfg(image_folder, tmp_path, method, weights, **kw):
    return CalibConfig(method=method, bits="W4A4", data=str(image_folder), out=str(tmp_path / "recipes" / method),
                       weights=str(weights), size=SIZE, stat_images=4, rank=2, batch_size=2, **kw)


def _input(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------ AdaRound
def test_adaround_starts_at_the_weight_and_hardens_to_floor_or_ceiling():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, 3, 3, generator=g)
    s = (w.abs().flatten(1).amax(1) / 7).view(-1, 1, 1, 1)
    v = adaround_init(w, s)
    soft = adaround_fake_quantize(w, s, v, -8, 7)
    assert torch.allclose(soft, w, atol=1e-5 * float(s.max()))  # h(V) = w/s − ⌊w/s⌋: no error yet
    codes = adaround_codes(w, s, v, -8, 7)
    nearest = torch.clamp(torch.round(w / s), -8, 7)
    rest = w / s - torch.floor(w / s)
    clear = (rest - 0.5).abs() > 1e-3  # away from ties, the initial hard choice is round to nearest
    assert torch.equal(codes[clear], nearest[clear])
    assert torch.equal(codes, torch.round(codes)) and codes.min() >= -8 and codes.max() <= 7
    # The regulariser is zero exactly where every h(V) is 0 or 1.
    assert float(adaround_regularizer(torch.full((4,), 10.0), 2.0)) == 0.0
    assert float(adaround_regularizer(torch.zeros(4), 2.0)) > 0.0
    assert float(rectified_sigmoid(torch.tensor(-10.0))) == 0.0 and float(rectified_sigmoid(torch.tensor(10.0))) == 1.0


def test_qdiffusion_codes_are_adaround_choices_and_the_recipe_reloads_bit_for_bit(image_folder, tmp_path,
                                                                                   tiny_weights, tiny_model):
    cfg = _cfg(image_folder, tmp_path, "qdiffusion", tiny_weights, steps=20)
    result = calibrate(cfg)
    # What the layers looked like before reconstruction (prepare is deterministic given the config).
    data = CalibData.build(tiny_model, cfg, SIZE)
    before = copy.deepcopy(tiny_model)
    prepared = prepare(before, data, cfg, get_method("qdiffusion"))
    recipe = read_recipe(result.recipe)
    qmin, qmax = qrange(4, signed=True)
    moved = 0
    for name, layer in prepared.items():
        codes = recipe.layers[name].weight_codes.float()
        s = layer.w_scale.detach().view(-1, *([1] * (layer.weight.dim() - 1)))
        v = layer.weight / s
        lo, hi = torch.clamp(torch.floor(v), qmin, qmax), torch.clamp(torch.floor(v) + 1, qmin, qmax)
        assert codes.min() >= qmin and codes.max() <= qmax
        assert bool(((codes == lo) | (codes == hi)).all()), name
        assert torch.equal(recipe.layers[name].weight_scale, layer.w_scale.detach())  # AdaRound keeps the scales
        assert recipe.layers[name].lowrank_rank == 0 and recipe.layers[name].smooth is None
        moved += int((codes != torch.clamp(torch.round(v), qmin, qmax)).sum())
    assert moved > 0  # the rounding was learned, not round to nearest
    assert recipe.timestep is None and "timestep" not in json.loads((result.recipe / "recipe.json").read_text())
    x = _input()
    with torch.no_grad():
        assert torch.equal(apply_recipe(tiny_model, result.recipe)(x), result.model(x))


def test_hardened_layer_freezes_to_its_adaround_codes(tiny_model, image_folder, tmp_path):
    from quantface.calibration.layers import QuantLayer
    from quantface.quant import weight_scale

    layer = QuantLayer(copy.deepcopy(tiny_model.encoder.conv_out), "encoder.conv_out")
    layer.set_weight_quant(4, weight_scale(layer.weight, 4))
    layer.init_rounding()
    with torch.no_grad():
        layer.rounding.normal_(generator=torch.Generator().manual_seed(0))
    want = adaround_codes(layer.weight, layer.w_scale.detach().view(-1, 1, 1, 1), layer.rounding, -8, 7)
    layer.freeze()
    assert layer.rounding is None and torch.equal(layer.weight_codes.float(), want)


# ------------------------------------------------------------------------------------------ QArtSR
@pytest.fixture(scope="module")
def qartsr_case(tmp_path_factory):
    """A QArtSR recipe of the tiny model whose timestep moved far from 399 (a large timestep lr)."""
    from tests.conftest import write_tiny_assets

    root = tmp_path_factory.mktemp("qartsr")
    weights, faces = write_tiny_assets(root, SIZE)
    cfg = _cfg(faces, root, "qartsr", weights, steps=2, trq_steps=4, e2e_steps=4, timestep_lr=25.0)
    return cfg, calibrate(cfg)


def test_trq_timestep_round_trips_through_the_recipe(qartsr_case, tiny_model):
    cfg, result = qartsr_case
    tuned = model_timestep(result.model)
    assert abs(tuned - 399) > 20  # it was trained (8 Adam steps of up to 25)
    recipe = read_recipe(result.recipe)
    assert recipe.timestep == tuned  # float32 value, exactly
    assert recipe.stats["trq_steps"] == 4 and recipe.stats["e2e_steps"] == 4 and recipe.stats["steps"] == 2
    assert json.loads((result.recipe / "recipe.json").read_text())["timestep"] == tuned
    reloaded = apply_recipe(tiny_model, recipe)
    assert model_timestep(reloaded) == tuned and model_timestep(tiny_model) == 399  # the FP model keeps its own
    x = _input()
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))


def _temb_constant(graph: onnx.ModelProto, block: str, channels: int) -> np.ndarray:
    """The folded constant the graph adds to ``block``'s conv1 output: its timestep projection."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type == "Add" and node.name == f"/{block.replace('.', '/', 1)}/Add":  # h + temb_proj(temb)
            for i in node.input:
                if i in inits and inits[i].size == channels:
                    return inits[i].reshape(-1)
    raise AssertionError(f"no folded timestep constant in {block}")


def test_exported_graph_is_the_model_at_the_tuned_timestep(qartsr_case, tiny_model, tmp_path):
    cfg, result = qartsr_case
    out = tmp_path / "qartsr.onnx"
    export_onnx(ExportConfig(weights=cfg.weights, recipe=str(result.recipe), profile="reference", out=str(out)))
    graph = onnx.load(str(out))
    tuned = model_timestep(result.model)
    assert json.loads(read_metadata(graph)["timestep"]) == tuned
    assert not {"Sin", "Cos"} & {n.op_type for n in graph.graph.node}  # the timestep path is folded
    # The folded constant is the timestep projection PyTorch computes at the tuned t, not at 399.
    qmodel = apply_recipe(tiny_model, result.recipe)
    at_399 = copy.deepcopy(qmodel)
    set_timestep(at_399, 399.0)

    def temb_proj(model):
        got = {}
        block = model.unet.down_blocks[0]
        h = block.temb_proj.register_forward_hook(lambda m, a, y: got.setdefault("y", y))
        with torch.no_grad():
            model(_input(1))
        h.remove()
        return got["y"].reshape(-1).numpy()

    folded = _temb_constant(graph, "unet.down_blocks.0", qmodel.unet.down_blocks[0].conv1.out_channels)
    want, old = temb_proj(qmodel), temb_proj(at_399)
    assert np.abs(folded - want).max() <= 1e-5 * np.abs(want).max()
    assert np.abs(folded - old).max() > 100 * np.abs(folded - want).max()
    # Every quantized layer left in the graph computes what the PyTorch layer does (tests.parity).
    x = _input().numpy()
    for i in range(len(x)):
        layers = layer_parity(out, qmodel, x[i:i + 1])
        assert layers and all(p.rel_l2 <= 1e-4 and p.exact_fraction >= 0.99 for p in layers.values())
    session = cpu_session(out, 1)
    got = np.concatenate([session.run(None, {session.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(len(x))])
    with torch.no_grad():
        ref = qmodel(torch.from_numpy(x)).numpy()
        ref_399 = at_399(torch.from_numpy(x)).numpy()
    print(f"graph vs tuned model {output_psnr(got, ref):.1f} dB, vs the model at 399 {output_psnr(got, ref_399):.1f} dB")
    assert output_psnr(got, ref) > output_psnr(got, ref_399)


def test_rpq_and_end_to_end_leave_the_original_weights_untouched(image_folder, tmp_path, tiny_weights, tiny_model):
    cfg = _cfg(image_folder, tmp_path, "qartsr", tiny_weights, steps=3, trq_steps=2, e2e_steps=2)
    spec = get_method("qartsr")
    data = CalibData.build(tiny_model, cfg, SIZE)
    fp_state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    qmodel = copy.deepcopy(tiny_model)
    layers = prepare(qmodel, data, cfg, spec)
    weights = {n: (l.weight.clone(), None if l.bias is None else l.bias.clone(), l.smooth.clone())
               for n, l in layers.items()}
    scales = {n: (l.w_scale.detach().clone(), l.a_scale.detach().clone()) for n, l in layers.items()}
    qartsr_calibrate(tiny_model, qmodel, layers, data, cfg, spec, cfg.steps)
    for name, layer in layers.items():
        w, b, s = weights[name]
        assert torch.equal(layer.weight, w) and torch.equal(layer.smooth, s), name
        assert (b is None and layer.bias is None) or torch.equal(layer.bias, b), name
    assert all(torch.equal(v, fp_state[k]) for k, v in tiny_model.state_dict().items())
    changed = sum(not torch.equal(l.w_scale.detach(), scales[n][0]) or not torch.equal(l.a_scale.detach(), scales[n][1])
                  for n, l in layers.items())
    assert changed == len(layers)  # every layer's step sizes were trained


def test_rpq_groups_and_full_precision_upstream(tiny_model, image_folder, tmp_path, tiny_weights):
    cfg = _cfg(image_folder, tmp_path, "qartsr", tiny_weights)
    data = CalibData.build(tiny_model, cfg, SIZE)
    qmodel = copy.deepcopy(tiny_model)
    layers = prepare(qmodel, data, cfg, get_method("qartsr"))
    order = list(layers)
    groups = module_groups(order, layers, 5)
    assert len(groups) == 5 and [n for g in groups for n in g] == order
    x = _input()
    with torch.no_grad():
        fp = tiny_model(x)
        quantized = qmodel(x)
        with full_precision(list(layers.values())):
            assert (qmodel(x) - fp).abs().max() <= 1e-4  # quantizers off: the FP model (smoothing folded)
        assert torch.equal(qmodel(x), quantized)  # and back on
    assert all(l.weight_bits == 4 and l.act_bits == 4 for l in quant_layers(qmodel).values())


# ------------------------------------------------------------------------------------------ errors
def test_recipe_timestep_outside_the_schedule_is_one_error(qartsr_case, tmp_path):
    import hashlib
    import shutil

    _, result = qartsr_case
    for bad in (-1.0, 1000.0, "399"):
        folder = tmp_path / f"bad_{bad}"
        shutil.copytree(result.recipe, folder)
        meta = json.loads((folder / "recipe.json").read_text())
        meta["timestep"] = bad
        (folder / "recipe.json").write_text(json.dumps(meta))
        with pytest.raises(RecipeError, match="timestep"):
            read_recipe(folder)
        assert hashlib.sha256((folder / "recipe.safetensors").read_bytes()).hexdigest() == meta["tensors_sha256"]


@pytest.mark.parametrize("field,value", [("trq_steps", -1), ("e2e_steps", 1.5), ("timestep_lr", 0.0)])
def test_qartsr_options_are_checked(field, value):
    with pytest.raises(ConfigError, match=field.replace("_", "-")):
        CalibConfig(method="qartsr", **{field: value})


def test_set_timestep_needs_a_model_with_one():
    with pytest.raises(ConfigError, match="no fixed timestep"):
        set_timestep(torch.nn.Linear(2, 2), 300.0)
