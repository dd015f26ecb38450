"""The online randomized Hadamard rotation x' = x·Q, Q = diag(d)·H (H = ``block_hadamard(n)``, the
normalised Hadamard matrix H/√n or its block-diagonal fallback), as ONNX.

Node: ``quantface::Hadamard(X, D, H) -> Y`` or ``quantface::Hadamard(X, D, A, B) -> Y`` (domain
``quantface``, version 1), Y = (X ⊙ D)·H along the channel axis. D holds the layer's random signs,
shaped to broadcast along that axis. H is the (n, n) normalised Hadamard matrix, or — from order
``KRON_MIN_ORDER`` on, when ``quantface.hadamard.kron_factors`` splits it — its two Kronecker factors
A (a × a) and B (b × b), H = A ⊗ B, a·b = n: the channel vector viewed as an (a, b) matrix is
mixed by B along one axis and by A along the other, a + b multiply-adds per element instead of n.
Matrices are shared initializers, one per order. It is a model-local ONNX function written with
onnxscript, so stock ONNX Runtime inlines its body — no custom kernel. Four overloads (ONNX IR ≥ 10
function overloads) give the same op one body per layout and form; a model carries the ones it uses::

    "nchw"                (conv inputs, channels on axis 1): Conv(X ⊙ D, W = Hᵀ[:, :, None, None])
    "nchw_kron"           Reshape (N·a, b, H, W) → Conv 1×1 (Bᵀ) → Reshape (N, a, b·H·W, 1) → Conv 1×1 (Aᵀ)
    "channels_last"       (linear inputs, channels last): MatMul(X ⊙ D, H)
    "channels_last_kron"  Reshape (…, a, b) → MatMul(·, B) → MatMul(Aᵀ, ·) → Reshape back

Why these bodies (measured in docs/export_notes.md, "The Hadamard node's bodies"): on NCHW inputs
Mul(d) + a 1×1 Conv by H is within about 15 % of the fastest dense form and shares one matrix per
order between layers (Einsum and Transpose-MatMul are slower); channels last, Mul(d) + MatMul. The
Kronecker-factored body wins from order 128 on and loses on narrow layers (``KRON_MIN_ORDER``), and
it shrinks the file: the ``reference`` profile, whose point is the smallest standard file, uses it
from order 4 on (``Profile.kron_min_order``).

The ``qnn`` profile has no local functions (QNN cannot run them): it emits the same two nodes inline
(``<layer>_Hadamard_Mul`` then ``<layer>_Hadamard_Conv`` / ``<layer>_Hadamard_MatMul``, with Hᵀ stored
as a (n, n, 1, 1) conv weight).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnxscript import opset21 as op
from onnxscript import script, values

from quantface.export.graph import GraphBuilder
from quantface.hadamard import block_hadamard, kron_factors

DOMAIN, VERSION, OP = "quantface", 1, "Hadamard"
NCHW, CHANNELS_LAST = "nchw", "channels_last"
NCHW_KRON, CHANNELS_LAST_KRON = "nchw_kron", "channels_last_kron"
# Orders from which the Kronecker-factored body is used (see the module docstring's measurements).
KRON_MIN_ORDER = 128
_OPSET = values.Opset(DOMAIN, VERSION)


@script(_OPSET, default_opset=op)
def _hadamard_nchw(X, D, H):
    return op.Conv(op.Mul(X, D), op.Unsqueeze(op.Transpose(H, perm=[1, 0]), [2, 3]))


@script(_OPSET, default_opset=op)
def _hadamard_channels_last(X, D, H):
    return op.MatMul(op.Mul(X, D), H)


@script(_OPSET, default_opset=op)
def _hadamard_nchw_kron(X, D, A, B):
    # Channels c = i·b + j viewed as (a, b): B mixes j on (N·a, b, H, W), then A mixes i on
    # (N, a, b·H·W, 1); both are 1×1 convolutions.
    xd = op.Mul(X, D)
    minus_one = op.Constant(value_ints=[-1])
    x1 = op.Reshape(xd, op.Concat(minus_one, op.Shape(B, end=1), op.Shape(X, start=2), axis=0))
    y1 = op.Conv(x1, op.Unsqueeze(op.Transpose(B, perm=[1, 0]), [2, 3]))
    x2 = op.Reshape(y1, op.Concat(op.Shape(X, end=1), op.Shape(A, end=1), op.Constant(value_ints=[-1, 1]), axis=0))
    y2 = op.Conv(x2, op.Unsqueeze(op.Transpose(A, perm=[1, 0]), [2, 3]))
    return op.Reshape(y2, op.Shape(X))


@script(_OPSET, default_opset=op)
def _hadamard_channels_last_kron(X, D, A, B):
    # (..., a·b) → (..., a, b): B on the last axis, then Aᵀ from the left on the (a, b) matrices.
    xd = op.Mul(X, D)
    x1 = op.Reshape(xd, op.Concat(op.Shape(X, end=-1), op.Shape(A, end=1), op.Shape(B, end=1), axis=0))
    y1 = op.MatMul(op.Transpose(A, perm=[1, 0]), op.MatMul(x1, B))
    return op.Reshape(y1, op.Shape(X))


FUNCTIONS = {_hadamard_nchw: NCHW, _hadamard_channels_last: CHANNELS_LAST,
             _hadamard_nchw_kron: NCHW_KRON, _hadamard_channels_last_kron: CHANNELS_LAST_KRON}


def hadamard_functions(used: set[str] | None = None) -> list[onnx.FunctionProto]:
    """The overloads of ``quantface::Hadamard`` as FunctionProtos for ``model.functions``
    (only those in ``used``, when given)."""
    out = []
    for fn, overload in FUNCTIONS.items():
        if used is not None and overload not in used:
            continue
        proto = fn.to_function_proto()
        proto.name, proto.domain, proto.overload = OP, DOMAIN, overload
        what = "(A ⊗ B)" if overload.endswith("_kron") else "H"
        proto.doc_string = f"Y = (X * D) · {what} along the channel axis ({overload}); see export.rotation."
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


def emit_rotation(b: GraphBuilder, prefix: str, x: str, q: np.ndarray, conv: bool, inline: bool,
                  kron_min_order: int = KRON_MIN_ORDER, smooth_inv: np.ndarray | None = None) -> list[onnx.NodeProto]:
    """Nodes computing x·Q for the layer ``prefix`` (channels on axis 1 if ``conv``, else last): the
    Kronecker-factored body from order ``kron_min_order`` on; with ``smooth_inv`` (float32 1/s), D carries
    the smoothing too, D = d·(1/s): (x ⊙ D)·H is ((x/s) ⊙ d)·H bit for bit, since d = ±1."""
    d, h = split_rotation(q)
    n = len(d)
    if smooth_inv is None:
        signs = b.initializer(f"{prefix}.hadamard_signs", d.reshape(n, 1, 1) if conv else d)
    else:
        carried = (np.asarray(smooth_inv, np.float32).reshape(-1) * d.astype(np.float32)).astype(np.float32)
        signs = b.initializer(f"{prefix}.hadamard_signs_smooth_inv", carried.reshape(n, 1, 1) if conv else carried)
    if not inline:
        factors = kron_factors(n) if n >= kron_min_order else None
        if factors is not None:
            fa, fb = factors
            mats = [b.shared_initializer(f"hadamard.H{n}.A{len(fa)}", fa),
                    b.shared_initializer(f"hadamard.H{n}.B{len(fb)}", fb)]
            overload = NCHW_KRON if conv else CHANNELS_LAST_KRON
        else:
            mats, overload = [b.shared_initializer(f"hadamard.H{n}", h)], NCHW if conv else CHANNELS_LAST
        return [b.node(OP, [x, signs, *mats], f"{prefix}_Hadamard", domain=DOMAIN, overload=overload)]
    mul = b.node("Mul", [x, signs], f"{prefix}_Hadamard_Mul")
    if conv:
        mat = b.shared_initializer(f"hadamard.H{n}_conv", np.ascontiguousarray(h.T)[:, :, None, None])
        return [mul, b.node("Conv", [mul.output[0], mat], f"{prefix}_Hadamard_Conv")]
    mat = b.shared_initializer(f"hadamard.H{n}", h)
    return [mul, b.node("MatMul", [mul.output[0], mat], f"{prefix}_Hadamard_MatMul")]
