"""Bit widths: which ones the toolchain supports and their integer code ranges (no torch here, so the
command line can check options without importing it; the quantizer math is ``quantface.quant``)."""

from __future__ import annotations

from quantface.errors import ConfigError

MIN_BITS, MAX_BITS = 2, 8
# Activations (unsigned grids) may also take 16-bit codes: QNN's UINT16 activations. Codes up to
# 2^16 − 1 < 2^24 are exact in float32, so quantize / dequantize stay exact. Weights stay at most
# 8 bits (int8 storage).
WIDE_ACT_BITS = 16
# Bits of the ``ort-cpu`` export's requantized convolution outputs (UINT8, what QLinearConv emits).
REQUANT_BITS = 8


def check_bits(bits: int, wide: bool = False) -> int:
    """``bits`` in MIN_BITS..MAX_BITS (or WIDE_ACT_BITS when ``wide``, for activations), else ConfigError."""
    if not isinstance(bits, int) or not (MIN_BITS <= bits <= MAX_BITS or (wide and bits == WIDE_ACT_BITS)):
        allowed = f"{MIN_BITS}..{MAX_BITS}" + (f" or {WIDE_ACT_BITS}" if wide else "")
        raise ConfigError(f"bit width {bits!r} is outside the supported range {allowed}")
    return bits


def container_bits(bits: int) -> int:
    """Width of the stored container of ``bits``-bit weight or factor codes where 4-bit containers exist
    (the ``reference`` export, the 4-bit storage of ``ort-cpu`` / ``qnn``): INT4 from 4 bits down, else INT8 —
    so 3-bit codes take 4 and 7-bit ones (``--reduce-range``) 8."""
    return 4 if bits <= 4 else 8


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer code range of a b-bit grid: signed [−2^(b−1), 2^(b−1)−1], unsigned [0, 2^b−1]
    (unsigned activation grids also allow b = WIDE_ACT_BITS)."""
    check_bits(bits, wide=not signed)
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
