"""Calibration's side of the recipe (``quantface.recipe`` holds the format): a ``Recipe`` from the
frozen fake-quant model, and the fake-quant model back from a ``Recipe``.

``apply_recipe`` rebuilds the calibrated fake-quant model from the FP model bit for bit: weights from
codes × scales, rotations from their stored signs, the merged low-rank branch from its factors, the
calibrated bias (QuantVSR's folded LBA) and the tuned timestep (TRQ) where the recipe has them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from quantface.calibration.layers import LowRank, QuantLayer, quant_layers, wrap_layers
from quantface.models.timesteps import set_timestep
from quantface.points import QuantConstant, QuantPoint, recipe_points
from quantface.points import install as install_points
from quantface.recipe import LayerRecipe, Recipe, RecipeError, read_recipe, weights_fingerprint, write_recipe


def _compact_float(t: torch.Tensor) -> torch.Tensor:
    """float16 when that holds ``t`` exactly (frozen low-rank factors), else float32 as it is."""
    t = t.detach().contiguous()
    half = t.half()
    return half if torch.equal(half.float(), t) else t


def layer_recipe(layer: QuantLayer) -> LayerRecipe:
    """What a frozen ``QuantLayer`` holds, as the recipe stores it."""
    entry = LayerRecipe(kind="conv" if layer.conv_args is not None else "linear",
                        weight_shape=tuple(layer.weight.shape), weight_bits=layer.weight_bits,
                        act_bits=layer.act_bits, smooth=layer.smooth, hadamard=layer.hadamard,
                        output_range=layer.output_range)
    if layer.weight_bits is not None:
        entry.weight_codes = layer.weight_codes.to(torch.int8)
        entry.weight_scale = layer.w_scale.detach().float()
    if layer.act_bits is not None:
        entry.act_scale = float(layer.a_scale.detach().float())
        entry.act_zero_point = int(layer.a_zero_point)
    if layer.lowrank is not None and layer.lowrank.bits is not None:  # on its integer grid (--branch-bits)
        entry.lowrank_down = layer.lowrank.down.detach().float().contiguous()
        entry.lowrank_up = layer.lowrank.up.detach().float().contiguous()
        entry.lowrank_bits = layer.lowrank.bits
        entry.lowrank_down_scale, entry.lowrank_up_scale = layer.lowrank.down_scale, layer.lowrank.up_scale
    elif layer.lowrank is not None:
        entry.lowrank_down = _compact_float(layer.lowrank.down)
        entry.lowrank_up = _compact_float(layer.lowrank.up)
    if layer.bias_calibrated:
        entry.bias = layer.bias.detach().float()
    return entry


def save_recipe(qmodel: torch.nn.Module, fp_model: torch.nn.Module, cfg, spec, stats: dict,
                sections: dict | None = None, files: dict[str, bytes] | None = None,
                timestep: float | None = None) -> Path:
    """Write the frozen ``qmodel`` as the recipe folder ``cfg.out`` (``quantface.recipe.write_recipe``).
    ``sections`` are extra top-level entries of recipe.json (e.g. "allocation"); ``files`` extra
    files written into the folder with it (e.g. plots); ``timestep`` the tuned timestep (TRQ), if any."""
    layers = quant_layers(qmodel)
    if any(l.lora is not None or l.lba is not None or (l.weight_bits is not None and not l.frozen)
           for l in layers.values()):
        raise RuntimeError("save_recipe needs frozen layers (QuantLayer.freeze) with merged branches and folded biases")
    import json

    recipe = Recipe(model={"name": cfg.model, "config": json.loads(fp_model.config.to_json()),
                           "weights_sha256": weights_fingerprint(fp_model)},
                    method=spec.name, method_summary=spec.summary, bits=cfg.bits,
                    layers={name: layer_recipe(layer) for name, layer in layers.items()},
                    calibration=cfg.to_dict(), stats=stats, sections=sections or {}, timestep=timestep)
    return write_recipe(recipe, cfg.out, files)


def apply_recipe(fp_model: torch.nn.Module, recipe: Recipe | str | Path, requant_outputs: bool = False,
                 points: bool = False) -> torch.nn.Module:
    """A fake-quant copy of ``fp_model`` as the recipe describes it (``fp_model`` is not modified).
    ``requant_outputs`` also simulates the ``ort-cpu`` export's 8-bit requantized convolution
    outputs (``QuantLayer.quantized_product``), for comparing with that graph. ``points`` simulates the
    ``qnn`` profile's integer node units instead: every requantizable product requantized (Linear layers
    and 16-bit inputs included) and every quantizer point of the recipe's ``points`` section rounded
    (``quantface.points``), for comparing with a ``qnn`` graph exported from a recipe with points."""
    if not isinstance(recipe, Recipe):
        recipe = read_recipe(recipe)
    recipe.check_fits(fp_model)
    model = copy.deepcopy(fp_model)
    names = set(recipe.layers)
    layers = wrap_layers(model, include=lambda n: n in names)
    if set(layers) != names:  # check_fits found every name; this would be a bug
        raise RecipeError(f"recipe {recipe.path} names layers this model lacks: {sorted(names - set(layers))[:3]}")
    for name, layer in layers.items():
        e = recipe.layers[name]
        if e.smooth is not None:
            layer.smooth = e.smooth.clone()
        if e.hadamard is not None:
            layer.rotation = e.hadamard.matrix()
            layer.hadamard = e.hadamard
        if e.lowrank_down is not None:
            layer.lowrank = LowRank(e.lowrank_down.float(), e.lowrank_up.float(), layer.conv_args)
            if e.lowrank_bits is not None:
                layer.lowrank.bits = e.lowrank_bits
                layer.lowrank.down_scale, layer.lowrank.up_scale = e.lowrank_down_scale, e.lowrank_up_scale
        if e.bias is not None:
            layer.bias, layer.bias_calibrated = e.bias.clone(), True
        if e.weight_bits is not None:
            layer.weight_bits = e.weight_bits
            layer.load_frozen(e.weight_codes, e.weight_scale)
        layer.output_range = e.output_range
        layer.requant_output = requant_outputs or points
        layer.requant_wide = points
        if e.act_bits is not None:
            layer.set_act_quant(e.act_bits, torch.tensor(e.act_scale, dtype=torch.float32),
                                torch.tensor(float(e.act_zero_point)))
    if points:
        install_quant_points(model, recipe)
    if recipe.timestep is not None:
        set_timestep(model, recipe.timestep)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def install_quant_points(model: torch.nn.Module, recipe: Recipe) -> None:
    """Every quantizer point of ``model`` fake-quantizes over the recipe's range, every constant point
    rounds as the export stores it (``quantface.points``). RecipeError for a recipe without points."""
    ranges = recipe_points(recipe, model)
    if not ranges:
        raise RecipeError(f"recipe {recipe.path} records no quantizer points (calibrate again, or run "
                          "tools/add_points.py on it)")
    install_points(model, lambda name: QuantPoint(*ranges[name]), lambda name: QuantConstant())
