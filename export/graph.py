"""Small helpers every graph pass shares: building initializers and nodes, and asking who produces or
consumes a value. Passes edit ``onnx.ModelProto`` objects in place and return them, so they compose
as ``model = pass_(model)``.

Names: nodes a pass creates are named ``<prefix>_<Role>`` (e.g. ``unet.conv_in_QuantizeLinear``) and
their outputs ``<node name>_output``; initializers ``<prefix>.<role>`` (e.g. ``unet.conv_in.weight_codes``).
``GraphBuilder`` refuses a name that already exists rather than silently renaming it, so a test
can look every node up by the name it expects.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Integer containers the exporter writes, with their value ranges. INT4 / UINT4 (opset 21) are
# stored packed two per byte in raw_data (via ml_dtypes, which onnx uses for its 4-bit types).
INT_RANGES = {TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15), TensorProto.INT8: (-128, 127),
              TensorProto.UINT8: (0, 255), TensorProto.UINT16: (0, 65535), TensorProto.INT32: (-2**31, 2**31 - 1),
              TensorProto.INT64: (-2**63, 2**63 - 1)}


def make_initializer(name: str, array: np.ndarray, elem_type: int | None = None) -> TensorProto:
    """An initializer from a numpy array, with the data in ``raw_data`` (so external data can hold
    it). ``elem_type`` casts integer codes into one of ``INT_RANGES``' containers, refusing values
    outside it; without it, float arrays are stored as float32 (float16 ones stay float16) and others
    as they are."""
    array = np.asarray(array)
    if elem_type is None:
        if array.dtype.kind == "f" and array.dtype != np.float16:
            array = array.astype(np.float32)
        return numpy_helper.from_array(np.asarray(array, order="C"), name)
    lo, hi = INT_RANGES[elem_type]
    if array.size and (array.min() < lo or array.max() > hi):
        raise ValueError(f"initializer {name}: values outside the range of {TensorProto.DataType.Name(elem_type)}")
    np_type = helper.tensor_dtype_to_np_dtype(elem_type)
    return numpy_helper.from_array(np.asarray(array.astype(np.int64).astype(np_type), order="C"), name)


class GraphBuilder:
    """Collects new nodes and initializers for one graph, checking that every name is new."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.names = {i.name for i in graph.initializer} | {n.name for n in graph.node}
        self.values = {v for n in graph.node for v in n.output} | {i.name for i in graph.input}
        self.initializers: dict[str, TensorProto] = {i.name: i for i in graph.initializer}

    def _claim(self, name: str) -> str:
        if name in self.names or name in self.values:
            raise ValueError(f"graph name {name!r} is already taken")
        self.names.add(name)
        return name

    def initializer(self, name: str, array: np.ndarray, elem_type: int | None = None) -> str:
        tensor = make_initializer(self._claim(name), array, elem_type)
        self.graph.initializer.append(tensor)
        self.initializers[name] = tensor
        self.values.add(name)
        return name

    def shared_initializer(self, name: str, array: np.ndarray) -> str:
        """Like ``initializer`` but reuses an existing initializer of that name (e.g. one Hadamard
        matrix per order, shared by every layer of that width)."""
        return name if name in self.initializers else self.initializer(name, array)

    def node(self, op_type: str, inputs: list[str], name: str, output: str | None = None, domain: str = "",
             **attrs) -> onnx.NodeProto:
        """A node named ``name`` whose single output is ``output`` (default ``<name>_output``).
        The node is returned, not added: the caller decides where it goes in the node list."""
        output = output or f"{name}_output"
        if output not in self.values:
            self.values.add(output)
        return helper.make_node(op_type, inputs, [output], name=self._claim(name), domain=domain, **attrs)


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            if name:
                users[name].append(node)
    return users


def replace_nodes(graph: onnx.GraphProto, replacements: dict[int, list[onnx.NodeProto]]) -> None:
    """Replace node i by the list ``replacements[i]`` (an empty list deletes it), keeping order."""
    new: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        new.extend(replacements.get(i, [node]))
    del graph.node[:]
    graph.node.extend(new)


def remove_dead(model: onnx.ModelProto) -> onnx.ModelProto:
    """Dead-code elimination. Requires: nothing. Ensures: every node and initializer contributes to
    a graph output; value_info of removed values is dropped."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return model


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Node counts by op type of the main graph (custom ops as ``domain::Op``), sorted by name."""
    counts: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        counts[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    return dict(sorted(counts.items()))


def initializer_array(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def all_names(model: onnx.ModelProto) -> Iterable[str]:
    """Every node, value and initializer name in the model (main graph and local functions)."""
    g = model.graph
    yield from (n.name for n in g.node)
    yield from (v for n in g.node for v in (*n.input, *n.output))
    yield from (i.name for i in g.initializer)
    for f in model.functions:
        yield from (n.name for n in f.node)


def shape_view(model: onnx.ModelProto, keep_bytes: int = 1 << 16) -> onnx.ModelProto:
    """A copy for ONNX shape inference: initializer payloads above ``keep_bytes`` are dropped (shape
    inference reads only their dims and types; small ones — shapes, axes — keep their values for
    data propagation). Keeps models of 2 GiB or more inferable, which protobuf cannot serialise."""
    view = onnx.ModelProto()
    view.CopyFrom(model)
    for init in view.graph.initializer:
        if len(init.raw_data) > keep_bytes:
            init.ClearField("raw_data")
    return view


def compact(model: onnx.ModelProto) -> onnx.ModelProto:
    """Requires: nothing. Ensures: every intermediate value (a node output that is not a graph output)
    is named ``t<i>`` in graph order, and no ``value_info`` (ONNX Runtime infers every shape when the
    session starts; the QNN EP places the whole graph without it); nodes, initializers and the graph's
    inputs and outputs keep their names (the names passes and tests look nodes up by). The last pass of
    reference profile and the integer-unit qnn graph: the value names and shape records were 0.34 MB of the W4A4 ``reference`` graph's 4.05 MB,
    and a tenth of the integer-unit ``qnn`` graph (a Q → DQ pair on every tensor)."""
    graph = model.graph
    keep = {v.name for v in (*graph.input, *graph.output)} | {i.name for i in graph.initializer}
    renamed: dict[str, str] = {}
    for node in graph.node:
        for j, v in enumerate(node.output):
            if v and v not in keep:
                renamed[v] = node.output[j] = f"t{len(renamed)}"
    for node in graph.node:
        for j, v in enumerate(node.input):
            if v in renamed:
                node.input[j] = renamed[v]
    del graph.value_info[:]
    return model
