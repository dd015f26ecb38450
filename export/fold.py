"""Passes that fold everything that does not depend on the input image into initializers.

The fixed timestep makes a whole sub-network constant: the sinusoidal embedding, the UNet's time
MLP (``unet.time_in``, ``unet.time_out``) and every ResBlock's ``temb_proj``; the static input shape
makes every ``Shape`` → ``Gather`` → ``Concat`` chain constant. Rather than special-casing the
model, ``fold_constants`` finds the input-independent part of the *finished* (quantized) graph and
evaluates it once with ONNX Runtime (graph optimizations off: plain op semantics), so the constants
are exactly what the runtime would have computed — including the QDQ of the quantized time layers,
whose nodes therefore disappear from the exported graph (``constant_layers`` lists them).

Kept although input-independent: ``DequantizeLinear`` of stored weight codes — the point of a QDQ
graph is to ship integer codes, not their float values — and ``Cast`` of a float16 initializer to
float or of an INT4 initializer to INT8 (low-rank factors and 4-bit codes stored at half the bytes,
exactly; ``export.profiles``), with the weight DQ behind such a cast; and integer codes cast to float
and multiplied by their scales (a Linear layer's integer-grid branch factors, ``export.lower._int_factor``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper, shape_inference

from quantface.export.errors import ExportError
from quantface.onnx_runtime import cpu_session
from quantface.export.graph import consumers, make_initializer, producers, remove_dead, shape_view
from quantface.export.save import read_external

# Initializer types a profile stores values in behind a ``Cast`` to the type its kernels read.
NARROW_STORAGE = (onnx.TensorProto.FLOAT16, onnx.TensorProto.INT4)


def remove_identities(model: onnx.ModelProto) -> onnx.ModelProto:
    """Requires: nothing. Ensures: no ``Identity`` node (consumers read its input directly), except
    one whose output is a graph output."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    rename = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.output[0] not in outputs}

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in rename)]
    for node in keep:
        for i, name in enumerate(node.input):
            node.input[i] = resolve(name)
    del graph.node[:]
    graph.node.extend(keep)
    return model


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Requires: nothing. Ensures: no ``Constant`` node; their values are initializers."""
    graph = model.graph
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = node.attribute[0]
            value = helper.get_attribute_value(attr)
            if attr.name == "value":
                array = numpy_helper.to_array(value)
            else:  # value_float(s) / value_int(s)
                array = np.asarray(value, dtype=np.float32 if "float" in attr.name else np.int64)
            graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return model


def _fold_known_shapes(model: onnx.ModelProto) -> int:
    """Replace each ``Shape`` node whose input has a static inferred shape by an int64 initializer;
    returns how many were replaced."""
    inferred = shape_inference.infer_shapes(shape_view(model), strict_mode=False, data_prop=True)
    shapes = {}
    for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        t = v.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[v.name] = [d.dim_value for d in t.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    graph = model.graph
    keep, folded = [], 0
    for node in graph.node:
        if node.op_type != "Shape" or node.input[0] not in shapes:
            keep.append(node)
            continue
        dims = shapes[node.input[0]]
        attrs = {a.name: a.i for a in node.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", len(dims))
        graph.initializer.append(numpy_helper.from_array(np.array(dims[start:end], np.int64), node.output[0]))
        folded += 1
    del graph.node[:]
    graph.node.extend(keep)
    return folded


def _is_weight_dq(node: onnx.NodeProto, stored: set[str]) -> bool:
    return node.op_type == "DequantizeLinear" and all(i in stored for i in node.input if i)


def _is_storage_cast(node: onnx.NodeProto, narrow_initializers: set[str]) -> bool:
    """A ``Cast`` of a float16 or INT4 initializer: a value stored narrower than the kernel reads it."""
    return node.op_type == "Cast" and len(node.input) == 1 and node.input[0] in narrow_initializers


def _is_code_cast(node: onnx.NodeProto, int_initializers: set[str]) -> bool:
    """A ``Cast`` to float of an INT8 / INT4 initializer: integer codes a ``Mul`` by their scales dequantizes."""
    to = {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("to")
    return (node.op_type == "Cast" and len(node.input) == 1 and node.input[0] in int_initializers
            and to == onnx.TensorProto.FLOAT)


def _is_scaled_codes(node: onnx.NodeProto, code_floats: set[str], inits: set[str]) -> bool:
    """``Mul`` of cast codes by an initializer of scales: a dequantization written without DequantizeLinear
    (a Linear layer's integer-grid branch factors, ``export.lower._int_factor``)."""
    return node.op_type == "Mul" and len(node.input) == 2 and bool(set(node.input) & code_floats) \
        and set(node.input) <= code_floats | inits


def _fold_static_values(model: onnx.ModelProto, base_dir: str | None) -> int:
    """Evaluate the input-independent nodes feeding input-dependent ones (or graph outputs) into
    initializers; returns how many values were folded."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    dynamic = {i.name for i in graph.input}
    static_nodes = []
    for node in graph.node:  # topological order
        if any(i in dynamic for i in node.input if i):
            dynamic.update(node.output)
        else:
            static_nodes.append(node)
    users = consumers(graph)
    made_by = producers(graph)
    outputs = {o.name for o in graph.output}
    frontier = sorted({v for n in static_nodes for v in n.output
                       if v in outputs or any(u.output[0] in dynamic for u in users.get(v, []))})
    narrow = {i.name for i in graph.initializer if i.data_type in NARROW_STORAGE}
    stored = inits | {n.output[0] for n in graph.node if _is_storage_cast(n, narrow)}
    ints = {i.name for i in graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4)}
    code_floats = {n.output[0] for n in graph.node if _is_code_cast(n, ints)}
    frontier = [v for v in frontier if not (_is_weight_dq(made_by[v], stored) or _is_storage_cast(made_by[v], narrow)
                                            or _is_scaled_codes(made_by[v], code_floats, inits))]
    if not frontier:
        return 0
    values = _evaluate(model, static_nodes, frontier, base_dir)
    keep = [n for n in graph.node if not (set(n.output) & set(values))]
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(make_initializer(name, arr) for name, arr in values.items())
    remove_dead(model)
    return len(values)


def fold_constants(model: onnx.ModelProto, base_dir: str | None = None) -> onnx.ModelProto:
    """Requires: static graph input shapes; no ``Constant`` node (``constants_to_initializers``);
    initializers stored as external data (``export.trace``) found relative to ``base_dir``.
    Ensures: no ``Shape`` node; every node depends on the graph input's values, except
    ``DequantizeLinear`` of stored weight codes and ``Cast`` of float16 / INT4 initializers; folded values are initializers; dead
    nodes and initializers removed; the exporter's ``value_info`` (partly symbolic, stale where nodes
    were rewritten) dropped. Shapes and values are folded alternately until nothing changes, since
    each can unlock the other (a shape behind an ``Expand`` of the timestep, say)."""
    del model.graph.value_info[:]
    while True:
        changed = _fold_known_shapes(model) + _fold_static_values(model, base_dir)
        left = [n for n in model.graph.node if n.op_type == "Shape"]
        if not left:
            return remove_dead(model)
        if not changed:
            raise ExportError(f"node {left[0].name}: the shape of {left[0].input[0]} is not static")


def _evaluate(model: onnx.ModelProto, nodes: list[onnx.NodeProto], outputs: list[str], base_dir: str | None
              ) -> dict[str, np.ndarray]:
    """Run ``nodes`` (which read only initializers) with ONNX Runtime, returning ``outputs``; the
    external data those initializers use (the time MLP's FP weights, say) is read into the copy run."""
    sub = onnx.ModelProto()
    sub.CopyFrom(model)
    g = sub.graph
    del g.node[:], g.input[:], g.output[:], g.value_info[:]
    g.node.extend(nodes)
    g.output.extend(helper.make_empty_tensor_value_info(name) for name in outputs)
    sub = remove_dead(sub)
    for tensor in sub.graph.initializer:
        if external_data_helper.uses_external_data(tensor):
            read_external(tensor, base_dir)
    session = cpu_session(sub.SerializeToString(), 1, optimization="ORT_DISABLE_ALL")
    return dict(zip(outputs, session.run(outputs, {})))


def annotate_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Requires: static graph input shapes. Ensures: ``value_info`` records the static shape of every
    intermediate value (ONNX shape inference, strict); ExportError names the first that is not."""
    del model.graph.value_info[:]
    try:
        inferred = shape_inference.infer_shapes(shape_view(model), strict_mode=True, data_prop=True)
    except shape_inference.InferenceError as exc:
        raise ExportError(f"ONNX shape inference fails on the exported graph: {str(exc).splitlines()[0]}") from None
    known = {v.name for v in inferred.graph.value_info
             if all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)}
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for v in node.output:
            if v not in known and v not in outputs:
                raise ExportError(f"node {node.name}: the shape of {v} is not static")
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def int4_storage(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """The INT4 initializers that only store codes for a ``Cast`` to INT8 (``Profile.int4_storage``),
    each with that Cast."""
    graph = model.graph
    int4 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT4}
    users = consumers(graph)
    found = {}
    for name in int4:
        readers = users.get(name, [])
        to = {a.name: a.i for a in readers[0].attribute} if len(readers) == 1 else {}
        if len(readers) == 1 and readers[0].op_type == "Cast" and to.get("to") == onnx.TensorProto.INT8:
            found[name] = readers[0]
    return found


def unpack_int4_storage(model: onnx.ModelProto, base_dir: str = "") -> onnx.ModelProto:
    """A copy of ``model`` whose INT4-stored codes (``int4_storage``) are INT8 initializers again, named as
    their Casts' outputs, the Casts gone: the same values, for formats without a 4-bit type (the ORT
    format; ONNX Runtime makes the same INT8 initializers when a session starts). ``base_dir``: where
    external data is found."""
    stored = int4_storage(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not stored:
        return out
    graph = out.graph
    casts = {c.name for c in stored.values()}
    inits = {i.name: i for i in graph.initializer}
    kept = [i for i in graph.initializer if i.name not in stored]
    kept += [make_initializer(cast.output[0], numpy_helper.to_array(inits[name], base_dir).astype(np.int8))
             for name, cast in stored.items()]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = [n for n in graph.node if n.name not in casts]
    del graph.node[:]
    graph.node.extend(nodes)
    return out
