"""PyTorch → ONNX: the one place that calls ``torch.onnx.export``.

Exporter: the TorchScript one (``dynamo=False``). It names nodes after the module hierarchy
(``/encoder/blocks.0/norm1/InstanceNormalization``), exports ``GroupNorm`` as
Reshape → InstanceNormalization → Reshape → Mul → Add (ops every target, QNN included, runs) and lets
an ``autograd.Function`` choose its own ONNX node through ``symbolic``.

Quantized layers: the FP model is traced, with every Conv2d / Linear the recipe quantizes swapped
for a ``_Marker`` whose ``symbolic`` emits one placeholder node ``quantface_export::QuantLayer(x)``
carrying the layer name as attribute ``layer``. Its forward runs the FP layer, so shapes downstream
of it are traced correctly, and its weights never reach the graph (the traced layer ops are dead
and dropped). ``export.lower`` then replaces every placeholder by the layer's QDQ subgraph built
from the recipe — the exporter never sees calibration's fake-quant layers, and no node has to be
recognised by pattern or by name.

The graph is then moved to opset 21 (INT4 / UINT4 Q/DQ) by ``onnx.version_converter``; opset 20→21
only widened type constraints and Q/DQ for the ops this exporter emits.
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager

import onnx
import torch
from onnx import version_converter


INPUT_NAME, OUTPUT_NAME = "lq", "restored"
MARKER_DOMAIN, MARKER_OP = "quantface_export", "QuantLayer"
TORCH_OPSET, TARGET_OPSET = 20, 21  # the TorchScript exporter stops at opset 20
TARGET_IR = 10  # the IR version of opset 21: INT4 / UINT4 tensors, function overloads


class _MarkerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layer_out: torch.Tensor, name: str) -> torch.Tensor:  # type: ignore[override]
        return layer_out.clone()

    @staticmethod
    def symbolic(g, x, layer_out, name: str):  # type: ignore[no-untyped-def]
        out = g.op(f"{MARKER_DOMAIN}::{MARKER_OP}", x, layer_s=name)
        out.setType(layer_out.type())
        return out


class _Marker(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module, name: str):
        super().__init__()
        self.layer = layer
        self.layer_name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MarkerFn.apply(x, self.layer(x), self.layer_name)


@contextmanager
def _with_markers(model: torch.nn.Module, names: list[str]):
    """``model`` in eval mode with each module in ``names`` swapped for its ``_Marker``, in place (a
    deep copy would double the memory of a billion-parameter model); modules and modes restored after."""
    modes = {m: m.training for m in model.modules()}
    swapped = []
    for name in names:
        layer = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _Marker(layer, name))
        swapped.append((parent, child, layer))
    try:
        yield model.eval()
    finally:
        for parent, child, layer in reversed(swapped):
            setattr(parent, child, layer)
        for m, mode in modes.items():
            m.training = mode


def trace_to_onnx(model: torch.nn.Module, batch: int, size: int, quantized: list[str] = ()) -> onnx.ModelProto:
    """ONNX graph of the FP ``model`` for a static (batch, 3, size, size) input ``lq`` and output
    ``restored``; each module named in ``quantized`` is one ``quantface_export::QuantLayer`` placeholder.

    Ensures: opset 21 (IR 10), static input/output shapes, torch's own constant folding applied (the rest —
    shape arithmetic, the timestep path — is left to ``export.fold``)."""
    example = torch.zeros(batch, model.config.image_channels, size, size)
    buffer = io.BytesIO()
    with _with_markers(model, list(quantized)) as marked, warnings.catch_warnings(), torch.no_grad():
        has_markers = any(isinstance(m, _Marker) for m in marked.modules())
        # The legacy-exporter deprecation and the tracer's "shape check is constant" warnings are
        # expected: the exported graph is specialised to this static input on purpose.
        warnings.simplefilter("ignore")
        torch.onnx.export(marked, (example,), buffer, dynamo=False, opset_version=TORCH_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
                          custom_opsets={MARKER_DOMAIN: 1} if has_markers else None)
    proto = version_converter.convert_version(onnx.load_from_string(buffer.getvalue()), TARGET_OPSET)
    proto.ir_version = max(proto.ir_version, TARGET_IR)
    return proto
