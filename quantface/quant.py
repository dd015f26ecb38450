"""Uniform affine quantization: the one home of the b-bit math used by calibration *and* export.

Convention (ONNX ``QuantizeLinear`` / ``DequantizeLinear``, chosen so the exported graph computes
exactly what calibration simulated)::

    q  = clamp(round_half_to_even(x / s) + z, q_min, q_max)        # integer code
    x̂  = (q − z) · s                                                # dequantized value

The paper's Eq. 4 writes the same grid with the zero point subtracted inside the clamp; the two are
the same set of representable values. Weights are symmetric (z = 0) per output channel on the signed
grid [−2^(b−1), 2^(b−1) − 1]; activations are asymmetric per tensor on the unsigned grid
[0, 2^b − 1]. ``torch.round`` rounds half to even, like ONNX.

Training uses the straight-through estimator (paper Eq. 5): ``RoundSTE`` passes the gradient of
rounding through unchanged while its forward is bit-identical to ``torch.round``; the gradient with
respect to the scale follows from the dequantization (LSQ-style), so scales can be learned.
"""

from __future__ import annotations

import torch

from quantface.errors import ConfigError

from quantface.bits import MAX_BITS, MIN_BITS, REQUANT_BITS, WIDE_ACT_BITS, check_bits, qrange  # noqa: F401

BIAS_CODE_LIMIT = 1 << 24  # |INT32 bias codes| of a requantized conv (see ``bias_fits``)
# Smallest scale we allow: keeps x / s finite for all-zero channels.
EPS = 1e-8


class RoundSTE(torch.autograd.Function):
    """round() forward (half to even, bit-identical to torch.round); identity gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float, qmin: int, qmax: int
             ) -> torch.Tensor:
    """Integer codes (as a float tensor holding integers) of ``x``; ``scale`` broadcasts against ``x``."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float) -> torch.Tensor:
    return (q - zero_point) * scale


class _FakeQuantize(torch.autograd.Function):
    """dequantize(quantize(x)) in one node. Backward (STE + LSQ): ∂x̂/∂x = 1 where the code is not
    clamped, else 0; ∂x̂/∂s = (q − z) − x/s where not clamped, else (q − z). Saves only x and s and
    recomputes the rest, which keeps distillation's memory and time down."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):  # type: ignore[override]
        ctx.save_for_backward(x, scale)
        ctx.zero_point, ctx.qmin, ctx.qmax = zero_point, qmin, qmax
        return dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, scale = ctx.saved_tensors
        z = ctx.zero_point
        v = x / scale
        code = torch.round(v) + z
        inside = (code >= ctx.qmin) & (code <= ctx.qmax)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            q = torch.clamp(code, ctx.qmin, ctx.qmax)
            g = grad * ((q - z) - v * inside)
            # Sum over the dimensions along which the scale was broadcast.
            while g.dim() > scale.dim():
                g = g.sum(0)
            for d, n in enumerate(scale.shape):
                if n == 1 and g.shape[d] != 1:
                    g = g.sum(d, keepdim=True)
            grad_s = g
        return grad_x, grad_s, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float, qmin: int, qmax: int
                  ) -> torch.Tensor:
    """dequantize(quantize(x)) with the straight-through estimator; the forward is bit-identical to
    those two calls, the gradient w.r.t. the scale is LSQ's (paper Eq. 5)."""
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax)


# --------------------------------------------------------------------------------------------
# Choosing quantization parameters
# --------------------------------------------------------------------------------------------

def _per_channel_absmax(w: torch.Tensor) -> torch.Tensor:
    return w.detach().abs().flatten(1).amax(1)


def weight_scale(w: torch.Tensor, bits: int, method: str = "mse", grid: int = 40) -> torch.Tensor:
    """Symmetric per-output-channel scales, shape (out,), for a Linear (out, in) or Conv (out, in, kh, kw)
    weight. ``minmax``: s = max|w| / (2^(b−1) − 1). ``mse``: the clipping ratio in [0.3, 1] (``grid``
    candidates) per channel that minimises the channel's quantization MSE."""
    qmin, qmax = qrange(bits, signed=True)
    absmax = _per_channel_absmax(w).clamp_min(EPS)
    base = absmax / qmax
    if method == "minmax":
        return base
    if method != "mse":
        raise ConfigError(f"unknown weight scale method {method!r} (minmax, mse)")
    flat = w.detach().flatten(1)
    best_err = torch.full_like(base, float("inf"))
    best = base.clone()
    for ratio in torch.linspace(0.3, 1.0, grid, dtype=w.dtype, device=w.device):
        s = (base * ratio).clamp_min(EPS)[:, None]
        err = ((dequantize(quantize(flat, s, 0.0, qmin, qmax), s, 0.0) - flat) ** 2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s[:, 0], best)
    return best


def _rows_view(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scale.view(-1, *([1] * (like.dim() - 1)))


def factor_quantize(factor: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A low-rank branch factor on a symmetric ``bits``-bit grid, one scale per row (dim 0: the rank
    of a down factor (r, in, …), the output channel of an up factor (out, r, …)): (integer codes as
    floats, scale (rows,)). The scale is the row's max |value| / (2^(b−1) − 1) (``weight_scale``'s
    ``minmax``), recomputed from the factor, so the same call serves the straight-through fake-quant
    of training (``fake_quantize`` with this scale) and the rounding at freeze."""
    scale = weight_scale(factor, bits, "minmax")
    qmin, qmax = qrange(bits, signed=True)
    return quantize(factor.detach(), _rows_view(scale, factor), 0.0, qmin, qmax), scale


def factor_fake_quantize(factor: torch.Tensor, bits: int) -> torch.Tensor:
    """``factor`` through its ``factor_quantize`` grid, with the straight-through gradient."""
    scale = weight_scale(factor, bits, "minmax")
    qmin, qmax = qrange(bits, signed=True)
    return fake_quantize(factor, _rows_view(scale, factor), 0.0, qmin, qmax)


def factor_codes(values: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The int8 codes of a factor stored as codes · scale per row (``factor_quantize`` then
    ``dequantize``): ``dequantize(codes, scale)`` gives ``values`` back bit for bit. ValueError when
    ``values`` are not on that grid."""
    view = _rows_view(scale.float(), values)
    codes = torch.round(values.float() / view)
    qmin, qmax = qrange(bits, signed=True)
    if codes.min() < qmin or codes.max() > qmax or not torch.equal(dequantize(codes, view, 0.0), values.float()):
        raise ValueError(f"the factor is not on its {bits}-bit grid")
    return codes.to(torch.int8)


def act_qparams_from_range(lo: torch.Tensor | float, hi: torch.Tensor | float, bits: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per-tensor (scale, zero_point) covering [lo, hi] (the range is widened to hold 0,
    so zero is exactly representable, as ONNX requires for padding)."""
    device = next((t.device for t in (lo, hi) if isinstance(t, torch.Tensor)), torch.device("cpu"))
    lo_t = torch.as_tensor(lo, dtype=torch.float32, device=device).clamp(max=0.0)
    hi_t = torch.as_tensor(hi, dtype=torch.float32, device=device).clamp(min=0.0)
    return boundary_qparams(lo_t, hi_t, bits)


def boundary_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per-tensor (scale, zero_point) of the grid from ``lo`` to ``hi`` as given (not widened
    to hold 0): the learnable-boundary quantizer. The scale carries the gradient to both boundaries;
    the zero point is a constant integer code (rounding has no gradient)."""
    qmin, qmax = qrange(bits, signed=False)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zero_point = torch.clamp(torch.round(qmin - lo.detach() / scale.detach()), qmin, qmax)
    return scale, zero_point


def act_range_method(bits: int, method: str) -> str:
    """The activation range method a ``bits``-bit quantizer uses when a method asks for ``method``:
    above ``MAX_BITS`` (16-bit activations) always ``minmax`` over every observed value — 2^16 levels
    make rounding error negligible, so shrinking the range only clips (and a clipping search on a
    sample of positions misses the extremes it would clip); else ``method``."""
    return "minmax" if bits > MAX_BITS else method


def act_qparams(sample: torch.Tensor, bits: int, method: str = "mse", percentile: float = 99.99,
                grid: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor activation (scale, zero_point) from a sample of activation values.

    ``minmax``: the sample's range. ``percentile``: the [100−p, p] percentiles. ``mse``: the range
    shrunk towards zero by the candidate ratio (``grid`` steps in [0.2, 1], low and high sides shrunk
    independently in a 2-step coordinate search) that minimises the quantization MSE of the sample."""
    x = sample.detach().flatten().float()
    lo, hi = x.min(), x.max()
    if method == "minmax":
        return act_qparams_from_range(lo, hi, bits)
    if method == "percentile":
        k = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], device=x.device)
        pick = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0), device="cpu")[:2**24].to(x.device)
        q = torch.quantile(x[pick], k)
        return act_qparams_from_range(q[0], q[1], bits)
    if method != "mse":
        raise ConfigError(f"unknown activation scale method {method!r} (minmax, percentile, mse)")
    qmin, qmax = qrange(bits, signed=False)

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        s, z = act_qparams_from_range(a, b, bits)
        return float(((dequantize(quantize(x, s, z, qmin, qmax), s, z) - x) ** 2).mean())

    ratios = torch.linspace(0.2, 1.0, grid, device=x.device)
    best_lo, best_hi = lo, hi
    for _ in range(2):  # coordinate descent: high side, then low side, twice
        best_hi = hi * ratios[int(torch.tensor([err(best_lo, hi * r) for r in ratios], device="cpu").argmin())]
        best_lo = lo * ratios[int(torch.tensor([err(lo * r, best_hi) for r in ratios], device="cpu").argmin())]
    return act_qparams_from_range(best_lo, best_hi, bits)


def _bias_on_grid(bias: torch.Tensor, act_scale: torch.Tensor | float, w_scale: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(bias / (s_x · s_w), s_x · s_w): the bias in accumulator steps, per output channel."""
    scale = torch.as_tensor(act_scale, dtype=torch.float32, device=w_scale.device) * w_scale.detach().float()
    return bias.detach().float() / scale, scale


def bias_codes(bias: torch.Tensor, act_scale: torch.Tensor | float, w_scale: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's float bias as int32 codes on the grid of its integer accumulator: scale
    s_x · s_w (per output channel), zero point 0 — the form ONNX ``QLinearConv`` takes its bias in.
    The rounding error, at most s_x · s_w / 2 per channel, is below one accumulator step. Only for
    biases that ``bias_fits``."""
    steps, scale = _bias_on_grid(bias, act_scale, w_scale)
    return torch.round(steps).to(torch.int32), scale


def bias_fits(bias: torch.Tensor, act_scale: torch.Tensor | float, w_scale: torch.Tensor) -> bool:
    """Whether every bias code is within ±``BIAS_CODE_LIMIT`` = 2^24, the integers float32 holds
    exactly (integer kernels convert the accumulator to float to requantize). Degenerate weight
    scales (a channel the low-rank branch took whole, scale ``EPS``) put it at ~10^9 codes, where
    ONNX Runtime's QLinearConv and the float simulation part ways."""
    return bool(_bias_on_grid(bias, act_scale, w_scale)[0].abs().max() <= BIAS_CODE_LIMIT)


def requantizable(conv: bool, weight_bits: int | None, act_bits: int | None,
                  output_range: tuple[float, float] | None, bias: torch.Tensor | None,
                  act_scale: torch.Tensor | float | None, w_scale: torch.Tensor | None, wide: bool = False) -> bool:
    """Whether an integer kernel can run a layer's product with its output requantized to
    ``requant_bits(act_bits)``: a convolution with quantized weights and an input of at most ``MAX_BITS``
    (ONNX Runtime's QLinearConv takes 8-bit inputs: not after 16-bit activations), a recorded output
    range, and a bias that fits the accumulator grid (``bias_fits``). ``wide``: the QNN HTP's integer
    node units, which also take Linear layers (Gemm) and 16-bit inputs. The one predicate the
    calibrated model's simulation and the exporter both use."""
    return ((conv or wide) and weight_bits is not None and act_bits is not None and (act_bits <= MAX_BITS or wide)
            and output_range is not None and (bias is None or bias_fits(bias, act_scale, w_scale)))


def requant_bits(act_bits: int) -> int:
    """Bits of a requantized product: ``REQUANT_BITS`` after an input of at most ``MAX_BITS``, else
    ``WIDE_ACT_BITS`` (an A16 layer's output stays 16-bit, as in ONNX Runtime's A16W8 QNN graphs)."""
    return REQUANT_BITS if act_bits <= MAX_BITS else WIDE_ACT_BITS


def requantize(acc: torch.Tensor, act_scale: torch.Tensor, w_scale: torch.Tensor, out_scale: torch.Tensor,
               out_zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """The output stage of an integer convolution (ONNX Runtime's QLinearConv), dequantized:
    ``acc`` is the exact integer accumulator Σ (q_x − z_x)·q_w + bias codes (any float dtype holding
    integers exactly), ``w_scale`` shaped to broadcast along its channel axis. Like the kernel, in
    float32: m = (s_x · s_w) / s_y, q_y = clamp(round_half_even(float32(acc) · m) + z_y), then
    (q_y − z_y) · s_y."""
    qmin, qmax = qrange(bits, signed=False)
    multiplier = (act_scale.detach().float() * w_scale.detach().float()) / out_scale.float()
    codes = torch.clamp(torch.round(acc.float() * multiplier) + out_zero_point, qmin, qmax)
    return (codes - out_zero_point) * out_scale


# --------------------------------------------------------------------------------------------
# Packing integer codes for storage (recipes) and export
# --------------------------------------------------------------------------------------------

def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes in [−8, 7] → uint8, two per byte (low nibble first), flattened; pads with 0."""
    flat = codes.flatten().to(torch.int16)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nibbles = (flat & 0xF).to(torch.uint8)
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_int4``: int8 tensor of ``numel`` signed codes."""
    lo = (packed & 0xF).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    both = torch.stack([lo, hi], 1).flatten()[:numel]
    return torch.where(both > 7, both - 16, both).to(torch.int8)


# --------------------------------------------------------------------------------------------
# AdaRound: learned rounding of weights (Nagel et al. 2020), as BRECQ / Q-Diffusion use it
# --------------------------------------------------------------------------------------------

# The rectified sigmoid's stretch: h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1) reaches 0 and 1 exactly.
ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's h(V) in [0, 1]: the soft choice between rounding down (0) and up (1)."""
    return torch.clamp(torch.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0.0, 1.0)


def adaround_init(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """V with h(V) = w/s − ⌊w/s⌋, so the soft weight starts at w itself (inside the grid)."""
    v = w.detach() / scale.detach()
    rest = (v - torch.floor(v)).clamp(1e-6, 1 - 1e-6)  # keep the logit finite
    return -torch.log((ADAROUND_ZETA - ADAROUND_GAMMA) / (rest - ADAROUND_GAMMA) - 1.0)


def adaround_fake_quantize(w: torch.Tensor, scale: torch.Tensor, v: torch.Tensor, qmin: int, qmax: int
                           ) -> torch.Tensor:
    """The soft-rounded weight (⌊w/s⌋ + h(V)) · s, clamped to the grid; differentiable in V only."""
    s = scale.detach()
    return torch.clamp(torch.floor(w.detach() / s) + rectified_sigmoid(v), qmin, qmax) * s


def adaround_codes(w: torch.Tensor, scale: torch.Tensor, v: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The hardened rounding: ⌊w/s⌋ + [h(V) ≥ ½] (i.e. V ≥ 0), clamped: integer codes as a float tensor."""
    return torch.clamp(torch.floor(w.detach() / scale.detach()) + (v.detach() >= 0).to(w.dtype), qmin, qmax)


def adaround_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ 1 − |2h(V) − 1|^β: zero only where every h(V) is 0 or 1; β is annealed from large to small."""
    return (1.0 - (2.0 * rectified_sigmoid(v) - 1.0).abs().pow(beta)).sum()
