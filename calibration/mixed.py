"""Adaptive bit-width allocation (QuantFace paper §3.4, "QuantFace-MP", e.g. W4A3.98): the orchestration.

Called by ``calibration.run.calibrate`` right after ``prepare`` when ``CalibConfig.mp_budget`` is set,
on the *prepared* model (transforms folded, SVD split, zero-initialised LoRA: exactly the FP model
while its quantizers are switched off). Four steps, each in its own module:

1. **Sensitivity sweep** and 2. **layer errors** (``calibration.sensitivity``): B_i per layer, the
   perceptual weight w_i = 2^B_i − 1, and ‖W X − Q(W) Q_b(X)‖²_F per option; L_{i,o} = w_i² · that.
3. **Integer program** (``calibration.allocation.allocate``, pulp + its bundled CBC; under ``torchrun``
   solved on rank 0 and its solution sent to the others): exactly one
   option per layer, Σ M_{i,o} ≤ budget, least Σ L_{i,o}. The options and the cost M are the
   target's (``calibration.targets``: uniform weight bits with ``mp_cost`` elements / bops).
4. **Apply**: each layer's activation scale / zero point is recomputed for its chosen b from the same
   observed sample (and where the weight bits change, its weight scales); the caller then runs the
   usual refinement with those bits. ``AllocationResult.meta`` is the recipe's "allocation" section
   (every input of the program: w_i, B_i, L, M, budget, achieved mean bits, solve seconds),
   ``files`` the per-layer JSON and the two plots (``calibration.plots``) written into the recipe folder.

The lean targets (``--target cpu`` / ``qnn``: no online node, ``allocate_lean``) replace steps 1–2 by
errors measured on the image (``calibration.sensitivity.option_errors``: each layer alone at each option,
the rest at the target's baseline option) and take their own costs and budgets (weight bytes; for ``qnn``
also a latency proxy, a second dimension of the same program).

Measurements behind the defaults (ε, the B_i histograms) are in docs/calibration_notes.md.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quantface import distributed as dist
from quantface.calibration.allocation import Option, allocate, check_budget
from quantface.calibration.config import B_MAX, B_MIN, epsilon
from quantface.calibration.layers import QuantLayer
from quantface.calibration.plots import bits_plot
from quantface.calibration.sensitivity import (LayerStats, QParams, cache_dir, layer_errors, layer_sizes, option_errors,
                                               option_key, sensitivity_sweep)
from quantface.calibration.targets import get_target
from quantface.errors import QuantFaceError
from quantface.quant import act_range_method, weight_scale

if TYPE_CHECKING:
    from quantface.calibration.config import CalibConfig
    from quantface.calibration.methods import MethodSpec


@dataclass
class AllocationResult:
    meta: dict  # the recipe's "allocation" section
    files: dict[str, bytes]  # extra files for the recipe folder
    cache: Path  # the sweep cache folder (removed once the recipe is written)

    def cleanup(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)


def candidate_choices(cfg: "CalibConfig", weight_bits: int) -> list[tuple[int, int]]:
    """(weight bits, activation bits) options of every layer."""
    return get_target(cfg.target).choices(cfg, weight_bits)


def build_problem(stats: dict[str, LayerStats], sensitivity: dict[str, int], choices: list[tuple[int, int]],
                  cfg: "CalibConfig", weight_bits: int) -> tuple[dict[str, list[Option]], float, Callable, dict]:
    """Options per layer (L, M), the budget in cost units, a describer of costs, and budget notes."""
    target = get_target(cfg.target)
    cost = target.cost(cfg)
    reference = cost.reference(list(stats.values()), weight_bits)
    options = {n: [Option(target.option(c), (2 ** sensitivity[n] - 1) ** 2 * stats[n].sq_error[c],
                          cost.of(stats[n], *c)) for c in choices] for n in stats}

    def describe(c: float) -> str:
        return f"{c / reference:.4g} {cost.unit}"

    return options, cfg.mp_budget * reference, describe, cost.notes(reference)


def _check_cost_only(stats: dict[str, LayerStats], choices, cfg: "CalibConfig", weight_bits: int) -> None:
    options, budget, describe, _ = build_problem(stats, {n: B_MIN for n in stats}, choices, cfg, weight_bits)
    check_budget(options, budget, describe)


def _solve(options: dict[str, list[Option]], budget: float, describe: Callable):
    """``allocate`` on rank 0, its solution (or its user error) sent to every rank under ``torchrun``."""
    if not dist.active():
        return allocate(options, budget, describe)
    sol, error = None, None
    if dist.is_main():
        try:
            sol = allocate(options, budget, describe)
        except QuantFaceError as exc:
            error = exc
    sol, error = dist.broadcast_object((sol, error))
    if error is not None:
        raise error
    return sol


def _ratio(cost: Any, reference: Any) -> Any:
    """A cost as a fraction of the reference cost (per dimension for tuple costs)."""
    return tuple(c / r for c, r in zip(cost, reference)) if isinstance(cost, tuple) else cost / reference


def _solution_meta(sol, options: dict[str, list[Option]], choices: list[tuple[int, int]], budget: float,
                   reference: float, seconds: float) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The recipe's "allocation" entries both allocations share: the program's solution, and per layer its
    options' errors and costs and the choice."""
    top = {"budget_cost": budget, "achieved_cost": sol.cost, "achieved_budget": _ratio(sol.cost, reference),
           "objective": sol.objective, "solve_seconds": sol.seconds, "solver": "pulp CBC",
           "sweep_and_error_seconds": round(seconds, 1)}
    per_layer = {n: {"errors": [o.error for o in opts], "costs": [o.cost for o in opts], "choice": sol.choice[n],
                     "weight_bits": choices[sol.choice[n]][0], "act_bits": choices[sol.choice[n]][1]}
                 for n, opts in options.items()}
    return top, per_layer


def allocate_bits(model: torch.nn.Module, layers: dict[str, QuantLayer], data, cfg: "CalibConfig",
                  spec: "MethodSpec", qparams: QParams, weights_sha256: str) -> AllocationResult:
    """Steps 1–4 of the module docstring on the prepared ``model`` (``qparams``: what ``prepare`` observed);
    leaves every layer at its chosen bits."""
    t0 = time.time()
    target = get_target(cfg.target)
    x = data.lq[:cfg.mp_sweep_images]
    if target.lean:
        return allocate_lean(model, layers, x, cfg, spec, qparams, weights_sha256, t0)
    weight_bits = cfg.weight_code_bits(cfg.weight_bits)
    choices = candidate_choices(cfg, weight_bits)
    # Layer statistics and errors first: cheap, and they tell an infeasible budget before the sweep.
    stats = layer_errors(model, layers, x, choices, qparams, spec)
    _check_cost_only(stats, choices, cfg, weight_bits)
    sweep = sensitivity_sweep(model, layers, x, cfg, qparams, weights_sha256)
    sweep_seconds = time.time() - t0
    sens = {n: r["bits"] for n, r in sweep.items()}
    options, budget, describe, notes = build_problem(stats, sens, choices, cfg, weight_bits)
    sol = _solve(options, budget, describe)
    # Apply the chosen bits: ranges (and where the weight bits change, weight scales) recomputed for them.
    with torch.no_grad():
        for name, layer in layers.items():
            w_bits, a_bits = choices[sol.choice[name]]
            if w_bits != layer.weight_bits:
                layer.set_weight_quant(w_bits, weight_scale(layer.weight, w_bits, spec.scale_init))
            layer.set_act_quant(a_bits, *qparams(name, a_bits, spec.scale_init))
    top, per_layer = _solution_meta(sol, options, choices, budget, notes["reference_cost"], sweep_seconds)
    total_e = sum(s.elements for s in stats.values())
    mean_bits = sum(choices[sol.choice[n]][1] * stats[n].elements for n in layers) / total_e
    meta: dict[str, Any] = {
        "mode": target.mode,
        "target": cfg.target,
        "metric": cfg.mp_metric, "epsilon": epsilon(cfg), "sweep_images": len(x), "b_range": [B_MIN, B_MAX],
        "cost": target.cost(cfg).name,
        **notes,
        "candidates": [target.option(c) for c in choices],
        "budget": cfg.mp_budget, **top,
        "achieved_mean_act_bits": mean_bits,
        "label": target.label(weight_bits, mean_bits, sol.cost / notes["reference_cost"]),
        "layers": {n: {"index": i, "sensitivity_bits": sens[n], "weight": 2 ** sens[n] - 1,
                       "deviation": sweep[n]["deviation"], "input_elements": stats[n].elements,
                       "macs": stats[n].macs, "weight_params": stats[n].weights,
                       "sq_error": [stats[n].sq_error[c] for c in choices], **per_layer[n]}
                   for i, n in enumerate(layers)},
    }
    dist.log(f"bit allocation: {meta['label']} (budget {describe(budget)}, achieved {describe(sol.cost)}), "
          f"solved in {sol.seconds:.2f}s")
    names = list(layers)
    panels = target.panels([choices[sol.choice[n]] for n in names])
    files = {
        "sensitivity.json": (json.dumps({"metric": cfg.mp_metric, "epsilon": epsilon(cfg), "b_range": [B_MIN, B_MAX],
                                         "layers": {n: {"index": i, **sweep[n]} for i, n in enumerate(names)}},
                                        indent=1) + "\n").encode(),
        "sensitivity.png": bits_plot([("B_i: bits to reach the deviation threshold", [sens[n] for n in names])],
                                     f"sensitivity sweep: {cfg.mp_metric} deviation <= {epsilon(cfg):g}", B_MAX),
        "allocation.png": bits_plot(panels, f"bit allocation {meta['label']} (budget {describe(budget)})",
                                    target.plot_max),
    }
    return AllocationResult(meta, files, cache_dir(cfg))


def allocate_lean(model: torch.nn.Module, layers: dict[str, QuantLayer], x: torch.Tensor, cfg: "CalibConfig",
                  spec: "MethodSpec", qparams: QParams, weights_sha256: str, t0: float) -> AllocationResult:
    """The lean targets (``--target cpu`` / ``qnn``, ``calibration.targets.LeanTarget``): the program over each
    layer's (weight bits, activation bits) options with errors measured on the image against the target's
    baseline option (``option_errors``) and the target's costs and budgets; leaves every layer at its chosen
    option (weight scales searched for its bits, activation range from its observed sample)."""
    target = get_target(cfg.target)
    choices = target.choices(cfg, cfg.weight_bits)
    baseline = target.baseline(choices)
    stats = layer_sizes(model, layers, x)
    cost = target.cost(cfg)
    budget, reference = target.budget(cfg, list(stats.values()))

    def describe(c: Any) -> str:
        r = _ratio(c, reference)
        return (f"({', '.join(f'{v:.4g}' for v in r)}) {cost.unit}" if isinstance(r, tuple) else f"{r:.4g} {cost.unit}")

    check_budget({n: [Option(target.option(c), 0.0, cost.of(stats[n], *c)) for c in choices] for n in stats},
                 budget, describe)
    errors = option_errors(model, layers, x, choices, baseline, qparams, spec, cfg, weights_sha256)
    options = {n: [Option(target.option(c), errors[n][c], cost.of(stats[n], *c)) for c in choices] for n in stats}
    sweep_seconds = time.time() - t0
    sol = _solve(options, budget, describe)
    with torch.no_grad():
        for name, layer in layers.items():
            w_bits, a_bits = choices[sol.choice[name]]
            if w_bits != layer.weight_bits:
                layer.set_weight_quant(w_bits, weight_scale(layer.weight, w_bits, spec.scale_init))
            if a_bits != layer.act_bits:
                layer.set_act_quant(a_bits, *qparams(name, a_bits, act_range_method(a_bits, spec.scale_init)))
    chosen = {n: choices[sol.choice[n]] for n in layers}
    low_w, high_a = min(w for w, _ in choices), max(a for _, a in choices)
    total_p, total_m = sum(st.weights for st in stats.values()), sum(st.macs for st in stats.values())
    low_share = sum(stats[n].weights for n in layers if chosen[n][0] == low_w) / total_p
    wide_share = sum(stats[n].macs for n in layers if chosen[n][1] == high_a) / total_m
    top, per_layer = _solution_meta(sol, options, choices, budget, reference, sweep_seconds)
    mean_act = sum(chosen[n][1] * stats[n].macs for n in layers) / total_m
    meta: dict[str, Any] = {
        "mode": target.mode, "target": cfg.target, "metric": "image MSE change (outputs in [0, 1])",
        "sweep_images": len(x), "cost": cost.name, **cost.notes(reference),
        "candidates": [target.option(c) for c in choices], "baseline": target.option(baseline),
        "budget": cfg.mp_budget, **({"latency_budget": cfg.mp_latency_budget}
                                    if cfg.mp_latency_budget is not None else {}),
        **top,
        "weights_at_low_bits": low_share,
        **({"macs_at_high_act_bits": wide_share} if high_a != min(a for _, a in choices) else {}),
        "label": target.label(cfg.weight_bits, mean_act, _ratio(sol.cost, reference)),
        "layers": {n: {"index": i, "weight_params": stats[n].weights, "macs": stats[n].macs,
                       "input_elements": stats[n].elements,
                       "option_errors": {option_key(c): errors[n][c] for c in choices}, **per_layer[n]}
                   for i, n in enumerate(layers)},
    }
    wide = f", {100 * wide_share:.1f}% of the MACs at A{high_a}" if "macs_at_high_act_bits" in meta else ""
    dist.log(f"bit allocation: {meta['label']}, {100 * low_share:.1f}% of the weights at W{low_w}{wide} (budget "
             f"{describe(budget)}, achieved {describe(sol.cost)}), solved in {sol.seconds:.2f}s")
    names = list(layers)
    files = {"allocation.png": bits_plot(target.panels([chosen[n] for n in names]),
                                         f"bit allocation {meta['label']}", target.plot_max)}
    return AllocationResult(meta, files, cache_dir(cfg))
