"""Adaptive bit-width allocation (QuantFace paper §3.4, "QuantFace-MP", e.g. W4A3.98): the orchestration.

Called by ``calibration.run.calibrate`` right after ``prepare`` when ``CalibConfig.mp_budget`` is set,
on the *prepared* model (transforms folded, SVD split, zero-initialised LoRA: exactly the FP model
while its quantizers are switched off). Four steps, each in its own module:

1. **Sensitivity sweep** and 2. **layer errors** (``calibration.sensitivity``): B_i per layer, the
   perceptual weight w_i = 2^B_i − 1, and ‖W X − Q(W) Q_b(X)‖²_F per option; L_{i,o} = w_i² · that.
3. **Integer program** (``calibration.allocation.allocate``, pulp + its bundled CBC; under ``torchrun``
   solved on rank 0 and its solution sent to the others): exactly one
   option per layer, Σ M_{i,o} ≤ budget, least Σ L_{i,o}. The options and the cost M are the
   target's (``calibration.targets``: uniform weight bits with ``mp_cost`` elements / bops, or
   ``--target qnn``'s W4/W8 × A8/A16 in bytes).
4. **Apply**: each layer's activation scale / zero point is recomputed for its chosen b from the same
   observed sample (and where the weight bits change, its weight scales); the caller then runs the
   usual refinement with those bits. ``AllocationResult.meta`` is the recipe's "allocation" section
   (every input of the program: w_i, B_i, L, M, budget, achieved mean bits, solve seconds),
   ``files`` the per-layer JSON and the two plots (``calibration.plots``) written into the recipe folder.

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
from quantface.calibration.sensitivity import (LayerStats, QParams, cache_dir, layer_errors, sensitivity_sweep,
                                               weight_bit_errors)
from quantface.calibration.targets import get_target
from quantface.errors import QuantFaceError
from quantface.quant import weight_scale

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


def _solution_meta(sol, options: dict[str, list[Option]], choices: list[tuple[int, int]], budget: float,
                   reference: float, seconds: float) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The recipe's "allocation" entries both allocations share: the program's solution, and per layer its
    options' errors and costs and the choice."""
    top = {"budget_cost": budget, "achieved_cost": sol.cost, "achieved_budget": sol.cost / reference,
           "objective": sol.objective, "solve_seconds": sol.seconds, "solver": "pulp CBC",
           "sweep_and_error_seconds": round(seconds, 1)}
    per_layer = {n: {"errors": [o.error for o in opts], "costs": [o.cost for o in opts], "choice": sol.choice[n],
                     "weight_bits": choices[sol.choice[n]][0], "act_bits": choices[sol.choice[n]][1]}
                 for n, opts in options.items()}
    return top, per_layer


def allocate_bits(model: torch.nn.Module, layers: dict[str, QuantLayer], data, cfg: "CalibConfig",
                  spec: "MethodSpec", samples: dict[str, torch.Tensor], weights_sha256: str) -> AllocationResult:
    """Steps 1–4 of the module docstring on the prepared ``model``; leaves every layer at its chosen bits."""
    t0 = time.time()
    target = get_target(cfg.target)
    x = data.lq[:cfg.mp_sweep_images]
    if target.lean:
        return allocate_weight_bits(model, layers, x, cfg, spec, t0)
    qparams = QParams(samples)
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


def allocate_weight_bits(model: torch.nn.Module, layers: dict[str, QuantLayer], x: torch.Tensor, cfg: "CalibConfig",
                         spec: "MethodSpec", t0: float) -> AllocationResult:
    """``--target cpu`` (``calibration.targets.CpuTarget``): the program over each layer's weight bits with
    errors measured on the image (``weight_bit_errors``: the layer alone at the lower width, the rest as
    prepared) and costs in weight bytes; leaves every layer at its chosen weight bits (scales searched for
    them). The higher width's error is 0: the prepared model is the baseline."""
    target = get_target(cfg.target)
    choices = target.choices(cfg, cfg.weight_bits)
    low, high = min(w for w, _ in choices), max(w for w, _ in choices)
    stats = {n: LayerStats(weights=l.weight.numel()) for n, l in layers.items()}
    cost = target.cost(cfg)
    reference = cost.reference(list(stats.values()), high)
    budget = cfg.mp_budget * reference

    def describe(c: float) -> str:
        return f"{c / reference:.4g} {cost.unit}"

    check_budget({n: [Option(target.option(c), 0.0, cost.of(stats[n], *c)) for c in choices] for n in stats},
                 budget, describe)
    with torch.no_grad():
        for layer in layers.values():  # the baseline: every layer at the higher width
            layer.set_weight_quant(high, weight_scale(layer.weight, high, spec.scale_init))
        errors = weight_bit_errors(model, layers, x, low, spec)
    options = {n: [Option(target.option(c), errors[n] if c[0] == low else 0.0, cost.of(stats[n], *c))
                   for c in choices] for n in stats}
    sweep_seconds = time.time() - t0
    sol = _solve(options, budget, describe)
    with torch.no_grad():
        for name, layer in layers.items():
            w_bits = choices[sol.choice[name]][0]
            if w_bits != layer.weight_bits:
                layer.set_weight_quant(w_bits, weight_scale(layer.weight, w_bits, spec.scale_init))
    total = sum(st.weights for st in stats.values())
    low_share = sum(stats[n].weights for n in layers if choices[sol.choice[n]][0] == low) / total
    top, per_layer = _solution_meta(sol, options, choices, budget, reference, sweep_seconds)
    meta: dict[str, Any] = {
        "mode": target.mode, "target": cfg.target, "metric": "image MSE increase (outputs in [0, 1])",
        "sweep_images": len(x), "cost": cost.name, **cost.notes(reference),
        "candidates": [target.option(c) for c in choices],
        "budget": cfg.mp_budget, **top,
        "weights_at_low_bits": low_share,
        "label": target.label(cfg.weight_bits, cfg.act_bits, sol.cost / reference),
        "layers": {n: {"index": i, "weight_params": stats[n].weights, "error_at_low_bits": errors[n], **per_layer[n]}
                   for i, n in enumerate(layers)},
    }
    dist.log(f"bit allocation: {meta['label']}, {100 * low_share:.1f}% of the weights at W{low} (budget "
             f"{describe(budget)}, achieved {describe(sol.cost)}), solved in {sol.seconds:.2f}s")
    names = list(layers)
    files = {"allocation.png": bits_plot(target.panels([choices[sol.choice[n]] for n in names]),
                                         f"bit allocation {meta['label']} (budget {describe(budget)})",
                                         target.plot_max)}
    return AllocationResult(meta, files, cache_dir(cfg))
