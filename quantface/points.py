"""Quantizer points: where a deployment graph rounds the output of a float op (a norm, SiLU, a residual
add, an attention product) to integer codes, so the QNN HTP runs the op as an integer QDQ node unit.

A model marks every such tensor with a ``Point`` — an identity module without parameters, so state
dicts, recipes and the FP numerics are untouched — and every float constant such an op reads (a norm's
γ / β, the timestep projection a ResBlock adds) with a ``ConstantPoint``. What a point does depends on
who installed it:

* nothing (``Point`` / ``ConstantPoint`` as built): identity; modules keep their FP code path, bit for bit;
* calibration (``observing``): ``RangeObserver`` records the min / max of its tensor on calibration images,
  stored in the recipe's ``points`` section (``{name: [lo, hi]}``);
* the simulation (``calibration.recipe.apply_recipe(..., points=True)``): ``QuantPoint`` fake-quantizes
  to ``POINT_BITS`` over the recorded range, and ``QuantConstant`` rounds each constant as the export
  stores it (``constant_codes``);
* the exporter (``export.trace``): a marker the lowering turns into QuantizeLinear → DequantizeLinear
  with the same parameters; the constants stay float in the trace and ``export.integer_ops`` stores
  them as codes with ``constant_codes``, so graph and simulation round the same float32 values.

A module whose points are ``active`` takes the split path a QDQ graph needs (GroupNorm as normalize →
× γ → + β, SiLU as x · sigmoid(x)); otherwise its single FP op.
"""

from __future__ import annotations

import torch
from torch import nn

from quantface.quant import act_qparams_from_range, fake_quantize, qrange
from quantface.recipe import Recipe, RecipeError

POINT_BITS = 16  # UINT16 activations: what ONNX Runtime's A16W8 QNN configuration gives its float ops


class Point(nn.Module):
    """Identity marker of a float op's output (see the module docstring)."""

    active = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ConstantPoint(Point):
    """Identity marker of a float constant an integer node unit reads."""


class ActivePoint(Point):
    """Identity that switches its module to the split path (the exporter's constants: stored later)."""

    active = True


class ActiveConstant(ConstantPoint):
    active = True


class RangeObserver(Point):
    """Records the min / max of every tensor it sees (calibration)."""

    active = True

    def __init__(self) -> None:
        super().__init__()
        self.lo, self.hi = float("inf"), float("-inf")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.lo = min(self.lo, float(x.detach().min()))  # (Python floats: no tensor on any device)
        self.hi = max(self.hi, float(x.detach().max()))
        return x


class QuantPoint(Point):
    """Fake-quantizes to ``POINT_BITS`` unsigned codes over [lo, hi] (widened to hold 0)."""

    active = True

    def __init__(self, lo: float, hi: float, bits: int = POINT_BITS):
        super().__init__()
        self.bits, self.lo, self.hi = bits, lo, hi
        scale, zero = act_qparams_from_range(lo, hi, bits)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("zero_point", zero, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = qrange(self.bits, signed=False)
        return fake_quantize(x, self.scale, self.zero_point, qmin, qmax)

    def extra_repr(self) -> str:
        return f"A{self.bits}, [{self.lo:.4g}, {self.hi:.4g}]"


def constant_codes(values: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """(codes, scale, zero_point): a float constant as the export stores it, unsigned ``POINT_BITS``
    codes per tensor (the UINT16 constants ONNX Runtime's A16W8 QNN configuration gives Mul / Add). A
    tensor of one repeated value c is stored exactly: scale |c| with code 1 (c > 0), code 0 over zero
    point 1 (c < 0), or code 0 at scale 1 (zeros); any other over [min(0, v), max(0, v)]."""
    v = values.detach().float()
    lo, hi = v.min(), v.max()
    if lo == hi:
        c = float(lo)
        return torch.full_like(v, 1 if c > 0 else 0, dtype=torch.int32), (abs(c) if c else 1.0), (1 if c < 0 else 0)
    scale_t, zero_t = act_qparams_from_range(lo, hi, POINT_BITS)
    qmin, qmax = qrange(POINT_BITS, signed=False)
    codes = torch.clamp(torch.round(v / scale_t) + zero_t, qmin, qmax)
    return codes.to(torch.int32), float(scale_t), int(zero_t)


def dequantized_constant(values: torch.Tensor) -> torch.Tensor:
    """``values`` after ``constant_codes`` and back, in float32 as the graph's DequantizeLinear computes it."""
    codes, scale, zero = constant_codes(values)
    return (codes.float() - zero) * torch.tensor(scale, dtype=torch.float32, device=codes.device)


class QuantConstant(ConstantPoint):
    """Rounds a constant as the export stores it (``constant_codes``), dequantized."""

    active = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dequantized_constant(x).to(x.dtype)


def recipe_points(recipe: Recipe, model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """The recipe's ``points`` section checked against ``model``'s quantizer points: {name: (lo, hi)};
    empty for a recipe without one. RecipeError if it names other points than the model has."""
    section = recipe.sections.get("points")
    if not section:
        return {}
    names = set(points(model))
    if not isinstance(section, dict) or set(section) != names:
        missing = sorted(names - set(section)) if isinstance(section, dict) else []
        raise RecipeError(f"recipe {recipe.path}: its points section does not match the model's quantizer points"
                          + (f" (missing {', '.join(missing[:3])})" if missing else ""))
    ranges = {}
    for name, r in section.items():
        if not (isinstance(r, list) and len(r) == 2 and all(isinstance(v, (int, float)) for v in r) and r[0] <= r[1]):
            raise RecipeError(f"recipe {recipe.path}: point {name} has no [min, max] range")
        ranges[name] = (float(r[0]), float(r[1]))
    return ranges


def points(model: nn.Module) -> dict[str, Point]:
    """The model's activation points (not its constant points), by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Point) and not isinstance(m, ConstantPoint)}


def constant_points(model: nn.Module) -> dict[str, ConstantPoint]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ConstantPoint)}


def install(model: nn.Module, make_point, make_constant) -> None:
    """Replace every point of ``model`` by ``make_point(name)`` and every constant point by
    ``make_constant(name)``, in place."""
    for name, factory in [*((n, make_point) for n in points(model)),
                          *((n, make_constant) for n in constant_points(model))]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, factory(name))


__all__ = ["POINT_BITS", "ActiveConstant", "ActivePoint", "ConstantPoint", "Point", "QuantConstant", "QuantPoint",
           "RangeObserver", "constant_codes", "dequantized_constant", "constant_points", "install", "points", "recipe_points"]
