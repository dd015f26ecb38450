"""Export profiles: which integer containers hold the recipe's b-bit codes, and how the rotation is
emitted, for each target runtime.

Every mapping (``w`` = weight bits in 2..8, ``a`` = activation bits in 2..8 or 16, per ``quantface.quant``)::

    profile    weight container            activation container            Hadamard rotation
    ---------  --------------------------  ------------------------------  ---------------------------------
    reference  INT4 if w ≤ 4, else INT8    UINT4 if a ≤ 4, UINT8 if a ≤ 8  quantface::Hadamard function node
    ort-cpu    INT8 (stored INT4 if w ≤ 4)  UINT8 if a ≤ 8                  quantface::Hadamard function node
    qnn        INT8 (stored INT4 if w ≤ 4)  UINT8 if a ≤ 8, else UINT16     plain Mul + Conv 1×1 / MatMul

* ``reference`` is the exact, most compact graph (opset 21 4-bit types), for checking and archiving.
  4-bit containers are used for 2- and 3-bit codes too: the narrowest container holding the codes.
* ``ort-cpu`` uses the 8-bit containers ONNX Runtime's CPU kernels are fastest with, and
  requantizes each quantized convolution's output to 8 bits (``UINT8``, per tensor, over the
  recipe's ``output_range``; bias as ``INT32`` codes on the accumulator grid s_x·s_w): ONNX Runtime
  fuses DQ → Conv → Q into ``QLinearConv`` only when a QuantizeLinear follows the Conv, and
  otherwise dequantizes the weights and runs the convolution in float on every call. Codes of ≤ 4
  bits are stored as INT4 initializers behind a ``Cast`` to INT8, and float16-exact low-rank factors as
  float16 behind a ``Cast`` to float (``int4_storage``, ``half_lowrank``): ONNX Runtime folds both
  casts into initializers when the session starts, so the file holds 4-bit codes and the kernels
  are the INT8 / float ones, values bit for bit the same. This is the
  one place a profile departs from the calibrated values: an 8-bit rounding of the product, before
  the float low-rank branch is added (its effect is what ``quantface validate`` reports as parity).
  Recipes without output ranges (written before they were recorded; see
  ``tools/add_output_ranges.py``) export their convolutions in float, as before.
  Quantized Linear layers (8-bit weight container, input of at most 8 bits) become ONNX Runtime's
  ``com.microsoft.MatMulIntegerToFloat``: the input's QuantizeLinear codes times the INT8 weight codes,
  accumulated in int32, scaled by s_x·s_w per output channel, plus the float bias — the op ORT's own
  QDQ fusion makes of DQ → MatMul, which it cannot make once its MatMul + Add (bias) fusion has turned
  the pair into a float Gemm (it then dequantizes the weights on every call). The same product as the
  QDQ form up to float summation order; nothing new to simulate.
* ``qnn`` targets ONNX Runtime's QNN execution provider (Qualcomm HTP): no model-local functions
  (so the rotation is emitted as its body, inline), unsigned 8/16-bit activations, signed 8-bit
  per-channel weights. 16-bit activations come only from the hardware-aware bit allocation
  (``calibrate --target qnn``, ``calibration.mixed``); ``act_type`` puts them in UINT16 in every
  profile (ONNX Runtime's CPU kernels run 16-bit QuantizeLinear / DequantizeLinear too).
  It requantizes convolution outputs as ``ort-cpu`` does: a DQ → Conv → Q node unit (bias INT32) is
  what the QNN EP hands to the HTP as an integer convolution; without the output Q the conv is a
  float op (FP16 on v73 and newer HTPs, the CPU on older ones).
  Every other quantized layer (Linear layers, convs whose product is not requantized) keeps its
  INT8 codes but applies the per-channel weight scales after the product: ``DequantizeLinear`` of the
  codes at unit per-tensor scale → ``MatMul`` / ``Conv`` → ``Mul`` by the scales (→ bias ``Add``),
  the same codes × scales up to float rounding. The real QNN EP (onnxruntime-qnn 2.7) places a
  per-channel weight DQ on the CPU unless it is inside a full QDQ node unit with a Q on the
  product, and the HTP rejects an integer Gemm/FullyConnected with a float output; a per-tensor DQ
  it takes standalone, so the layer runs on the HTP as a float (FP16) product of integer codes.
  Codes of ≤ 4 bits are stored as INT4 behind a ``Cast`` to INT8, as in ``ort-cpu``: ONNX Runtime's
  basic optimizations (constant folding) run before the graph is partitioned, so the QNN EP sees INT8
  initializers (measured: ``recipes/quantface_w4a8_cpu``'s qnn graph wholly on the HTP).
  **Integer node units** (``integer_units``): for a recipe that records quantizer points
  (``quantface.points``; ``calibrate`` does for the reference model) and whose layers are all plain integer
  products (no online smoothing / rotation, no float low-rank branch — the ``--target qnn`` and W8 recipes),
  every float op is a QDQ node unit too (``export.integer_units``: UINT16 Q → DQ at each point, data
  movement re-quantized with its input's parameters, constants as codes), every product requantized —
  Linear layers as ``Gemm`` units with INT32 bias, 16-bit-input convolutions to UINT16 — and the
  per-channel weights stay per channel. No op then runs in FP16 on the HTP; the PyTorch simulation is
  ``apply_recipe(..., points=True)``.

Exact b-bit grid: whenever the container is wider than the bits, a float ``Clip`` to
``[(0 − z)·s, (2^b − 1 − z)·s]`` precedes the activation's ``QuantizeLinear``, so its codes stay in
[0, 2^b − 1] exactly as calibration simulated; weights need none (their codes are stored in range).
"""

from __future__ import annotations

from dataclasses import dataclass

from onnx import TensorProto

from quantface.bits import container_bits
from quantface.errors import ConfigError
from quantface.export.rotation import KRON_MIN_ORDER


@dataclass(frozen=True)
class Profile:
    name: str
    int4_weights: bool  # INT4 container for weights of ≤ 4 bits
    uint4_acts: bool  # UINT4 container for activations of ≤ 4 bits
    inline_rotation: bool  # emit the Hadamard body inline instead of a quantface::Hadamard node
    half_lowrank: bool = False  # store float16-exact low-rank factors as float16 (+ Cast) for size
    # Factors on an integer grid (a recipe calibrated with --branch-bits) as codes + DequantizeLinear, not floats.
    int_lowrank: bool = False
    # Orders from which a Hadamard node uses its Kronecker-factored body (export.rotation): 128 is the
    # measured speed crossover; the reference profile factors every order it can, for the smallest file.
    kron_min_order: int = KRON_MIN_ORDER
    # The Hadamard node's sign vector also carries the layer's smoothing 1/s (no Smooth Mul; export.lower).
    signs_carry_smoothing: bool = False
    # Zero points of the (symmetric) weight codes written out; without them DequantizeLinear's default 0.
    weight_zero_points: bool = True
    requant_conv_outputs: bool = False  # 8-bit Q→DQ on quantized convs' outputs, so ORT fuses QLinearConv
    # Layers not requantized: per-channel weight scales applied after the product (DQ of the codes at
    # unit per-tensor scale → Conv/MatMul → Mul by the scales), since the QNN EP runs a per-channel DQ
    # outside a full QDQ node unit (Q on the output) on the CPU (see export.lower).
    scales_after_product: bool = False
    # Quantized Linear layers as com.microsoft.MatMulIntegerToFloat (u8 codes × s8 codes → float + bias).
    integer_linears: bool = False
    # Weight codes of ≤ 4 bits stored as INT4 initializers and Cast to the INT8 container: half the
    # bytes on disk, the same INT8 kernels (ONNX Runtime's constant folding turns Cast(initializer)
    # into an INT8 initializer when the session starts, before its QDQ fusions).
    int4_storage: bool = False
    # With a recipe that records quantizer points (quantface.points): every float op an integer QDQ node
    # unit, Linear layers and 16-bit-input convolutions requantized too (export.integer_units).
    integer_units: bool = False

    def weight_type(self, bits: int) -> int:
        return TensorProto.INT4 if self.int4_weights and container_bits(bits) == 4 else TensorProto.INT8

    def act_type(self, bits: int) -> int:
        if self.uint4_acts and bits <= 4:
            return TensorProto.UINT4
        return TensorProto.UINT8 if bits <= 8 else TensorProto.UINT16


CONTAINER_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.INT8: 8, TensorProto.UINT8: 8,
                  TensorProto.UINT16: 16}

PROFILES: dict[str, Profile] = {p.name: p for p in [
    Profile("reference", int4_weights=True, uint4_acts=True, inline_rotation=False, half_lowrank=True,
            int_lowrank=True, kron_min_order=4, signs_carry_smoothing=True, weight_zero_points=False),
    Profile("ort-cpu", int4_weights=False, uint4_acts=False, inline_rotation=False, half_lowrank=True, int_lowrank=True,
            signs_carry_smoothing=True, requant_conv_outputs=True, integer_linears=True, int4_storage=True),
    Profile("qnn", int4_weights=False, uint4_acts=False, inline_rotation=True, requant_conv_outputs=True,
            scales_after_product=True, int4_storage=True, integer_units=True),
]}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ConfigError(f"unknown export profile {name!r}; available: {', '.join(PROFILES)}")
    return PROFILES[name]
