"""What the bit allocation measures on the prepared model (QuantFace paper §3.4): each layer's
sensitivity B_i (the sweep) and its quantized-product error for every option (the layer errors).

1. **Sensitivity sweep.** For each quantized layer i, with every other quantizer (weights included)
   switched off, layer i's activation quantizer runs at b = 2, 3, … bits (range by ``act_qparams``
   'mse' on the layer's observed transformed-input sample) until the output deviation from the
   unquantized model is ≤ ε, or b = B_max = 8. That b is B_i; the layer's perceptual weight is
   w_i = 2^B_i − 1. Deviation (``mp_metric``), averaged over the first ``mp_sweep_images``
   calibration images, outputs mapped to [0, 1]:

   * ``ssim`` (default): 1 − SSIM(out, out_FP) (``quantface.metrics.ssim_map``);
   * ``psnr``: the MSE(out, out_FP) (PSNR's argument, so ε is an MSE: 1e-7 is 70 dB);
   * ``lpips``: LPIPS(out, out_FP) with the local LPIPS weights of ``lpips_backbone`` / ``lpips_lin``.

   ε defaults per metric (``DEFAULT_EPSILON``); it bounds the deviation caused by *one* layer alone
   (the whole model's deviation adds up over all of them), hence small (measurements behind the
   defaults: docs/calibration_notes.md, "Sensitivity threshold"). Per-layer results are cached in
   ``.<out>.mp_cache/sensitivity.json`` beside the output (written atomically after every layer) and
   reused on restart when the configuration matches; the cache is removed once the recipe is written.
   Under ``torchrun`` the layers still to sweep are split over the ranks (layer j on rank j mod world;
   each layer's result depends on that layer alone) and the results gathered; rank 0 reads and writes
   the cache.

2. **Layer errors.** L_{i,o} = w_i² · ‖W X − Q(W) Q_b(X)‖²_F per image, X the layer's (transformed)
   input on the sweep images in the unquantized model, W its residual weight (after the SVD split),
   Q(W) its weight quantizer, Q_b(X) the activation quantizer at b bits, W X the layer's conv / linear
   op without bias. The low-rank branches run in FP on x' on both sides and cancel.

3. **Option errors** (the lean targets, ``--target cpu`` / ``qnn``, instead of 1–2): each layer alone at
   each option against a baseline option, measured as the change of the output's MSE to FP on the sweep
   images (``option_errors``; cached and restartable like the sweep).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quantface import distributed as dist
from quantface.calibration.config import B_MAX, B_MIN, epsilon
from quantface.calibration.layers import QuantLayer, hooks_removed
from quantface.calibration.methods import get_method
from quantface.data import atomic_write_bytes
from quantface.metrics import ssim_map
from quantface.quant import (EPS, act_qparams, act_qparams_from_range, act_range_method, dequantize, qrange, quantize,
                             weight_scale)

if TYPE_CHECKING:
    from quantface.calibration.config import CalibConfig
    from quantface.calibration.methods import MethodSpec

SWEEP_BATCH = 8
CACHE_SUFFIX = ".mp_cache"
# Configuration fields that do not change the sweep's results (the cache ignores them).
_SWEEP_IRRELEVANT = {"out", "steps", "batch_size", "lr", "scale_lr", "lora_lr", "lambda_perceptual", "lambda_mse",
                     "checkpoint_every", "resume", "threads", "mp_budget", "mp_latency_budget", "mp_candidates", "mp_cost", "target",
                     "bits", "fold_lowrank",
                     "rank_budget", "rank_cost", "rank_error", "rank_time_budget", "rank_errors_from"}  # the sweep runs with quantizers off but one: branches cancel


@contextmanager
def quantizers_off(layers: dict[str, QuantLayer]):
    """Every weight and activation quantizer switched off (the prepared model is then FP); the
    quantizer state is restored on exit."""
    saved = {n: (l.weight_bits, l.act_bits, l.a_scale, l.a_zero_point) for n, l in layers.items()}
    try:
        for layer in layers.values():
            layer.weight_bits = None
            layer.act_bits = None
        yield
    finally:
        for n, (wb, ab, s, z) in saved.items():
            layer = layers[n]
            layer.weight_bits, layer.act_bits = wb, ab
            layer.a_scale, layer.a_zero_point = s, z


class QParams:
    """Activation (scale, zero point) per (layer, bits, method) from the layer's observed
    transformed-input sample, computed once; ``minmax`` from its observed extremes where ``ranges`` has
    them (a sample misses them)."""

    def __init__(self, samples: dict[str, torch.Tensor] | None = None,
                 ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.samples = {} if samples is None else samples
        self.ranges = {} if ranges is None else ranges
        self._cache: dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def record(self, name: str, sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """A layer's observed sample and extremes (``calibration.run.prepare`` fills them)."""
        self.samples[name], self.ranges[name] = sample, (lo, hi)

    def __call__(self, name: str, bits: int, method: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
        key = (name, bits, method)
        if key not in self._cache:
            if method == "minmax" and name in self.ranges:
                self._cache[key] = act_qparams_from_range(*self.ranges[name], bits)
            else:
                self._cache[key] = act_qparams(self.samples[name], bits, method)
        return self._cache[key]


def _to01(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) / 2).double()


def deviation_fn(cfg: "CalibConfig") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Per-image deviation of outputs (N, 3, H, W) in [-1, 1] from the FP outputs; see the module docstring."""
    if cfg.mp_metric == "ssim":
        return lambda out, ref: 1.0 - ssim_map(_to01(out), _to01(ref))
    if cfg.mp_metric == "psnr":
        return lambda out, ref: ((_to01(out) - _to01(ref)) ** 2).flatten(1).mean(1)
    from quantface.lpips import load_lpips

    net = load_lpips(cfg.lpips_net, cfg.lpips_backbone, cfg.lpips_lin)
    return lambda out, ref: net(out.clamp(-1, 1), ref).flatten().double()


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + SWEEP_BATCH]) for i in range(0, len(x), SWEEP_BATCH)])


def cache_dir(cfg: "CalibConfig") -> Path:
    out = Path(cfg.out)
    return out.parent / f".{out.name}{CACHE_SUFFIX}"


def sweep_key(cfg: "CalibConfig", layer_names: list[str], weights_sha256: str) -> dict:
    """What the sweep's results depend on: the cache is reused only when this matches exactly."""
    relevant = {k: v for k, v in cfg.to_dict().items() if k not in _SWEEP_IRRELEVANT}
    relevant["mp_epsilon"] = epsilon(cfg)
    relevant["fp_layers"] = list(relevant["fp_layers"])
    # "bits" is irrelevant but for one thing: whether the method folds its smoothing and rotation at them.
    relevant["balanced"] = get_method(cfg.method).balances(cfg.weight_bits, cfg.act_bits)
    return {"config": relevant, "weights_sha256": weights_sha256, "b_range": [B_MIN, B_MAX],
            "layers": hashlib.sha256("\n".join(layer_names).encode()).hexdigest()}


def cached_layers(cfg: "CalibConfig", path: Path, key: dict, layers: dict[str, QuantLayer], what: str) -> dict:
    """The per-layer results a restartable measurement cached at ``path`` under ``key`` (rank 0 reads, every
    rank gets them); {} when there is none, it is unreadable, or its key differs."""
    results: dict = {}
    if cfg.resume and path.is_file() and dist.is_main():
        try:
            cached = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            cached = {}
        if isinstance(cached, dict) and cached.get("key") == key:
            results = {n: r for n, r in cached.get("layers", {}).items() if n in layers}
            if results:
                print(f"{what}: reusing {len(results)} cached layer(s) from {path}")
    return dist.broadcast_object(results)


def sensitivity_sweep(model: torch.nn.Module, layers: dict[str, QuantLayer], x: torch.Tensor, cfg: "CalibConfig",
                      qparams: QParams, weights_sha256: str) -> dict[str, dict]:
    """B_i per layer: {name: {"bits": B_i, "deviation": {b: deviation}}} (see the module docstring).
    Restartable: finished layers are cached and reused when the configuration matches."""
    eps = epsilon(cfg)
    deviation = deviation_fn(cfg)
    key = sweep_key(cfg, list(layers), weights_sha256)
    path = cache_dir(cfg) / "sensitivity.json"
    results = cached_layers(cfg, path, key, layers, "sensitivity sweep")
    todo = [n for n in layers if n not in results]
    mine = [todo[j] for j in dist.shard(len(todo))]
    share = f", rank 0's {len(mine)} of {len(todo)} layers" if dist.active() else ""
    with quantizers_off(layers):
        ref = _forward(model, x)
        for name in dist.progress(mine, desc=f"sensitivity sweep ({cfg.mp_metric} ≤ {eps:g}{share})"):
            layer = layers[name]
            devs: dict[str, float] = {}
            for b in range(B_MIN, B_MAX + 1):
                layer.set_act_quant(b, *qparams(name, b, "mse"))
                devs[str(b)] = float(deviation(_forward(model, x), ref).mean())
                if devs[str(b)] <= eps:
                    break
            layer.act_bits = None
            results[name] = {"bits": b, "deviation": devs}
            if dist.is_main():
                atomic_write_bytes(path, (json.dumps({"key": key, "layers": results}, indent=1) + "\n").encode())
    if dist.active():
        for part in dist.all_gather_object({n: results[n] for n in mine}):
            results.update(part)
        if dist.is_main():
            atomic_write_bytes(path, (json.dumps({"key": key, "layers": results}, indent=1) + "\n").encode())
    return {n: results[n] for n in layers}


@dataclass
class LayerStats:
    elements: int = 0  # elements of the layer's input, per image
    macs: int = 0  # multiply-accumulates of its conv / linear op, per image
    weights: int = 0  # parameters of its quantized residual weight
    sq_error: dict[Any, float] = field(default_factory=dict)  # ‖W X − Q(W) Q_b(X)‖²_F per image, per option


def layer_sizes(model: torch.nn.Module, layers: dict[str, QuantLayer], probe: torch.Tensor) -> dict[str, LayerStats]:
    """E_i, MACs_i and P_i of every layer (no errors), from one forward pass of ``probe`` (one image)."""
    stats = {n: LayerStats(weights=l.weight.numel()) for n, l in layers.items()}

    def hook(name: str):
        def run(module: QuantLayer, args):
            xt = module.transform_input(args[0].detach())
            st = stats[name]
            st.elements = xt[0].numel()
            st.macs = module._op(xt[:1], module.weight, None)[0].numel() * module.weight[0].numel()
        return run

    with quantizers_off(layers):
        with hooks_removed(l.register_forward_pre_hook(hook(n)) for n, l in layers.items()):
            _forward(model, probe[:1])
    return stats


def layer_errors(model: torch.nn.Module, layers: dict[str, QuantLayer], x: torch.Tensor,
                 choices: Sequence[tuple[int, int]], qparams: QParams, spec: "MethodSpec") -> dict[str, LayerStats]:
    """For each layer and each (weight bits, activation bits) choice: ‖W X − Q(W) Q_b(X)‖²_F per image
    on the layer's transformed inputs in the unquantized model; plus E_i, MACs_i and P_i (``layer_sizes``)."""
    stats = layer_sizes(model, layers, x)
    w_quant: dict[tuple[str, int], torch.Tensor] = {}

    def quantized_weight(name: str, layer: QuantLayer, bits: int) -> torch.Tensor:
        if (name, bits) not in w_quant:
            scale = layer.w_scale.detach() if bits == layer.weight_bits and layer.w_scale is not None \
                else weight_scale(layer.weight, bits, spec.scale_init)
            s = scale.clamp_min(EPS).view(-1, *([1] * (layer.weight.dim() - 1)))
            lo, hi = qrange(bits, signed=True)
            w_quant[name, bits] = dequantize(quantize(layer.weight, s, 0.0, lo, hi), s, 0.0)
        return w_quant[name, bits]

    def hook(name: str):
        def run(module: QuantLayer, args):
            xt = module.transform_input(args[0].detach())
            ref = module._op(xt, module.weight, None)
            st = stats[name]
            x_q: dict[int, torch.Tensor] = {}
            for w_bits, a_bits in choices:
                if a_bits not in x_q:
                    s, z = qparams(name, a_bits, spec.scale_init)
                    lo, hi = qrange(a_bits, signed=False)
                    x_q[a_bits] = dequantize(quantize(xt, s, z, lo, hi), s, z)
                out = module._op(x_q[a_bits], quantized_weight(name, module, w_bits), None)
                err = float((out - ref).double().pow(2).sum())
                st.sq_error[w_bits, a_bits] = st.sq_error.get((w_bits, a_bits), 0.0) + err
        return run

    with quantizers_off(layers):
        with hooks_removed(l.register_forward_pre_hook(hook(n)) for n, l in layers.items()):
            _forward(model, x)
    for st in stats.values():
        st.sq_error = {k: v / len(x) for k, v in st.sq_error.items()}
    return stats


def option_key(option: tuple[int, int]) -> str:
    """An option (weight bits, activation bits) as the error cache's and the recipe's JSON key, "W4A16"."""
    return f"W{option[0]}A{option[1]}"


def option_errors(model: torch.nn.Module, layers: dict[str, QuantLayer], x: torch.Tensor,
                  options: Sequence[tuple[int, int]], baseline: tuple[int, int], qparams: QParams,
                  spec: "MethodSpec", cfg: "CalibConfig", weights_sha256: str) -> dict[str, dict[tuple[int, int], float]]:
    """The lean targets' layer errors (``--target cpu`` / ``qnn``), measured on the image: with every layer at
    ``baseline`` (w_0, a_0), for each layer alone at each of ``options`` that differs from the baseline in
    one width (its weight scales searched for w as calibration does, its activation range from its observed
    sample for a, ``act_range_method``), the change of the mean squared output error against the FP model
    (outputs in [0, 1]) on ``x``; an option coarser than the baseline cannot help and is floored at 0, a finer
    one (16-bit activations) is negative where it helps. An option differing in both widths gets the sum of
    its two one-width changes (first order: measuring it would cost one more pass of ``x`` per layer). One
    forward pass of ``x`` per layer and measured option (progress every 10 layers); restartable like the
    sweep (``.<out>.mp_cache/option_errors.json``). Leaves every layer at the baseline."""
    w0, a0 = baseline
    measured = [o for o in options if o != baseline and (o[0] == w0 or o[1] == a0)]
    key = {**sweep_key(cfg, list(layers), weights_sha256), "bits": cfg.bits, "target": cfg.target,
           "baseline": option_key(baseline), "options": [option_key(o) for o in measured]}
    path = cache_dir(cfg) / "option_errors.json"
    done = cached_layers(cfg, path, key, layers, "layer errors")

    def set_option(name: str, layer: QuantLayer, w: int, a: int) -> None:
        if w != layer.weight_bits:
            layer.set_weight_quant(w, weight_scale(layer.weight, w, spec.scale_init))
        if a != layer.act_bits:
            layer.set_act_quant(a, *qparams(name, a, act_range_method(a, spec.scale_init)))

    with torch.no_grad():
        for name, layer in layers.items():
            set_option(name, layer, w0, a0)
        with quantizers_off(layers):
            ref = _forward(model, x)

        def mse() -> float:
            return float(((_to01(_forward(model, x)) - _to01(ref)) ** 2).mean())

        base = mse()
        t0 = time.time()
        for i, (name, layer) in enumerate(layers.items()):
            if name not in done:
                saved = (layer.weight_bits, layer.w_scale, layer.act_bits, layer.a_scale, layer.a_zero_point)
                row = {}
                for w, a in measured:
                    set_option(name, layer, w, a)
                    change = mse() - base
                    row[option_key((w, a))] = max(change, 0.0) if w <= w0 and a <= a0 else change
                    layer.weight_bits, layer.w_scale, layer.act_bits, layer.a_scale, layer.a_zero_point = saved
                done[name] = row
                if dist.is_main():
                    atomic_write_bytes(path, (json.dumps({"key": key, "layers": done}, indent=1) + "\n").encode())
            if (i + 1) % 10 == 0 or i + 1 == len(layers):
                dist.log(f"layer errors: {i + 1}/{len(layers)} layers ({time.time() - t0:.0f}s)")
    errors: dict[str, dict[tuple[int, int], float]] = {}
    for name in layers:
        row = {baseline: 0.0, **{o: done[name][option_key(o)] for o in measured}}
        for w, a in options:
            if (w, a) not in row:
                row[w, a] = row[w, a0] + row[w0, a]
        errors[name] = {o: row[o] for o in options}
    return errors
