"""Distillation of the low-rank branches (QD-LoRA, paper §3.3; EfficientDM's single LoRA branch).

Only the branches' factors — and, for methods with ``learn_scales``, the quantizer scales — are
trained; quantized residual weights stay fixed. The target is the FP model's output for the same
degraded input; the loss is λ1·perceptual + λ2·MSE, perceptual being LPIPS when local LPIPS weights
are given, else 1 − SSIM (differentiable, no weights needed). Batches are a function of (seed, step),
and the trainable state plus Adam's moments are checkpointed (safetensors) so an interrupted run
resumes to the same result.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from quantface.calibration.config import CalibConfig
from quantface.calibration.layers import QuantLayer
from quantface.calibration.methods import MethodSpec
from quantface.checkpoint import load_checkpoint, save_checkpoint
from quantface.metrics import ssim_map

CHECKPOINT_NAME = "distill_checkpoint.safetensors"


def checkpoint_path(cfg: CalibConfig) -> Path:
    """Where distillation checkpoints beside the recipe folder ``cfg.out`` (and resumes from)."""
    return Path(cfg.out).parent / f".{Path(cfg.out).name}.{CHECKPOINT_NAME}"


def perceptual_loss(cfg: CalibConfig, device: torch.device | str = "cpu"):
    """LPIPS(pred, target) from local weights if configured, else 1 − SSIM; inputs in [-1, 1]."""
    if cfg.lpips_backbone:
        from quantface.lpips import load_lpips

        net = load_lpips(cfg.lpips_net, cfg.lpips_backbone, cfg.lpips_lin).to(device)
        return lambda pred, target: net(pred, target).mean()
    return lambda pred, target: 1.0 - ssim_map((pred.clamp(-1, 1) + 1) / 2, (target + 1) / 2).mean()


def trainable_parameters(layers: dict[str, QuantLayer], spec: MethodSpec) -> dict[str, list[torch.nn.Parameter]]:
    """The trained tensors by optimiser group: SVD-initialised branches, LoRA-initialised ones, scales."""
    svd, lora, scales = [], [], []
    for layer in layers.values():
        if layer.lowrank is not None:
            svd += [layer.lowrank.down, layer.lowrank.up]
        if layer.lora is not None:
            lora += [layer.lora.down, layer.lora.up]
        if spec.learn_scales:
            scales += [p for p in (layer.w_scale, layer.a_scale) if p is not None]
    return {"svd": svd, "lora": lora, "scales": scales}


def learning_rates(cfg: CalibConfig) -> dict[str, float]:
    """Learning rate of each group of ``trainable_parameters``."""
    return {"svd": cfg.lr,
            "lora": cfg.lora_lr if cfg.lora_lr is not None else cfg.lr,
            "scales": cfg.scale_lr if cfg.scale_lr is not None else cfg.lr}


def _named(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    wanted = {id(p) for p in params}
    return {n: p for n, p in model.named_parameters() if id(p) in wanted}


def distill(qmodel: torch.nn.Module, layers: dict[str, QuantLayer], data, cfg: CalibConfig, spec: MethodSpec,
            steps: int) -> None:
    groups = trainable_parameters(layers, spec)
    for p in qmodel.parameters():
        p.requires_grad_(False)
    trained = [p for params in groups.values() for p in params]
    for p in trained:
        p.requires_grad_(True)
    lrs = learning_rates(cfg)
    opt = torch.optim.Adam([{"params": params, "lr": lrs[name]} for name, params in groups.items()])
    named = _named(qmodel, trained)
    ckpt = checkpoint_path(cfg)
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    start = load_checkpoint(ckpt, named, opt) if cfg.resume and ckpt.exists() else 0
    if start:
        print(f"resumed distillation from {ckpt} at step {start}")
    perceptual = perceptual_loss(cfg, data.lq.device)
    qmodel.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"distill {spec.name}", dynamic_ncols=True)
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=g, device="cpu").to(data.lq.device)
        pred = qmodel(data.lq[idx])
        target = data.fp_out[idx]
        loss = cfg.lambda_perceptual * perceptual(pred, target) + cfg.lambda_mse * torch.mean((pred - target) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.5f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(ckpt, named, opt, step + 1)
    bar.close()
    qmodel.eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    ckpt.unlink(missing_ok=True)
