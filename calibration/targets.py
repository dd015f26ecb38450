"""What the bit allocation chooses between and what a choice costs, per target (``CalibConfig.target``).

A target describes itself: its (weight bits, activation bits) options, its cost model, how it is
checked, named and plotted. The allocation (``calibration.mixed``) is generic over them; adding a
target adds a class here, not branches there. No torch: the CLI and the config checks import this.

* ``UniformWeights`` (no ``--target``): every layer keeps the run's weight bits, its activation bits
  are one of ``mp_candidates``; the cost is ``mp_cost``: ``elements`` (b · E_i, activation storage /
  traffic in bits) or ``bops`` (b · w_bits · MACs_i, bit operations). ``mp_budget`` is a mean
  activation bit width (element- or MAC-weighted).
* ``QnnTarget`` (``--target qnn``, Qualcomm's HTP, the ``qnn`` profile): (weight bits ∈ {4, 8}) ×
  (activation bits ∈ {8, 16}) per layer, at or above the run's ``--bits``, the widths the HTP runs
  in integers. Lean like ``cpu``: no online node, so every conv / linear layer reaches the HTP as an
  integer QDQ node unit (the float ops between them, norms, SiLU, attention, run there in FP16). Two
  costs, each with its budget (``QnnTarget.budget``): the weight codes' bytes P_i·w/8 (``mp_budget``, a
  fraction (0, 1] of the all-W8 bytes, default ``QNN_DEFAULT_BUDGET``) and a latency proxy,
  MACs_i·a/8 (assumed: the HTP's 16-bit-activation convolutions run at about half its 8-bit rate;
  ``mp_latency_budget``, a multiple ≥ 1 of the proxy with every layer at the run's activation bits,
  default ``QNN_DEFAULT_LATENCY``). Errors measured on the image like ``cpu``'s.
* ``CpuTarget`` (``--target cpu``, ONNX Runtime's CPU kernels, the ``ort-cpu`` profile): weight bits
  ∈ {4, 8} per layer under 8-bit activations. Every CPU integer kernel reads 8-bit
  codes, so a 4-bit layer buys bytes on disk (INT4-stored codes, ``export.profiles``), not speed; and
  what keeps the graph fast is no online node: no smoothing, no rotation, no low-rank branch
  (``lean``). The cost is the weight codes' bytes P_i·w/8; ``mp_budget`` is a fraction (0, 1] of the
  all-W8 bytes Σ P_i (default ``CPU_DEFAULT_BUDGET``). Each layer's error is measured on the image
  (``calibration.sensitivity.option_errors``), not on the layer's product.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from quantface.bits import container_bits
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
# --target qnn's defaults: the same weight-byte share as the CPU's, and at most 25 % more latency proxy than
# all-A8 (docs/calibration_notes.md, "W4 x A8/A16 for the HTP").
QNN_DEFAULT_BUDGET = 0.55
QNN_DEFAULT_LATENCY = 1.25
QNN_COST_TABLE = ("cost of option (w, a) of layer i = (P_i·w/8 bytes of weight codes, MACs_i·a/8 latency proxy: "
                  "MACs per image at a-bit activations in 8-bit MAC units)")
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


class QnnCost(Cost):
    """Two dimensions: weight bytes and the latency proxy (``QNN_COST_TABLE``)."""

    def of(self, layer: LayerSize, w: int, a: int) -> tuple[float, float]:
        return layer.weights * w / 8, layer.macs * a / 8

    def notes(self, reference: Any) -> dict[str, Any]:
        return {**super().notes(list(reference)), "cost_table": QNN_COST_TABLE}


class CpuByteCost(Cost):
    def of(self, layer: LayerSize, w: int, a: int) -> float:
        return layer.weights * container_bits(w) / 8  # the container: 7-bit codes (--reduce-range) fill INT8

    def reference(self, layers: Sequence[LayerSize], weight_bits: int) -> float:
        return float(sum(s.weights for s in layers))


COSTS = {
    "elements": ElementCost("elements", "mean activation bits", "activation bits per image (act bits × input elements)"),
    "bops": BopsCost("bops", "mean activation bits (MAC-weighted)",
                     "bit operations per image (act bits × weight bits × MACs)"),
}
QNN_COST = QnnCost("qnn_bytes_latency", "of (the all-W8 weight bytes, the all-A8 latency proxy)",
                   "(bytes of the weight codes, latency proxy MACs·a/8)")
CPU_BYTES = CpuByteCost("cpu_weight_bytes", "of the all-W8 weight bytes",
                        "bytes of the weight codes (P_i · w / 8: 4-bit codes stored as INT4, 7- and 8-bit ones as INT8)")


# ----------------------------------------------------------------------------------------- targets
class UniformWeights:
    """No ``--target``: the run's weight bits everywhere, activation bits from ``mp_candidates``."""

    name: str | None = None
    mode = "activation_bits"
    lean = False  # whether the target takes no online transform and no low-rank branch (CpuTarget)
    default_budget: float | None = None  # mp_budget when none is given (None: uniform bits)
    default_latency: float | None = None  # mp_latency_budget when none is given (None: it does not apply)
    default_steps: int | None = None  # refinement steps when --steps is not given (None: the method's)
    plot_max = ACT_PLOT_MAX
    reduce_range_refusal = ""  # why --reduce-range is refused with this target ("": it is not)
    candidates_refusal = ""  # why --mp-candidates is (its own options instead of mp_candidates)

    def defaults(self, cfg: "CalibConfig") -> tuple[float | None, float | None]:
        """(mp_budget, mp_latency_budget) when the user gives none."""
        return self.default_budget, self.default_latency

    def check(self, cfg: "CalibConfig") -> None:
        """One-sentence ConfigErrors for the budget (already a positive number, or None)."""
        if cfg.mp_latency_budget is not None:
            raise ConfigError("--mp-latency-budget applies to --target qnn")
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


class LeanTarget(UniformWeights):
    """A hardware target whose graph has no online node (``MethodSpec.lean``): options (w, a) per layer,
    errors measured on the image against a baseline option (``calibration.mixed.allocate_lean``)."""

    lean = True
    cost_words = ""  # what the cost is, for the --mp-cost refusal
    # No branch to distil: the refinement would train the quantizer scales alone, which no run has measured
    # to help these targets (docs/calibration_notes.md); --steps N asks for it.
    default_steps = 0

    def check_lean(self, cfg: "CalibConfig") -> None:
        if cfg.method == "quantvsr":
            raise ConfigError(f"--target {self.name} keeps no low-rank branch, which is what --method quantvsr "
                              f"allocates and trains; use another method")
        if cfg.mp_cost != "elements":
            raise ConfigError(f"--mp-cost does not apply with --target {self.name}, whose cost is {self.cost_words}")

    def baseline(self, choices: Sequence[tuple[int, int]]) -> tuple[int, int]:
        """The option every layer is at while the others' errors are measured: the widest weights at the
        narrowest activations (the other options differ from it in one width each, or in both)."""
        return max(w for w, _ in choices), min(a for _, a in choices)

    def budget(self, cfg: "CalibConfig", sizes: Sequence[LayerSize]) -> tuple[Any, Any]:
        """(budget, reference cost) in the cost's units."""
        raise NotImplementedError


class QnnTarget(LeanTarget):
    """``--target qnn``: W4/W8 × A8/A16 per layer, no online node; costs weight bytes and a latency proxy."""

    name = "qnn"
    mode = "qnn"
    plot_max = 16
    default_budget = QNN_DEFAULT_BUDGET
    default_latency = QNN_DEFAULT_LATENCY
    cost_words = "its weight bytes and latency proxy"
    reduce_range_refusal = ("--reduce-range is for x86 CPUs without VNNI; the QNN HTP (--target qnn) takes "
                            "full-range 8-bit weights")
    candidates_refusal = "--mp-candidates does not apply with --target qnn, whose options are W4/W8 x A8/A16"

    def defaults(self, cfg: "CalibConfig") -> tuple[float | None, float | None]:
        return (1.0 if cfg.weight_bits == max(QNN_WEIGHT_BITS) else self.default_budget), self.default_latency

    def check(self, cfg: "CalibConfig") -> None:
        self.check_lean(cfg)
        if cfg.weight_bits not in QNN_WEIGHT_BITS or cfg.act_bits not in QNN_ACT_BITS:
            raise ConfigError(f"--target qnn chooses 4- or 8-bit weights and 8- or 16-bit activations per layer, at "
                              f"or above --bits; use W4A8, W4A16 or W8A8 (not {cfg.bits})")
        if cfg.weight_bits == max(QNN_WEIGHT_BITS) and cfg.act_bits == max(QNN_ACT_BITS):
            raise ConfigError("--bits W8A16 leaves --target qnn nothing to choose: every layer would be W8A16; "
                              "drop --target for a uniform W8A16 graph")
        low = cfg.weight_bits / 8
        if cfg.mp_budget is not None and not low <= cfg.mp_budget <= 1:
            raise ConfigError(f"--mp-budget {cfg.mp_budget} must be a fraction in [{low:g}, 1] of the all-W8 weight "
                              f"bytes with --target qnn and --bits {cfg.bits}")
        if cfg.mp_latency_budget is not None and cfg.mp_latency_budget < 1:
            raise ConfigError(f"--mp-latency-budget {cfg.mp_latency_budget} must be at least 1 (a multiple of the "
                              f"latency proxy with every layer at {cfg.act_bits}-bit activations)")

    def choices(self, cfg: "CalibConfig", weight_bits: int) -> list[tuple[int, int]]:
        return [(w, a) for w in QNN_WEIGHT_BITS if w >= cfg.weight_bits for a in QNN_ACT_BITS if a >= cfg.act_bits]

    def cost(self, cfg: "CalibConfig") -> Cost:
        return QNN_COST

    def budget(self, cfg: "CalibConfig", sizes: Sequence[LayerSize]) -> tuple[Any, Any]:
        reference = (float(sum(s.weights for s in sizes)), sum(s.macs for s in sizes) * cfg.act_bits / 8)
        return (cfg.mp_budget * reference[0], cfg.mp_latency_budget * reference[1]), reference

    def option(self, choice: tuple[int, int]) -> Any:
        return choice

    def label(self, weight_bits: int, mean_act_bits: float, budget_fraction: Any) -> str:
        return (f"qnn {budget_fraction[0]:.3f} of W8 weight bytes, {budget_fraction[1]:.3f}x A{min(QNN_ACT_BITS)} latency "
                f"(mean A{mean_act_bits:.2f})")

    def panels(self, chosen: Sequence[tuple[int, int]]) -> list[tuple[str, list[int]]]:
        return [*super().panels(chosen), ("chosen weight bits", [w for w, _ in chosen])]


class CpuTarget(LeanTarget):
    """``--target cpu``: W4/W8 per layer under 8-bit activations, no online node, cost in weight
    bytes, budget a fraction of all-W8; errors measured on the image."""

    name = "cpu"
    mode = "cpu_weight_bits"
    default_budget = CPU_DEFAULT_BUDGET
    cost_words = "the weights' bytes"
    candidates_refusal = "--mp-candidates does not apply with --target cpu, whose options are W4/W8 weights"

    def check(self, cfg: "CalibConfig") -> None:
        self.check_lean(cfg)
        if cfg.weight_bits != 4 or cfg.act_bits != 8:
            raise ConfigError(f"--target cpu chooses 4- or 8-bit weights per layer under 8-bit activations (the CPU "
                              f"kernels' container); use --bits W4A8 (not {cfg.bits})")
        if cfg.mp_budget is not None and not 0 < cfg.mp_budget <= 1:
            raise ConfigError(f"--mp-budget {cfg.mp_budget} must be a fraction in (0, 1] of the all-W8 weight bytes "
                              f"with --target cpu")
        if cfg.mp_budget is not None and cfg.mp_budget < 0.5:
            raise ConfigError(f"--mp-budget {cfg.mp_budget} is infeasible with --target cpu: every layer at W4 is "
                              f"0.5 of the all-W8 weight bytes")
        if cfg.mp_latency_budget is not None:
            raise ConfigError("--mp-latency-budget applies to --target qnn (the CPU options do not change the "
                              "activation width)")

    def choices(self, cfg: "CalibConfig", weight_bits: int) -> list[tuple[int, int]]:
        return [(cfg.weight_code_bits(w), cfg.act_bits) for w in CPU_WEIGHT_BITS]

    def cost(self, cfg: "CalibConfig") -> Cost:
        return CPU_BYTES

    def budget(self, cfg: "CalibConfig", sizes: Sequence[LayerSize]) -> tuple[Any, Any]:
        reference = float(sum(s.weights for s in sizes))
        return cfg.mp_budget * reference, reference

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
