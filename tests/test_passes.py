"""The exporter's graph passes on graphs of a few nodes built here: which node feeds which, what is
left, and that ONNX Runtime computes the same before and after (or what the recipe says)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from quantface.export.fold import constants_to_initializers, fold_constants, remove_identities
from quantface.export.graph import remove_dead
from quantface.export.layer import ExportLayer
from quantface.export.lower import lower_quant_layers
from quantface.export.profiles import get_profile
from quantface.export.trace import MARKER_DOMAIN, MARKER_OP
from quantface.onnx_runtime import cpu_session
from quantface.quant import act_qparams_from_range
from quantface.recipe import LayerRecipe

X_SHAPE = (1, 2, 4, 4)


def _model(nodes, inits=(), outputs=("y",), functions=(), extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), *extra_opsets], ir_version=10,
                             functions=list(functions))


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return cpu_session(model.SerializeToString(), 1, optimization="ORT_DISABLE_ALL").run(None, {"x": x})


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, X_SHAPE).astype(np.float32)


def _init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def test_remove_identities_rewires_consumers_and_keeps_a_graph_output():
    #   x ─ Identity(a) ─ Relu(r) ─ Identity(b) ─ Identity(y: graph output)
    nodes = [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Identity", ["r"], ["b"]), helper.make_node("Identity", ["b"], ["y"])]
    model = _model(nodes)
    want = _run(model, _x())[0]
    remove_identities(model)
    assert [(n.op_type, list(n.input)) for n in model.graph.node] == [("Relu", ["x"]), ("Identity", ["r"])]
    assert np.array_equal(_run(model, _x())[0], want)


def test_constants_become_initializers_with_their_values():
    #   x ─ Add(c: tensor) ─ Mul(f: value_float) ─ Reshape(shape: value_ints) ─ y
    c = np.arange(2, dtype=np.float32).reshape(1, 2, 1, 1)
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(c)),
             helper.make_node("Constant", [], ["f"], value_float=0.5),
             helper.make_node("Constant", [], ["shape"], value_ints=[1, -1]),
             helper.make_node("Add", ["x", "c"], ["s"]), helper.make_node("Mul", ["s", "f"], ["m"]),
             helper.make_node("Reshape", ["m", "shape"], ["y"])]
    model = _model(nodes)
    want = _run(model, _x())[0]
    constants_to_initializers(model)
    assert [n.op_type for n in model.graph.node] == ["Add", "Mul", "Reshape"]
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert np.array_equal(values["c"], c) and values["f"].dtype == np.float32 and values["f"] == 0.5
    assert values["shape"].dtype == np.int64 and values["shape"].tolist() == [1, -1]
    assert np.array_equal(_run(model, _x())[0], want)


def test_fold_constants_evaluates_what_does_not_depend_on_the_input():
    #   t ─ Mul(two) ─ Sin ─ k ──────────┐
    #   x ───────────────────────────── Add ─ Reshape ─ Mul ─ y
    #   x ─ Shape ──────────────────────────────┘        │
    #   w (INT8 codes), ws ─ DequantizeLinear ───────────┘   (kept: a QDQ graph ships the codes)
    #   t ─ Neg (dead)
    nodes = [helper.make_node("Mul", ["t", "two"], ["t2"]), helper.make_node("Sin", ["t2"], ["k"]),
             helper.make_node("Add", ["x", "k"], ["a"]), helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Reshape", ["a", "shape"], ["r"]),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], name="w_dq"),
             helper.make_node("Mul", ["r", "wd"], ["y"]), helper.make_node("Neg", ["t"], ["dead"])]
    inits = [_init("t", np.float32(3.0)), _init("two", np.float32(2.0)),
             _init("w", np.array([1, -2, 3, 7], np.int8)), _init("ws", np.float32(0.25))]
    model = _model(nodes, inits)
    want = _run(model, _x())[0]
    fold_constants(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Add", "Reshape", "DequantizeLinear", "Mul"]
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert values["k"] == np.float32(np.sin(np.float32(6.0)))  # evaluated by ONNX Runtime, float32
    assert values["shape"].tolist() == list(X_SHAPE)
    assert set(values) == {"k", "shape", "w", "ws"}  # t, two and the dead branch's inputs are gone
    assert np.array_equal(_run(model, _x())[0], want)


def test_remove_dead_keeps_exactly_what_reaches_an_output():
    #   x ─ Relu ─ y        x ─ Neg ─ Add(u) (dead, with its initializer u)
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["n"]),
             helper.make_node("Add", ["n", "u"], ["unused"])]
    model = _model(nodes, [_init("u", np.float32(1.0))])
    remove_dead(model)
    assert [n.op_type for n in model.graph.node] == ["Relu"] and not model.graph.initializer


# ----------------------------------------------------------------------------- lowering one layer
S_X, Z_X = 0.0625, 8  # 4-bit activation grid: [-0.5, 0.4375]
OUT_RANGE = (-1.5, 2.0)


def _conv_layer(seed: int = 0) -> ExportLayer:
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([0.1, -0.2, 0.05]))
    recipe = LayerRecipe(kind="conv", weight_shape=(3, 2, 3, 3), weight_bits=4, act_bits=4, act_scale=S_X,
                         act_zero_point=Z_X, weight_codes=torch.randint(-8, 8, (3, 2, 3, 3), generator=g,
                                                                         dtype=torch.int8),
                         weight_scale=torch.tensor([0.02, 0.03, 0.05]), output_range=OUT_RANGE)
    return ExportLayer("conv", recipe, conv)


def _placeholder_graph() -> onnx.ModelProto:
    #   x ─ quantface_export::QuantLayer(layer="conv") ─ y
    node = helper.make_node(MARKER_OP, ["x"], ["y"], name="conv_placeholder", domain=MARKER_DOMAIN, layer="conv")
    return _model([node], extra_opsets=[helper.make_opsetid(MARKER_DOMAIN, 1)])


def _expected(layer: ExportLayer, x: np.ndarray, requant: bool) -> np.ndarray:
    """What the recipe says the layer computes, in float64 (the bias on the s_x·s_w grid and the
    output on the 8-bit grid of ``output_range`` when requantized)."""
    xq = (np.clip(np.round(x / S_X) + Z_X, 0, 15) - Z_X) * S_X
    ws = layer.w_scale.double().numpy()
    w = layer.weight_codes.double().numpy() * ws[:, None, None, None]
    bias = layer.bias.double().numpy()
    if requant:
        bias = np.round(bias / (S_X * ws)) * (S_X * ws)
    acc = torch.nn.functional.conv2d(torch.from_numpy(xq), torch.from_numpy(w), torch.from_numpy(bias),
                                     padding=1).numpy()
    if not requant:
        return acc
    s, z = (float(v) for v in act_qparams_from_range(*OUT_RANGE, 8))
    return (np.clip(np.round(acc / s) + z, 0, 255) - z) * s


@pytest.mark.parametrize("profile", ["reference", "ort-cpu"])
def test_lowering_a_conv_placeholder(profile):
    layer = _conv_layer()
    model = lower_quant_layers(_placeholder_graph(), {"conv": layer}, get_profile(profile))
    names = [n.name for n in model.graph.node]
    requant = profile == "ort-cpu"
    # reference: UINT4 / INT4 containers, no output Q/DQ; ort-cpu: UINT8 / INT8 (Clip keeps 4-bit
    # codes; the 4-bit weight codes stored as INT4 behind a Cast to INT8), an INT32 bias and the output
    # Q/DQ ONNX Runtime fuses into QLinearConv.
    want = (["conv_Clip", "conv.weight_codes_Cast"] if requant else []) + [
        "conv_QuantizeLinear", "conv_DequantizeLinear", "conv_weight_DequantizeLinear"]
    want += ["conv_bias_DequantizeLinear", "conv_Conv", "conv_OutputQuantizeLinear",
             "conv_OutputDequantizeLinear"] if requant else ["conv_Conv"]
    assert sorted(names) == sorted(want), names
    assert not any(n.domain == MARKER_DOMAIN for n in model.graph.node)
    assert MARKER_DOMAIN not in {o.domain for o in model.opset_import}
    nodes = {n.name: n for n in model.graph.node}
    assert nodes["conv_DequantizeLinear"].input[0] == nodes["conv_QuantizeLinear"].output[0]
    conv = nodes["conv_Conv"]
    assert conv.input[:2] == [nodes["conv_DequantizeLinear"].output[0], nodes["conv_weight_DequantizeLinear"].output[0]]
    inits = {i.name: i for i in model.graph.initializer}
    if requant:
        cast = nodes["conv.weight_codes_Cast"]
        assert nodes["conv_weight_DequantizeLinear"].input[0] == cast.output[0]
        assert [a.i for a in cast.attribute if a.name == "to"] == [TensorProto.INT8]
        codes = inits[cast.input[0]]
    else:
        codes = inits[nodes["conv_weight_DequantizeLinear"].input[0]]
    assert codes.data_type == TensorProto.INT4
    if requant:
        assert inits[nodes["conv_bias_DequantizeLinear"].input[0]].data_type == TensorProto.INT32
        assert nodes["conv_OutputQuantizeLinear"].input[0] == conv.output[0]
    assert [n.name for n in model.graph.node if "y" in n.output] == ["conv_OutputDequantizeLinear" if requant
                                                                      else "conv_Conv"]
    x = _x(1)
    got = _run(model, x)[0].astype(np.float64)
    want_y = _expected(layer, x.astype(np.float64), requant)
    step = float(act_qparams_from_range(*OUT_RANGE, 8)[0]) if requant else 0.0
    # float32 against float64: equal to rounding, except (requantized) an output code on a tie
    assert np.mean(np.abs(got - want_y) <= 1e-5) >= 0.99 and np.abs(got - want_y).max() <= step + 1e-5


def test_lowering_refuses_a_placeholder_without_its_layer():
    with pytest.raises(Exception, match="names no quantized layer"):
        lower_quant_layers(_placeholder_graph(), {"other": _conv_layer()}, get_profile("reference"))
