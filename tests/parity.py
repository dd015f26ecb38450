"""Layer-by-layer parity of an exported graph with the PyTorch fake-quant model it came from.

End to end, ONNX Runtime and PyTorch agree bit for bit only up to float summation order: a
rotation (Hadamard Conv vs matmul) can move an activation across a quantizer's rounding boundary,
flipping one code by one step, and a random tiny model amplifies such a flip through the network
(the same graph and recipe give 29 or 140+ dB depending on the CPU's kernels). So the tests compare
each quantized layer on its own: ONNX Runtime's value of the layer's input is fed to the PyTorch
layer, and its output compared with ONNX Runtime's. A wrong scale, axis, zero point, bias, rotation
or branch moves a layer's output by tens of percent; a rare flipped code by a fraction of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from quantface.calibration.layers import quant_layers
from quantface.onnx_runtime import cpu_session


@dataclass
class LayerParity:
    max_abs: float  # max |ORT − PyTorch| over the layer's output
    rel_l2: float  # ‖ORT − PyTorch‖₂ / ‖PyTorch‖₂
    exact_fraction: float  # share of output elements within 1e-5 · max|PyTorch| + 1e-6


def layer_parity(onnx_path: str | Path, qmodel: torch.nn.Module, x: np.ndarray) -> dict[str, LayerParity]:
    """Per quantized layer present in the graph (constant-folded ones are not), its parity on ``x``."""
    model = onnx.load(str(onnx_path))
    initializers = {i.name for i in model.graph.initializer}
    layers = quant_layers(qmodel)
    ends: dict[str, tuple[str, str]] = {}
    for name in layers:
        group = [n for n in model.graph.node if n.name.startswith(f"{name}_")]
        if not group:
            continue
        made = {v for n in group for v in n.output}  # the layer's input: read by its nodes, made by none of them
        first = next(n for n in group if n.input[0] not in initializers and n.input[0] not in made)
        ends[name] = (first.input[0], group[-1].output[0])
    outputs = {o.name for o in model.graph.output}
    for value in {v for pair in ends.values() for v in pair} - outputs:
        model.graph.output.append(onnx.helper.make_tensor_value_info(value, onnx.TensorProto.FLOAT, None))
    session = cpu_session(model.SerializeToString(), 1)
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})))
    result = {}
    with torch.no_grad():
        for name, (x_in, y_out) in ends.items():
            want = layers[name](torch.from_numpy(got[x_in])).double().numpy()
            diff = np.abs(got[y_out].astype(np.float64) - want)
            scale = np.abs(want).max()
            rel = np.linalg.norm(diff) / max(np.linalg.norm(want), 1e-12)
            result[name] = LayerParity(float(diff.max()), float(rel), float(np.mean(diff <= 1e-5 * scale + 1e-6)))
    return result


def float_products_of_weight_codes(path: Path, tmp_path: Path) -> list[str]:
    """Nodes of ONNX Runtime's optimized graph (extended optimizations) that run a float Conv / MatMul /
    Gemm on weights dequantized from stored codes on every call (a DequantizeLinear of an initializer)."""
    cpu_session(path, None, optimization="ORT_ENABLE_EXTENDED", optimized_model=tmp_path / "optimized_w.onnx")
    graph = onnx.load(str(tmp_path / "optimized_w.onnx")).graph
    inits = {i.name for i in graph.initializer}
    dq_of_init = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    return [n.name for n in graph.node
            if n.op_type in ("Conv", "MatMul", "Gemm", "FusedMatMul") and dq_of_init & set(n.input)]


def fused_qlinearconvs(path: Path, tmp_path: Path) -> int:
    """How many QLinearConv nodes ONNX Runtime's CPU EP makes of the graph at ``path`` (extended
    optimizations, the optimized model written to ``tmp_path``)."""
    cpu_session(path, None, optimization="ORT_ENABLE_EXTENDED", optimized_model=tmp_path / "optimized.onnx")
    return sum(n.op_type == "QLinearConv" for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
