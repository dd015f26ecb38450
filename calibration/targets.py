"""What the bit allocation chooses between and what a choice costs, per target (``CalibConfig.target``).

A target describes itself: its (weight bits, activation bits) options, its cost model, how it is
checked, named and plotted. The allocation (``calibration.mixed``) is generic over them; adding a
target adds a class here, not branches there. No torch: the CLI and the config checks import this.

* ``UniformWeights`` (no ``--target``): every layer keeps the run's weight bits, its activation bits
  are one of ``mp_candidates``; the cost is ``mp_cost``: ``elements`` (b · E_i, activation storage /
  traffic in bits) or ``bops`` (b · w_bits · MACs_i, bit operations). ``mp_budget`` is a mean
  activation bit width (element- or MAC-weighted).
* ``QnnTarget`` (``--target qnn``, hardware-aware): (weight bits ∈ {4, 8}) × (activation bits ∈
  {8, 16}), the widths Qualcomm's HTP runs; the cost is the layer's bytes (``QNN_BYTE_TABLE``);
  ``mp_budget`` is a fraction (0, 1] of the all-A16/W8 cost Σ (2 E_i + P_i).
* ``CpuTarget`` (``--target cpu``, ONNX Runtime's CPU kernels, the ``ort-cpu`` profile): weight bits
  ∈ {4, 8} per layer under 8-bit activations. Every CPU integer kernel reads 8-bit
  codes, so a 4-bit layer buys bytes on disk (INT4-stored codes, ``export.profiles``), not speed; and
  what keeps the graph fast is no online node: no smoothing, no rotation, no low-rank branch
  (``lean``). The cost is the weight codes' bytes P_i·w/8; ``mp_budget`` is a fraction (0, 1] of the
  all-W8 bytes Σ P_i (default ``CPU_DEFAULT_BUDGET``). Each layer's error is measured on the image
  (``calibration.sensitivity.weight_bit_errors``), not on the layer's product.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from quantface.errors import ConfigError

if TYPE_CHECKING:
    from quantface.calibration.config import CalibConfig

QNN_WEIGHT_BITS, QNN_ACT_BITS = (4, 8), (8, 16)
CPU_WEIGHT_BITS = (4, 8)
# --target cpu's default budget: 0.55 of the all-W8 weight bytes (about 90 % of the weights at 4 bits).
# Measured on the reference model (W8A8 baseline, 20 test faces): 47.9 / 47.5 / 46.7 dB PSNR to FP with
# 26 / 62 / 90 % of the weights at W4 (greedy by measured image error per byte), 39.4 dB with all of them
# (docs/calibration_notes.md, "W4A8 for the CPU").
CPU_DEFAULT_BUDGET = 0.55
QNN_BYTE_TABLE = ("bytes of option (w, a) of layer i = E_i·a/8 (input activation elements per image at a bits) "
                  "+ P_i·w/8 (quantized residual weight parameters at w bits); low-rank branches excluded "
                  "(FP, identical for every option)")
ACT_PLOT_MAX = 8  # y axis of the activation-bits plot of the uniform-weights target (the sweep's B_max)


class LayerSize(Protocol):
    """What a cost needs of a layer (``calibration.sensitivity.LayerStats``)."""

    elements: int  # elements of the layer's input, per image
    macs: int  # multiply-accumulates of its conv / linear op, per image
    weights: int  # parameters of its quantized residual weight


# ------------------------------------------------------------------------------------------- costs
@dataclass(frozen=True)
class Cost:
    """A cost model: M(layer, w, a), the reference cost the budget is a multiple (or fraction) of,
    and the words for both in the recipe and in messages."""

    name: str  # the recipe's allocation "cost"
    unit: str  # how a budget in reference units is worded ("4 mean activation bits")
    note: str  # the recipe's "cost_unit"

    def of(self, layer: LayerSize, w: int, a: int) -> float:
        raise NotImplementedError

    def reference(self, layers: Sequence[LayerSize], weight_bits: int) -> float:
        raise NotImplementedError

    def notes(self, reference: float) -> dict[str, Any]:
        return {"cost_unit": self.note, "reference_cost": reference}


class ElementCost(Cost):
    def of(self, layer: LayerSize, w: int, a: int) -> float:
        return a * layer.elements

    def reference(self, layers: Sequence[LayerSize], weight_bits: int) -> float:
        return sum(s.elements for s in layers)


class BopsCost(Cost):
    def of(self, layer: LayerSize, w: int, a: int) -> float:
        return a * w * layer.macs

    def reference(self, layers: Sequence[LayerSize], weight_bits: int) -> float:
        return weight_bits * sum(s.macs for s in layers)


class QnnByteCost(Cost):
    def of(self, layer: LayerSize, w: int, a: int) -> float:
        return layer.elements * a / 8 + layer.weights * w / 8

    def reference(self, layers: Sequence[LayerSize], weight_bits: int) -> float:
        return sum(2 * s.elements + s.weights for s in layers)

    def notes(self, reference: float) -> dict[str, Any]:
        return {**super().notes(reference), "byte_table": QNN_BYTE_TABLE}


class CpuByteCost(Cost):
    def of(self, layer: LayerSize, w: int, a: int) -> float:
        return layer.weights * w / 8

    def reference(self, layers: Sequence[LayerSize], weight_bits: int) -> float:
        return float(sum(s.weights for s in layers))


COSTS = {
    "elements": ElementCost("elements", "mean activation bits", "activation bits per image (act bits × input elements)"),
    "bops": BopsCost("bops", "mean activation bits (MAC-weighted)",
                     "bit operations per image (act bits × weight bits × MACs)"),
}
QNN_BYTES = QnnByteCost("qnn_bytes", "of the all-A16/W8 bytes", "bytes")
CPU_BYTES = CpuByteCost("cpu_weight_bytes", "of the all-W8 weight bytes",
                        "bytes of the weight codes (P_i · w / 8: 4-bit codes stored as INT4)")


# ----------------------------------------------------------------------------------------- targets
class UniformWeights:
    """No ``--target``: the run's weight bits everywhere, activation bits from ``mp_candidates``."""

    name: str | None = None
    mode = "activation_bits"
    lean = False  # whether the target takes no online transform and no low-rank branch (CpuTarget)
    default_budget: float | None = None  # mp_budget when none is given (None: uniform bits)
    plot_max = ACT_PLOT_MAX
    reduce_range_refusal = ""  # why --reduce-range is refused with this target ("": it is not)
    candidates_refusal = ""  # why --mp-candidates is (its own options instead of mp_candidates)

    def check(self, cfg: "CalibConfig") -> None:
        """One-sentence ConfigErrors for the budget (already a positive number, or None)."""
        if cfg.mp_budget is not None and cfg.mp_budget < min(cfg.mp_candidates):
            raise ConfigError(f"--mp-budget {cfg.mp_budget} mean activation bits is infeasible: the smallest "
                              f"candidate bit width is {min(cfg.mp_candidates)}")

    def choices(self, cfg: "CalibConfig", weight_bits: int) -> list[tuple[int, int]]:
        return [(weight_bits, b) for b in sorted(cfg.mp_candidates)]

    def cost(self, cfg: "CalibConfig") -> Cost:
        return COSTS[cfg.mp_cost]

    def option(self, choice: tuple[int, int]) -> Any:
        """What an option of the program means (``Option.choice``; the recipe's "candidates")."""
        return choice[1]

    def label(self, weight_bits: int, mean_act_bits: float, budget_fraction: float) -> str:
        return f"W{weight_bits}A{mean_act_bits:.2f}"

    def panels(self, chosen: Sequence[tuple[int, int]]) -> list[tuple[str, list[int]]]:
        """The allocation plot's panels from the chosen (weight bits, activation bits) per layer."""
        return [("chosen activation bits", [a for _, a in chosen])]


class QnnTarget(UniformWeights):
    """``--target qnn``: W4/W8 × A8/A16 per layer, cost in bytes, budget a fraction of all-A16/W8."""

    name = "qnn"
    mode = "qnn"
    plot_max = 16
    reduce_range_refusal = ("--reduce-range is for x86 CPUs without VNNI; the QNN HTP (--target qnn) takes "
                            "full-range 8-bit weights")
    candidates_refusal = "--mp-candidates does not apply with --target qnn, whose options are W4/W8 x A8/A16"

    def check(self, cfg: "CalibConfig") -> None:
        if cfg.mp_budget is None:
            return
        if cfg.mp_budget > 1:
            raise ConfigError(f"--mp-budget {cfg.mp_budget} must be a fraction in (0, 1] of the all-A16/W8 bytes "
                              f"with --target qnn")
        if cfg.mp_cost != "elements":
            raise ConfigError("--mp-cost does not apply with --target qnn, whose cost is its byte table")

    def choices(self, cfg: "CalibConfig", weight_bits: int) -> list[tuple[int, int]]:
        return [(w, a) for w in QNN_WEIGHT_BITS for a in QNN_ACT_BITS]

    def cost(self, cfg: "CalibConfig") -> Cost:
        return QNN_BYTES

    def option(self, choice: tuple[int, int]) -> Any:
        return choice

    def label(self, weight_bits: int, mean_act_bits: float, budget_fraction: float) -> str:
        return f"qnn {budget_fraction:.3f} of A16/W8 bytes"

    def panels(self, chosen: Sequence[tuple[int, int]]) -> list[tuple[str, list[int]]]:
        return [*super().panels(chosen), ("chosen weight bits", [w for w, _ in chosen])]


class CpuTarget(UniformWeights):
    """``--target cpu``: W4/W8 per layer under 8-bit activations, no online node, cost in weight
    bytes, budget a fraction of all-W8; errors measured on the image."""

    name = "cpu"
    mode = "cpu_weight_bits"
    lean = True
    default_budget = CPU_DEFAULT_BUDGET
    candidates_refusal = "--mp-candidates does not apply with --target cpu, whose options are W4/W8 weights"

    def check(self, cfg: "CalibConfig") -> None:
        if cfg.method == "quantvsr":
            raise ConfigError("--target cpu keeps no low-rank branch, which is what --method quantvsr allocates and "
                              "trains; use another method")
        if cfg.weight_bits != 4 or cfg.act_bits != 8:
            raise ConfigError(f"--target cpu chooses 4- or 8-bit weights per layer under 8-bit activations (the CPU "
                              f"kernels' container); use --bits W4A8 (not {cfg.bits})")
        if cfg.mp_budget is not None and not 0 < cfg.mp_budget <= 1:
            raise ConfigError(f"--mp-budget {cfg.mp_budget} must be a fraction in (0, 1] of the all-W8 weight bytes "
                              f"with --target cpu")
        if cfg.mp_budget is not None and cfg.mp_budget < 0.5:
            raise ConfigError(f"--mp-budget {cfg.mp_budget} is infeasible with --target cpu: every layer at W4 is "
                              f"0.5 of the all-W8 weight bytes")
        if cfg.mp_cost != "elements":
            raise ConfigError("--mp-cost does not apply with --target cpu, whose cost is the weights' bytes")

    def choices(self, cfg: "CalibConfig", weight_bits: int) -> list[tuple[int, int]]:
        return [(cfg.weight_code_bits(w), cfg.act_bits) for w in CPU_WEIGHT_BITS]

    def cost(self, cfg: "CalibConfig") -> Cost:
        return CPU_BYTES

    def option(self, choice: tuple[int, int]) -> Any:
        return choice[0]

    def label(self, weight_bits: int, mean_act_bits: float, budget_fraction: float) -> str:
        return f"cpu {budget_fraction:.3f} of W8 weight bytes"

    def panels(self, chosen: Sequence[tuple[int, int]]) -> list[tuple[str, list[int]]]:
        return [("chosen weight bits", [w for w, _ in chosen])]


UNIFORM = UniformWeights()
TARGETS: Mapping[str, UniformWeights] = {"qnn": QnnTarget(), "cpu": CpuTarget()}


def get_target(name: str | None) -> UniformWeights:
    """The target ``CalibConfig.target`` names (None: uniform weight bits); ConfigError if unknown."""
    if name is None:
        return UNIFORM
    if name not in TARGETS:
        raise ConfigError(f"--target {name!r} is not one of {', '.join(TARGETS)}")
    return TARGETS[name]
