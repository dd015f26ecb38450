"""Pass: ``GroupNormalization`` → Reshape → InstanceNormalization → Reshape → Mul → Add.

The exporter writes ``nn.GroupNorm`` as one opset-21 ``GroupNormalization`` node, which the QNN EP
does not take (and older runtimes lack). Its standard decomposition uses only ops every target
runs — the form the TorchScript exporter used to write::

    x ─ Reshape (0, G, −1) ─ InstanceNormalization (scale 1, bias 0, ε) ─ Reshape (shape of x) ─ Mul γ ─ Add β

γ and β become (C, 1, …, 1) initializers broadcasting over the channel axis. A ``GroupNormalization``
without affine parameters (the exporter's ``ConstantOfShape`` ones and zeros: the normalize step of a
split ``models.reference.GroupNorm``, whose γ and β are ops of their own) ends at the second Reshape. Scale and bias are initializers or
``ConstantOfShape`` of a constant shape (how the exporter writes the ones and zeros of ``F.group_norm``
without affine parameters). The ``Shape`` of x that
the second Reshape reads is folded into a constant by ``export.fold``. Nodes are named after the
``GroupNormalization`` node's module path (``/encoder/blocks.0/norm1/InstanceNormalization``).

Requires: every ``GroupNormalization``'s input rank known to ONNX shape inference, its scale and
bias initializers. Ensures: no ``GroupNormalization`` node.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from quantface.export.errors import ExportError
from quantface.export.graph import GraphBuilder, replace_nodes, shape_view


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    inferred = shape_inference.infer_shapes(shape_view(model), strict_mode=False)
    g = inferred.graph
    return {v.name: len(v.type.tensor_type.shape.dim) for v in (*g.input, *g.value_info, *g.output)
            if v.type.tensor_type.HasField("shape")}


def group_norm_to_instance_norm(model: onnx.ModelProto) -> onnx.ModelProto:
    """See the module docstring."""
    graph = model.graph
    if not any(n.op_type == "GroupNormalization" and n.domain in ("", "ai.onnx") for n in graph.node):
        return model
    ranks = _ranks(model)
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer
             if i.data_location != onnx.TensorProto.EXTERNAL}
    made = set()  # the exporter's ones / zeros of a group_norm without affine parameters
    for n in graph.node:
        if n.op_type == "ConstantOfShape" and n.input[0] in inits:
            value = next((numpy_helper.to_array(a.t) for a in n.attribute if a.name == "value"), np.zeros(1, np.float32))
            inits[n.output[0]] = np.full(inits[n.input[0]].astype(np.int64), value.reshape(-1)[0], value.dtype)
            made.add(n.output[0])
    b = GraphBuilder(graph)
    replacements: dict[int, list[onnx.NodeProto]] = {}
    for i, node in enumerate(graph.node):
        if node.op_type != "GroupNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        x, scale, bias = node.input
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        groups, eps = attrs["num_groups"], attrs.get("epsilon", 1e-5)
        if x not in ranks or scale not in inits or bias not in inits:
            raise ExportError(f"node {node.name}: GroupNormalization needs a known input rank and constant scale and bias")
        if attrs.get("stash_type", 1) != 1:
            raise ExportError(f"node {node.name}: GroupNormalization with stash_type {attrs['stash_type']} is not supported")
        p = node.name.rpartition("/")[0] or node.name  # node names: the module path (export.trace)
        m = p.strip("/").replace("/", ".") or node.output[0]  # initializer names: its dotted form
        ones = (1,) * (ranks[x] - 2)
        gamma = inits[scale].reshape(-1, *ones)
        beta = inits[bias].reshape(-1, *ones)
        affine = not (scale in made and bias in made and np.all(gamma == 1) and np.all(beta == 0))
        nodes = [
            b.node("Reshape", [x, b.initializer(f"{m}.group_shape", np.array([0, groups, -1], np.int64))],
                   f"{p}/Reshape"),
            b.node("Shape", [x], f"{p}/Shape"),
        ]
        nodes.append(b.node("InstanceNormalization",
                            [nodes[0].output[0], b.initializer(f"{m}.group_scale", np.ones(groups, gamma.dtype)),
                             b.initializer(f"{m}.group_bias", np.zeros(groups, beta.dtype))],
                            f"{p}/InstanceNormalization", epsilon=float(eps)))
        nodes.append(b.node("Reshape", [nodes[2].output[0], nodes[1].output[0]], f"{p}/Reshape_1",
                            output=None if affine else node.output[0]))
        if affine:
            nodes.append(b.node("Mul", [nodes[3].output[0], b.initializer(f"{m}.gamma", gamma)], f"{p}/Mul"))
            nodes.append(b.node("Add", [nodes[4].output[0], b.initializer(f"{m}.beta", beta)], f"{p}/Add",
                                output=node.output[0]))
        replacements[i] = nodes
    replace_nodes(graph, replacements)
    return model
