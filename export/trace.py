"""PyTorch → ONNX: the one place that calls ``torch.onnx.export``, with either of its exporters.

``dynamo`` (the default): the supported exporter, ``torch.onnx.export(..., dynamo=True)``
(``torch.export`` captures the FP model, onnxscript translates it), directly at opset 21 (INT4 / UINT4
Q/DQ), IR version 10, with large weights written to disk rather than into one protobuf (below), so
graphs of 2 GB and more export.

``torchscript``: ``dynamo=False``, deprecated by torch (its warning is shown), kept to compare with.
It names nodes after the module hierarchy, exports ``GroupNorm`` as Reshape → InstanceNormalization →
Reshape → Mul → Add, and lets an ``autograd.Function`` (``_MarkerFn``) emit the placeholder node
through ``symbolic``; the graph is moved from opset 20 (where it stops) to 21 by
``onnx.version_converter``. It builds the graph in one in-memory protobuf, so it cannot export 2 GB of
weights or more.

Both write the same graphs: the same op counts, every quantized layer's nodes by name and in order
(``GroupNormalization`` is decomposed by ``export.norms``), and the same outputs (max |Δ| 0 on the
committed W4A4 recipe in all three profiles). What used to differ — a constant of the timestep path
that one exporter folded with torch and the other left to ONNX Runtime — is now computed by torch in
the model (``models.reference.SinusoidalTimesteps``).

Quantized layers (dynamo): every Conv2d / Linear the recipe quantizes is swapped for a ``_Marker`` that calls
the custom op ``quantface_export::quant_layer(x, layer)`` (``torch.library.custom_op``; its fake
implementation gives the layer's output shape, so ``torch.export`` traces everything downstream, and
its eager one runs the FP layer). ``custom_translation_table`` translates it to one placeholder node
``quantface_export::QuantLayer(x)`` carrying the layer name as attribute ``layer``; the FP layer's
weights never reach the graph. ``export.lower`` then replaces every placeholder by the layer's QDQ
subgraph built from the recipe — the exporter never sees calibration's fake-quant layers, and no node
has to be recognised by pattern or by name.

Optimizer: the exporter's (onnxscript's), run here with one restriction: it folds no floating-point
arithmetic (``_exact_folds_only``). It would evaluate the input-independent float ops — the timestep
path's ``Exp`` / ``Cos`` / ``Sin``, the time MLP — with ONNX's NumPy reference implementation, whose last bits differ from what ONNX
Runtime computes, and a last-bit change in front of a 4-bit quantizer can move a code. Those ops are
left to ``export.fold``, which evaluates them with ONNX Runtime; the optimizer still folds shapes and
pure data movement (exact anywhere), cancels transposes and removes dead code.

Node names: the exporter's own (``node_conv2d_3``) are replaced by the module path of the op, as
``/encoder/blocks.0/norm1/GroupNormalization`` (the layout the TorchScript exporter used), taken from
the node's ``pkg.torch.onnx.name_scopes`` metadata; the per-node metadata (FX node, stack trace with
local file paths) is then dropped, so it ships in no model.

Weights: a graph whose initializers reach ``export.save.EXTERNAL_DATA_THRESHOLD`` (2 GB) is written by
``ONNXProgram.save`` straight from the torch tensors into ``<work>/trace.onnx.data`` and read back
without that data: its large initializers stay references into that file (``export.save`` copies them
into the final data file), so no protobuf of 2 GB or more is ever built.
"""

from __future__ import annotations

import ast
import io
import logging
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import onnx
import onnxscript
import torch
from onnx import external_data_helper, version_converter
from onnx.defs import OpSchema
from onnxscript import ir
from torch import nn

from quantface.export import save
from quantface.export.errors import ExportError
from quantface.points import ActiveConstant, ActivePoint, constant_points
from quantface.points import install as install_points
from quantface.points import points as model_points

INPUT_NAME, OUTPUT_NAME = "lq", "restored"
MARKER_DOMAIN, MARKER_OP = "quantface_export", "QuantLayer"
POINT_OP = "QuantPoint"  # a quantizer point's placeholder (quantface.points), lowered to Q → DQ
TORCH_OPSET, TARGET_OPSET = 20, 21  # the TorchScript exporter stops at opset 20
TARGET_IR = 10  # the IR version of opset 21: INT4 / UINT4 tensors, function overloads
INLINE_BYTES = 1 << 16  # initializers of a trace read back from disk up to this size are loaded into memory

# The FP modules the markers of the export in progress stand for, by layer name (the custom op's
# eager and fake implementations look them up; they are not submodules, so torch.export lifts none
# of their weights).
_LAYERS: dict[str, nn.Module] = {}


def _output_shape(module: nn.Module, shape: torch.Size) -> tuple[int, ...]:
    if isinstance(module, nn.Linear):
        return (*shape[:-1], module.out_features)
    if not isinstance(module, nn.Conv2d):
        raise ExportError(f"only Conv2d and Linear layers can be exported quantized, not {type(module).__name__}")
    if module.padding == "same":
        return (shape[0], module.out_channels, *shape[2:])
    padding = (0, 0) if module.padding == "valid" else module.padding
    spatial = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in
               zip(shape[2:], module.kernel_size, module.stride, padding, module.dilation)]
    return (shape[0], module.out_channels, *spatial)


@torch.library.custom_op("quantface_export::quant_layer", mutates_args=())
def quant_layer(x: torch.Tensor, layer: str) -> torch.Tensor:
    """The placeholder of quantized layer ``layer``: computes the FP layer."""
    return _LAYERS[layer](x)


@quant_layer.register_fake
def _quant_layer_fake(x: torch.Tensor, layer: str) -> torch.Tensor:
    return x.new_empty(_output_shape(_LAYERS[layer], x.shape))


_PLACEHOLDER = onnxscript.values.Op(
    onnxscript.values.Opset(MARKER_DOMAIN, 1), MARKER_OP,
    OpSchema(MARKER_OP, MARKER_DOMAIN, 1, inputs=[OpSchema.FormalParameter("x", "T")],
             outputs=[OpSchema.FormalParameter("y", "T")],
             type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(double)"], "")],
             attributes=[OpSchema.Attribute("layer", OpSchema.AttrType.STRING, "the recipe's layer name")]))


def _translate_quant_layer(x, layer: str):  # type: ignore[no-untyped-def]
    """``custom_translation_table`` entry: one ``quantface_export::QuantLayer(x, layer=...)`` node."""
    return _PLACEHOLDER(x, layer=layer)


@torch.library.custom_op("quantface_export::quant_point", mutates_args=())
def quant_point(x: torch.Tensor, point: str) -> torch.Tensor:
    """The placeholder of quantizer point ``point``: the identity."""
    return x.clone()


@quant_point.register_fake
def _quant_point_fake(x: torch.Tensor, point: str) -> torch.Tensor:
    return torch.empty_like(x)


_POINT_PLACEHOLDER = onnxscript.values.Op(
    onnxscript.values.Opset(MARKER_DOMAIN, 1), POINT_OP,
    OpSchema(POINT_OP, MARKER_DOMAIN, 1, inputs=[OpSchema.FormalParameter("x", "T")],
             outputs=[OpSchema.FormalParameter("y", "T")],
             type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(double)"], "")],
             attributes=[OpSchema.Attribute("point", OpSchema.AttrType.STRING, "the recipe's point name")]))


def _translate_quant_point(x, point: str):  # type: ignore[no-untyped-def]
    """``custom_translation_table`` entry: one ``quantface_export::QuantPoint(x, point=...)`` node."""
    return _POINT_PLACEHOLDER(x, point=point)


class _PointMarker(ActivePoint):
    """A quantizer point in the trace: the ``quant_point`` placeholder (its module switches to the split path)."""

    def __init__(self, name: str):
        super().__init__()
        self.point_name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_point(x, self.point_name)


class _MarkerFn(torch.autograd.Function):
    """The TorchScript exporter's placeholder: ``symbolic`` emits the node."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer_out: torch.Tensor, name: str) -> torch.Tensor:  # type: ignore[override]
        return layer_out.clone()

    @staticmethod
    def symbolic(g, x, layer_out, name: str):  # type: ignore[no-untyped-def]
        out = g.op(f"{MARKER_DOMAIN}::{MARKER_OP}", x, layer_s=name)
        out.setType(layer_out.type())
        return out


class _Marker(nn.Module):
    """For TorchScript, the FP layer is a submodule run for the downstream shapes (its traced ops are
    dead and dropped); for dynamo, it is not a submodule (``_LAYERS``), so none of its weights is lifted."""

    def __init__(self, name: str, layer: nn.Module | None = None):
        super().__init__()
        self.layer_name = name
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer is not None:
            return _MarkerFn.apply(x, self.layer(x), self.layer_name)
        return quant_layer(x, self.layer_name)


@contextmanager
def _with_markers(model: nn.Module, names: list[str], torchscript: bool = False, points: bool = False):
    """``model`` in eval mode with each module in ``names`` swapped for its ``_Marker``, in place (a
    deep copy would double the memory of a billion-parameter model), and with ``points`` each quantizer
    point for its ``_PointMarker`` (constant points switched on, identities: ``export.integer_units``
    stores the constants); modules and modes restored after."""
    modes = {m: m.training for m in model.modules()}
    swapped = []
    if points:
        for name, point in {**model_points(model), **constant_points(model)}.items():
            parent_name, _, child = name.rpartition(".")
            swapped.append((model.get_submodule(parent_name) if parent_name else model, child, point))
        install_points(model, _PointMarker, lambda name: ActiveConstant())
    try:
        for name in names:
            layer = model.get_submodule(name)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _Marker(name, layer if torchscript else None))
            _LAYERS[name] = layer
            swapped.append((parent, child, layer))
        yield model.eval()
    finally:
        for parent, child, layer in reversed(swapped):
            setattr(parent, child, layer)
        _LAYERS.clear()
        for m, mode in modes.items():
            m.training = mode


# Ops whose result is exact (no rounding), so the optimizer may evaluate them on float tensors too.
_EXACT_OPS = {"Cast", "Concat", "Constant", "ConstantOfShape", "Expand", "Flatten", "Gather", "Identity", "Reshape",
              "Shape", "Size", "Slice", "Split", "Squeeze", "Tile", "Transpose", "Unsqueeze"}


def _exact_folds_only(node: ir.Node) -> bool | None:
    """``should_fold`` for the optimizer's constant folding: no for float arithmetic, else its own rules."""
    if node.domain in ("", "ai.onnx") and node.op_type in _EXACT_OPS:
        return None
    if all(v.dtype is not None and not v.dtype.is_floating_point() for v in node.outputs):
        return None
    return False


def _module_path(node: onnx.NodeProto) -> list[str]:
    """The module attribute names from the root to ``node``'s module (``['encoder', 'blocks.0',
    'norm1']``), from the exporter's ``pkg.torch.onnx.name_scopes`` (['', 'encoder', 'encoder.blocks.0',
    'encoder.blocks.0.norm1', '<fx node>'])."""
    props = {p.key: p.value for p in node.metadata_props}
    if "pkg.torch.onnx.name_scopes" not in props:
        return []
    scopes = ast.literal_eval(props["pkg.torch.onnx.name_scopes"])[:-1]
    return [s[len(parent) + 1:] if parent else s for parent, s in zip(scopes, scopes[1:])]


def name_nodes_by_module(model: onnx.ModelProto) -> onnx.ModelProto:
    """Requires: the exporter's node metadata. Ensures: node ``i`` is named ``/<module path>/<op>``
    (``_1``, ``_2``, ... on repeats, in graph order); no node carries metadata."""
    seen: Counter[str] = Counter()
    for node in model.graph.node:
        base = "/".join(["", *_module_path(node), node.op_type])
        node.name = base if not seen[base] else f"{base}_{seen[base]}"
        seen[base] += 1
        del node.metadata_props[:]
    return model


def _read_back(program: torch.onnx.ONNXProgram, work: Path) -> onnx.ModelProto:
    """``program`` saved with external data under ``work`` and loaded without its large initializers
    (they stay references into ``work``; small ones, shapes and axes, are read into memory)."""
    path = work / "trace.onnx"
    program.save(path, external_data=True)
    proto = onnx.load(str(path), load_external_data=False)
    for tensor in proto.graph.initializer:
        if external_data_helper.uses_external_data(tensor) and save.external_length(tensor, work) <= INLINE_BYTES:
            save.read_external(tensor, work)
    path.unlink()
    return proto


def _graph_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _trace_torchscript(model: nn.Module, example: torch.Tensor, quantized: list[str]) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with _with_markers(model, quantized, torchscript=True) as marked, warnings.catch_warnings(), torch.no_grad():
        # The tracer's "converting a tensor to a Python value" notes are expected: the graph is
        # specialised to this static input on purpose. The exporter's deprecation warning is shown.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(marked, (example,), buffer, dynamo=False, opset_version=TORCH_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
                          custom_opsets={MARKER_DOMAIN: 1} if quantized else None)
    return version_converter.convert_version(onnx.load_from_string(buffer.getvalue()), TARGET_OPSET)


@contextmanager
def _quiet_registry():
    """The exporter logs one line per torchvision op it skips (torchvision is not a dependency:
    none of its ops appears in our models); those lines are dropped, warnings are not."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        yield
    finally:
        registry.setLevel(level)


def _trace_dynamo(model: nn.Module, example: torch.Tensor, quantized: list[str], work: Path | None,
                  points: bool = False) -> onnx.ModelProto:
    with _with_markers(model, quantized, points=points) as marked, torch.no_grad(), _quiet_registry():
        kept = _graph_bytes(marked)  # the markers' layers are no longer submodules: their weights stay out
        program = torch.onnx.export(marked, (example,), None, dynamo=True, opset_version=TARGET_OPSET,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], optimize=False,
                                    verbose=False,
                                    custom_translation_table={torch.ops.quantface_export.quant_layer.default:
                                                              _translate_quant_layer,
                                                              torch.ops.quantface_export.quant_point.default:
                                                              _translate_quant_point})
    onnxscript.optimizer.optimize_ir(program.model, should_fold=_exact_folds_only)
    if work is not None and kept >= save.EXTERNAL_DATA_THRESHOLD:
        proto = _read_back(program, Path(work))
    else:
        proto = program.model_proto
    del program
    del proto.metadata_props[:]
    return name_nodes_by_module(proto)


def trace_to_onnx(model: nn.Module, batch: int, size: int, quantized: list[str] = (), work: Path | None = None,
                  exporter: str = "dynamo", points: bool = False) -> onnx.ModelProto:
    """ONNX graph of the FP ``model`` for a static (batch, 3, size, size) input ``lq`` and output
    ``restored``; each module named in ``quantized`` is one ``quantface_export::QuantLayer`` placeholder
    and, with ``points``, each quantizer point one ``quantface_export::QuantPoint`` (dynamo only).
    With the dynamo exporter, ``work`` (a folder that outlives the graph) and weights reaching the
    external-data threshold, the large initializers are references into ``work`` (module docstring).

    Ensures: opset 21, IR 10, static input/output shapes, the exporter's own constant folding applied
    (the rest — the placeholders and what depends on them, shape arithmetic, the timestep path — is
    left to ``export.fold``), nodes named by module path."""
    example = torch.zeros(batch, model.config.image_channels, size, size)
    if exporter == "torchscript":
        if points:
            raise ExportError("quantizer points (integer float ops) need the dynamo exporter")
        proto = _trace_torchscript(model, example, list(quantized))
    elif exporter == "dynamo":
        proto = _trace_dynamo(model, example, list(quantized), work, points)
    else:
        raise ExportError(f"unknown exporter {exporter!r}")
    if proto.ir_version > TARGET_IR:
        raise ExportError(f"the exporter wrote IR version {proto.ir_version}; the targets load {TARGET_IR}")
    proto.ir_version = TARGET_IR
    return proto
