"""Per-layer low-rank budgets (``CalibConfig.rank_budget``, ``--rank-budget F``; beyond the QuantFace paper).

Every method with a low-rank branch gives layer i a merged branch of rank R_i, split between the SVD
branch and the LoRA branch in the method's proportion (QuantFace: half and half, the SVD half taking
the floor). Two regimes:

* **Uniform** (F = 1.0, the default): R_i = (svd_rank + lora_rank)·r, as before, but capped below the
  layer's size n_i = min(out, in·kh·kw) of its (reshaped) weight: R_i ≤ n_i − 1. A branch of rank ≥ n_i
  holds the whole weight (its residual is zero and the "quantized" layer runs in full precision). In
  the reference model this changes three layers, the 8- and 3-channel output convs: encoder.conv_out
  and unet.conv_out (n = 8: rank 16 → 7) and decoder.conv_out (n = 3: rank 3 + 8 = 11 → 2).
* **Allocated** (F ≠ 1.0): R_i is chosen from ``RANK_CANDIDATES`` = {0, 2, 4, 8, 16, 32}, those below
  n_i, by the bit allocation's integer program (``calibration.allocation.allocate``: exactly one option
  per layer, Σ cost ≤ budget, least Σ error):

  - cost M_{i,R} (``rank_cost``): ``params`` = R·(in·kh·kw + out), the branch's parameters (down
    factor R × in × kh × kw, up factor out × R); ``macs`` = that × the layer's output positions per
    image (the branch's multiply-accumulates); or ``both``, a two-dimensional cost with one
    constraint each. Parameters alone favour the many-parameter, low-resolution UNet layers'
    branches for removal and keep the few-parameter, full-resolution ones, whose MACs dominate
    (on the reference model F = 0.5 by parameters leaves 1.05 × the uniform MACs);
  - budget = F × Σ_i M_{i, uniform R_i} (the capped uniform branches above), per dimension;
  - error L_{i,R} = ‖W′X − Q(W′ − B_R)·Q_a(X) − B_R·X‖²_F per image, B_R the rank-R truncated SVD of the
    layer's (smoothed, rotated) weight W′, Q the weight quantizer on the residual (its own scales,
    the method's scale init), Q_a the layer's activation quantizer (range from the observed
    sample, as ``prepare`` sets it), X the layer's transformed input in the unquantized model on the
    first ``mp_sweep_images`` calibration images, ∗ the layer's conv / matmul without bias. It is the
    error of the best rank-R branch the layer could start from; the branch itself starts as SVD
    (R·svd share) + zero-initialised LoRA (the rest) and is then distilled.

  R = 0 means no branch: the whole weight is quantized and the export emits no branch nodes.

With ``--mp-budget`` as well, the ranks are chosen first (this program) and the activation bits
then by the bit allocation on the model with those ranks: two programs in sequence, not one joint
program (the joint program is not implemented).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from quantface.calibration.allocation import Option, allocate
from quantface.calibration.layers import QuantLayer, hooks_removed
from quantface.quant import EPS, act_qparams, dequantize, qrange, quantize, weight_scale

if TYPE_CHECKING:
    from quantface.calibration.config import CalibConfig
    from quantface.calibration.methods import MethodSpec

RANK_CANDIDATES = (0, 2, 4, 8, 16, 32)
ERROR_BATCH = 8


def layer_size(layer: QuantLayer) -> int:
    """n = min(out, in·kh·kw): the rank of the layer's reshaped weight at most."""
    return min(layer.weight.shape[0], layer.weight[0].numel())


def rank_cap(layer: QuantLayer) -> int:
    """The largest rank a branch may have: below the layer's size (a rank-n branch is the whole weight)."""
    return max(layer_size(layer) - 1, 0)


def uniform_rank(spec: "MethodSpec", cfg: "CalibConfig", layer: QuantLayer) -> int:
    """The merged rank without ``--rank-budget``: (svd + lora)·r, uncapped as before per-layer ranks
    (``QuantLayer.split_lowrank`` caps the SVD part at the matrix). Capping it below the layer's size
    made the demo's tiny-model ort-cpu graph fall to 33 dB parity with its simulation (unexplained yet),
    so only allocated ranks are capped (``candidates``)."""
    return (spec.svd_rank + spec.lora_rank) * cfg.rank


def split_rank(spec: "MethodSpec", rank: int) -> tuple[int, int]:
    """(SVD rank, LoRA rank) of a merged rank-``rank`` branch, in the method's proportion."""
    units = spec.svd_rank + spec.lora_rank
    svd = rank * spec.svd_rank // units if units else 0
    return svd, rank - svd


def branch_params(layer: QuantLayer, rank: int) -> int:
    return rank * (layer.weight[0].numel() + layer.out_channels)


def candidates(layer: QuantLayer) -> list[int]:
    return [r for r in RANK_CANDIDATES if r <= rank_cap(layer)]


@dataclass
class RankStats:
    positions: int = 0  # output positions per image (pixels of a conv's output, tokens of a linear)
    sq_error: dict[int, float] | None = None  # L_{i,R} per candidate rank


def _svd_parts(layer: QuantLayer, ranks: list[int]) -> dict[int, torch.Tensor]:
    """The rank-R truncated SVD of the layer's weight, with its shape, per rank (float32)."""
    w = layer.weight.detach()
    u, sigma, vh = torch.linalg.svd(w.flatten(1).double(), full_matrices=False)
    return {r: ((u[:, :r] * sigma[:r]) @ vh[:r]).to(w.dtype).reshape(w.shape) for r in ranks}


def rank_errors(model: torch.nn.Module, layers: dict[str, QuantLayer], x: torch.Tensor,
                act: dict[str, tuple[torch.Tensor, torch.Tensor]], cfg: "CalibConfig",
                spec: "MethodSpec") -> dict[str, RankStats]:
    """L_{i,R} per layer and candidate rank (module docstring), measured by hooks in one pass of the
    unquantized ``model`` (no branch split yet, quantizers off) over ``x``; ``act`` the layers'
    activation (scale, zero point)."""
    w_bits = cfg.weight_code_bits(cfg.weight_bits)
    stats = {n: RankStats(sq_error={}) for n in layers}
    residual_q: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, layer in layers.items():
        parts = _svd_parts(layer, candidates(layer))
        lo, hi = qrange(w_bits, signed=True)
        residual_q[name] = {}
        for r, b in parts.items():
            res = layer.weight.detach() - b
            s = weight_scale(res, w_bits, spec.scale_init).clamp_min(EPS).view(-1, *([1] * (res.dim() - 1)))
            residual_q[name][r] = (res, dequantize(quantize(res, s, 0.0, lo, hi), s, 0.0))

    def hook(name: str):
        def run(module: QuantLayer, args):
            xt = module.transform_input(args[0].detach())
            scale, zero = act[name]
            lo, hi = qrange(cfg.act_bits, signed=False)
            xq = dequantize(quantize(xt, scale, zero, lo, hi), scale, zero)
            st = stats[name]
            for r, (res, res_q) in residual_q[name].items():
                # W'X − (Q(res)·Q_a(X) + B·X) = res·X − Q(res)·Q_a(X): the branch cancels
                diff = module._op(xq, res_q, None) - module._op(xt, res, None)
                st.sq_error[r] = st.sq_error.get(r, 0.0) + float(diff.double().pow(2).sum())
                st.positions = diff[0].numel() // module.out_channels
        return run

    with hooks_removed(l.register_forward_pre_hook(hook(n)) for n, l in layers.items()):
        with torch.no_grad():
            for i in range(0, len(x), ERROR_BATCH):
                model(x[i:i + ERROR_BATCH])
    for st in stats.values():
        st.sq_error = {r: v / len(x) for r, v in st.sq_error.items()}
    return stats


def rank_cost(layer: QuantLayer, rank: int, positions: int, cost: str) -> float | tuple[float, float]:
    """M_{i,R}: the branch's parameters, its MACs per image, or both (a two-dimensional cost)."""
    params = float(branch_params(layer, rank))
    return {"params": params, "macs": params * positions, "both": (params, params * positions)}[cost]


@dataclass
class RankAllocation:
    ranks: dict[str, int]  # the merged branch rank per layer
    meta: dict[str, Any]  # the recipe's "rank_allocation" section


def allocate_ranks(model: torch.nn.Module, layers: dict[str, QuantLayer], x: torch.Tensor,
                   act: dict[str, tuple[torch.Tensor, torch.Tensor]], cfg: "CalibConfig",
                   spec: "MethodSpec") -> RankAllocation:
    """R_i per layer by the integer program (module docstring) on the unsplit, unquantized ``model``."""
    import time

    t0 = time.time()
    stats = rank_errors(model, layers, x, act, cfg, spec)
    measure_seconds = time.time() - t0
    options = {n: [Option(r, stats[n].sq_error[r], rank_cost(l, r, stats[n].positions, cfg.rank_cost))
                   for r in candidates(l)] for n, l in layers.items()}
    uniform = {n: uniform_rank(spec, cfg, l) for n, l in layers.items()}
    ref_params = sum(branch_params(l, uniform[n]) for n, l in layers.items())
    ref_macs = sum(branch_params(l, uniform[n]) * stats[n].positions for n, l in layers.items())
    reference = {"params": ref_params, "macs": ref_macs, "both": (ref_params, ref_macs)}[cfg.rank_cost]
    dims = reference if isinstance(reference, tuple) else (reference,)
    budget = tuple(cfg.rank_budget * r for r in dims) if isinstance(reference, tuple) else cfg.rank_budget * reference
    unit = {"params": "parameters", "macs": "multiply-accumulates per image",
            "both": "parameters and multiply-accumulates per image, each"}[cfg.rank_cost]

    def describe(c: float) -> str:
        return f"{c:g} branch {unit}"

    sol = allocate(options, budget, describe)
    ranks = {n: options[n][sol.choice[n]].choice for n in layers}
    params = {n: branch_params(l, ranks[n]) for n, l in layers.items()}
    macs = {n: params[n] * stats[n].positions for n in layers}
    achieved = sol.cost if isinstance(sol.cost, tuple) else (sol.cost,)
    meta = {
        "budget": cfg.rank_budget, "cost": cfg.rank_cost, "cost_unit": unit,
        "reference": f"uniform rank (svd_rank + lora_rank)·r = {(spec.svd_rank + spec.lora_rank) * cfg.rank}, "
                     f"capped at size − 1",
        "reference_cost": reference, "budget_cost": budget, "achieved_cost": sol.cost,
        "achieved_budget": max(a / r for a, r in zip(achieved, dims)) if all(dims) else 0.0,
        "branch_params": sum(params.values()), "uniform_branch_params": ref_params,
        "branch_macs_per_image": sum(macs.values()), "uniform_branch_macs_per_image": ref_macs,
        "candidates": list(RANK_CANDIDATES), "error_images": len(x),
        "objective": sol.objective, "solve_seconds": sol.seconds, "solver": "pulp CBC",
        "measure_seconds": round(measure_seconds, 1),
        "layers": {n: {"index": i, "size": layer_size(l), "uniform_rank": uniform[n],
                       "candidates": [o.choice for o in options[n]], "errors": [o.error for o in options[n]],
                       "costs": [o.cost for o in options[n]], "rank": ranks[n],
                       "svd_rank": split_rank(spec, ranks[n])[0], "lora_rank": split_rank(spec, ranks[n])[1],
                       "output_positions": stats[n].positions}
                   for i, (n, l) in enumerate(layers.items())},
    }
    print(f"rank allocation (budget {cfg.rank_budget:g} of the uniform branches' {unit}): parameters "
          f"{sum(params.values()) / max(ref_params, 1):.3f}, MACs {sum(macs.values()) / max(ref_macs, 1):.3f} of "
          f"the uniform branches', solved in {sol.seconds:.2f}s")
    return RankAllocation(ranks, meta)


def activation_qparams(samples: dict[str, torch.Tensor], cfg: "CalibConfig", spec: "MethodSpec"
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: act_qparams(s, cfg.act_bits, spec.scale_init) for n, s in samples.items()}
