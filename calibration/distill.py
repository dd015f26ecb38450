"""Distillation of the low-rank branches (QD-LoRA, paper §3.3; EfficientDM's single LoRA branch).

Only the branches' factors — and, for methods with ``learn_scales``, the quantizer scales — are
trained; quantized residual weights stay fixed. The target is the FP model's output for the same
degraded input; the loss is λ1·perceptual + λ2·MSE, perceptual being LPIPS when local LPIPS weights
are given, else 1 − SSIM (differentiable, no weights needed). Batches are a function of (seed, step),
and the trainable state plus Adam's moments are checkpointed (safetensors) so an interrupted run
resumes to the same result.

Under ``torchrun`` (``quantface.distributed``) every rank draws the same global batch and takes its
contiguous slice of it (``torch.tensor_split``: sizes differ by at most one); its loss is weighted by
its share of the batch, the gradients are summed over the ranks (one all-reduce per step), so each
rank's Adam takes the single process's step on the same effective batch, up to the order of the
floating-point additions (docs/distributed.md has the measured difference). Rank 0 writes the
checkpoints; a run resumes only when every rank finds the same checkpoint step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quantface import distributed as dist
from quantface.calibration.config import CalibConfig
from quantface.calibration.layers import QuantLayer
from quantface.calibration.methods import MethodSpec
from quantface.checkpoint import checkpoint_step, load_checkpoint, save_checkpoint
from quantface.metrics import ssim_map

CHECKPOINT_NAME = "distill_checkpoint.safetensors"


def checkpoint_path(cfg: CalibConfig, stage: str | None = None) -> Path:
    """Where distillation checkpoints beside the recipe folder ``cfg.out`` (and resumes from); a later
    stage of the same run (``stage``, e.g. QuantVSR's bias alignment) has its own file."""
    prefix = f"{stage}_" if stage else ""
    return Path(cfg.out).parent / f".{Path(cfg.out).name}.{prefix}{CHECKPOINT_NAME}"


def batch_generator(cfg: CalibConfig, step: int, stage: str | None = None) -> torch.Generator:
    """The generator that draws step ``step``'s batch: a function of (seed, step), and of ``stage`` for
    a later stage (so it does not replay the first stage's batches)."""
    seed = cfg.seed * 1_000_003 + step
    if stage:
        seed = seed * 7 + 1 + sum(stage.encode())  # the first stage's seeds are kept as they were
    return torch.Generator().manual_seed(seed)


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


def _resume_step(cfg: CalibConfig, ckpt: Path) -> int:
    """The step to resume from: the checkpoint's, if every rank finds the same one, else 0."""
    local = checkpoint_step(ckpt) if cfg.resume and ckpt.exists() else 0
    steps = dist.all_gather_object(local)
    if len(set(steps)) > 1:
        dist.log(f"not resuming distillation: the ranks' checkpoints disagree (steps {steps}); starting afresh")
        return 0
    return local


def distill(qmodel: torch.nn.Module, layers: dict[str, QuantLayer], data, cfg: CalibConfig, spec: MethodSpec,
            steps: int, groups: dict[str, list[torch.nn.Parameter]] | None = None,
            lrs: dict[str, float] | None = None, stage: str | None = None) -> list[float]:
    """Train the branches (and scales) for ``steps`` steps; returns the loss of each step run (from the
    resumed step on), the global batch's under ``torchrun``. ``groups`` and ``lrs`` replace what is
    trained (``trainable_parameters``, ``learning_rates``) for a later ``stage`` of a run, which has
    its own checkpoint and batches (``checkpoint_path``, ``batch_generator``)."""
    if groups is None:
        groups = trainable_parameters(layers, spec)
    for p in qmodel.parameters():
        p.requires_grad_(False)
    trained = [p for params in groups.values() for p in params]
    for p in trained:
        p.requires_grad_(True)
    lrs = lrs if lrs is not None else learning_rates(cfg)
    opt = torch.optim.Adam([{"params": params, "lr": lrs[name]} for name, params in groups.items()])
    named = _named(qmodel, trained)
    ckpt = checkpoint_path(cfg, stage)
    if dist.is_main():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
    start = _resume_step(cfg, ckpt)
    if start:
        load_checkpoint(ckpt, named, opt)
        dist.log(f"resumed distillation from {ckpt} at step {start}")
    perceptual = perceptual_loss(cfg, data.lq.device)
    world, rank = dist.world_size(), dist.rank()
    losses: list[float] = []
    qmodel.train()
    bar = dist.progress(range(start, steps), initial=start, total=steps,
                        desc=f"distill {spec.name}" + (f" ({stage})" if stage else ""))
    for step in bar:
        g = batch_generator(cfg, step, stage)
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=g, device="cpu").to(data.lq.device)
        opt.zero_grad(set_to_none=True)
        if not dist.active():
            pred = qmodel(data.lq[idx])
            target = data.fp_out[idx]
            loss = cfg.lambda_perceptual * perceptual(pred, target) + cfg.lambda_mse * torch.mean((pred - target) ** 2)
            loss.backward()
        else:
            # This rank's slice; its mean loss weighted by its share, so the sum over ranks is the batch's mean.
            mine = torch.tensor_split(idx, world)[rank]
            share = len(mine) / len(idx)
            if len(mine):
                pred = qmodel(data.lq[mine])
                target = data.fp_out[mine]
                part = share * (cfg.lambda_perceptual * perceptual(pred, target)
                                + cfg.lambda_mse * torch.mean((pred - target) ** 2))
                part.backward()
                part = part.detach()
            else:  # a batch smaller than the world: nothing to do here this step
                part = torch.zeros((), device=data.lq.device)
            dist.all_reduce_grads(trained)
            loss = dist.all_reduce_sum(part.reshape(1)).reshape(())
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.5f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps and dist.is_main():
            save_checkpoint(ckpt, named, opt, step + 1)
    bar.close()
    dist.check_replicated(trained, "trained parameters")
    qmodel.eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    if dist.is_main():
        ckpt.unlink(missing_ok=True)
    return losses
