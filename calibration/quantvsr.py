"""QuantVSR-style calibration for images: STCA rank allocation (spatial part), joint refinement of the
full-precision and low-bit branches, learnable bias alignment (LBA).

QuantVSR (Chai et al. 2025, low-bit one-step video super-resolution; bowenchai/QuantVSR) gives each
quantized layer a full-precision low-rank branch L1·L2 beside the low-bit branch Q(W − L1·L2), with a
rank chosen per layer from how complex the layer's activations are, refines both branches together
against the FP model, then learns a bias per output channel that aligns the quantized output's mean.
Here, in this framework's stages (``calibration.run``):

1. **STCA, spatial part** (``spatial_complexity``, ``stca_ranks``; in ``prepare``, on the FP model with
   the rotation folded, quantizers off). The statistic of layer i, measured on its *input* x (before
   the layer's own rotation) over the first ``stat_images`` calibration images:

       C_i = mean over images n and input channels c of std_p(x[n, c, p]),

   the standard deviation over the spatial positions p of a convolution's input (H·W) or the tokens of
   a Linear's (N; a Linear on one vector, the timestep MLP, has no spatial extent and no C) — QuantVSR's
   spatial complexity, as its observer computes it (unbiased std). The ranks R_i come from
   ``calibration.allocation.allocate`` (the bit and branch-rank allocations' integer program): one
   candidate rank per layer from ``calibration.ranks.candidates`` ({0, 2, 4, 8, 16, 32} below the
   layer's size) plus the layer's uniform rank U_i = min(2r, size) — as ``split_lowrank`` caps it, so
   for the 3- and 8-channel output convs the whole weight in the FP branch, what the uniform branches
   give them (without that option they are forced to be quantized: on the reference model W4A4, 16
   test faces, no training, 35.6 dB PSNR to FP against 41.0 for uniform rank 16 and 41.7 with it) —;
   a layer without a statistic (C undefined: the timestep MLP's one vector per image) keeps U_i, as
   QuantVSR keeps its base rank for layers it does not observe. Cost = the branch's parameters
   (``--rank-cost``: or MACs, or both, as ``calibration.ranks``), budget = F (``--rank-budget``,
   default 1.0) × the uniform branches' cost Σ cost(U_i) (the parameters they really have), minimising

       Σ_i (C_i / mean_j C_j) · E_i(R_i),   E_i(R) = Σ_{k>R} σ_k² / Σ_k σ_k²,

   σ the singular values of the layer's (rotated) weight W′: the share of the weight's energy the
   FP branch leaves to the low-bit branch, weighted by how complex the layer's activations are. For
   layers of the same weights, a more complex one never gets a lower rank.
2. **Joint refinement** (``QuantLayer.set_joint_residual``): the low-bit branch quantizes W′ − L1·L2
   with the branch's *current* factors, so the SVD factors and the weight / activation step sizes,
   trained by QuantFace's distillation (``calibration.distill``: same batches, λ_perceptual·(1 − SSIM
   or LPIPS) + λ_mse·MSE against the FP model's output), move both branches; ``freeze`` fixes the
   residual from the float16 factors the recipe stores. ``steps`` steps, learning rates ``--lr``
   (factors) and ``--scale-lr`` (step sizes).
3. **LBA** (``QuantLayer.add_lba``): per quantized layer a bias b_c per output channel added to its
   output, initialised to the mean over calibration images and positions of the layer's quantization
   error y_FP − y_Q (both computed from the input the quantized model feeds the layer, all layers in
   one pass of the refined model), then trained alone with the same loss (``lba_steps`` steps at
   ``--lba-lr``). ``freeze`` folds it into the layer's bias (``QuantLayer.fold_lba``), which the recipe
   then stores (``LayerRecipe.bias``) and the exporter uses: no node is added.

Departs from the paper: no temporal complexity (one image, no frames); ranks from an integer program
under a parameter budget rather than percentile thresholds stepping a minimum rank up or down by one
per sample and rounding to a multiple of 8 (QuantVSR has no budget); static per-tensor activation
quantizers (QuantVSR's are dynamic); the step sizes trained with the factors (QuantVSR trains the
factors alone); QuantFace's perceptual + MSE loss instead of MSE alone; LBA initialised to the mean
error rather than zero; stage lengths a CPU-sized budget. Not data-parallel yet.

Measured (reference model, W4A4, the first 128 calibration faces, PSNR to FP on the first 50 test faces,
``quantface eval --limit 50``): STCA ranks + LBA at its mean-error start, no training, 42.85 dB; + 100
joint-refinement steps 43.05 dB; + 50 LBA steps 43.12 dB (``recipes/quantvsr_w4a4``); on the same faces
svdquant_w4a4 40.69 dB and quantface_w4a4 41.25 dB. Before training, on 16 faces, the complexity weighting
did not beat the same program with every C_i equal (41.70 against 41.82 dB): the gain over uniform rank 16
(41.01 dB, Hadamard rotation, same budget) comes from the program moving parameters, not from C.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from quantface.calibration.allocation import Option, allocate
from quantface.calibration.layers import QuantLayer, hooks_removed
from quantface.calibration.ranks import (Storage, branch_params, candidates, cost_unit, energy_beyond, layer_size,
                                        rank_cost, reference_cost, scaled_budget, split_rank)

if TYPE_CHECKING:
    from quantface.calibration.config import CalibConfig
    from quantface.calibration.methods import MethodSpec

STAT_BATCH = 8  # images per pass of the statistics
STATISTIC = ("spatial complexity C_i: mean over images and input channels of the (unbiased) standard deviation "
             "of the layer's input over spatial positions (conv: H·W, linear: tokens), FP model, before the "
             "layer's rotation; objective Σ (C_i / mean C) · E_i(R_i), E_i(R) the share of the weight's squared "
             "singular values beyond the first R; candidates {0,2,4,8,16,32} below the layer's size plus its "
             "uniform rank; layers without spatial extent keep the uniform rank")


# ------------------------------------------------------------------------------------------------ STCA
@dataclass
class LayerComplexity:
    complexity: float  # C_i
    positions: int  # output positions per image (for the MACs cost)
    spatial: bool = True  # False: the layer's input has no spatial extent (one vector per image), no statistic


def spatial_complexity(model: nn.Module, layers: dict[str, QuantLayer], x: torch.Tensor) -> dict[str, LayerComplexity]:
    """C_i per layer (module docstring) from one pass of ``model`` over ``x`` in batches of ``STAT_BATCH``."""
    sums = {n: 0.0 for n in layers}
    images = {n: 0 for n in layers}
    positions = {n: 0 for n in layers}
    spatial = {n: False for n in layers}

    def hook(name: str):
        def record(module: QuantLayer, args, out):
            a = args[0].detach()
            if module.conv_args is not None:
                per_channel = a.flatten(2)  # (B, C, H·W)
            else:
                per_channel = a.reshape(a.shape[0], -1, a.shape[-1]).transpose(1, 2)  # (B, C, tokens)
            n = per_channel.shape[0]
            if per_channel.shape[-1] > 1:
                sums[name] += float(per_channel.double().std(dim=-1).mean(dim=1).sum())
                spatial[name] = True
            images[name] += n
            positions[name] = out[0].numel() // module.out_channels
        return record

    with hooks_removed(l.register_forward_hook(hook(n)) for n, l in layers.items()):
        with torch.no_grad():
            for i in range(0, len(x), STAT_BATCH):
                model(x[i:i + STAT_BATCH])
    return {n: LayerComplexity(sums[n] / images[n] if images[n] else 0.0, positions[n], spatial[n]) for n in layers}


@dataclass
class StcaAllocation:
    ranks: dict[str, int]  # the SVD branch rank per layer
    meta: dict[str, Any]  # the recipe's "rank_allocation" section


def allocate_stca(complexity: dict[str, LayerComplexity], layers: dict[str, QuantLayer], cfg: "CalibConfig",
                  spec: "MethodSpec") -> StcaAllocation:
    """R_i per layer by the integer program (module docstring, stage 1) from measured complexities."""
    uniform_unit = (spec.svd_rank + spec.lora_rank) * cfg.rank
    measured = [c.complexity for c in complexity.values() if c.spatial]
    mean_c = sum(measured) / max(len(measured), 1)
    weight = {n: (c.complexity / mean_c if mean_c > 0 else 1.0) for n, c in complexity.items()}
    # The uniform reference: rank 2r, capped at the layer's size as split_lowrank caps the SVD branch.
    uniform = {n: min(uniform_unit, layer_size(l)) for n, l in layers.items()}
    storage = Storage.of(cfg)
    options: dict[str, list[Option]] = {}
    for name, layer in layers.items():
        if not complexity[name].spatial:  # no statistic (the timestep MLP): the uniform rank, as QuantVSR keeps
            ranks = [uniform[name]]
        else:  # the uniform rank too: for the 3- and 8-channel output convs, their whole weight
            ranks = sorted(set(candidates(layer)) | {uniform[name]})
        energies = energy_beyond(layer.weight, ranks)
        positions = complexity[name].positions
        options[name] = [Option(r, weight[name] * e, rank_cost(layer, r, positions, cfg.rank_cost, storage))
                         for r, e in zip(ranks, energies)]
    ref_params = float(sum(branch_params(l, uniform[n]) for n, l in layers.items()))
    ref_macs = float(sum(branch_params(l, uniform[n]) * complexity[n].positions for n, l in layers.items()))
    reference = reference_cost(layers, uniform, {n: c.positions for n, c in complexity.items()}, cfg.rank_cost,
                               storage)
    budget = scaled_budget(reference, cfg.rank_budget)
    unit = cost_unit(cfg.rank_cost)
    sol = allocate(options, budget, lambda c: f"{c:g} branch {unit}")
    ranks = {n: options[n][sol.choice[n]].choice for n in layers}
    params = {n: branch_params(l, ranks[n]) for n, l in layers.items()}
    macs = {n: params[n] * complexity[n].positions for n in layers}
    meta = {
        "method": "stca-spatial", "statistic": STATISTIC,
        "budget": cfg.rank_budget, "cost": cfg.rank_cost, "cost_unit": unit,
        "reference": f"uniform rank svd_rank·r = {uniform_unit}, capped at the layer's size",
        "reference_cost": reference, "budget_cost": budget, "achieved_cost": sol.cost,
        "branch_params": sum(params.values()), "uniform_branch_params": ref_params,
        "branch_macs_per_image": sum(macs.values()), "uniform_branch_macs_per_image": ref_macs,
        "mean_complexity": mean_c, "objective": sol.objective, "solve_seconds": sol.seconds, "solver": "pulp CBC",
        "layers": {n: {"index": i, "size": layer_size(l), "complexity": complexity[n].complexity,
                       "uniform_rank": uniform[n], "candidates": [o.choice for o in options[n]],
                       "errors": [o.error for o in options[n]], "costs": [o.cost for o in options[n]],
                       "rank": ranks[n], "svd_rank": split_rank(spec, ranks[n])[0],
                       "lora_rank": split_rank(spec, ranks[n])[1], "output_positions": complexity[n].positions}
                   for i, (n, l) in enumerate(layers.items())},
    }
    print(f"stca ranks (budget {cfg.rank_budget:g} of the uniform rank-{uniform_unit} branches' {unit}): parameters "
          f"{sum(params.values()) / max(ref_params, 1):.3f}, MACs {sum(macs.values()) / max(ref_macs, 1):.3f} of the "
          f"uniform branches', ranks {sorted(set(ranks.values()))}")
    return StcaAllocation(ranks, meta)


def stca_ranks(model: nn.Module, layers: dict[str, QuantLayer], x: torch.Tensor, cfg: "CalibConfig",
               spec: "MethodSpec") -> StcaAllocation:
    """Stage 1 on the unsplit, unquantized ``model``: complexities on ``x``, then the program."""
    return allocate_stca(spatial_complexity(model, layers, x), layers, cfg, spec)


# ------------------------------------------------------------------------------------------------ LBA
def transformed_weight(layer: QuantLayer) -> torch.Tensor:
    """W′: the layer's whole (smoothed, rotated) weight, residual plus branches, unquantized."""
    if layer.full_weight is not None:
        return layer.full_weight
    w = layer.weight
    for b in (layer.lowrank, layer.lora):
        if b is not None:
            w = w + b.product().detach()
    return w


def mean_quantization_error(model: nn.Module, layers: dict[str, QuantLayer], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per layer and output channel, the mean over images and positions of y_FP − y_Q: the layer's
    output with W′ unquantized on its unquantized (transformed) input, minus its quantized output, both
    on the input the quantized ``model`` feeds it, in one pass over ``x``."""
    sums: dict[str, torch.Tensor] = {}
    counts = {n: 0 for n in layers}

    def hook(name: str):
        def record(module: QuantLayer, args, out):
            xt = module.transform_input(args[0].detach())
            err = module._op(xt, transformed_weight(module), module.bias) - out.detach()
            err = err.movedim(module.channel_dim, -1).reshape(-1, module.out_channels)
            sums[name] = sums.get(name, 0.0) + err.double().sum(0)
            counts[name] += err.shape[0]
        return record

    with hooks_removed(l.register_forward_hook(hook(n)) for n, l in layers.items()):
        with torch.no_grad():
            for i in range(0, len(x), STAT_BATCH):
                model(x[i:i + STAT_BATCH])
    return {n: (sums[n] / counts[n]).float() for n in layers if counts[n]}


# ------------------------------------------------------------------------------------------------ stages
def quantvsr_calibrate(qmodel: nn.Module, layers: dict[str, QuantLayer], data, cfg: "CalibConfig",
                       spec: "MethodSpec", steps: int) -> dict:
    """Stages 2 and 3 (module docstring) on the prepared ``qmodel``; returns the recipe's stats entries
    (both stages' losses and the LBA steps). The layers are left with their LBA, unfolded (``freeze``
    folds it)."""
    from quantface.calibration.distill import distill, trainable_parameters
    from quantface.calibration.methods import LBA_STEPS

    for layer in layers.values():
        if layer.lowrank is not None and layer.weight_bits is not None:
            layer.set_joint_residual()
    stats: dict = {}
    if steps:
        groups = trainable_parameters(layers, spec)  # the SVD factors and the step sizes
        stats["distill_loss"] = distill(qmodel, layers, data, cfg, spec, steps, groups=groups)
    lba_steps = cfg.lba_steps if cfg.lba_steps is not None else LBA_STEPS
    qmodel.eval()
    init = mean_quantization_error(qmodel, layers, data.lq[:cfg.stat_images])
    for name, layer in layers.items():
        if layer.weight_bits is not None or layer.act_bits is not None:
            layer.add_lba(init.get(name))
    if lba_steps:
        lbas = [l.lba for l in layers.values() if l.lba is not None]
        stats["lba_loss"] = distill(qmodel, layers, data, cfg, spec, lba_steps, groups={"lba": lbas},
                                    lrs={"lba": cfg.lba_lr}, stage="lba")
    stats["lba_steps"] = lba_steps
    return stats
