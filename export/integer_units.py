"""Passes of the ``qnn`` profile for a recipe with quantizer points whose layers are all plain integer
products (``plain_integer``: the lean ``calibrate --target qnn`` recipes, W8 ones with the branch folded):
every float op of the graph becomes an integer QDQ node unit, so the QNN HTP runs the whole graph in
integers (no FP16 op between units). Other recipes keep the float form of ``export.profiles``.

A QDQ node unit is an op whose float inputs all come from ``DequantizeLinear`` and whose outputs only
``QuantizeLinear`` reads; the QNN EP hands it to the HTP as one integer op. Around the quantized layers
(``export.lower``, ``units=True``: requantized convolutions, Linear layers as ``Gemm``) the graph's float
ops get their quantization from:

* ``lower_points``: each ``quantface_export::QuantPoint`` placeholder (``export.trace``, from the model's
  ``quantface.points``) → ``QuantizeLinear`` → ``DequantizeLinear``, UINT16 per tensor over the recipe's
  ``points`` range — the output of every norm step, SiLU half, residual add, attention product, concat;
* ``through_data_movement``: after each Reshape / Transpose / Flatten / Squeeze / Unsqueeze / nearest
  Resize of a dequantized tensor, a Q → DQ with its producer's parameters (exact: moving codes creates
  no value off the grid, so there is nothing to simulate);
* ``store_constants``: every float constant an Add / Sub / Mul / Div reads as codes
  (``quantface.points.constant_codes``: UINT16 per tensor, exact for repeated values, the same codes
  the simulation's ``QuantConstant`` rounds to); InstanceNormalization's and LayerNormalization's unit
  scale (INT8 code 127 at scale float32(1/127), exactly 1) and zero bias (INT32 zeros, a LayerNormalization
  given one): their γ / β are the separate Mul /
  Add the model's split norms write.

``float_ops`` is the static check: the compute nodes that are not node units.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from quantface.export.errors import ExportError
from quantface.export.graph import GraphBuilder, consumers, producers, replace_nodes
from quantface.export.layer import ExportLayer
from quantface.export.trace import MARKER_DOMAIN, POINT_OP
from quantface.points import POINT_BITS, constant_codes
from quantface.quant import act_qparams_from_range

DATA_MOVEMENT = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize"}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div"}
NORMS = {"InstanceNormalization", "LayerNormalization"}
QDQ = {"QuantizeLinear", "DequantizeLinear"}
UNIT_SCALE = np.float32(1 / 127)  # a norm's unit scale: INT8 code 127 at this scale, as ONNX Runtime's QNN quantizer stores it


def plain_integer(layer: ExportLayer) -> bool:
    """Whether a quantized layer is a plain integer product the HTP takes natively: quantized weights,
    an 8- or 16-bit input (no narrower grid clipped inside a wider container), no online smoothing or
    rotation, no float low-rank branch, and a product that can be requantized (``requantizable``): what
    integer node units need of every layer."""
    return (layer.weight_bits is not None and layer.act_bits in (8, 16) and layer.smooth is None
            and layer.rotation is None and layer.lowrank is None and layer.requantizable(True))


def _qdq(b: GraphBuilder, p: str, x: str, scale: str, zero: str, y: str | None = None) -> list[onnx.NodeProto]:
    q = b.node("QuantizeLinear", [x, scale, zero], f"{p}_QuantizeLinear")
    return [q, b.node("DequantizeLinear", [q.output[0], scale, zero], f"{p}_DequantizeLinear", output=y)]


def lower_points(model: onnx.ModelProto, ranges: dict[str, tuple[float, float]]) -> onnx.ModelProto:
    """Requires: ``QuantPoint`` placeholders naming points of ``ranges``. Ensures: none left; each is
    Q → DQ (UINT16, per tensor over its range) writing the placeholder's output value."""
    graph = model.graph
    b = GraphBuilder(graph)
    replacements: dict[int, list[onnx.NodeProto]] = {}
    for i, node in enumerate(graph.node):
        if node.domain != MARKER_DOMAIN or node.op_type != POINT_OP:
            continue
        name = helper.get_attribute_value(node.attribute[0]).decode()
        if name not in ranges:
            raise ExportError(f"the recipe records no range for quantizer point {name}")
        scale, zero = act_qparams_from_range(*ranges[name], POINT_BITS)
        s = b.initializer(f"{name}.scale", np.array(float(scale), np.float32))
        z = b.initializer(f"{name}.zero_point", np.array(int(zero)), TensorProto.UINT16)
        replacements[i] = _qdq(b, name, node.input[0], s, z, node.output[0])
    replace_nodes(graph, replacements)
    return model


def layer_norms_as_instance_norms(model: onnx.ModelProto) -> onnx.ModelProto:
    """Requires: static shapes in ``value_info`` (``export.fold.annotate_shapes``); LayerNormalization only
    over the last axis, of unit scale and zero (or no) bias. Ensures: each is Reshape to (rows, 1, width)
    → InstanceNormalization (unit scale, zero bias, its ε) → Reshape back — the same normalization
    (InstanceNormalization normalizes each (row, channel) over the last axis), as an op the HTP takes in 16 bits
    (onnxruntime-qnn 2.7 rejects a UINT16 LayerNorm: QNN error 3110)."""
    graph = model.graph
    b = GraphBuilder(graph)
    inits = {i.name: i for i in graph.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*graph.value_info, *graph.input, *graph.output)}
    replacements: dict[int, list[onnx.NodeProto]] = {}
    for i, node in enumerate(graph.node):
        if node.op_type != "LayerNormalization":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        shape = shapes.get(node.input[0])
        if shape is None or attrs.get("axis", -1) not in (-1, len(shape) - 1):
            raise ExportError(f"node {node.name}: only a LayerNormalization over the last axis of a known shape "
                              "can run as an integer node unit")
        scale = numpy_helper.to_array(inits[node.input[1]]) if node.input[1] in inits else None
        bias = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else np.zeros(1)
        if scale is None or not np.all(scale == 1) or not np.all(bias == 0):
            raise ExportError(f"node {node.name}: a LayerNormalization of unit scale and zero bias is expected here "
                              "(γ and β are the split norm's Mul and Add)")
        rows, width = int(np.prod(shape[:-1])), shape[-1]
        p = node.name.rpartition("/")[0]
        m = p.strip("/").replace("/", ".")
        flat = b.node("Reshape", [node.input[0], b.initializer(f"{m}.rows_shape", np.array([rows, 1, width], np.int64))],
                      f"{p}/RowsReshape")
        inorm = b.node("InstanceNormalization", [flat.output[0], b.initializer(f"{m}.rows_scale", np.ones(1, np.float32)),
                                                 b.initializer(f"{m}.rows_bias", np.zeros(1, np.float32))],
                       f"{p}/InstanceNormalization", epsilon=float(attrs.get("epsilon", 1e-5)))
        back = b.node("Reshape", [inorm.output[0], b.initializer(f"{m}.shape", np.array(shape, np.int64))],
                      f"{p}/Reshape_1", output=node.output[0])
        replacements[i] = [flat, inorm, back]
    replace_nodes(graph, replacements)
    return model


def widen_norm_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Requires: each InstanceNormalization's input dequantized, its output quantized to UINT16. Ensures:
    an 8-bit input is first converted to UINT16 (QNN's InstanceNorm node unit takes one type in and out),
    exactly: the UINT16 grid with scale s / 257 and zero point 257 z holds every UINT8 value (c − z) s as
    code 257 c."""
    graph = model.graph
    b = GraphBuilder(graph)
    inits = {i.name: i for i in graph.initializer}
    made_by = producers(graph)
    replacements: dict[int, list[onnx.NodeProto]] = {}
    for i, node in enumerate(graph.node):
        if node.op_type != "InstanceNormalization":
            continue
        dq = made_by.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or inits[dq.input[2]].data_type != TensorProto.UINT8:
            continue
        scale = numpy_helper.to_array(inits[dq.input[1]])
        zero = int(numpy_helper.to_array(inits[dq.input[2]]))
        p = f"{node.name}_widened"
        s = b.initializer(f"{p}.scale", np.array(np.float32(scale) / np.float32(257), np.float32))
        z = b.initializer(f"{p}.zero_point", np.array(257 * zero), TensorProto.UINT16)
        qdq = _qdq(b, p, node.input[0], s, z)
        node.input[0] = qdq[1].output[0]
        replacements[i] = [*qdq, node]
    replace_nodes(graph, replacements)
    return model


def _resize_is_nearest(node: onnx.NodeProto) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return attrs.get("mode", b"nearest") == b"nearest"


def through_data_movement(model: onnx.ModelProto) -> onnx.ModelProto:
    """``_through_data_movement`` until nothing changes (a chain of moves into a QuantizeLinear is
    quantized one move further back each time)."""
    while _through_data_movement(model):
        pass
    return model


def _through_data_movement(model: onnx.ModelProto) -> int:
    """Requires: nodes in topological order. Ensures: every data-movement op (``DATA_MOVEMENT``, Resize
    only in nearest mode) of a dequantized tensor whose output some other op than QuantizeLinear reads
    is followed by Q → DQ with the input's own scale and zero point; one that moves a float op's output
    (read by nothing else) straight into a QuantizeLinear is preceded by Q → DQ with that Q's parameters
    (Q(move(x)) = move(Q(x)): both exact)."""
    graph = model.graph
    b = GraphBuilder(graph)
    made_by = producers(graph)
    users = consumers(graph)
    outputs = {o.name for o in graph.output}
    replacements: dict[int, list[onnx.NodeProto]] = {}
    for i, node in enumerate(graph.node):
        if node.op_type not in DATA_MOVEMENT or (node.op_type == "Resize" and not _resize_is_nearest(node)):
            continue
        src = made_by.get(node.input[0])
        readers = users.get(node.output[0], [])
        if (src is not None and src.op_type not in QDQ and len(readers) == 1 and readers[0].op_type == "QuantizeLinear"
                and len(users.get(node.input[0], [])) == 1):
            # a float op's output moved, then quantized (the split GroupNorm's normalize step): quantize
            # before the move with the same parameters, so the op is a node unit
            q = readers[0]
            x = node.input[0]
            qdq = _qdq(b, f"{node.name}_input", x, q.input[1], q.input[2], f"{node.name}_input_dequantized")
            node.input[0] = qdq[1].output[0]
            replacements[i] = [*qdq, node]
            continue
        if src is None or src.op_type != "DequantizeLinear":
            continue
        y = node.output[0]
        readers = users.get(y, [])
        if y not in outputs and readers and all(r.op_type == "QuantizeLinear" for r in readers):
            continue
        moved = f"{node.name}_moved"
        node.output[0] = moved
        b.values.add(moved)
        qdq = _qdq(b, node.name, moved, src.input[1], src.input[2], y)
        replacements[i] = [node, *qdq]
        made_by[y] = qdq[1]  # later data movement of y reads a DQ now
    replace_nodes(graph, replacements)
    return len(replacements)


def _dequantized_scale(value: str, made_by: dict, inits: dict) -> float:
    dq = made_by.get(value)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits:
        raise ExportError(f"the input {value} of a norm is not dequantized from a constant scale")
    return float(numpy_helper.to_array(inits[dq.input[1]]))


def store_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Requires: the norms' scale inputs all ones and biases zeros (the split norms of ``quantface.points``)
    and their data inputs dequantized (``lower_points``, ``through_data_movement``). Ensures: no float
    initializer feeds an elementwise op or a norm; each is read through a DequantizeLinear of its codes."""
    graph = model.graph
    b = GraphBuilder(graph)
    inits = {i.name: i for i in graph.initializer}
    made_by = producers(graph)
    stored: dict[str, str] = {}  # initializer → its DQ output (one per constant, shared by its readers)
    new_nodes: list[onnx.NodeProto] = []

    def dequantized(name: str, codes: np.ndarray, scale: float, zero: int, container: int) -> str:
        if name in stored:
            return stored[name]
        c = b.initializer(f"{name}_codes", codes, container)
        s = b.initializer(f"{name}_scale", np.array(scale, np.float32))
        z = b.initializer(f"{name}_zero_point", np.array(zero), container)
        dq = b.node("DequantizeLinear", [c, s, z], f"{name}_DequantizeLinear")
        new_nodes.append(dq)
        stored[name] = dq.output[0]
        return dq.output[0]

    order: list[onnx.NodeProto] = []
    for node in graph.node:
        new_nodes.clear()
        if node.op_type in ELEMENTWISE:
            for j, v in enumerate(node.input):
                t = inits.get(v)
                if t is None or t.data_type != TensorProto.FLOAT:
                    continue
                codes, scale, zero = constant_codes(torch.from_numpy(numpy_helper.to_array(t).copy()))
                node.input[j] = dequantized(v, codes.numpy().astype(np.uint16), scale, zero, TensorProto.UINT16)
        elif node.op_type in NORMS:
            x_scale = _dequantized_scale(node.input[0], made_by, inits)
            if node.op_type == "LayerNormalization" and len(node.input) < 3:  # the HTP's LayerNorm takes a bias
                width = numpy_helper.to_array(inits[node.input[1]]).shape
                node.input.append(b.initializer(f"{node.name}.zero_bias", np.zeros(width, np.float32)))
                inits[node.input[2]] = b.initializers[node.input[2]]
            for j, v in enumerate(node.input[1:3], start=1):
                t = inits.get(v)
                if not v or t is None or t.data_type != TensorProto.FLOAT:
                    continue
                array = numpy_helper.to_array(t)
                if j == 1 and np.all(array == 1):  # 127 · float32(1/127) is 1.0 exactly
                    node.input[j] = dequantized(v, np.full(array.shape, 127, np.int8), UNIT_SCALE, 0, TensorProto.INT8)
                elif j == 2 and np.all(array == 0):  # bias codes on the grid s_x · s_scale, as the HTP takes them
                    node.input[j] = dequantized(v, np.zeros(array.shape, np.int32), float(np.float32(x_scale) * UNIT_SCALE),
                                                0, TensorProto.INT32)
                else:
                    raise ExportError(f"node {node.name}: a norm's scale / bias must be ones / zeros here "
                                      "(γ and β are the split norm's Mul and Add)")
        order += [*new_nodes, node]  # each constant's DQ right before its first reader
    del graph.node[:]
    graph.node.extend(order)
    used = {v for n in graph.node for v in n.input}
    kept = [i for i in graph.initializer if i.name in used]  # the float constants now stored as codes go
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


def float_ops(model: onnx.ModelProto) -> list[str]:
    """One line per compute node that is not a QDQ node unit: a float input (not an integer shape /
    index input) that no DequantizeLinear produces, or an output that some other op than
    QuantizeLinear reads (the graph's output counts as such a reader). Q / DQ and ``Cast`` of stored
    integer codes are not compute nodes."""
    graph = model.graph
    made_by, users = producers(graph), consumers(graph)
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    problems = []
    for node in graph.node:
        if node.op_type in QDQ or (node.op_type == "Cast" and all(v in inits for v in node.input)):
            continue
        float_inputs = [v for v in node.input if v and (inits[v].data_type == TensorProto.FLOAT if v in inits
                                                        else types.get(v, TensorProto.FLOAT) == TensorProto.FLOAT)]
        if node.op_type in DATA_MOVEMENT:
            float_inputs = float_inputs[:1]  # Resize's roi / scales are parameters
        bare = [v for v in float_inputs if not (v in made_by and made_by[v].op_type == "DequantizeLinear")]
        loose = [v for v in node.output if v in outputs or any(r.op_type != "QuantizeLinear" for r in users.get(v, []))]
        if bare or loose:
            why = (f"float input {bare[0]}" if bare else "") + (" and " if bare and loose else "") + \
                  (f"output {loose[0]} read unquantized" if loose else "")
            problems.append(f"node {node.name} ({node.op_type}): {why}")
    return problems
