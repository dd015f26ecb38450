"""Static pre-flight check of an ONNX model against what ONNX Runtime's QNN execution provider can
hand to Qualcomm's HTP: ``qnn_report(model)`` lists the nodes and values it would not take.

Checked:

* ops: only the ``ai.onnx`` ops of ``QNN_OPS`` — the op builders registered by ONNX Runtime's QNN
  EP (``onnxruntime/core/providers/qnn/builder/op_builder_factory.cc``); custom-domain ops and
  model-local functions (QNN cannot run them) are reported;
* shapes: every graph input, output and intermediate value has a static shape;
* activations: ``QuantizeLinear`` produces uint8 or uint16 (and ``DequantizeLinear`` of computed
  values reads one of those);
* weights: ``DequantizeLinear`` of an initializer reads int8 or int4 codes with zero points 0 (QNN's
  weights are symmetric), except a constant only elementwise ops read, stored on an activation grid
  (UINT8 / UINT16, any zero point: what ONNX Runtime's QNN quantizer gives Mul / Add constants); a 1-D INT32 initializer feeding the bias of a ``Conv``, ``Gemm`` or norm is a
  bias (codes on s_x·s_w, zero points 0);
* node units, as the real QNN EP (onnxruntime-qnn 2.7, ``export.qnn_ep.placement``) groups them: a
  per-channel weight DQ (1-D scale as long as the quantized axis) must feed only Conv / ConvTranspose
  / MatMul / Gemm node units — every float input dequantized, the product read only by a
  ``QuantizeLinear`` — or the EP runs it standalone on the CPU ("QNN EP does not support a standalone
  DQ op with per-channel quantization"); a per-tensor weight DQ may stand alone. A Gemm of
  dequantized inputs needs a ``QuantizeLinear`` on its output too: the HTP rejects an integer
  FullyConnected with a float output (QNN error 3110, "Failed to add node", so the unit goes to the CPU).

Not checked (run a real QNN EP session on the device for those): per-op attribute and rank limits,
and whether the float (non-QDQ) ops — normalisations, softmax, the low-rank branch, the rotation —
have an FP16 path on the target HTP (v73 and newer run them in FP16; older ones fall back to CPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper, shape_inference

from quantface.export.fold import unpack_int4_storage
from quantface.export.graph import consumers, producers, shape_view

QNN_OPS = frozenset("""
Abs Add And ArgMax ArgMin Asin Atan AveragePool BatchNormalization Cast Ceil Clip Concat Conv
ConvTranspose Cos CumSum DepthToSpace DequantizeLinear Div Einsum Elu Equal Exp Expand Flatten Floor
Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalMaxPool Greater GreaterOrEqual
GridSample HardSigmoid HardSwish InstanceNormalization Inverse LRN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax LpNormalization LSTM MatMul Max MaxPool Mean Min Mod Mul Neg Not Or Pad Pow
PRelu QuantizeLinear RandomUniformLike Reciprocal ReduceL2 ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum Relu Reshape Resize RMSNormalization Round STFT ScatterElements ScatterND Sigmoid Sign Sin
Slice Softmax SpaceToDepth Split Sqrt Squeeze Sub Sum Tanh ThresholdedRelu Tile TopK Transpose
Unsqueeze Upsample Where
""".split())

ACTIVATION_TYPES = {TensorProto.UINT8, TensorProto.UINT16}
WEIGHT_TYPES = {TensorProto.INT8, TensorProto.INT4}


def _name(t: int) -> str:
    return TensorProto.DataType.Name(t)


def _static(v: onnx.ValueInfoProto) -> bool:
    t = v.type.tensor_type
    return t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim)


def qnn_report(model: onnx.ModelProto | str | Path) -> list[str]:
    """One line per problem (empty: nothing this check knows of stops QNN HTP)."""
    base_dir = None
    if not isinstance(model, onnx.ModelProto):
        base_dir = str(Path(model).parent)
        model = onnx.load(str(model), load_external_data=False)  # dims and types suffice, but zero points
    # INT4-stored codes as the EP gets them: ONNX Runtime folds their Casts before partitioning.
    model = unpack_int4_storage(model, base_dir or "")
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    problems: list[str] = []
    for f in model.functions:
        overload = f" (overload {f.overload})" if f.overload else ""
        problems.append(f"model-local function {f.domain}::{f.name}{overload}: QNN cannot run functions")
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name}: custom op {node.domain}::{node.op_type}")
        elif node.op_type not in QNN_OPS:
            problems.append(f"node {node.name}: op {node.op_type} is not supported by the QNN EP")

    inferred = shape_inference.infer_shapes(shape_view(model), strict_mode=False)
    values = {v.name: v for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output)}
    for kind, group in (("input", graph.input), ("output", graph.output)):
        problems += [f"graph {kind} {v.name}: shape is not static" for v in group if not _static(v)]
    for node in graph.node:
        for out in node.output:
            if out and (out not in values or not _static(values[out])):
                problems.append(f"node {node.name}: output {out} has no static shape")

    biases = {n.input[2] for n in graph.node if n.op_type in BIASED_OPS and len(n.input) > 2}
    made_by, users = producers(graph), consumers(graph)
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "QuantizeLinear":
            zp = inits.get(node.input[2]) if len(node.input) > 2 else None
            t = attrs.get("output_dtype") or (zp.data_type if zp is not None else TensorProto.UINT8)
            if t not in ACTIVATION_TYPES:
                problems.append(f"node {node.name}: activations quantized to {_name(t)} (QNN takes UINT8/UINT16)")
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            codes = inits[node.input[0]]
            readers = users.get(node.output[0], [])
            if (codes.data_type in ACTIVATION_TYPES and readers
                    and all(r.op_type in ELEMENTWISE_OPS for r in readers)):
                continue  # a constant of an elementwise node unit, on an activation grid (export.integer_units)
            if codes.data_type == TensorProto.INT32 and len(codes.dims) == 1 and node.output[0] in biases:
                zp = inits.get(node.input[2]) if len(node.input) > 2 else None
                if zp is not None and np.any(numpy_helper.to_array(zp, base_dir or "") != 0):
                    problems.append(f"node {node.name}: bias zero points are not 0")
                continue
            if codes.data_type not in WEIGHT_TYPES:
                problems.append(f"node {node.name}: weights stored as {_name(codes.data_type)} (QNN takes INT8/INT4)")
            scale = inits.get(node.input[1])
            per_channel = scale is not None and any(d > 1 for d in scale.dims)
            if per_channel and not all(_full_unit(c, made_by, users) for c in users.get(node.output[0], [])):
                problems.append(f"node {node.name}: per-channel weights outside a QDQ node unit with a "
                                f"QuantizeLinear on the product (the QNN EP runs the DQ standalone, on the CPU)")
            zp = inits.get(node.input[2]) if len(node.input) > 2 else None
            if zp is not None and np.any(numpy_helper.to_array(zp, base_dir or "") != 0):
                problems.append(f"node {node.name}: weight zero points are not 0")
        elif node.op_type == "DequantizeLinear":
            zp = inits.get(node.input[2]) if len(node.input) > 2 else None
            if zp is not None and zp.data_type not in ACTIVATION_TYPES:
                problems.append(f"node {node.name}: activations dequantized from {_name(zp.data_type)}")
        elif (node.op_type == "Gemm" and all(_dequantized(v, made_by) for v in node.input[:2])
              and not _full_unit(node, made_by, users)):
            problems.append(f"node {node.name}: Gemm of dequantized inputs without a QuantizeLinear on its output "
                            f"(the HTP rejects an integer FullyConnected with a float output)")
    return problems


PRODUCT_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
# Ops whose third input is a bias the HTP takes as INT32 codes (zero points 0)
BIASED_OPS = {"Conv", "Gemm", "InstanceNormalization", "LayerNormalization"}
ELEMENTWISE_OPS = {"Add", "Sub", "Mul", "Div"}


def _dequantized(value: str, made_by: dict[str, onnx.NodeProto]) -> bool:
    return value in made_by and made_by[value].op_type == "DequantizeLinear"


def _full_unit(node: onnx.NodeProto, made_by: dict[str, onnx.NodeProto], users: dict[str, list]) -> bool:
    """Whether ``node`` is a product op whose inputs are all dequantized and whose output only
    ``QuantizeLinear`` reads: the QDQ node unit the QNN EP hands the HTP as an integer op."""
    readers = users.get(node.output[0], [])
    return (node.op_type in PRODUCT_OPS and all(_dequantized(v, made_by) for v in node.input if v)
            and bool(readers) and all(r.op_type == "QuantizeLinear" for r in readers))
