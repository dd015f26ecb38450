"""Time the bit-allocation integer program (``calibration.allocation.allocate``, pulp + CBC).

    python tools/bench_allocation.py --recipe recipes/quantface_mp_w4a4      # the program a recipe recorded
    python tools/bench_allocation.py --data ../shared/data/faces_hq/calib    # built on the fly (sweep included)

Two problems:

1. the reference model's real one: from a recipe's "allocation" section (its L_{i,o}, M_{i,o} and
   budget, exactly what calibration solved), or built on the fly (prepare + layer errors + the
   sensitivity sweep on ``--images`` calibration images, the calibrate() code path);
2. a synthetic one with Stable Diffusion 2.1's size: ``--layers`` (300) quantized activations ×
   ``--choices`` (4) bit widths 3..6, seeded: input elements log-uniform in [1e4, 3e6], sensitivity
   B_i uniform in 2..8, errors w_i² · e_i · 4^(−b) with e_i log-uniform over six decades and ±20 %
   noise per option (quantization noise power falls about 4× per bit), cost b × elements, budget
   ``--budget`` mean activation bits; and the same with errors drawn without any structure.

Acceptance (issue #4): ≤ 5 s for the reference model, ≤ 60 s for the SD2.1-sized problem.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantface.calibration.allocation import Option, Solution, allocate  # noqa: E402
from quantface.errors import exit_status  # noqa: E402

REAL_LIMIT_S, SYNTHETIC_LIMIT_S = 5.0, 60.0


def from_recipe(path: Path) -> tuple[dict[str, list[Option]], float, str]:
    meta = json.loads((path / "recipe.json").read_text())
    if "allocation" not in meta:
        raise SystemExit(f"{path} has no allocation section (calibrate with --mp-budget)")
    a = meta["allocation"]
    options = {n: [Option(c if not isinstance(c, list) else tuple(c), e, m)
                   for c, e, m in zip(a["candidates"], l["errors"], l["costs"])] for n, l in a["layers"].items()}
    return options, a["budget_cost"], f"recipe {path} (budget {a['budget']}, recorded solve {a['solve_seconds']:.2f}s)"


def on_the_fly(data: str, images: int, budget: float) -> tuple[dict[str, list[Option]], float, str]:
    import copy

    from quantface.calibration import CalibConfig
    from quantface.calibration.methods import get_method
    from quantface.calibration.mixed import build_problem, candidate_choices
    from quantface.calibration.sensitivity import QParams, layer_errors, sensitivity_sweep
    from quantface.calibration.recipe import weights_fingerprint
    from quantface.calibration.run import CalibData, prepare
    from quantface.models import load_model

    cfg = CalibConfig(method="quantface", bits="W4A4", data=data, out=str(Path("/tmp") / "bench_allocation"),
                      limit=max(images, 8), stat_images=max(images, 8), mp_budget=budget, mp_sweep_images=images,
                      resume=False)
    spec = get_method(cfg.method)
    fp = load_model(cfg.model, cfg.weights)
    data_ = CalibData.build(fp, cfg, fp.config.working_size)
    model = copy.deepcopy(fp)
    qp = QParams()
    layers = prepare(model, data_, cfg, spec, qp)
    x = data_.lq[:images]
    choices = candidate_choices(cfg, cfg.weight_bits)
    stats = layer_errors(model, layers, x, choices, qp, spec)
    sweep = sensitivity_sweep(model, layers, x, cfg, qp, weights_fingerprint(fp))
    options, budget_cost, _, _ = build_problem(stats, {n: r["bits"] for n, r in sweep.items()}, choices, cfg,
                                               cfg.weight_bits)
    return options, budget_cost, f"reference model built on the fly ({images} images, budget {budget})"


def synthetic(layers: int, choices: int, budget: float, seed: int, structured: bool
              ) -> tuple[dict[str, list[Option]], float, str]:
    rng = random.Random(seed)
    bits = list(range(3, 3 + choices))
    options, total = {}, 0
    for i in range(layers):
        elements = int(10 ** rng.uniform(4, math.log10(3e6)))
        total += elements
        if structured:
            w = 2 ** rng.randint(2, 8) - 1
            e = 10 ** rng.uniform(-3, 3)
            errs = [w * w * e * 4.0 ** (-b) * rng.uniform(0.8, 1.2) for b in bits]
        else:
            errs = [rng.uniform(0, 1000) for _ in bits]
        options[f"layer{i}"] = [Option(b, err, b * elements) for b, err in zip(bits, errs)]
    kind = "structured" if structured else "unstructured"
    label = f"synthetic SD2.1-sized, {kind} errors ({layers} layers x {choices} choices, seed {seed})"
    return options, budget * total, label


def report(options: dict[str, list[Option]], budget_cost: float, label: str, limit: float) -> Solution:
    t0 = time.perf_counter()
    sol = allocate(options, budget_cost)
    wall = time.perf_counter() - t0
    n_vars = sum(len(v) for v in options.values())
    ok = "OK" if sol.seconds <= limit else "OVER"
    print(f"{label}: {len(options)} layers, {n_vars} binaries: solved in {sol.seconds:.3f} s "
          f"(limit {limit:.0f} s, {ok}; wall {wall:.3f} s), cost {sol.cost / budget_cost:.4f} of the budget, "
          f"objective {sol.objective:.6g}")
    return sol


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="recipe folder with an allocation section")
    p.add_argument("--data", default="../shared/data/faces_hq/calib", help="calibration faces (without --recipe)")
    p.add_argument("--images", type=int, default=4, help="sweep images when building on the fly")
    p.add_argument("--budget", type=float, default=4.0, help="mean activation bits")
    p.add_argument("--layers", type=int, default=300)
    p.add_argument("--choices", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    def run() -> None:
        if a.recipe:
            options, budget_cost, label = from_recipe(Path(a.recipe))
        else:
            options, budget_cost, label = on_the_fly(a.data, a.images, a.budget)
        report(options, budget_cost, label, REAL_LIMIT_S)
        for structured in (True, False):
            report(*synthetic(a.layers, a.choices, a.budget, a.seed, structured), SYNTHETIC_LIMIT_S)

    return exit_status(run)


if __name__ == "__main__":
    raise SystemExit(main())
