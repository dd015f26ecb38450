"""QArtSR-style calibration: timestep retraining, reversed per-module quantization, extended end to end.

QArtSR (Zhu et al. 2025, one-step diffusion super-resolution) observes that a quantized one-step model
is better served by another timestep than the one its FP model was trained at, and calibrates in three
stages, training only the parameters of the quantizers, never the original weights:

1. **TRQ** (timestep retraining quantization): the UNet's fixed timestep becomes a trained parameter
   (a float, ``CalibConfig.timestep_lr`` in timestep units), trained end to end with every quantizer's
   step sizes on the image loss for ``trq_steps`` steps. The tuned value is stored in the recipe
   (``Recipe.timestep``); ``apply_recipe`` and the exporter run the model at it, and the exporter folds
   the timestep path into constants computed from it (``export.fold``), as it does for t = 399.
2. **RPQ** (reversed per-module quantization): the quantized layers, in execution order, are cut into
   ``MODULES`` groups of about equal weight count. From the output end backwards, each group is
   calibrated with the groups *before* it in full precision (their quantizers off, so its input is the FP
   model's) and the groups after it quantized as already calibrated; loss = module loss (the mean over the
   group's layers of ‖y_q − y_fp‖² / mean y_fp², against the FP model's layer outputs on the same batch)
   + image loss (λ_perceptual·(1 − SSIM, or LPIPS) + λ_mse·MSE of the output against the FP output). Only
   that group's weight and activation step sizes are trained, ``steps`` steps per group.
3. **Extended end-to-end**: every step size and the timestep once more on the image loss, ``e2e_steps``.

Batches are a function of (seed, stage, step). Departs from the paper: no public code exists to follow
(libozhu03/QArtSR holds only its README), so the quantizers are this framework's (per-channel weights and
per-tensor activations with LSQ step sizes, SmoothQuant scales folded before calibration and kept fixed);
modules are execution-order groups of layers rather than the UNet's / VAE's named blocks; the tuned
timestep enters the timestep embedding only (the x0 conversion keeps the schedule's ᾱ at the configured
t = 399); stage lengths are a CPU-sized budget. No checkpoints: an interrupted run starts again.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from tqdm import tqdm

from quantface.calibration.config import CalibConfig
from quantface.calibration.distill import perceptual_loss
from quantface.calibration.layers import QuantLayer, call_order, hooks_removed
from quantface.calibration.methods import E2E_STEPS, TRQ_STEPS, MethodSpec
from quantface.models.timesteps import model_timestep, set_timestep

MODULES = 8  # groups of the reversed per-module stage
STAGE_SEEDS = {"trq": 1, "rpq": 2, "e2e": 3}


def execution_order(model: nn.Module, layers: dict[str, QuantLayer], probe: torch.Tensor) -> list[str]:
    """Quantized layer names in the order a forward pass on ``probe`` first calls them."""
    order = call_order(model, dict(layers), probe)
    return order + [n for n in layers if n not in order]  # layers the probe did not reach, last


def module_groups(order: list[str], layers: dict[str, QuantLayer], count: int = MODULES) -> list[list[str]]:
    """``order`` cut into at most ``count`` contiguous groups of about equal weight count."""
    sizes = [layers[n].weight.numel() for n in order]
    total, groups, current, acc = sum(sizes), [], [], 0
    for name, size in zip(order, sizes):
        current.append(name)
        acc += size
        if acc >= total * (len(groups) + 1) / count and len(groups) < count - 1:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


@contextmanager
def full_precision(layers: list[QuantLayer]):
    """``layers`` with their quantizers off (their folded transform kept: the FP layer's output)."""
    saved = [(l.weight_bits, l.act_bits) for l in layers]
    try:
        for l in layers:
            l.weight_bits, l.act_bits = None, None
        yield
    finally:
        for l, (wb, ab) in zip(layers, saved):
            l.weight_bits, l.act_bits = wb, ab


def _scales(layers: list[QuantLayer]) -> list[nn.Parameter]:
    return [p for l in layers for p in (l.w_scale, l.a_scale) if p is not None]


def _batch(data, cfg: CalibConfig, stage: str, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 7 + STAGE_SEEDS[stage])
    return torch.randint(0, len(data), (cfg.batch_size,), generator=g, device="cpu").to(data.lq.device)


def _image_loss(cfg: CalibConfig, perceptual, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return cfg.lambda_perceptual * perceptual(pred, target) + cfg.lambda_mse * torch.mean((pred - target) ** 2)


def _end_to_end(qmodel: nn.Module, layers: dict[str, QuantLayer], data, cfg: CalibConfig, perceptual,
                steps: int, stage: str, timestep: torch.Tensor) -> None:
    """Every step size and the timestep, on the image loss."""
    scale_lr = cfg.scale_lr if cfg.scale_lr is not None else cfg.lr
    opt = torch.optim.Adam([{"params": _scales(list(layers.values())), "lr": scale_lr},
                            {"params": [timestep], "lr": cfg.timestep_lr}])
    bar = tqdm(range(steps), desc=f"qartsr {stage}", dynamic_ncols=True)
    for step in bar:
        idx = _batch(data, cfg, stage, step)
        loss = _image_loss(cfg, perceptual, qmodel(data.lq[idx]), data.fp_out[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.5f}", t=f"{float(timestep.detach()):.2f}")


def _layer_outputs(model: nn.Module, names: list[str], x: torch.Tensor, grad: bool) -> tuple[torch.Tensor, dict]:
    """``model(x)`` and the outputs of its modules ``names`` in that pass."""
    modules = dict(model.named_modules())
    outs: dict[str, torch.Tensor] = {}
    with hooks_removed(modules[n].register_forward_hook(lambda m, a, y, n=n: outs.__setitem__(n, y)) for n in names):
        with torch.set_grad_enabled(grad):
            y = model(x)
    return y, outs


def _reversed_per_module(fp_model: nn.Module, qmodel: nn.Module, layers: dict[str, QuantLayer], data,
                         cfg: CalibConfig, perceptual, steps: int) -> None:
    order = execution_order(qmodel, layers, data.lq[:1])
    groups = module_groups(order, layers)
    scale_lr = cfg.scale_lr if cfg.scale_lr is not None else cfg.lr
    step0 = 0
    for k in tqdm(reversed(range(len(groups))), total=len(groups), desc="qartsr reversed per-module",
                  dynamic_ncols=True):
        group = groups[k]
        upstream = [layers[n] for g in groups[:k] for n in g]
        opt = torch.optim.Adam(_scales([layers[n] for n in group]), lr=scale_lr)
        with full_precision(upstream):
            for step in range(steps):
                idx = _batch(data, cfg, "rpq", step0 + step)
                x = data.lq[idx]
                _, want = _layer_outputs(fp_model, group, x, grad=False)
                pred, got = _layer_outputs(qmodel, group, x, grad=True)
                module = sum(torch.mean((got[n] - want[n]) ** 2) / torch.mean(want[n] ** 2).clamp_min(1e-12)
                             for n in group) / len(group)
                loss = module + _image_loss(cfg, perceptual, pred, data.fp_out[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        step0 += steps


def qartsr_calibrate(fp_model: nn.Module, qmodel: nn.Module, layers: dict[str, QuantLayer], data,
                     cfg: CalibConfig, spec: MethodSpec, steps: int) -> tuple[float, dict[str, int]]:
    """The three stages (module docstring) on ``qmodel``; returns the tuned timestep, at which ``qmodel``
    is left running, and the steps of the TRQ and end-to-end stages. Weights (``QuantLayer.weight``) and
    ``fp_model`` are only read."""
    for p in qmodel.parameters():
        p.requires_grad_(False)
    trq_steps = cfg.trq_steps if cfg.trq_steps is not None else TRQ_STEPS
    e2e_steps = cfg.e2e_steps if cfg.e2e_steps is not None else E2E_STEPS
    scales = _scales(list(layers.values()))
    for p in scales:
        p.requires_grad_(True)
    perceptual = perceptual_loss(cfg, data.lq.device)
    timestep = torch.tensor([model_timestep(qmodel)], dtype=torch.float32, device=data.lq.device,
                            requires_grad=True)
    set_timestep(qmodel, timestep)  # the forward reads the trained tensor (its gradient reaches it)
    qmodel.train()
    try:
        _end_to_end(qmodel, layers, data, cfg, perceptual, trq_steps, "trq", timestep)
        with torch.no_grad():
            set_timestep(qmodel, timestep.detach().clone())  # fixed during the per-module stage
        _reversed_per_module(fp_model, qmodel, layers, data, cfg, perceptual, steps)
        set_timestep(qmodel, timestep)
        _end_to_end(qmodel, layers, data, cfg, perceptual, e2e_steps, "e2e", timestep)
    finally:
        tuned = float(timestep.detach())
        set_timestep(qmodel, tuned)
        qmodel.eval()
        for p in scales:
            p.requires_grad_(False)
    print(f"qartsr: timestep {model_timestep(fp_model):g} -> {tuned:.4f}")
    return model_timestep(qmodel), {"trq_steps": trq_steps, "e2e_steps": e2e_steps}
