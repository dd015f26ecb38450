"""Q-Diffusion's post-training quantization for a one-step model: BRECQ block reconstruction with AdaRound.

Q-Diffusion (Li et al. 2023) calibrates a diffusion UNet with BRECQ (Li et al. 2021): the network is cut
into blocks, and each block in turn learns its weights' rounding (AdaRound, Nagel et al. 2020) and its
activation quantizers' step sizes (LSQ) to minimise the block's output error against the full-precision
block. Its timestep-aware calibration — calibration inputs drawn across the sampling trajectory — has one
timestep to draw from here: a one-step restorer always runs its UNet at the fixed t = 399, so the
calibration set is the one-step model's own inputs and nothing more.

Blocks, in execution order: every ResNet block and transformer block (``BLOCK_TYPES``), and every quantized
layer outside them (the encoder's and decoder's stage convolutions, the down / up-sampling convolutions,
the prompt embedder's convolutions and projection, the time MLP) as a block of its own. For block k:

* inputs: the block's inputs in the *quantized* model, whose blocks before k are already reconstructed
  (BRECQ's asymmetric reconstruction), for ``IMAGES`` calibration images, cached once;
* target: the FP block's output on the FP model's own inputs for the same images;
* loss: Σ_channels (ŷ − y)² averaged over the rest, plus ``REG_WEIGHT`` · Σ 1 − |2h(V) − 1|^β, β annealed
  from 20 to 2 after a warm-up of ``WARMUP`` of the iterations (AdaRound's schedule);
* trained: each weight element's rounding variable V (soft weight ⌊w/s⌋ + h(V), h the rectified sigmoid),
  lr ``ROUND_LR``; each layer's per-tensor activation step size (LSQ gradient of ``quantface.quant``),
  lr ``CalibConfig.scale_lr``. Weight step sizes stay at their MSE-searched values, as in AdaRound.

At the end of a block its rounding is hardened (V ≥ 0 rounds up) to integer codes; the weight becomes
those codes times its scale, so freezing and the recipe are exactly the other methods'.

Departs from BRECQ / Q-Diffusion: weights and activation step sizes are learned in one joint pass per
block (they run a weight pass, then an activation pass), over 200 iterations by default (``--steps``; they use 20k)
and 16 images, so that the whole model calibrates in minutes on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from quantface.calibration.config import CalibConfig
from quantface.calibration.layers import QuantLayer, call_order
from quantface.quant import adaround_regularizer

BLOCK_TYPES = ("ResBlock", "TransformerBlock")  # the reference model's ResNet and transformer blocks
IMAGES = 16  # calibration images whose block inputs and FP outputs are cached
CAPTURE_BATCH = 8
REG_WEIGHT = 0.01  # BRECQ's rounding-loss weight
BETA = (20.0, 2.0)  # the regulariser's β, annealed from the first to the second
WARMUP = 0.2  # share of the iterations without the rounding regulariser
ROUND_LR = 1e-3  # Adam on V (BRECQ's default)


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


def _blocks(model: nn.Module, layers: dict[str, QuantLayer], probe: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The reconstruction units of ``model`` in the order a forward pass on ``probe`` runs them."""
    units: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if type(m).__name__ in BLOCK_TYPES and not any(name.startswith(f"{u}.") for u in units):
            units[name] = m
    for name, layer in layers.items():
        if not any(name.startswith(f"{u}.") for u in units):
            units[name] = layer
    return [(name, units[name]) for name in call_order(model, units, probe)]


def _run_until(model: nn.Module, module: nn.Module, lq: torch.Tensor, output: bool) -> list:
    """``module``'s positional inputs (or, with ``output``, its output) when ``model`` runs on ``lq``,
    batch by batch, concatenated along the batch; each forward stops at the module."""
    got: list = []

    def pre(mod, args):
        got.append([a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        if not output:
            raise _Stop

    def post(mod, args, out):
        got.append(out.detach())
        raise _Stop

    handle = module.register_forward_hook(post) if output else module.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            for i in range(0, len(lq), CAPTURE_BATCH):
                try:
                    model(lq[i:i + CAPTURE_BATCH])
                except _Stop:
                    pass
    finally:
        handle.remove()
    if output:
        return [torch.cat(got)]
    return [torch.cat([g[j] for g in got]) if isinstance(got[0][j], torch.Tensor) else got[0][j]
            for j in range(len(got[0]))]


def _beta(step: int, steps: int) -> float:
    warm = int(WARMUP * steps)
    progress = (step - warm) / max(steps - warm, 1)
    return BETA[1] + (BETA[0] - BETA[1]) * max(0.0, 1.0 - progress)


def _reconstruct(block: nn.Module, block_layers: list[QuantLayer], inputs: list, target: torch.Tensor,
                 cfg: CalibConfig, steps: int, generator: torch.Generator) -> float:
    """AdaRound + LSQ on one block; hardens its rounding. Returns the last reconstruction loss."""
    for layer in block_layers:
        layer.init_rounding()
    rounding = [l.rounding for l in block_layers]
    scales = [l.a_scale for l in block_layers if l.a_scale is not None]
    for p in rounding + scales:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": rounding, "lr": ROUND_LR},
                            {"params": scales, "lr": cfg.scale_lr if cfg.scale_lr is not None else cfg.lr}])
    channel = 1 if target.dim() == 4 else -1
    warm = int(WARMUP * steps)
    rec = torch.zeros(())
    n = len(target)
    for step in range(steps):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=generator, device="cpu").to(target.device)
        out = block(*[a[idx] if isinstance(a, torch.Tensor) else a for a in inputs])
        rec = ((out - target[idx]) ** 2).sum(channel).mean()
        loss = rec
        if step >= warm:
            beta = _beta(step, steps)
            loss = loss + REG_WEIGHT * sum(adaround_regularizer(v, beta) for v in rounding)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for layer in block_layers:
        layer.harden_rounding()
        if layer.a_scale is not None:
            layer.a_scale.requires_grad_(False)
    return float(rec.detach())


def reconstruct_blocks(fp_model: nn.Module, qmodel: nn.Module, layers: dict[str, QuantLayer], data,
                       cfg: CalibConfig, steps: int) -> None:
    """Block by block, in execution order: AdaRound + LSQ reconstruction (module docstring). ``qmodel``'s
    layers end with hardened rounding; ``fp_model`` is only read."""
    for p in qmodel.parameters():
        p.requires_grad_(False)
    lq = data.lq[:IMAGES]
    fp_modules = dict(fp_model.named_modules())
    generator = torch.Generator().manual_seed(cfg.seed)
    units = _blocks(qmodel, layers, lq[:1])
    bar = tqdm(units, desc="block reconstruction", dynamic_ncols=True)
    for name, block in bar:
        block_layers = [l for l in ([block] if isinstance(block, QuantLayer) else block.modules())
                        if isinstance(l, QuantLayer) and l.weight_bits is not None]
        if not block_layers:
            continue
        inputs = _run_until(qmodel, block, lq, output=False)
        (target,) = _run_until(fp_model, fp_modules[name], lq, output=True)
        loss = _reconstruct(block, block_layers, inputs, target, cfg, steps, generator)
        bar.set_postfix(block=name, loss=f"{loss:.4g}")
    qmodel.eval()
