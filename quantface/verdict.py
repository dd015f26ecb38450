"""The parity bars ``quantface validate`` (and the demo) judge an exported graph by (no heavy imports,
so the command line shows them in ``--help``).

Parity is the PSNR between ONNX Runtime's float outputs and the PyTorch model's on the same faces.
A quantized graph is compared with the fake-quant model of the recipe it was exported from: the
``ort-cpu`` / ``reference`` graphs of the committed W4A4 recipe reach 46-47 dB on 20 test faces
(README), the full-range W8A8 ``ort-cpu`` graph on a CPU whose integer kernels saturate 31 dB
(docs/calibration_notes.md), so 40 dB separates "computes the recipe" from "does not". An FP32 graph
is compared with the FP model; the two differ only by float32 rounding and operator order (the
reference model's FP32 graph from ``quantface demo``: 140.3 dB, max |Δ| 1.1e-6 on the demo's 9
held-out faces), so anything under 80 dB is a lowering bug.
"""

MIN_PARITY_QUANTIZED = 40.0
MIN_PARITY_FP32 = 80.0


def default_min_parity(quantized: bool) -> float:
    return MIN_PARITY_QUANTIZED if quantized else MIN_PARITY_FP32
