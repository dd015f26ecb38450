"""PassionSR-style module-wise calibration: learnable equivalent transformation + learnable boundaries.

For each quantized layer on its own, with the FP model's input X and output Y of that layer on a few
calibration images, learn

* a per-input-channel scale s (the equivalent transformation x/s, W·diag(s); initialised from the
  SmoothQuant scale already folded by ``prepare``, trained as a multiplicative correction exp(θ)),
* the activation quantizer's clipping boundaries [lo, hi] (learnable boundary quantizer), and
* the weight quantizer's per-channel scales,

to minimise ‖layer_q(X) − Y‖². Layers are independent (inputs come from the FP model), so the loop is a
plain pass over layers. When done the correction is folded like the original smoothing and the
learned boundaries become the activation scale and zero point.
"""

from __future__ import annotations

import torch

from quantface import distributed as dist
from quantface.calibration.config import CalibConfig
from quantface.calibration.layers import QuantLayer, hooks_removed
from quantface.quant import EPS, act_qparams_from_range, boundary_qparams, fake_quantize, qrange

IMAGES = 4  # calibration images whose layer inputs are cached
MAX_ROWS = 4096  # linear-layer token rows kept per layer
LR = 1e-3  # module-wise problems are small and well conditioned; PassionSR's bound learning rate scale


def _capture(fp_model: torch.nn.Module, layers: dict[str, QuantLayer], lq: torch.Tensor
             ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Inputs and outputs of every FP layer named like a quant layer, on ``lq``."""
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    modules = dict(fp_model.named_modules())

    def hook(name: str):
        def record(mod, args, out):
            captured[name] = (args[0].detach(), out.detach())
        return record

    with hooks_removed(modules[name].register_forward_hook(hook(name)) for name in layers):
        with torch.inference_mode():
            fp_model(lq)
    return captured


def _optimise_layer(layer: QuantLayer, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    """Learn θ (scale correction), [lo, hi] and weight scales of ``layer`` on (x, y); fold the result."""
    cd = layer.channel_dim
    shape_x = [1] * x.dim()
    shape_x[cd] = -1
    shape_w = (1, -1, 1, 1) if layer.conv_args is not None else (1, -1)
    dev = layer.weight.device
    s0 = layer.smooth if layer.smooth is not None else torch.ones(layer.in_channels, device=dev)
    w0 = layer.weight.detach()  # already W·diag(s0)
    theta = torch.zeros(layer.in_channels, device=dev, requires_grad=True)
    x_s = x * (1.0 / s0).view(shape_x)
    lo = torch.tensor(float(x_s.min()), device=dev, requires_grad=True)
    hi = torch.tensor(float(x_s.max()), device=dev, requires_grad=True)
    with torch.no_grad():
        scale, zp = act_qparams_from_range(lo, hi, layer.act_bits)
        # Start from the range the MSE search chose rather than the raw min/max.
        lo.copy_(-(zp * layer.a_scale.detach()))
        hi.copy_(lo + layer.a_scale.detach() * (2**layer.act_bits - 1))
    w_scale = layer.w_scale.detach().clone().requires_grad_(True)
    aq_min, aq_max = qrange(layer.act_bits, signed=False)
    wq_min, wq_max = qrange(layer.weight_bits, signed=True)
    opt = torch.optim.Adam([{"params": [theta, lo, hi], "lr": lr}, {"params": [w_scale], "lr": lr * 0.1}])
    for _ in range(steps):
        c = torch.exp(theta)
        xt = x_s / c.view(shape_x)
        wt = w0 * c.view(shape_w)
        a_scale, a_zp = boundary_qparams(lo, hi, layer.act_bits)
        xq = fake_quantize(xt, a_scale, a_zp, aq_min, aq_max)
        ws = w_scale.clamp_min(EPS).view(-1, *([1] * (wt.dim() - 1)))
        wq = fake_quantize(wt, ws, 0.0, wq_min, wq_max)
        loss = torch.mean((layer._op(xq, wq, layer.bias) - y) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        c = torch.exp(theta)
        layer.smooth = s0 * c
        layer.weight = w0 * c.view(shape_w)
        layer.set_weight_quant(layer.weight_bits, w_scale.clamp_min(EPS))
        scale, zp = act_qparams_from_range(torch.minimum(lo, hi), torch.maximum(lo, hi), layer.act_bits)
        layer.set_act_quant(layer.act_bits, scale, zp)


def modulewise_calibrate(fp_model: torch.nn.Module, qmodel: torch.nn.Module, layers: dict[str, QuantLayer],
                         data, cfg: CalibConfig, steps: int) -> None:
    captured = _capture(fp_model, layers, data.lq[:IMAGES])
    g = torch.Generator().manual_seed(cfg.seed)
    # Under torchrun every rank runs every layer (the same small problems, the same result): not sharded.
    for name, layer in dist.progress(layers.items(), desc="module-wise calibration"):
        if layer.weight_bits is None or layer.act_bits is None or layer.rotation is not None:
            continue
        x, y = captured[name]
        if layer.conv_args is None and x.dim() == 3:
            x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            keep = torch.randperm(x.shape[0], generator=g, device="cpu")[:MAX_ROWS].to(x.device)
            x, y = x[keep], y[keep]
        _optimise_layer(layer, x.clone(), y.clone(), steps, LR)
