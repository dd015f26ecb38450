"""Does ONNX Runtime's integer convolution on this CPU compute 8-bit codes exactly?

    python tools/check_u8s8_saturation.py

Builds one QDQ convolution (UINT8 activations, INT8 per-channel weights, UINT8 requantized output,
which ONNX Runtime fuses into ``QLinearConv``) with random codes of the given ranges and compares its
output with the exact integer accumulator, requantized the same way. On x86 CPUs without VNNI the
U8S8 kernels use ``vpmaddubsw``, which saturates the int16 sum of two u8·s8 products
(2·255·127 > 32767): full-range W8A8 codes then differ, while 7-bit weights (|q| ≤ 63, ONNX
Runtime's ``reduce_range``) or 7-bit activations (q ≤ 127) stay exact. The second column is the same
graph in a session with ORT's QDQ fusions off (``exact_qdq``, how ``OnnxBackend`` runs a ``qnn`` graph
on such a CPU): exact everywhere.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from quantface.onnx_runtime import cpu_session

OUT_SCALE, OUT_ZERO = 4096.0, 128


def mismatch(w_max: int, a_max: int, seed: int = 0, exact_qdq: bool = False) -> tuple[float, float]:
    """(share of outputs that differ, largest difference in output steps) for codes |w| ≤ w_max, a ≤ a_max,
    in a session with ORT's QDQ fusions on (its default) or off (``exact_qdq``)."""
    rng = np.random.default_rng(seed)
    channels, outs = 32, 16
    x = rng.integers(0, a_max + 1, (1, channels, 8, 8)).astype(np.float32)  # codes: scale 1, zero point 0
    w = rng.integers(-w_max, w_max + 1, (outs, channels, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(outs, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(outs, np.int8), "w_zero"),
             numpy_helper.from_array(np.array(1.0, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
             numpy_helper.from_array(np.array(OUT_SCALE, np.float32), "y_scale"),
             numpy_helper.from_array(np.array(OUT_ZERO, np.uint8), "y_zero")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["c", "y_scale", "y_zero"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "y_scale", "y_zero"], ["y"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    got = cpu_session(model.SerializeToString(), 1, exact_qdq=exact_qdq).run(None, {"x": x})[0]
    acc = torch.nn.functional.conv2d(torch.from_numpy(x).double(), torch.from_numpy(w).double(), padding=1).numpy()
    want = (np.clip(np.round(acc / OUT_SCALE) + OUT_ZERO, 0, 255) - OUT_ZERO) * OUT_SCALE
    return float(np.mean(got != want)), float(np.abs(got - want).max() / OUT_SCALE)


def main() -> int:
    for w_max, a_max, label in [(7, 15, "W4A4"), (63, 255, "W7A8"), (127, 127, "W8A7"), (127, 255, "W8A8")]:
        share, steps = mismatch(w_max, a_max)
        exact_share, exact_steps = mismatch(w_max, a_max, exact_qdq=True)
        print(f"{label} codes (|w| <= {w_max}, a <= {a_max}): {share:.1%} of outputs differ, "
              f"at most {steps:.0f} output steps; QDQ fusions off: {exact_share:.1%}, {exact_steps:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
