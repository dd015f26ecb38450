"""The recipe: the single contract between calibration and export.

A recipe folder holds ``recipe.json`` (human readable: per layer its weight / activation bits, the
activation scale and zero point, granularity, Hadamard order and seed, smoothing and low-rank tensor
references, the range of the quantized product's output on calibration images — optional, recipes
written before it have none) and ``recipe.safetensors`` (the tensors: integer weight codes — 4-bit
codes packed two per byte —, per-channel weight scales, smoothing vectors, merged low-rank factors).

``load_recipe`` + ``apply_recipe`` rebuild the calibrated fake-quant model from the FP model bit for
bit: weights are rebuilt from codes × scales, Hadamard matrices from (order, seed). A recipe made
for other weights, a wrong version, missing tensors or a truncated file give one ``RecipeError``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from quantface.calibration.layers import LowRank, QuantLayer, quant_layers, wrap_layers
from quantface import __version__
from quantface.data import atomic_write_bytes
from quantface.errors import QuantFaceError
from quantface.hadamard import random_hadamard
from quantface.quant import pack_int4, unpack_int4

FORMAT = "quantface-recipe"
VERSION = 1
JSON_NAME, TENSORS_NAME = "recipe.json", "recipe.safetensors"


class RecipeError(QuantFaceError):
    """A recipe folder is missing, malformed, or made for another model."""


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the FP model's parameters (names, shapes, bytes): ties a recipe to its weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Recipe:
    meta: dict
    tensors: dict[str, torch.Tensor]
    path: Path

    @property
    def layers(self) -> dict[str, dict]:
        return self.meta["layers"]

    @property
    def sha256(self) -> str:
        return self.meta["tensors_sha256"]


def _compact_float(t: torch.Tensor) -> torch.Tensor:
    """float16 when that holds ``t`` exactly (frozen low-rank factors), else float32 as it is."""
    t = t.detach().contiguous()
    half = t.half()
    return half if torch.equal(half.float(), t) else t


def _layer_entry(layer: QuantLayer, tensors: dict[str, torch.Tensor]) -> dict:
    n = layer.name
    entry: dict = {
        "kind": "conv" if layer.conv_args is not None else "linear",
        "weight_shape": list(layer.weight.shape),
        "weight_bits": layer.weight_bits,
        "act_bits": layer.act_bits,
        "weight_granularity": "per_channel", "weight_axis": 0, "weight_symmetric": True,
        "act_granularity": "per_tensor", "act_symmetric": False,
        "act_scale": None, "act_zero_point": None,
        "smoothing": None, "hadamard": None, "lowrank_rank": 0,
        "output_range": None if layer.output_range is None else [float(v) for v in layer.output_range],
    }
    if layer.weight_bits is not None:
        codes = layer.weight_codes
        if layer.weight_bits <= 4:
            tensors[f"{n}.weight_codes_int4"] = pack_int4(codes)
            entry["weight_codes"] = f"{n}.weight_codes_int4"
        else:
            tensors[f"{n}.weight_codes"] = codes.contiguous()
            entry["weight_codes"] = f"{n}.weight_codes"
        tensors[f"{n}.weight_scale"] = layer.w_scale.detach().float().contiguous()
        entry["weight_scale"] = f"{n}.weight_scale"
    if layer.act_bits is not None:
        entry["act_scale"] = float(layer.a_scale.detach().float())
        entry["act_zero_point"] = int(layer.a_zero_point)
    if layer.smooth is not None:
        tensors[f"{n}.smooth"] = layer.smooth.float().contiguous()
        entry["smoothing"] = f"{n}.smooth"
    if layer.rotation is not None:
        entry["hadamard"] = {"order": layer.in_channels, "seed": layer.rotation_seed, "convention": "x' = x·diag(d)·H/√n"}
    if layer.lowrank is not None:
        tensors[f"{n}.lowrank_down"] = _compact_float(layer.lowrank.down)
        tensors[f"{n}.lowrank_up"] = _compact_float(layer.lowrank.up)
        entry["lowrank_rank"] = layer.lowrank.rank
        entry["lowrank"] = {"down": f"{n}.lowrank_down", "up": f"{n}.lowrank_up"}
    return entry


def _meta_text(meta: dict) -> str:
    return json.dumps(meta, indent=1) + "\n"


def rewrite_meta(recipe: Recipe, layers: dict[str, dict]) -> None:
    """Replace the per-layer entries of ``recipe``'s ``recipe.json`` (atomically), keeping its
    tensors file and everything else; for fields added to recipes after they were written."""
    meta = {**recipe.meta, "layers": layers}
    atomic_write_bytes(recipe.path / JSON_NAME, _meta_text(meta).encode())
    recipe.meta = meta


def save_recipe(qmodel: torch.nn.Module, fp_model: torch.nn.Module, cfg, spec, stats: dict,
                sections: dict | None = None, files: dict[str, bytes] | None = None) -> Path:
    """Write the frozen ``qmodel`` as a recipe folder ``cfg.out`` (atomically: temp folder, rename).
    ``sections`` are extra top-level entries of recipe.json (e.g. "allocation"); ``files`` extra
    files (name → bytes) written into the folder with it (e.g. plots)."""
    sections, files = sections or {}, files or {}
    reserved = {"format", "version", "tool_version", "model", "method", "method_summary", "bits", "calibration",
                "stats", "tensors_file", "tensors_sha256", "layers"}
    if set(sections) & reserved or {JSON_NAME, TENSORS_NAME} & set(files) or any("/" in f for f in files):
        raise ValueError("save_recipe: extra sections / files must not replace the recipe's own entries")
    layers = quant_layers(qmodel)
    if any(l.lora is not None or (l.weight_bits is not None and not l.frozen) for l in layers.values()):
        raise RuntimeError("save_recipe needs frozen layers (QuantLayer.freeze) with merged branches")
    tensors: dict[str, torch.Tensor] = {}
    entries = {name: _layer_entry(layer, tensors) for name, layer in layers.items()}
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(tmp / TENSORS_NAME))
        for fname, blob in files.items():
            (tmp / fname).write_bytes(blob)
        digest = hashlib.sha256((tmp / TENSORS_NAME).read_bytes()).hexdigest()
        meta = {
            "format": FORMAT, "version": VERSION, "tool_version": __version__,
            "model": {"name": cfg.model, "config": json.loads(fp_model.config.to_json()),
                      "weights_sha256": weights_fingerprint(fp_model)},
            "method": spec.name, "method_summary": spec.summary, "bits": cfg.bits,
            "calibration": cfg.to_dict(), "stats": stats,
            "tensors_file": TENSORS_NAME, "tensors_sha256": digest,
            **sections,
            "layers": entries,
        }
        (tmp / JSON_NAME).write_text(_meta_text(meta))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    js, st = path / JSON_NAME, path / TENSORS_NAME
    if not js.is_file():
        raise RecipeError(f"recipe folder {path} has no {JSON_NAME}")
    try:
        meta = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe file {js} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RecipeError(f"{js} is not a QuantFace recipe")
    if meta.get("version") != VERSION:
        raise RecipeError(f"recipe {js} has version {meta.get('version')}; this tool reads version {VERSION}")
    if not st.is_file():
        raise RecipeError(f"recipe folder {path} has no {TENSORS_NAME}")
    if hashlib.sha256(st.read_bytes()).hexdigest() != meta.get("tensors_sha256"):
        raise RecipeError(f"recipe tensors {st} are truncated or modified (sha256 mismatch)")
    try:
        tensors = load_file(str(st))
    except (SafetensorError, OSError) as exc:
        raise RecipeError(f"recipe tensors {st} are unreadable ({exc})") from None
    for name, entry in meta["layers"].items():
        keys = [entry.get("weight_codes"), entry.get("weight_scale"), entry.get("smoothing"),
                *(entry.get("lowrank") or {}).values()]
        missing = [k for k in keys if k is not None and k not in tensors]
        if missing:
            raise RecipeError(f"recipe {path} lacks tensor {missing[0]} of layer {name}")
    return Recipe(meta, tensors, path)


def apply_recipe(fp_model: torch.nn.Module, recipe: Recipe | str | Path, requant_outputs: bool = False
                 ) -> torch.nn.Module:
    """A fake-quant copy of ``fp_model`` as the recipe describes it (``fp_model`` is not modified).
    ``requant_outputs`` also simulates the ``ort-cpu`` export's 8-bit requantized convolution
    outputs (``QuantLayer.quantized_product``), for comparing with that graph."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if recipe.meta["model"]["weights_sha256"] != weights_fingerprint(fp_model):
        raise RecipeError(f"recipe {recipe.path} was calibrated for other model weights "
                          f"({recipe.meta['model']['name']}); it does not fit this model")
    model = copy.deepcopy(fp_model)
    names = set(recipe.layers)
    layers = wrap_layers(model, include=lambda n: n in names)
    if set(layers) != names:
        raise RecipeError(f"recipe {recipe.path} names layers this model lacks: {sorted(names - set(layers))[:3]}")
    t = recipe.tensors
    for name, layer in layers.items():
        e = recipe.layers[name]
        if list(layer.weight.shape) != e["weight_shape"]:
            raise RecipeError(f"recipe {recipe.path}: layer {name} has weight shape {e['weight_shape']}, "
                              f"the model {list(layer.weight.shape)}")
        if e["smoothing"]:
            layer.smooth = t[e["smoothing"]].clone()
        if e["hadamard"]:
            h = e["hadamard"]
            layer.rotation = torch.from_numpy(random_hadamard(h["order"], h["seed"])).float()
            layer.rotation_seed = h["seed"]
        if e["lowrank_rank"]:
            layer.lowrank = LowRank(t[e["lowrank"]["down"]].float(), t[e["lowrank"]["up"]].float(), layer.conv_args)
        if e["weight_bits"] is not None:
            layer.weight_bits = e["weight_bits"]
            codes = t[e["weight_codes"]]
            if e["weight_codes"].endswith("_int4"):
                codes = unpack_int4(codes, layer.weight.numel())
            layer.load_frozen(codes.reshape(layer.weight.shape), t[e["weight_scale"]])
        if e.get("output_range") is not None:
            layer.output_range = tuple(float(v) for v in e["output_range"])
        layer.requant_output = requant_outputs
        if e["act_bits"] is not None:
            layer.set_act_quant(e["act_bits"], torch.tensor(e["act_scale"], dtype=torch.float32),
                                torch.tensor(float(e["act_zero_point"])))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
