"""GPTQ weight rounding (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): each layer's integer weight codes chosen column by column so that the error
of the ones already rounded is compensated by the columns still to round, under the layer's input
second moments H = E[x xᵀ] (the Hessian of its output's squared error). Used by ``calibrate
--weight-rounding gptq`` right before the codes are fixed (``calibration.run``).

What this implementation does:

* H per layer from its input in the *unquantized* prepared model (quantizers off: every layer sees FP
  inputs), on the first ``stat_images`` calibration images, at most ``POSITIONS_PER_IMAGE`` spatial
  positions (or tokens) drawn per image (seeded); conv inputs unfolded to the (in · kh · kw) patch
  vectors the weight's flattened rows multiply, so the same algorithm serves Conv2d and Linear.
* The per-output-channel scales are the layer's own (``weight_scale`` as calibration searched them):
  GPTQ changes which code each weight gets, not the grid; symmetric codes in the layer's b-bit range.
* Columns in descending order of H's diagonal ("act order"), dampening ``DAMP`` · mean(diag H) on the
  diagonal, blocks of ``BLOCK`` columns with the lazy batch update, the inverse's upper Cholesky
  factor as in the paper. Columns the data never excites (diag 0) get plain rounding.
* Only layers whose whole weight is quantized (no low-rank branch left: the ``lean`` targets and the
  ≥ 8-bit runs, whose branch is folded): a kept FP branch would need its residual's compensation
  against a weight that moves; those layers keep round to nearest.

The codes are installed as the weight's exact grid values (``QuantLayer.set_weight_codes``), so
``freeze`` rounds them back to themselves: the recipe, the simulation and every export read the codes.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from quantface import distributed as dist
from quantface.calibration.layers import QuantLayer, hooks_removed
from quantface.quant import EPS, qrange

POSITIONS_PER_IMAGE = 2048  # spatial positions (tokens) per image and layer that enter H
DAMP = 0.01  # dampening: this fraction of the mean diagonal added to H's diagonal
BLOCK = 128  # columns per lazy batch update


def _patches(layer: QuantLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows the flattened weight multiplies: (positions, in · kh · kw) or (tokens, in)."""
    if layer.conv_args is None:
        return x.reshape(-1, x.shape[-1])
    a = layer.conv_args
    cols = F.unfold(x, layer.weight.shape[2:], dilation=a["dilation"], padding=a["padding"], stride=a["stride"])
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def input_hessians(model: torch.nn.Module, layers: dict[str, QuantLayer], images: torch.Tensor,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """H = E[x xᵀ] per layer (float64, (K, K)) from its transformed input, quantizers off; see the module
    docstring. One forward pass per image."""
    from quantface.calibration.sensitivity import quantizers_off

    sums = {n: torch.zeros(l.weight[0].numel(), l.weight[0].numel(), dtype=torch.float64) for n, l in layers.items()}
    counts = dict.fromkeys(layers, 0)
    gen = torch.Generator().manual_seed(seed)

    def hook(name: str):
        def run(module: QuantLayer, args):
            rows = _patches(module, module.transform_input(args[0].detach()).float())
            if len(rows) > POSITIONS_PER_IMAGE:
                rows = rows[torch.randperm(len(rows), generator=gen)[:POSITIONS_PER_IMAGE].to(rows.device)]
            rows = rows.double().cpu()
            sums[name] += rows.T @ rows
            counts[name] += len(rows)
        return run

    with torch.no_grad(), quantizers_off(layers):
        with hooks_removed(l.register_forward_pre_hook(hook(n)) for n, l in layers.items()):
            for i in dist.progress(range(len(images)), desc="GPTQ input statistics"):
                model(images[i:i + 1])
    return {n: sums[n] / max(counts[n], 1) for n in layers}


def gptq_codes(weight: torch.Tensor, scale: torch.Tensor, bits: int, hessian: torch.Tensor) -> torch.Tensor:
    """Integer codes (the weight's shape) for ``weight`` (out, …) on the per-output-channel grid ``scale``
    (out,) at ``bits`` signed bits, chosen by GPTQ under ``hessian`` (K, K), K = weight[0].numel()."""
    qmin, qmax = qrange(bits, signed=True)
    w = weight.detach().flatten(1).double().clone()
    s = scale.detach().double().clamp_min(EPS)[:, None]
    h = hessian.to(device=w.device, dtype=torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    order = torch.argsort(torch.diag(h), descending=True)  # on w's device, as h is
    w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(DAMP * float(torch.diag(h).mean()))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty_like(w)
    k = w.shape[1]
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        block, errors = w[:, start:end].clone(), torch.empty(w.shape[0], end - start, dtype=w.dtype, device=w.device)
        for j in range(end - start):
            col = block[:, j:j + 1]
            q = torch.clamp(torch.round(col / s), qmin, qmax)
            codes[:, start + j] = q[:, 0]
            err = (col - q * s) / u[start + j, start + j]
            block[:, j:] -= err @ u[start + j:start + j + 1, start + j:end]
            errors[:, j] = err[:, 0]
        w[:, end:] -= errors @ u[start:end, end:]
    out = torch.empty_like(codes)
    out[:, order.to(codes.device)] = codes
    return out.reshape(weight.shape).to(weight.dtype)


def apply_gptq(model: torch.nn.Module, layers: dict[str, QuantLayer], images: torch.Tensor, seed: int = 0
               ) -> list[str]:
    """GPTQ codes for every layer with fully quantized weights (no branch left); returns their names."""
    todo = {n: l for n, l in layers.items()
            if l.weight_bits is not None and l.lowrank is None and l.lora is None and l.rounding is None}
    if not todo:
        return []
    t0 = time.time()
    hessians = input_hessians(model, todo, images, seed)
    for name, layer in todo.items():
        layer.set_weight_codes(gptq_codes(layer.weight, layer.w_scale, layer.weight_bits, hessians[name]))
    dist.log(f"GPTQ: codes of {len(todo)} layers chosen ({time.time() - t0:.0f}s)")
    return list(todo)
