"""The bit allocation's integer program, without torch: exactly one option per layer, Σ cost ≤ budget,
least Σ error (a multiple-choice knapsack), solved exactly by pulp's bundled CBC.

Binary a_{i,o}, Σ_o a_{i,o} = 1 for every layer i, Σ M_{i,o} a_{i,o} ≤ budget, minimise Σ L_{i,o} a_{i,o}.
A cost may have several dimensions (``Option.cost`` a tuple, ``budget`` a tuple of the same length:
one constraint each), as the branch-rank allocation's parameters and MACs (``calibration.ranks``).
The errors L and costs M come from ``calibration.sensitivity`` and ``calibration.targets``; why the
program is scaled and how CBC is run is in docs/calibration_notes.md ("The integer program").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from quantface.errors import ConfigError


@dataclass(frozen=True)
class Option:
    """One candidate of a layer: what it means (``choice``: activation bits b, or (weight bits,
    activation bits)), its error L and its cost M."""

    choice: Any
    error: float
    cost: float | tuple[float, ...]  # a tuple: one value per budget dimension


@dataclass
class Solution:
    choice: dict[str, int]  # index of the chosen option per layer
    objective: float  # Σ L of the chosen options
    cost: float | tuple[float, ...]  # Σ M of the chosen options (≤ budget), per dimension for tuple costs
    budget: float | tuple[float, ...]
    seconds: float  # wall time of the solve (building the model and running CBC)
    status: str


def _dims(cost: float | tuple[float, ...]) -> tuple[float, ...]:
    return cost if isinstance(cost, tuple) else (cost,)


def minimum_cost(options: Mapping[str, Sequence[Option]]) -> float | tuple[float, ...]:
    """Σ over layers of the cheapest option's cost (per dimension for tuple costs)."""
    first = next(o for opts in options.values() for o in opts)
    if not isinstance(first.cost, tuple):
        return float(sum(min(o.cost for o in opts) for opts in options.values()))
    return tuple(float(sum(min(o.cost[d] for o in opts) for opts in options.values())) for d in range(len(first.cost)))


def check_budget(options: Mapping[str, Sequence[Option]], budget: float | tuple[float, ...],
                 describe: Callable[[float], str] = lambda c: f"{c:g}") -> None:
    """ConfigError when even every layer's cheapest option exceeds ``budget`` (in any dimension)."""
    lowest = minimum_cost(options)
    for low, bud in zip(_dims(lowest), _dims(budget)):
        if low > bud:
            raise ConfigError(f"the bit budget {describe(bud)} is infeasible: the minimum achievable is "
                              f"{describe(low)} (every layer at its cheapest option)")


def allocate(options: Mapping[str, Sequence[Option]], budget: float | tuple[float, ...],
             describe: Callable[[float], str] = lambda c: f"{c:g}") -> Solution:
    """Exactly one option per layer with Σ cost ≤ ``budget`` and the least Σ error (a multiple-choice
    knapsack, solved exactly by CBC). ``describe`` words a cost for error messages. With tuple costs
    and a tuple ``budget``, one constraint per dimension."""
    import warnings

    import pulp

    if not options or any(not opts for opts in options.values()):
        raise ConfigError("bit allocation needs at least one option for every layer")
    check_budget(options, budget, describe)
    names = list(options)
    budgets = _dims(budget)
    if any(len(_dims(o.cost)) != len(budgets) for opts in options.values() for o in opts):
        raise ValueError("allocate: every option's cost needs one value per budget dimension")
    # The objective's lower bound scaled to 1e4 and the budget to 1: CBC's absolute tolerances then
    # act as relative ones of about 1e-9 (docs/calibration_notes.md, "The integer program").
    lower = sum(min(o.error for o in opts) for opts in options.values())
    positive = [o.error for opts in options.values() for o in opts if o.error > 0]
    err_scale = (lower if lower > 0 else (min(positive) if positive else 1.0)) / 1e4
    cost_scales = [abs(b) or 1.0 for b in budgets]
    t0 = time.perf_counter()
    rhs = [b / cs for b, cs in zip(budgets, cost_scales)]
    for _attempt in range(2):
        prob = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
        if hasattr(prob, "add_variable"):  # PuLP ≥ 3.3; LpVariable(...) alone is deprecated there
            def binary(name):
                return prob.add_variable(name, 0, 1, cat="Binary")
        else:
            def binary(name):
                return pulp.LpVariable(name, cat="Binary")
        a = {(i, j): binary(f"a_{i}_{j}") for i, n in enumerate(names) for j in range(len(options[n]))}
        prob += pulp.lpSum(options[n][j].error / err_scale * a[i, j]
                           for i, n in enumerate(names) for j in range(len(options[n])))
        for i, n in enumerate(names):
            prob += pulp.lpSum(a[i, j] for j in range(len(options[n]))) == 1
        for d, cost_scale in enumerate(cost_scales):
            prob += pulp.lpSum(_dims(options[n][j].cost)[d] / cost_scale * a[i, j]
                               for i, n in enumerate(names) for j in range(len(options[n]))) <= rhs[d]
        with warnings.catch_warnings():  # PuLP 3.3 deprecates PULP_CBC_CMD (its bundled CBC) for 4.0
            warnings.simplefilter("ignore", DeprecationWarning)
            # "preprocess off": the bundled CBC's integer preprocessing reports a poor choice as
            # optimal on some of these problems (docs/calibration_notes.md; a case in test_mixed.py).
            solver = pulp.PULP_CBC_CMD(msg=False, gapRel=0, gapAbs=0, threads=1, options=["preprocess off"])
        status = pulp.LpStatus[prob.solve(solver)]
        if status != "Optimal":
            raise ConfigError(f"the bit-allocation program for budget {', '.join(describe(b) for b in budgets)} "
                              f"was not solved to optimality (CBC status {status})")
        choice = {n: max(range(len(options[n])), key=lambda j, i=i: a[i, j].value() or 0.0)
                  for i, n in enumerate(names)}
        costs = [float(sum(_dims(options[n][choice[n]].cost)[d] for n in names)) for d in range(len(budgets))]
        if all(c <= b for c, b in zip(costs, budgets)):
            break
        # CBC's feasibility tolerance let the rounded choice overshoot: tighten by the overshoot, once.
        rhs = [r - 2 * max(c - b, 0.0) / cs for r, c, b, cs in zip(rhs, costs, budgets, cost_scales)]
    else:
        raise ConfigError(f"the bit-allocation program found no choice within the budget "
                          f"{', '.join(describe(b) for b in budgets)}")
    seconds = time.perf_counter() - t0
    objective = float(sum(options[n][choice[n]].error for n in names))
    if isinstance(budget, tuple):
        return Solution(choice, objective, tuple(costs), tuple(float(b) for b in budgets), seconds, status)
    return Solution(choice, objective, costs[0], float(budget), seconds, status)
