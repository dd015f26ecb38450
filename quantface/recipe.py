"""The recipe: the single contract between calibration and export, typed, read and written here only.

A recipe folder holds ``recipe.json`` (human readable: the model it was calibrated for, the method,
the calibration config and stats, and per layer its weight / activation bits, granularity, the
activation scale and zero point, the Hadamard order, seed and a reference to its stored signs, the
smoothing and low-rank tensor references, and the range of the quantized product's output on
calibration images) and ``recipe.safetensors`` (integer weight codes — 4-bit codes packed two per
byte —, per-channel weight scales, Hadamard signs, smoothing vectors, merged low-rank factors (float16,
or int8 codes and per-row scales when calibrated with ``--branch-bits``), and
the layer's bias where calibration changed it: QuantVSR's learned bias alignment folded in; a layer
without a ``bias`` entry uses the FP model's).

``read_recipe`` returns a :class:`Recipe` of :class:`LayerRecipe` entries with every field checked
once, here: a missing or mistyped field is one ``RecipeError`` naming the file, the layer and the
field. Calibration builds a ``Recipe`` from its frozen model (``quantface.calibration.recipe``);
export lowers from a ``Recipe`` and the FP model alone (``quantface.export``).

Format versions: 2 stores each rotation's random signs (int8 ±1) as a tensor, so a recipe never
depends on a random number generator. Version 1 (recipes written before) stored only the seed; its
reader regenerates the signs with ``numpy.random.default_rng(seed)`` — a stream NumPy does not
promise to keep — so ``tools/upgrade_recipe.py`` rewrites a version-1 recipe as version 2 (the
committed recipes are upgraded; their other tensors are byte for byte the same).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from quantface import __version__
from quantface.errors import QuantFaceError
from quantface.hadamard import random_signs, signed_hadamard
from quantface.paths import atomic_write_bytes, file_mode, replace_dir, temp_dir
from quantface.quant import check_bits, dequantize, factor_codes, pack_int4, qrange, unpack_int4

FORMAT = "quantface-recipe"
VERSION = 2
READABLE_VERSIONS = (1, 2)
JSON_NAME, TENSORS_NAME = "recipe.json", "recipe.safetensors"
CONVENTION = "x' = x·diag(d)·H/√n"
KINDS = ("conv", "linear")
# The only granularities this tool writes, and so the only ones it reads (a recipe from a future
# tool with, e.g., per-group weights is refused instead of silently misread).
WEIGHT_LAYOUT = {"weight_granularity": "per_channel", "weight_axis": 0, "weight_symmetric": True}
ACT_LAYOUT = {"act_granularity": "per_tensor", "act_symmetric": False}
_TOP_LEVEL = ("format", "version", "tool_version", "model", "method", "method_summary", "bits", "calibration",
              "stats", "tensors_file", "tensors_sha256", "layers", "timestep")


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


@dataclass(frozen=True)
class HadamardSpec:
    """An online randomized Hadamard rotation Q = diag(d)·H/√n (``quantface.hadamard.block_hadamard``)."""

    signs: torch.Tensor  # int8 ±1, shape (order,)
    seed: int | None = None  # how the signs were drawn (provenance only: the signs are what counts)

    @classmethod
    def draw(cls, order: int, seed: int) -> "HadamardSpec":
        return cls(torch.from_numpy(random_signs(order, seed)), seed)

    @property
    def order(self) -> int:
        return int(self.signs.numel())

    def matrix(self) -> torch.Tensor:
        """Q as float32 (``quantface.hadamard.signed_hadamard``)."""
        return torch.from_numpy(signed_hadamard(self.signs.numpy())).float()


@dataclass
class LayerRecipe:
    """One quantized Conv2d / Linear: what calibration froze and what export lowers."""

    kind: str  # "conv" | "linear"
    weight_shape: tuple[int, ...]
    weight_bits: int | None = None
    act_bits: int | None = None
    act_scale: float | None = None  # per-tensor activation scale (float32 value)
    act_zero_point: int | None = None
    weight_codes: torch.Tensor | None = None  # int8 codes of the (transformed, residual) weight, weight_shape
    weight_scale: torch.Tensor | None = None  # float32, (out,)
    smooth: torch.Tensor | None = None  # float32, (in,): x ↦ x / s online
    hadamard: HadamardSpec | None = None
    lowrank_down: torch.Tensor | None = None  # (r, in, kh, kw) or (r, in); float16 or float32 as stored
    lowrank_up: torch.Tensor | None = None  # (out, r, 1, 1) or (out, r)
    # Factors on an integer grid (``--branch-bits``, ``quantface.quant.factor_quantize``): lowrank_down /
    # lowrank_up are then float32 codes · scale, one scale per row of down (r,) and of up (out,); the file
    # stores the int8 codes and the scales. None: float16-exact (or float32) factors, as stored.
    lowrank_bits: int | None = None
    lowrank_down_scale: torch.Tensor | None = None
    lowrank_up_scale: torch.Tensor | None = None
    output_range: tuple[float, float] | None = None  # of the quantized product, on calibration images
    # float32, (out,): the bias calibration gave the layer (QuantVSR's LBA folded into it); None: the FP model's
    bias: torch.Tensor | None = None

    @property
    def lowrank_rank(self) -> int:
        return 0 if self.lowrank_down is None else int(self.lowrank_down.shape[0])

    def lowrank_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 codes of integer-grid factors (``lowrank_bits``): codes · scale is each factor, bit for bit."""
        if self.lowrank_bits is None or self.lowrank_down is None:
            raise ValueError("this layer has no integer-grid low-rank factors")
        return (factor_codes(self.lowrank_down, self.lowrank_down_scale, self.lowrank_bits),
                factor_codes(self.lowrank_up, self.lowrank_up_scale, self.lowrank_bits))


@dataclass
class Recipe:
    model: dict  # {"name", "config", "weights_sha256"}
    method: str
    bits: str
    layers: dict[str, LayerRecipe]
    method_summary: str = ""
    calibration: dict = field(default_factory=dict)  # the CalibConfig that made it (as JSON)
    stats: dict = field(default_factory=dict)
    sections: dict = field(default_factory=dict)  # extra top-level entries, e.g. "allocation"
    # The UNet's timestep where calibration tuned it (QArtSR's TRQ; float32 value), else None: the
    # model's own. ``apply_recipe`` and the exporter run the model at it (models.timesteps.set_timestep).
    timestep: float | None = None
    tool_version: str = __version__
    version: int = VERSION  # the format version it was read from
    tensors_sha256: str = ""
    path: Path | None = None

    @property
    def sha256(self) -> str:
        return self.tensors_sha256

    def check_fits(self, fp_model: torch.nn.Module) -> None:
        """RecipeError unless this recipe was calibrated for ``fp_model``'s weights and names layers of
        the right kind and shape."""
        if self.model.get("weights_sha256") != weights_fingerprint(fp_model):
            raise RecipeError(f"recipe {self.path} was calibrated for other model weights "
                              f"({self.model.get('name')}); it does not fit this model")
        modules = dict(fp_model.named_modules())
        for name, layer in self.layers.items():
            m = modules.get(name)
            kind = "conv" if isinstance(m, torch.nn.Conv2d) else "linear" if isinstance(m, torch.nn.Linear) else None
            if kind is None:
                raise RecipeError(f"recipe {self.path} names layer {name}, which this model lacks or which is not "
                                  "a Conv2d / Linear")
            if kind != layer.kind or tuple(m.weight.shape) != layer.weight_shape:
                raise RecipeError(f"recipe {self.path}: layer {name} is a {layer.kind} of weight shape "
                                  f"{list(layer.weight_shape)}, the model's a {kind} of {list(m.weight.shape)}")


# ----------------------------------------------------------------------------- writing
def _layer_entry(name: str, layer: LayerRecipe, tensors: dict[str, torch.Tensor]) -> dict:
    entry: dict = {
        "kind": layer.kind, "weight_shape": list(layer.weight_shape),
        "weight_bits": layer.weight_bits, "act_bits": layer.act_bits,
        **WEIGHT_LAYOUT, **ACT_LAYOUT,
        "act_scale": layer.act_scale, "act_zero_point": layer.act_zero_point,
        "smoothing": None, "hadamard": None, "lowrank_rank": layer.lowrank_rank,
    }
    if layer.weight_bits is not None:
        key = f"{name}.weight_codes_int4" if layer.weight_bits <= 4 else f"{name}.weight_codes"
        codes = layer.weight_codes.to(torch.int8).contiguous()
        tensors[key] = pack_int4(codes) if layer.weight_bits <= 4 else codes
        tensors[f"{name}.weight_scale"] = layer.weight_scale.float().contiguous()
        entry["weight_codes"], entry["weight_scale"] = key, f"{name}.weight_scale"
    if layer.smooth is not None:
        tensors[f"{name}.smooth"] = layer.smooth.float().contiguous()
        entry["smoothing"] = f"{name}.smooth"
    if layer.hadamard is not None:
        tensors[f"{name}.hadamard_signs"] = layer.hadamard.signs.to(torch.int8).contiguous()
        entry["hadamard"] = {"order": layer.hadamard.order, "seed": layer.hadamard.seed,
                             "signs": f"{name}.hadamard_signs", "convention": CONVENTION}
    if layer.lowrank_down is not None and layer.lowrank_bits is not None:
        down, up = layer.lowrank_codes()
        keys = {"down": f"{name}.lowrank_down_codes", "up": f"{name}.lowrank_up_codes",
                "down_scale": f"{name}.lowrank_down_scale", "up_scale": f"{name}.lowrank_up_scale"}
        for key, t in zip(keys.values(), (down, up, layer.lowrank_down_scale, layer.lowrank_up_scale)):
            tensors[key] = t.contiguous() if t.dtype == torch.int8 else t.float().contiguous()
        entry["lowrank"] = {"bits": layer.lowrank_bits, **keys}
    elif layer.lowrank_down is not None:
        tensors[f"{name}.lowrank_down"] = layer.lowrank_down.contiguous()
        tensors[f"{name}.lowrank_up"] = layer.lowrank_up.contiguous()
        entry["lowrank"] = {"down": f"{name}.lowrank_down", "up": f"{name}.lowrank_up"}
    entry["output_range"] = None if layer.output_range is None else [float(v) for v in layer.output_range]
    if layer.bias is not None:  # only then: every other recipe's entries stay as they were
        tensors[f"{name}.bias"] = layer.bias.float().contiguous()
        entry["bias"] = f"{name}.bias"
    return entry


def _meta(recipe: Recipe, entries: dict) -> dict:
    clash = set(recipe.sections) & set(_TOP_LEVEL)
    if clash:
        raise ValueError(f"recipe sections must not replace the recipe's own entries: {sorted(clash)}")
    return {"format": FORMAT, "version": VERSION, "tool_version": recipe.tool_version, "model": recipe.model,
            "method": recipe.method, "method_summary": recipe.method_summary, "bits": recipe.bits,
            "calibration": recipe.calibration, "stats": recipe.stats, "tensors_file": TENSORS_NAME,
            "tensors_sha256": recipe.tensors_sha256, **recipe.sections,
            **({} if recipe.timestep is None else {"timestep": float(recipe.timestep)}), "layers": entries}


def _meta_text(meta: dict) -> str:
    return json.dumps(meta, indent=1) + "\n"


def write_recipe(recipe: Recipe, out: str | Path, files: dict[str, bytes] | None = None) -> Path:
    """Write ``recipe`` as the folder ``out`` (atomically: a temp folder beside it, then a rename);
    ``files`` are extra files (name → bytes) written into the folder with it (e.g. plots). Sets
    ``recipe.tensors_sha256`` and ``recipe.path``."""
    files = files or {}
    if {JSON_NAME, TENSORS_NAME} & set(files) or any("/" in f or f.startswith(".") for f in files):
        raise ValueError("write_recipe: extra files must not replace the recipe's own files")
    tensors: dict[str, torch.Tensor] = {}
    entries = {name: _layer_entry(name, layer, tensors) for name, layer in recipe.layers.items()}
    out = Path(out)
    tmp = temp_dir(out)  # .<name>.tmp-*, beside out; stale ones from a killed run removed
    try:
        save_file(tensors, str(tmp / TENSORS_NAME))
        for fname, blob in files.items():
            (tmp / fname).write_bytes(blob)
        recipe.tensors_sha256 = hashlib.sha256((tmp / TENSORS_NAME).read_bytes()).hexdigest()
        (tmp / JSON_NAME).write_text(_meta_text(_meta(recipe, entries)))
        for f in tmp.iterdir():
            os.chmod(f, file_mode())
        replace_dir(tmp, out)  # the old recipe is deleted only once the new one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    recipe.path, recipe.version = out, VERSION
    return out


def rewrite_layers(recipe: Recipe, **fields: dict) -> None:
    """Set per-layer fields (field name → {layer: value}) and rewrite the recipe's ``recipe.json``
    atomically, keeping its tensors file (for fields recorded after a recipe was written, e.g.
    ``output_range``; the fields must not be tensors)."""
    for fname, values in fields.items():
        for name, layer in recipe.layers.items():
            setattr(layer, fname, values.get(name))
    tensors: dict[str, torch.Tensor] = {}
    entries = {name: _layer_entry(name, layer, tensors) for name, layer in recipe.layers.items()}
    atomic_write_bytes(recipe.path / JSON_NAME, _meta_text(_meta(recipe, entries)).encode())


# ----------------------------------------------------------------------------- reading
class _Fields:
    """Typed access to one JSON object of a recipe: a wrong or missing field is one RecipeError."""

    def __init__(self, obj, where: str, js: Path):
        if not isinstance(obj, dict):
            raise RecipeError(f"recipe file {js}: {where} is not a JSON object")
        self.obj, self.where, self.js = obj, where, js

    def get(self, key: str, types: type | tuple, optional: bool = False):
        if key not in self.obj:
            if optional:
                return None
            raise RecipeError(f"recipe file {self.js}: {self.where} has no field {key!r}")
        value = self.obj[key]
        if value is None and optional:
            return None
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _as_tuple(types)):
            raise RecipeError(f"recipe file {self.js}: field {key!r} of {self.where} has the wrong type "
                              f"({type(value).__name__})")
        return value


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _tensor(tensors: dict, key: str, f: _Fields, dtype: torch.dtype | tuple, shape: tuple | None) -> torch.Tensor:
    if key not in tensors:
        raise RecipeError(f"recipe {f.js.parent} lacks tensor {key} of {f.where}")
    t = tensors[key]
    if t.dtype not in _as_tuple(dtype) or (shape is not None and tuple(t.shape) != tuple(shape)):
        raise RecipeError(f"recipe {f.js.parent}: tensor {key} of {f.where} has dtype {t.dtype} and shape "
                          f"{list(t.shape)}, expected {list(shape) if shape else 'another'} ({dtype})")
    return t


def _read_layer(name: str, e: dict, tensors: dict, js: Path, version: int) -> LayerRecipe:
    f = _Fields(e, f"layer {name}", js)
    kind = f.get("kind", str)
    if kind not in KINDS:
        raise RecipeError(f"recipe file {js}: layer {name} has kind {kind!r}, not one of {', '.join(KINDS)}")
    shape = f.get("weight_shape", list)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape) \
            or len(shape) != (4 if kind == "conv" else 2):
        raise RecipeError(f"recipe file {js}: layer {name} has an invalid weight_shape {shape!r}")
    out_ch, in_ch = shape[0], shape[1]
    layer = LayerRecipe(kind=kind, weight_shape=tuple(shape))
    for key, want in {**WEIGHT_LAYOUT, **ACT_LAYOUT}.items():
        got = e.get(key, want)
        if got != want:
            raise RecipeError(f"recipe file {js}: layer {name} has {key} {got!r}; this tool reads only {want!r}")
    wb, ab = f.get("weight_bits", int, optional=True), f.get("act_bits", int, optional=True)
    try:
        if wb is not None:
            check_bits(wb)
        if ab is not None:
            check_bits(ab, wide=True)
    except QuantFaceError as exc:
        raise RecipeError(f"recipe file {js}: layer {name}: {exc}") from None
    layer.weight_bits, layer.act_bits = wb, ab
    if ab is not None:
        layer.act_scale = float(f.get("act_scale", (int, float)))
        layer.act_zero_point = f.get("act_zero_point", int)
        # (a scale learned below zero is legal: the quantizer uses max(scale, EPS), see quantface.quant)
        if not math.isfinite(layer.act_scale) or not 0 <= layer.act_zero_point < (1 << ab):
            raise RecipeError(f"recipe file {js}: layer {name} has an invalid activation scale or zero point")
    if wb is not None:
        key = f.get("weight_codes", str)
        n = int(np.prod(shape))
        if key.endswith("_int4"):
            packed = _tensor(tensors, key, f, (torch.uint8, torch.int8), ((n + 1) // 2,))
            codes = unpack_int4(packed, n).reshape(shape)
        else:
            codes = _tensor(tensors, key, f, torch.int8, tuple(shape))
        layer.weight_codes = codes.to(torch.int8)
        layer.weight_scale = _tensor(tensors, f.get("weight_scale", str), f, torch.float32, (out_ch,))
    smooth = f.get("smoothing", str, optional=True)
    if smooth is not None:
        layer.smooth = _tensor(tensors, smooth, f, torch.float32, (in_ch,))
    h = f.get("hadamard", dict, optional=True)
    if h is not None:
        hf = _Fields(h, f"the hadamard entry of layer {name}", js)
        order, seed = hf.get("order", int), hf.get("seed", int, optional=True)
        if order != in_ch:
            raise RecipeError(f"recipe file {js}: layer {name} has a rotation of order {order} for {in_ch} channels")
        if version >= 2:
            signs = _tensor(tensors, hf.get("signs", str), f, torch.int8, (order,))
            if not bool(((signs == 1) | (signs == -1)).all()):
                raise RecipeError(f"recipe {js.parent}: the rotation signs of layer {name} are not all ±1")
        elif seed is None:
            raise RecipeError(f"recipe file {js}: the version-1 rotation of layer {name} has no seed")
        else:
            signs = torch.from_numpy(random_signs(order, seed))  # see the module docstring
        layer.hadamard = HadamardSpec(signs.clone(), seed)
    lr = f.get("lowrank", dict, optional=True)
    rank = f.get("lowrank_rank", int, optional=True) or 0
    if lr is not None:
        lf = _Fields(lr, f"the lowrank entry of layer {name}", js)
        bits = lf.get("bits", int, optional=True)
        floats = (torch.float16, torch.float32) if bits is None else torch.int8
        down = _tensor(tensors, lf.get("down", str), f, floats, None)
        up = _tensor(tensors, lf.get("up", str), f, floats, None)
        geo = tuple(shape[1:])
        want_down = (rank, *geo)
        want_up = (out_ch, rank, 1, 1) if kind == "conv" else (out_ch, rank)
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            raise RecipeError(f"recipe {js.parent}: the low-rank factors of layer {name} do not have rank {rank} "
                              f"and the layer's shape")
        if bits is not None:
            if not 2 <= bits <= 8:
                raise RecipeError(f"recipe file {js}: layer {name} has low-rank bits {bits}, not 2 to 8")
            qmin, qmax = qrange(bits, signed=True)
            if int(down.min()) < qmin or int(down.max()) > qmax or int(up.min()) < qmin or int(up.max()) > qmax:
                raise RecipeError(f"recipe {js.parent}: the low-rank codes of layer {name} exceed {bits} bits")
            ds = _tensor(tensors, lf.get("down_scale", str), f, torch.float32, (rank,))
            us = _tensor(tensors, lf.get("up_scale", str), f, torch.float32, (out_ch,))
            layer.lowrank_bits, layer.lowrank_down_scale, layer.lowrank_up_scale = bits, ds, us
            down = dequantize(down.float(), ds.view(-1, *[1] * (down.dim() - 1)), 0.0)
            up = dequantize(up.float(), us.view(-1, *[1] * (up.dim() - 1)), 0.0)
        layer.lowrank_down, layer.lowrank_up = down, up
    elif rank:
        raise RecipeError(f"recipe file {js}: layer {name} has lowrank_rank {rank} but no lowrank entry")
    rng = f.get("output_range", list, optional=True)
    if rng is not None:
        if len(rng) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng):
            raise RecipeError(f"recipe file {js}: layer {name} has an invalid output_range {rng!r}")
        layer.output_range = (float(rng[0]), float(rng[1]))
    bias = f.get("bias", str, optional=True)
    if bias is not None:
        layer.bias = _tensor(tensors, bias, f, torch.float32, (out_ch,))
    return layer


def read_recipe_meta(path: str | Path) -> dict:
    """The JSON of a recipe folder, its format and version checked, without reading its tensors; RecipeError
    on anything wrong."""
    path = Path(path)
    js = path / JSON_NAME
    if not path.is_dir():
        raise RecipeError(f"recipe folder {path} does not exist" if not path.exists()
                          else f"recipe {path} is not a folder (a recipe is a folder with {JSON_NAME})")
    if not js.is_file():
        raise RecipeError(f"recipe folder {path} has no {JSON_NAME}")
    try:
        meta = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe file {js} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RecipeError(f"{js} is not a QuantFace recipe")
    version = meta.get("version")
    if version not in READABLE_VERSIONS:
        raise RecipeError(f"recipe {js} has version {version}; this tool reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))}")
    return meta


def read_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe folder (see the module docstring); RecipeError on anything wrong."""
    path = Path(path)
    js, st = path / JSON_NAME, path / TENSORS_NAME
    meta = read_recipe_meta(path)
    version = meta["version"]
    top = _Fields(meta, "the recipe", js)
    model = _Fields(top.get("model", dict), "the model entry", js)
    model.get("weights_sha256", str)
    layers_meta = top.get("layers", dict)
    digest = top.get("tensors_sha256", str)
    if not st.is_file():
        raise RecipeError(f"recipe folder {path} has no {TENSORS_NAME}")
    blob = st.read_bytes()
    if hashlib.sha256(blob).hexdigest() != digest:
        raise RecipeError(f"recipe tensors {st} are truncated or modified (sha256 mismatch)")
    try:
        tensors = load_file(str(st))
    except (SafetensorError, OSError) as exc:
        raise RecipeError(f"recipe tensors {st} are unreadable ({exc})") from None
    layers = {name: _read_layer(name, e, tensors, js, version) for name, e in layers_meta.items()}
    timestep = top.get("timestep", (int, float), optional=True)
    steps = (model.obj.get("config") or {}).get("num_train_timesteps")
    if timestep is not None and not (math.isfinite(timestep) and 0 <= timestep
                                     and (not isinstance(steps, int) or timestep < steps)):
        raise RecipeError(f"recipe file {js} has timestep {timestep!r}, outside the model's schedule")
    return Recipe(
        model=model.obj, method=top.get("method", str), bits=top.get("bits", str), layers=layers,
        method_summary=top.get("method_summary", str, optional=True) or "",
        calibration=top.get("calibration", dict, optional=True) or {},
        stats=top.get("stats", dict, optional=True) or {},
        sections={k: v for k, v in meta.items() if k not in _TOP_LEVEL},
        tool_version=str(meta.get("tool_version", "")), version=version, tensors_sha256=digest, path=path,
        timestep=None if timestep is None else float(timestep))


def upgrade_recipe(path: str | Path) -> bool:
    """Rewrite a version-1 recipe folder as version 2 (its rotation signs stored; every other tensor,
    field and file kept); False if it already is version 2."""
    recipe = read_recipe(path)
    if recipe.version == VERSION:
        return False
    folder = Path(path)
    files = {f.name: f.read_bytes() for f in sorted(folder.iterdir())
             if f.is_file() and f.name not in (JSON_NAME, TENSORS_NAME) and not f.name.startswith(".")}
    write_recipe(recipe, folder, files)
    return True
