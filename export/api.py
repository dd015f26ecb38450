"""Public API of the exporter: ``export_onnx(ExportConfig) -> ExportResult`` and ``OnnxBackend``.

``build_onnx`` composes the passes, in order::

    trace_to_onnx            torch.onnx.export (TorchScript, or dynamo) of the FP model, one placeholder
                             per recipe layer
    group_norm_to_instance_norm
                             GroupNormalization → Reshape / InstanceNormalization / Reshape / Mul / Add
    remove_identities        drop Identity nodes (torch emits one per shared parameter)
    constants_to_initializers
    lower_quant_layers       placeholders → Smooth / Hadamard / Clip / Q / DQ / Conv|MatMul / low-rank
    fold_constants           Shape nodes and the input-independent subgraph (timestep path, shape
                             arithmetic) → initializers
    annotate_shapes          static shapes of every value recorded in value_info
    integer_linears          (ort-cpu) quantized Linear layers → Q → com.microsoft.MatMulIntegerToFloat
    compact                  value names shortened, value_info dropped (reference, integer units)
    add_metadata             per-layer bits, profile, recipe sha256, tool version, ...

and ``export_onnx`` checks (``onnx.checker``, full check) and writes the result atomically. With the
dynamo exporter, a graph whose weights reach 2 GB keeps them on disk from the trace on: ``export_onnx`` gives ``build_onnx`` a
work folder next to the output, the trace's large initializers stay references into it, and
``save_atomic`` copies them into the output's data file.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import torch

from quantface.export.config import ExportConfig
from quantface.export.errors import ExportError
from quantface.export.fold import annotate_shapes, constants_to_initializers, fold_constants, remove_identities
from quantface.export.graph import compact, op_counts
from quantface.export.layer import export_layers
from quantface.export.lower import integer_linears, lower_quant_layers, requantized
from quantface.export.integer_units import (layer_norms_as_instance_norms, lower_points, plain_integer, store_constants,
                                           through_data_movement, widen_norm_inputs)
from quantface.export.norms import group_norm_to_instance_norm
from quantface.export.profiles import get_profile
from quantface.export.save import add_metadata, read_metadata, save_atomic
from quantface.export.trace import INPUT_NAME, trace_to_onnx
from quantface import __version__
from quantface.errors import ConfigError
from quantface.models import load_model
from quantface.models.timesteps import model_timestep, set_timestep
from quantface.onnx_runtime import cpu_session, u8s8_saturates
from quantface.points import recipe_points
from quantface.recipe import read_recipe


@dataclass
class ExportResult:
    path: Path
    bytes: int  # on disk, external data included
    node_counts: dict[str, int]  # main-graph nodes by op type (custom ops as "domain::Op")
    constant_layers: list[str] = field(default_factory=list)  # quantized layers folded into constants


def _quantized_layer_present(model: onnx.ModelProto, name: str) -> bool:
    nodes = {n.name for n in model.graph.node}
    return any(f"{name}_{op}" in nodes for op in ("Conv", "MatMul", "MatMulIntegerToFloat"))


def build_onnx(cfg: ExportConfig, work: Path | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """The ONNX model ``cfg`` describes (not yet checked or written), and the quantized layers folded
    into constants because they do not depend on the input (the timestep path). In memory, except,
    given a ``work`` folder that outlives the model, weights of 2 GB or more: references into ``work``."""
    profile = get_profile(cfg.profile)
    fp_model = load_model(cfg.model, cfg.weights)
    config = fp_model.config
    size = cfg.size or config.working_size
    if size % config.size_multiple:
        raise ConfigError(f"--size {size} is not a multiple of {config.size_multiple}, which the model needs")
    recipe = read_recipe(cfg.recipe) if cfg.recipe else None
    layers = export_layers(recipe, fp_model) if recipe else {}  # RecipeError if it does not fit
    # The qnn profile with a recipe that records quantizer points and quantizes every layer as a plain integer
    # product (no FP layer, no online smoothing / rotation, no float low-rank branch): every float op an
    # integer node unit.
    ranges = recipe_points(recipe, fp_model) if recipe is not None and profile.integer_units else {}
    weight_layers = {n for n, m in fp_model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    units = (bool(ranges) and set(layers) == weight_layers
             and all(plain_integer(layer) for layer in layers.values()))
    if recipe is not None and recipe.timestep is not None:
        # A tuned timestep (TRQ): the traced model runs at it, and fold_constants turns the timestep path
        # (embedding, time MLP, its quantized layers) into constants computed from it.
        set_timestep(fp_model, recipe.timestep)
    tuned = {} if recipe is None or recipe.timestep is None else {"timestep": model_timestep(fp_model)}
    passes = [
        group_norm_to_instance_norm,
        remove_identities,
        constants_to_initializers,
        partial(lower_quant_layers, layers=layers, profile=profile, rotation=cfg.rotation, units=units),
        *([partial(lower_points, ranges=ranges)] if units else []),
        partial(fold_constants, base_dir=work),
        annotate_shapes,
        partial(integer_linears, layers=layers, profile=profile),
        *([layer_norms_as_instance_norms, through_data_movement, widen_norm_inputs, store_constants, annotate_shapes]
          if units else []),
        *([compact] if units or profile.name == "reference" else []),
    ]
    model = trace_to_onnx(fp_model, cfg.batch, size, list(layers), work=work, exporter=cfg.exporter, points=units)
    del fp_model
    for run in passes:
        model = run(model)
    constant = sorted(n for n in layers if not _quantized_layer_present(model, n))
    entries: dict[str, object] = {
        "tool_version": __version__,
        "model": cfg.model,
        "profile": profile.name,
        "rotation": cfg.rotation,
        "input": {"name": INPUT_NAME, "shape": [cfg.batch, config.image_channels, size, size], "range": [-1, 1]},
        "recipe_sha256": recipe.sha256 if recipe else "",
        "method": recipe.method if recipe else "fp32",
        "layer_bits": {n: {"weight_bits": e.weight_bits, "act_bits": e.act_bits}
                       for n, e in (recipe.layers.items() if recipe else [])},
        "constant_layers": constant,
        # Layers whose conv output this graph requantizes to 8 bits (QLinearConv): what a PyTorch
        # model compared with it simulates (``apply_recipe(..., requant_outputs=True)``).
        "requantized_layers": sorted(n for n, l in layers.items()
                                     if n not in constant and requantized(l, profile, units)),
        # Every float op an integer node unit (export.integer_units): the PyTorch model compared with it
        # simulates the recipe's quantizer points (``apply_recipe(..., points=True)``).
        "integer_units": units,
        **tuned,  # the tuned timestep the graph's constant timestep path was computed from
    }
    model = add_metadata(model, entries)
    model.producer_name, model.producer_version = "quantface", __version__
    return model, constant


def export_onnx(cfg: ExportConfig) -> ExportResult:
    """Export ``cfg`` to ``cfg.out`` (atomically; see ``export.save``)."""
    cfg.check()  # before tracing: the recipe folder exists and --out can be written
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".work", dir=out.parent) as work:
        model, constant = build_onnx(cfg, Path(work))
        written = save_atomic(model, out, base_dir=work)
    return ExportResult(out, written, op_counts(model), constant)


def _profile(path: Path) -> str | None:
    """The export profile recorded in a graph's metadata; None if it records none or cannot be parsed
    (ONNX Runtime then says why it cannot load it)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError and the like: the session's own error is the clearer one
        return None
    return read_metadata(model).get("profile")


class OnnxBackend:
    """Runs an exported model with ONNX Runtime's CPU execution provider, as a pipeline backend:
    (N, 3, H, W) float32 in [-1, 1] → the model's output. A model exported for a static batch b is
    run b images at a time (the last chunk padded by repeating its last image).

    ``exact_qdq`` keeps ORT's QDQ → integer-kernel fusions off (``quantface.onnx_runtime``). None, the
    default, turns it on for a graph exported with the ``qnn`` profile on a CPU whose fused U8S8 kernels
    saturate (x86 without VNNI): that graph is meant for the HTP, which computes its full-range W8A8
    units exactly, so its CPU reference must too (on such a CPU, ORT's fusions cost a tiny model 12 dB
    against the simulation). Every other graph runs as ORT runs it by default: on that CPU a full-range
    W8A8 ``ort-cpu`` graph is meant to be saturated by the runtime it ships on, and says so (``--reduce-range``).
    ``self.exact_qdq`` tells which way the session was made."""

    def __init__(self, path: str | Path, threads: int | None = None, profile_prefix: str | None = None,
                 exact_qdq: bool | None = None):
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"ONNX model {path} does not exist")
        if exact_qdq is None:
            exact_qdq = u8s8_saturates() and _profile(path) == "qnn"
        try:
            self.session = cpu_session(path, threads, profile_prefix=profile_prefix, exact_qdq=exact_qdq)
        except Exception as exc:  # onnxruntime raises its own pybind error types for unreadable models
            raise ExportError(f"ONNX model {path} cannot be loaded by ONNX Runtime: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        self.exact_qdq = exact_qdq
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = list(inp.shape)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.path = path

    def exact_qdq_note(self) -> str | None:
        """The one line a command prints when it runs this graph with ORT's QDQ fusions off; None otherwise."""
        if not self.exact_qdq:
            return None
        return (f"note: ONNX Runtime runs {self.path} with its QDQ fusions off (this CPU's U8S8 integer kernels "
                "saturate full-range 8-bit codes; the HTP, which a qnn graph is for, does not)")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        expected = self.input_shape[1:]
        if batch.ndim != 4 or any(isinstance(e, int) and e != g for e, g in zip(expected, batch.shape[1:])):
            raise ConfigError(f"the ONNX model takes input of shape (N, {', '.join(map(str, expected))}), "
                              f"got {tuple(batch.shape)}")
        b = self.input_shape[0]
        if not isinstance(b, int) or len(batch) == b:
            return self.session.run(None, {self.input_name: batch})[0]
        outs = []
        for i in range(0, len(batch), b):
            chunk = batch[i:i + b]
            n = len(chunk)
            if n < b:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])
            outs.append(self.session.run(None, {self.input_name: chunk})[0][:n])
        return np.concatenate(outs)
