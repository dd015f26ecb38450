"""The online randomized Hadamard rotation x' = x·Q, Q = diag(d)·H (H = ``block_hadamard(n)``, the
normalised Hadamard matrix H/√n or its block-diagonal fallback), as ONNX.

Node: ``quantface::Hadamard(X, D, H) -> Y`` (domain ``quantface``, version 1), Y = (X ⊙ D)·H along
the channel axis. D holds the layer's random signs, shaped to broadcast along that axis; H is one
(n, n) float initializer per order n, shared by every layer of that width. It is a model-local ONNX
function written with onnxscript, so stock ONNX Runtime inlines its body — no custom kernel. Two
overloads (ONNX IR ≥ 10 function overloads) give the same op one body per layout::

    overload "nchw"           (conv inputs, channels on axis 1):  Conv(X ⊙ D, W = Hᵀ[:, :, None, None])
    overload "channels_last"  (linear inputs, channels last):      MatMul(X ⊙ D, H)

Why these bodies (measured with ONNX Runtime 1.31, CPU EP, one thread, batch 1, median of 30 runs,
the reference model's shapes):

    NCHW n×HW            Transpose-MatMul-Transpose   Conv 1×1   Mul(d)+Conv 1×1(H)   Einsum
    32×128²                     0.575 ms              0.332 ms       0.375 ms          2.217 ms
    64×64²                      0.309 ms              0.212 ms       0.230 ms          1.219 ms
    96×32²                      0.167 ms              0.115 ms       0.129 ms          0.467 ms
    320×32²                     1.271 ms              1.087 ms       1.114 ms          2.654 ms
    (B, N, C) channels last: MatMul(Q) 0.041 ms, Mul(d)+MatMul(H) 0.051 ms at 256 tokens × 128.

A 1×1 Conv beats moving channels last around a MatMul by 1.1–1.7×, and is what ORT's NCHWc
kernels like; channels-last inputs need no transposes, so MatMul. A fused per-layer Q (no Mul)
would save 5–12 % of the rotation but store n² floats per layer — 11 MB for the reference model's
91 layers, 4× its 4-bit weights — where one H per order plus n signs per layer costs 1.7 MB.

The ``qnn`` profile has no local functions (QNN cannot run them): it emits the same two nodes inline
(``<layer>_Hadamard_Mul`` then ``<layer>_Hadamard_Conv`` / ``<layer>_Hadamard_MatMul``, with Hᵀ stored
as a (n, n, 1, 1) conv weight).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnxscript import opset21 as op
from onnxscript import script, values

from export.graph import GraphBuilder
from quantface.hadamard import block_hadamard

DOMAIN, VERSION, OP = "quantface", 1, "Hadamard"
NCHW, CHANNELS_LAST = "nchw", "channels_last"
_OPSET = values.Opset(DOMAIN, VERSION)


@script(_OPSET, default_opset=op)
def _hadamard_nchw(X, D, H):
    return op.Conv(op.Mul(X, D), op.Unsqueeze(op.Transpose(H, perm=[1, 0]), [2, 3]))


@script(_OPSET, default_opset=op)
def _hadamard_channels_last(X, D, H):
    return op.MatMul(op.Mul(X, D), H)


def hadamard_functions() -> list[onnx.FunctionProto]:
    """The two overloads of ``quantface::Hadamard`` as FunctionProtos for ``model.functions``."""
    out = []
    for fn, overload in ((_hadamard_nchw, NCHW), (_hadamard_channels_last, CHANNELS_LAST)):
        proto = fn.to_function_proto()
        proto.name, proto.domain, proto.overload = OP, DOMAIN, overload
        proto.doc_string = f"Y = (X * D) · H along the channel axis ({overload} layout); see export.rotation."
        out.append(proto)
    return out


def split_rotation(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d, H) with q = diag(d)·H, d ∈ {±1}^n, H = block_hadamard(n) — undoes ``random_hadamard``
    without re-deriving its random stream. Raises ValueError if q is not of that form."""
    q = np.asarray(q, dtype=np.float64)
    h = block_hadamard(q.shape[0])
    # Row i of q is d_i times row i of h, and rows of h have unit norm: d_i = <q_i, h_i>.
    d = np.sign(np.sum(q * h, axis=1))
    if np.any(d == 0) or not np.allclose(d[:, None] * h, q, atol=1e-6):
        raise ValueError("rotation is not a sign-randomized block Hadamard matrix")
    return d, h


def emit_rotation(b: GraphBuilder, prefix: str, x: str, q: np.ndarray, conv: bool, inline: bool
                  ) -> list[onnx.NodeProto]:
    """Nodes computing x·Q for the layer ``prefix`` (channels on axis 1 if ``conv``, else last)."""
    d, h = split_rotation(q)
    n = len(d)
    signs = b.initializer(f"{prefix}.hadamard_signs", d.reshape(n, 1, 1) if conv else d)
    if not inline:
        mat = b.shared_initializer(f"hadamard.H{n}", h)
        return [b.node(OP, [x, signs, mat], f"{prefix}_Hadamard", domain=DOMAIN, overload=NCHW if conv else CHANNELS_LAST)]
    mul = b.node("Mul", [x, signs], f"{prefix}_Hadamard_Mul")
    if conv:
        mat = b.shared_initializer(f"hadamard.H{n}_conv", np.ascontiguousarray(h.T)[:, :, None, None])
        return [mul, b.node("Conv", [mul.output[0], mat], f"{prefix}_Hadamard_Conv")]
    mat = b.shared_initializer(f"hadamard.H{n}", h)
    return [mul, b.node("MatMul", [mul.output[0], mat], f"{prefix}_Hadamard_MatMul")]
