"""Pass: replace each ``quantface_export::QuantLayer`` placeholder by the layer's QDQ subgraph.

For a layer ``P`` (its recipe name, e.g. ``unet.conv_in``) with input x and the placeholder's
output y, in order (every node optional, as the recipe says)::

    x ─ P_Smooth (Mul 1/s) ─ P_Hadamard ─┬─ P_Clip ─ P_QuantizeLinear ─ P_DequantizeLinear ─┐
                                         │     P.weight_codes ─ P_weight_DequantizeLinear ─┴─ P_Conv / P_MatMul
                                         │                                                      (+ P_BiasAdd)
                                         └─ P_LowRankDown ─ P_LowRankUp ──────────────────────── P_LowRankAdd ─ y

* Smoothing is a ``Mul`` by 1/s (not folded into the previous op, whose output other layers may
  share) unless the layer's Hadamard node carries it: ``reference`` and ``ort-cpu``
  (``Profile.signs_carry_smoothing``) multiply 1/s into the node's signs d, x·(d/s) being (x/s)·d bit
  for bit (d = ±1) — one vector and one elementwise pass fewer per layer. ``rotation=False`` then
  puts the explicit ``P_Smooth`` back where the Hadamard node was; ``qnn``, whose rotation is inline,
  keeps the ``Mul``.
* ``P_Hadamard`` is ``export.rotation``'s node (function call, or its body inline for ``qnn``).
* Activations: per-tensor ``QuantizeLinear`` → ``DequantizeLinear`` with the recipe's scale and zero
  point in the profile's container; ``P_Clip`` keeps codes in [0, 2^b − 1] when the container is
  wider than b bits (see ``export.profiles``).
* Weights: the recipe's integer codes as an initializer in the profile's container, dequantized per
  output channel with the recipe's scales and zero point 0. Conv weights are (out, in, kh, kw) with
  ``axis=0``; Linear weights are stored transposed, (in, out), for ``MatMul`` with ``axis=1`` — the
  output channel in both cases (the standard QDQ form of MatMul).
* ``ort-cpu`` and ``qnn`` (``export.profiles``): the Conv's bias as ``P_bias_DequantizeLinear`` of INT32
  codes, and ``P_OutputQuantizeLinear`` → ``P_OutputDequantizeLinear`` (UINT8) on the Conv's output,
  before ``P_LowRankAdd`` — the pattern ONNX Runtime fuses into ``QLinearConv`` (and the QNN EP
  gives the HTP as an integer convolution).
* ``qnn`` with integer node units (``units=True``, ``export.integer_units``): every layer requantized —
  a conv after a 16-bit input to UINT16 — and a Linear layer as ``_gemm_unit`` (Flatten → Gemm with
  per-channel weight codes (out, in) and INT32 bias → output Q → DQ → Reshape); zero points of weights and
  biases (all 0) left to DequantizeLinear's default.
* ``qnn`` (``Profile.scales_after_product``), every quantized layer not requantized (the Linear
  layers, convs without a usable output range): ``P_weight_DequantizeLinear`` of the codes at unit
  per-tensor scale → ``P_Conv`` / ``P_MatMul`` (no bias) → ``P_WeightScale`` (Mul by the per-channel
  scales) → ``P_BiasAdd``: what the QNN EP keeps on the HTP (see ``export.profiles``).
* ``ort-cpu`` (``Profile.integer_linears``): after shapes are known, ``integer_linears`` rewrites each
  quantized Linear layer with 8-bit containers, ``P_QuantizeLinear`` → ``P_DequantizeLinear`` →
  ``P_MatMul`` (``P_weight_DequantizeLinear``) (→ ``P_BiasAdd``), into ``P_QuantizeLinear`` →
  ``P_MatMulIntegerToFloat`` (``com.microsoft``: activation codes, INT8 weight codes (in, out), s_x,
  per-channel s_w, zero points, float bias), writing the same output value — see ``export.profiles``
  for why ONNX Runtime does not reach this op itself. (A pass of its own, after ``annotate_shapes``:
  ONNX shape inference does not know contrib operators.)
* The merged low-rank branch (rank 2r) runs in full precision from x' — after the rotation, before
  the activation QDQ, as in calibration: a k×k conv (the layer's stride, padding, dilation) to rank
  2r then a 1×1 conv back, or two MatMuls for a Linear.

Requires: placeholders from ``export.trace``; one ``ExportLayer`` (recipe entry + FP module) per
placeholder (``export.layer.export_layers``). Ensures: no placeholder or ``quantface_export`` import left;
the ``quantface`` domain and its function(s) present iff a Hadamard node was emitted.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from quantface.bits import container_bits
from quantface.export.errors import ExportError
from quantface.export.graph import GraphBuilder, replace_nodes
from quantface.export.layer import ExportLayer
from quantface.export.profiles import CONTAINER_BITS, Profile
from quantface.export.rotation import DOMAIN, VERSION, emit_rotation, hadamard_functions

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators (MatMulIntegerToFloat)
from quantface.export.trace import MARKER_DOMAIN, MARKER_OP, POINT_OP
from quantface.quant import act_qparams_from_range, bias_codes, qrange, requant_bits


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def _conv_attrs(layer: ExportLayer, kernel: tuple[int, ...]) -> dict:
    args = layer.conv_args
    if isinstance(args["padding"], str):
        raise ExportError(f"layer {layer.name}: string padding {args['padding']!r} is not supported by the exporter")
    pads = list(args["padding"])
    return dict(kernel_shape=list(kernel), strides=list(args["stride"]), pads=pads + pads,
                dilations=list(args["dilation"]))


def _activation_qdq(b: GraphBuilder, p: str, x: str, layer: ExportLayer, profile: Profile) -> list[onnx.NodeProto]:
    bits = layer.act_bits
    container = profile.act_type(bits)
    scale = np.float32(layer.a_scale.detach())
    zero = int(layer.a_zero_point)
    qmin, qmax = qrange(bits, signed=False)
    if not qmin <= zero <= qmax:
        raise ExportError(f"layer {p}: activation zero point {zero} is outside the {bits}-bit range")
    nodes = []
    if CONTAINER_BITS[container] > bits:
        lo = b.initializer(f"{p}.act_min", np.array((qmin - zero) * scale, np.float32))
        hi = b.initializer(f"{p}.act_max", np.array((qmax - zero) * scale, np.float32))
        nodes.append(b.node("Clip", [x, lo, hi], f"{p}_Clip"))
        x = nodes[-1].output[0]
    s = b.initializer(f"{p}.act_scale", np.array(scale, np.float32))
    z = b.initializer(f"{p}.act_zero_point", np.array(zero), container)
    nodes.append(b.node("QuantizeLinear", [x, s, z], f"{p}_QuantizeLinear"))
    nodes.append(b.node("DequantizeLinear", [nodes[-1].output[0], s, z], f"{p}_DequantizeLinear"))
    return nodes


def _weight(b: GraphBuilder, p: str, layer: ExportLayer, profile: Profile, conv: bool, zero_point: bool = True,
            gemm: bool = False) -> tuple[str, list]:
    """Name of the (dequantized) weight the main op consumes, and the nodes producing it (without
    ``zero_point``, the zero points — all 0 — left to the DequantizeLinear's default). A Linear layer's
    codes are (in, out) for MatMul, or (out, in) for a ``gemm`` with ``transB``."""
    if layer.weight_bits is None:
        w = _np(layer.quantized_weight())
        return b.initializer(f"{p}.weight", w if conv else w.T), []
    codes = _np(layer.weight_codes).astype(np.int64)
    lo, hi = qrange(layer.weight_bits, signed=True)
    if codes.min() < lo or codes.max() > hi:
        raise ExportError(f"layer {p}: weight codes exceed the {layer.weight_bits}-bit range")
    container = profile.weight_type(layer.weight_bits)
    scale = _np(layer.w_scale).astype(np.float32).reshape(-1)
    rows = conv or gemm  # output channels first
    codes_name, cast = _codes(b, f"{p}.weight_codes", codes if rows else codes.T, layer.weight_bits, container, profile)
    s = b.initializer(f"{p}.weight_scale", scale)
    z = [b.initializer(f"{p}.weight_zero_point", np.zeros(scale.shape, np.int64), container)] if zero_point else []
    dq = b.node("DequantizeLinear", [codes_name, s, *z], f"{p}_weight_DequantizeLinear", axis=0 if rows else 1)
    return dq.output[0], [*cast, dq]


def _codes(b: GraphBuilder, name: str, codes: np.ndarray, bits: int, container: int, profile: Profile
           ) -> tuple[str, list[onnx.NodeProto]]:
    """Weight codes in ``container``: as an initializer of that type, or (``Profile.int4_storage``,
    ≤ 4-bit codes in an INT8 container) an INT4 initializer and a ``Cast`` to INT8."""
    if profile.int4_storage and container_bits(bits) == 4 and container == TensorProto.INT8:
        cast = b.node("Cast", [b.initializer(f"{name}_int4", codes, TensorProto.INT4)], f"{name}_Cast",
                      to=TensorProto.INT8)
        return cast.output[0], [cast]
    return b.initializer(name, codes, container), []


def _weight_scales_after(b: GraphBuilder, p: str, layer: ExportLayer, conv: bool, profile: Profile
                         ) -> tuple[str, list, str]:
    """``qnn`` profile, layers not requantized (see ``export.profiles``): the codes dequantized at unit
    per-tensor scale (a DQ the QNN EP takes standalone), and the per-channel scales for the ``Mul``
    after the product. Returns (dequantized codes, their nodes, the scales' initializer)."""
    codes = _np(layer.weight_codes).astype(np.int64)
    lo, hi = qrange(layer.weight_bits, signed=True)
    if codes.min() < lo or codes.max() > hi:
        raise ExportError(f"layer {p}: weight codes exceed the {layer.weight_bits}-bit range")
    scale = _np(layer.w_scale).astype(np.float32).reshape(-1)
    codes_name, cast = _codes(b, f"{p}.weight_codes", codes if conv else codes.T, layer.weight_bits,
                              TensorProto.INT8, profile)
    one = b.initializer(f"{p}.weight_unit_scale", np.array(1.0, np.float32))
    z = b.initializer(f"{p}.weight_zero_point", np.array(0), TensorProto.INT8)
    dq = b.node("DequantizeLinear", [codes_name, one, z], f"{p}_weight_DequantizeLinear")
    s = b.initializer(f"{p}.weight_scale", scale.reshape(-1, *[1] * (layer.weight.dim() - 2)) if conv else scale)
    return dq.output[0], [*cast, dq], s


def integer_linear(layer: ExportLayer, profile: Profile) -> bool:
    """Whether ``profile`` runs this Linear layer as ``MatMulIntegerToFloat`` (see ``export.profiles``)."""
    return (profile.integer_linears and layer.conv_args is None and layer.weight_bits is not None
            and layer.act_bits is not None and profile.act_type(layer.act_bits) == TensorProto.UINT8
            and profile.weight_type(layer.weight_bits) == TensorProto.INT8)


def integer_linears(model: onnx.ModelProto, layers: dict[str, ExportLayer], profile: Profile) -> onnx.ModelProto:
    """Requires: ``lower_quant_layers``' nodes (names as in the module docstring), static shapes in
    ``value_info`` (``export.fold.annotate_shapes``). Ensures: every layer ``integer_linear`` selects that
    is still in the graph (not folded into constants) runs as ``P_QuantizeLinear`` →
    ``P_MatMulIntegerToFloat``, writing the value its ``P_BiasAdd`` (or ``P_MatMul``) wrote; their DQ nodes,
    the weights' float view and dead ``value_info`` gone; the ``com.microsoft`` opset imported if used."""
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    drop: set[str] = set()
    replace: dict[str, onnx.NodeProto] = {}
    for p, layer in layers.items():
        if not integer_linear(layer, profile) or f"{p}_MatMul" not in nodes:
            continue
        q, dq, wdq, mm = (nodes[f"{p}_{s}"] for s in ("QuantizeLinear", "DequantizeLinear", "weight_DequantizeLinear",
                                                       "MatMul"))
        if mm.input[:] != [dq.output[0], wdq.output[0]] or dq.input[0] != q.output[0]:
            raise ExportError(f"layer {p}: unexpected nodes around {mm.name}")
        add = nodes.get(f"{p}_BiasAdd")
        last = add or mm
        inputs = [q.output[0], wdq.input[0], q.input[1], wdq.input[1], q.input[2], wdq.input[2]]
        if add is not None:
            inputs.append(add.input[1])
        replace[last.name] = helper.make_node("MatMulIntegerToFloat", inputs, [last.output[0]],
                                              name=f"{p}_MatMulIntegerToFloat", domain=MS_DOMAIN)
        drop |= {dq.name, wdq.name, mm.name} - {last.name}
    if not replace:
        return model
    kept = [replace.get(n.name, n) for n in graph.node if n.name not in drop]
    del graph.node[:]
    graph.node.extend(kept)
    live = {v for n in kept for v in n.output}
    alive = [v for v in graph.value_info if v.name in live]
    del graph.value_info[:]
    graph.value_info.extend(alive)
    model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def requantized(layer: ExportLayer, profile: Profile, units: bool = False) -> bool:
    """Whether ``profile`` requantizes this layer's product (to ``quant.requant_bits`` of its input; see
    ``export.profiles`` and ``quantface.quant.requantizable``); ``units``: the ``qnn`` profile's integer
    node units (``export.integer_units``), where Linear layers and 16-bit inputs are requantized too."""
    return profile.requant_conv_outputs and layer.requantizable(units)


def _int32_bias(b: GraphBuilder, p: str, layer: ExportLayer, zero_point: bool = True) -> tuple[str, list[onnx.NodeProto]]:
    """The bias as INT32 codes on the accumulator grid s_x·s_w, dequantized per output channel (without
    ``zero_point``, the zero point input left out: 0 by default, and a vector of zeros fewer in the file)."""
    codes, scale = bias_codes(layer.bias, layer.a_scale.detach(), layer.w_scale)
    c = b.initializer(f"{p}.bias_codes", _np(codes), TensorProto.INT32)
    s = b.initializer(f"{p}.bias_scale", _np(scale).astype(np.float32))
    z = [b.initializer(f"{p}.bias_zero_point", np.zeros(codes.shape, np.int32), TensorProto.INT32)] if zero_point else []
    dq = b.node("DequantizeLinear", [c, s, *z], f"{p}_bias_DequantizeLinear", axis=0)
    return dq.output[0], [dq]


def _output_qdq(b: GraphBuilder, p: str, x: str, layer: ExportLayer) -> list[onnx.NodeProto]:
    """Per-tensor Q → DQ of the product over the layer's recorded output range: 8-bit (UINT8) after an
    input of at most 8 bits, else 16-bit (UINT16; ``quant.requant_bits``)."""
    bits = requant_bits(layer.act_bits)
    scale, zero = act_qparams_from_range(*layer.output_range, bits)
    s = b.initializer(f"{p}.output_scale", np.array(float(scale), np.float32))
    z = b.initializer(f"{p}.output_zero_point", np.array(int(zero)),
                      TensorProto.UINT8 if bits <= 8 else TensorProto.UINT16)
    q = b.node("QuantizeLinear", [x, s, z], f"{p}_OutputQuantizeLinear")
    return [q, b.node("DequantizeLinear", [q.output[0], s, z], f"{p}_OutputDequantizeLinear")]


def _factor(b: GraphBuilder, name: str, array: np.ndarray, half: bool) -> tuple[str, list[onnx.NodeProto]]:
    """A low-rank factor as an initializer: float16 + Cast when asked and float16 holds it exactly
    (factors of frozen recipes are float16-rounded, see ``quantface.calibration.layers.QuantLayer.freeze``), else float32."""
    if half:
        h = array.astype(np.float16)
        if np.array_equal(h.astype(array.dtype), array):
            cast = b.node("Cast", [b.initializer(f"{name}_fp16", h)], f"{name}_Cast", to=TensorProto.FLOAT)
            return cast.output[0], [cast]
    return b.initializer(name, array), []


def _int_factor(b: GraphBuilder, p: str, factor: str, codes, scale, bits: int, profile: Profile,
                conv: bool) -> tuple[str, list[onnx.NodeProto]]:
    """A factor on its integer grid (``--branch-bits``): its codes (initializer ``<layer>.lowrank_<factor>_codes``,
    INT4 from 4 bits down where the profile stores 4-bit codes narrow, else INT8) → ``Cast`` to float →
    ``Mul`` by the per-row scales: code · scale in float32, the values the fake-quant model computes with,
    bit for bit. Not a DequantizeLinear: ONNX Runtime keeps a weight DQ in the graph and runs it on every
    call, and fuses one feeding a float MatMul into MatMulNBits, which by default
    (``session.qdq_matmulnbits_accuracy_level`` 4) quantizes the activations to 8 bits; a Cast and Mul of
    initializers it constant-folds into the float factor once, when the session starts (``export.fold``
    keeps them in the file). Rows: axis 0 of a conv's factors, axis 1 of a Linear's (stored transposed)."""
    name, node = f"{p}.lowrank_{factor}", f"{p}_LowRank{factor.capitalize()}"
    codes = _np(codes).astype(np.int64)
    codes = codes if conv else np.ascontiguousarray(codes.T)
    scale = _np(scale).astype(np.float32)
    scale = scale.reshape(-1, *[1] * (codes.ndim - 1)) if conv else scale.reshape(1, -1)
    narrow = container_bits(bits) == 4 and (profile.int4_weights or profile.int4_storage)
    stored = b.initializer(f"{name}_codes", codes, TensorProto.INT4 if narrow else TensorProto.INT8)
    to_float = b.node("Cast", [stored], f"{node}_Cast", to=TensorProto.FLOAT)
    mul = b.node("Mul", [to_float.output[0], b.initializer(f"{name}_scale", scale)], f"{node}_Scale")
    return mul.output[0], [to_float, mul]


def _gemm_unit(b: GraphBuilder, p: str, x: str, y: str, layer: ExportLayer, profile: Profile
               ) -> list[onnx.NodeProto]:
    """A requantized Linear layer as the HTP's integer FullyConnected node unit: ``P_Flatten`` of the
    dequantized input ``x`` to (rows, in) → ``P_Gemm`` (per-channel weight codes (out, in), ``transB``,
    INT32 bias) → ``P_OutputQuantizeLinear`` → ``P_OutputDequantizeLinear`` → ``P_Reshape`` to ``y``, the
    input's leading dimensions (a shape ``export.fold`` folds) and the output width."""
    w, nodes = _weight(b, p, layer, profile, conv=False, zero_point=False, gemm=True)
    nodes.append(b.node("Flatten", [x], f"{p}_Flatten", axis=-1))
    inputs = [nodes[-1].output[0], w]
    if layer.bias is not None:
        bias, bias_nodes = _int32_bias(b, p, layer, zero_point=False)
        nodes += bias_nodes
        inputs.append(bias)
    nodes.append(b.node("Gemm", inputs, f"{p}_Gemm", transB=1))
    nodes += _output_qdq(b, p, nodes[-1].output[0], layer)
    leading = b.node("Shape", [x], f"{p}_Shape", end=-1)
    width = b.initializer(f"{p}.output_width", np.array([layer.weight.shape[0]], np.int64))
    shape = b.node("Concat", [leading.output[0], width], f"{p}_OutputShape", axis=0)
    nodes += [leading, shape, b.node("Reshape", [nodes[-1].output[0], shape.output[0]], f"{p}_Reshape", output=y)]
    return nodes


def lower_layer(b: GraphBuilder, layer: ExportLayer, x: str, y: str, profile: Profile, rotation: bool,
                units: bool = False) -> list[onnx.NodeProto]:
    """The nodes of one quantized layer, from input value ``x`` to output value ``y``."""
    p = layer.name
    conv = layer.conv_args is not None
    nodes: list[onnx.NodeProto] = []
    rotated = layer.rotation is not None and rotation
    inv = None if layer.smooth is None else (1.0 / layer.smooth).detach().cpu().numpy().astype(np.float32)  # as torch
    carried = inv is not None and rotated and profile.signs_carry_smoothing and not profile.inline_rotation
    if inv is not None and not carried:
        nodes.append(b.node("Mul", [x, b.initializer(f"{p}.smooth_inv", inv.reshape(-1, 1, 1) if conv else inv)],
                            f"{p}_Smooth"))
        x = nodes[-1].output[0]
    if rotated:
        try:
            nodes += emit_rotation(b, p, x, _np(layer.rotation), conv, profile.inline_rotation,
                                   profile.kron_min_order, inv if carried else None)
        except ValueError as exc:
            raise ExportError(f"layer {p}: {exc}") from None
        x = nodes[-1].output[0]
    x_main = x
    if layer.act_bits is not None:
        nodes += _activation_qdq(b, p, x, layer, profile)
        x_main = nodes[-1].output[0]
    branch = layer.lowrank
    has_bias = layer.bias is not None
    requant = requantized(layer, profile, units)
    if requant and not conv:  # the qnn profile's integer node units (see _gemm_unit)
        main = y if branch is None else f"{p}_main"
        nodes += _gemm_unit(b, p, x_main, main, layer, profile)
        return nodes if branch is None else nodes + _branch(b, layer, x, main, y, profile)
    scales_after = profile.scales_after_product and layer.weight_bits is not None and not requant
    if scales_after:
        w, w_nodes, w_scale = _weight_scales_after(b, p, layer, conv, profile)
    else:
        w, w_nodes = _weight(b, p, layer, profile, conv, zero_point=not units and profile.weight_zero_points)
    nodes += w_nodes
    if requant and has_bias:
        bias, bias_nodes = _int32_bias(b, p, layer, zero_point=not units)
        nodes += bias_nodes
    elif has_bias:  # a conv's bias after its WeightScale is added to (N, out, H, W)
        bias_array = _np(layer.bias)
        bias = b.initializer(f"{p}.bias", bias_array.reshape(-1, 1, 1) if conv and scales_after else bias_array)
    else:
        bias = None
    if conv:
        attrs = _conv_attrs(layer, tuple(layer.weight.shape[2:]))
        conv_bias = [bias] if bias and not scales_after else []
        nodes.append(b.node("Conv", [x_main, w] + conv_bias, f"{p}_Conv", **attrs))
        if requant:
            nodes += _output_qdq(b, p, nodes[-1].output[0], layer)
    else:
        nodes.append(b.node("MatMul", [x_main, w], f"{p}_MatMul"))
    if scales_after:
        nodes.append(b.node("Mul", [nodes[-1].output[0], w_scale], f"{p}_WeightScale"))
    if bias and (scales_after or not conv):
        nodes.append(b.node("Add", [nodes[-1].output[0], bias], f"{p}_BiasAdd"))
    if branch is None:  # the main path's last node writes the layer's output
        nodes[-1].output[0] = y
        b.values.add(y)
        return nodes
    return nodes + _branch(b, layer, x, nodes[-1].output[0], y, profile)


def _branch(b: GraphBuilder, layer: ExportLayer, x: str, main: str, y: str, profile: Profile) -> list[onnx.NodeProto]:
    """The float low-rank branch from ``x`` (the transformed input), added to ``main``, writing ``y``."""
    p, branch, conv = layer.name, layer.lowrank, layer.conv_args is not None
    nodes: list[onnx.NodeProto] = []
    if branch.bits is not None and profile.int_lowrank:
        down_name, cast_down = _int_factor(b, p, "down", branch.down_codes, branch.down_scale, branch.bits, profile,
                                           conv)
        up_name, cast_up = _int_factor(b, p, "up", branch.up_codes, branch.up_scale, branch.bits, profile, conv)
        down_shape = tuple(branch.down.shape)
    else:
        down, up = _np(branch.down), _np(branch.up)
        down_shape = down.shape
        if not conv:
            down, up = np.ascontiguousarray(down.T), np.ascontiguousarray(up.T)
        down_name, cast_down = _factor(b, f"{p}.lowrank_down", down, profile.half_lowrank)
        up_name, cast_up = _factor(b, f"{p}.lowrank_up", up, profile.half_lowrank)
    nodes += cast_down + cast_up
    if conv:
        d = b.node("Conv", [x, down_name], f"{p}_LowRankDown", **_conv_attrs(layer, tuple(down_shape[2:])))
        u = b.node("Conv", [d.output[0], up_name], f"{p}_LowRankUp")
    else:
        d = b.node("MatMul", [x, down_name], f"{p}_LowRankDown")
        u = b.node("MatMul", [d.output[0], up_name], f"{p}_LowRankUp")
    nodes += [d, u, b.node("Add", [main, u.output[0]], f"{p}_LowRankAdd", output=y)]
    return nodes


def lower_quant_layers(model: onnx.ModelProto, layers: dict[str, ExportLayer], profile: Profile,
                       rotation: bool = True, units: bool = False) -> onnx.ModelProto:
    """Replace every placeholder by ``lower_layer``'s nodes (see the module docstring)."""
    graph = model.graph
    b = GraphBuilder(graph)
    graph_outputs = {o.name for o in graph.output}
    replacements: dict[int, list[onnx.NodeProto]] = {}
    renamed: dict[str, str] = {}  # placeholder output → "<layer>_output" (graph outputs keep their name)
    seen: set[str] = set()
    for i, node in enumerate(graph.node):
        if node.domain != MARKER_DOMAIN or node.op_type == POINT_OP:  # points: export.integer_units
            continue
        name = helper.get_attribute_value(node.attribute[0]).decode()
        if node.op_type != MARKER_OP or name not in layers:
            raise ExportError(f"placeholder {node.name} names no quantized layer ({name!r})")
        seen.add(name)
        y = node.output[0]
        renamed[y] = y if y in graph_outputs else f"{name}_output"
        replacements[i] = lower_layer(b, layers[name], renamed.get(node.input[0], node.input[0]), renamed[y],
                                      profile, rotation, units)
    missing = sorted(set(layers) - seen)
    if missing:
        raise ExportError(f"quantized layers missing from the traced graph: {', '.join(missing[:3])}")
    replace_nodes(graph, replacements)
    for node in graph.node:
        for j, v in enumerate(node.input):
            if v in renamed:
                node.input[j] = renamed[v]
    imports = [o for o in model.opset_import if o.domain != MARKER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(imports)
    if any(n.domain == DOMAIN for n in graph.node):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
        model.functions.extend(hadamard_functions({n.overload for n in graph.node if n.domain == DOMAIN}))
    return model
