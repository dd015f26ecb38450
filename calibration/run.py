"""One entry point for every method: ``calibrate(CalibConfig) -> recipe folder``.

Stages (each method's ``MethodSpec`` switches them on or off):

1. data: calibration HQ faces, degraded with (seed, index), and the FP model's outputs for them;
2. wrap every Conv2d / Linear in a ``QuantLayer`` (FP layers by pattern stay untouched);
3. statistics on ``stat_images`` images: per-input-channel max|X| of every layer;
4. fold transforms: smoothing s = max|X|^α / max|W|^(1−α), randomized Hadamard, SVD split;
5. quantizers: per-channel weight scales on the (residual) weight, per-tensor activation ranges
   from the *transformed* inputs; LoRA branches added;
   (with ``mp_budget``) adaptive bit widths: sensitivity sweep, integer program, each layer's
   activation (and for ``target='qnn'`` weight) bits set to its choice (``calibration.mixed``);
6. refinement: distillation (QD-LoRA / EfficientDM), module-wise MSE (PassionSR), block reconstruction
   with AdaRound (Q-Diffusion), or QArtSR's timestep retraining + reversed per-module + end-to-end stages;
7. freeze (merge branches; where ``fold_lowrank`` says so, fold them into the weight; fix integer codes);
8. output ranges: per layer, the (min, max) of its frozen quantized product on the ``stat_images``
   images (where the ``ort-cpu`` export requantizes convolution outputs to 8 bits), and write the recipe.
"""

from __future__ import annotations

import copy
import fnmatch
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from quantface.calibration.config import CalibConfig
from quantface.calibration.layers import QuantLayer, quant_layers, wrap_layers
from quantface.calibration.methods import DEFAULT_STEPS, MethodSpec, get_method
from quantface.calibration.recipe import apply_recipe, save_recipe
from quantface.degradation import degraded_inputs
from quantface.device import describe as describe_device
from quantface.device import resolve_device
from quantface.errors import ConfigError
from quantface.models import load_model
from quantface.quant import act_qparams, weight_scale
from quantface.recipe import HadamardSpec, read_recipe, rewrite_layers, weights_fingerprint

# Values kept per layer and batch for activation-range search (random positions).
SAMPLES_PER_BATCH = 1 << 14


@dataclass
class CalibData:
    """Degraded calibration inputs and the FP model's outputs for them, (N, 3, H, W) in [-1, 1]."""

    lq: torch.Tensor
    fp_out: torch.Tensor

    @classmethod
    def build(cls, fp_model: torch.nn.Module, cfg: CalibConfig, size: int) -> "CalibData":
        device = next(fp_model.parameters()).device  # the data lives where the models run
        lq = degraded_inputs(cfg.data, size, cfg.limit, cfg.seed).to(device)
        outs = []
        with torch.inference_mode():
            for i in range(0, len(lq), 16):
                outs.append(fp_model(lq[i:i + 16]))
        return cls(lq=lq, fp_out=torch.cat(outs))

    def __len__(self) -> int:
        return len(self.lq)


def _batches(x: torch.Tensor, n: int, batch_size: int):
    for i in range(0, min(n, len(x)), batch_size):
        yield x[i:min(i + batch_size, n)]


class _InputObserver:
    """Forward pre-hook recording, per layer, per-channel max|x| and a random sample of values of
    the layer's input after its online transform (what its activation quantizer will see)."""

    def __init__(self, layers: dict[str, QuantLayer], transformed: bool, seed: int):
        self.absmax: dict[str, torch.Tensor] = {}
        self.samples: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        self.lo: dict[str, torch.Tensor] = {}
        self.hi: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(seed)
        self.handles = [layer.register_forward_pre_hook(self._hook(name, transformed))
                        for name, layer in layers.items()]

    def _hook(self, name: str, transformed: bool):
        def hook(module: QuantLayer, args):
            x = args[0].detach()
            if transformed:
                x = module.transform_input(x)
            ch = x.movedim(module.channel_dim, -1).reshape(-1, x.shape[module.channel_dim])
            amax = ch.abs().amax(0)
            self.absmax[name] = amax if name not in self.absmax else torch.maximum(self.absmax[name], amax)
            self.lo[name] = torch.minimum(self.lo.get(name, ch.min()), ch.min())
            self.hi[name] = torch.maximum(self.hi.get(name, ch.max()), ch.max())
            flat = x.flatten()
            n = min(SAMPLES_PER_BATCH, flat.numel())
            idx = torch.randint(0, flat.numel(), (n,), generator=self.generator, device="cpu")  # seeded on the CPU
            self.samples[name].append(flat[idx.to(flat.device)])
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def observe(model: torch.nn.Module, layers: dict[str, QuantLayer], data: CalibData, cfg: CalibConfig,
            transformed: bool, desc: str) -> _InputObserver:
    obs = _InputObserver(layers, transformed, cfg.seed)
    try:
        with torch.inference_mode():
            for batch in tqdm(list(_batches(data.lq, cfg.stat_images, 8)), desc=desc, dynamic_ncols=True):
                model(batch)
    finally:
        obs.remove()
    return obs


def observe_output_ranges(model: torch.nn.Module, layers: dict[str, QuantLayer], lq: torch.Tensor,
                          n_images: int) -> dict[str, tuple[float, float]]:
    """Per layer, (min, max) of its quantized product (``QuantLayer.quantized_product``: the
    quantized conv / matmul plus bias, without the low-rank branch) over the first ``n_images``
    inputs ``lq``, and stored on the layer as ``output_range``. Run on the frozen model."""
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}

    def hook(name: str):
        def record(module: QuantLayer, args):
            y = module.quantized_product(module.transform_input(args[0]))
            lo[name] = min(lo.get(name, float("inf")), float(y.min()))
            hi[name] = max(hi.get(name, float("-inf")), float(y.max()))
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        with torch.inference_mode():
            for batch in tqdm(list(_batches(lq, n_images, 8)), desc="output ranges", dynamic_ncols=True):
                model(batch)
    finally:
        for h in handles:
            h.remove()
    for name, layer in layers.items():
        layer.output_range = (lo[name], hi[name]) if name in lo else None
    return {n: (lo[n], hi[n]) for n in lo}


def smoothing_scale(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^α / max|W_j|^(1−α), the weight max taken over output channels
    and kernel positions of input channel j."""
    w_max = weight.detach().abs().transpose(0, 1).flatten(1).amax(1)
    s = act_absmax.clamp_min(1e-5) ** alpha / w_max.clamp_min(1e-5) ** (1.0 - alpha)
    return s.clamp(1e-4, 1e4)


def prepare(model: torch.nn.Module, data: CalibData, cfg: CalibConfig, spec: MethodSpec,
            samples: dict[str, torch.Tensor] | None = None) -> dict[str, QuantLayer]:
    """Stages 2–5 on ``model`` (modified in place); returns its quant layers. ``samples``, if given,
    receives each layer's observed transformed-input sample (what its activation range came from)."""
    patterns = cfg.fp_layers
    layers = wrap_layers(model, include=lambda name: not any(fnmatch.fnmatch(name, p) for p in patterns))
    if not layers:
        raise ConfigError("no layer is left to quantize: the --fp-layers patterns match every layer")
    balance = spec.balances(cfg.weight_bits, cfg.act_bits)
    if spec.smoothing and balance:
        raw = observe(model, layers, data, cfg, transformed=False, desc="channel statistics")
        for name, layer in layers.items():
            layer.fold_smoothing(smoothing_scale(raw.absmax[name], layer.weight, cfg.alpha))
    for index, (name, layer) in enumerate(layers.items()):
        if spec.hadamard and balance and layer.in_channels >= cfg.rotate_min_channels:
            layer.fold_rotation(HadamardSpec.draw(layer.in_channels, cfg.seed * 100003 + index))
        if spec.svd_rank:
            layer.split_lowrank(spec.svd_rank * cfg.rank)
        bits = cfg.weight_code_bits(cfg.weight_bits)
        layer.set_weight_quant(bits, weight_scale(layer.weight, bits, spec.scale_init))
    obs = observe(model, layers, data, cfg, transformed=True, desc="activation ranges")
    for name, layer in layers.items():
        sample = torch.cat(obs.samples[name])
        if spec.scale_init == "minmax":
            sample = torch.cat([sample, obs.lo[name].reshape(1), obs.hi[name].reshape(1)])
        if samples is not None:
            samples[name] = sample
        scale, zp = act_qparams(sample, cfg.act_bits, spec.scale_init)
        layer.set_act_quant(cfg.act_bits, scale, zp)
    if spec.lora_rank:
        gen = torch.Generator().manual_seed(cfg.seed)
        for layer in layers.values():
            layer.add_lora(spec.lora_rank * cfg.rank, gen)
    return layers


@dataclass
class CalibrationResult:
    recipe: Path  # the recipe folder written
    model: torch.nn.Module  # the calibrated fake-quant model (frozen), as the recipe describes it
    seconds: float


def calibrate(cfg: CalibConfig) -> CalibrationResult:
    """Run ``cfg.method`` on ``cfg.model`` and write the recipe to ``cfg.out``."""
    spec = get_method(cfg.method)
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    t0 = time.time()
    fp_model = load_model(cfg.model, cfg.weights).to(device)
    size = cfg.size if cfg.size is not None else fp_model.config.working_size
    if size % fp_model.config.size_multiple:
        raise ConfigError(f"--size {size} is not a multiple of {fp_model.config.size_multiple}, which the model needs")
    data = CalibData.build(fp_model, cfg, size)
    print(f"{cfg.method} {cfg.bits}: {len(data)} calibration images at {size}px on {describe_device(device)}")
    qmodel = copy.deepcopy(fp_model)
    samples: dict[str, torch.Tensor] | None = {} if cfg.mp_budget is not None else None
    layers = prepare(qmodel, data, cfg, spec, samples)
    allocation = None
    if cfg.mp_budget is not None:  # adaptive bit widths (paper §3.4), then the usual refinement with them
        from quantface.calibration.mixed import allocate_bits

        allocation = allocate_bits(qmodel, layers, data, cfg, spec, samples, weights_fingerprint(fp_model))
        samples = None
    steps = cfg.steps if cfg.steps is not None else DEFAULT_STEPS.get(spec.refine or "", 0)
    if spec.refine == "distill" and steps:
        from quantface.calibration.distill import distill

        distill(qmodel, layers, data, cfg, spec, steps)
    elif spec.refine == "modulewise" and steps:
        from quantface.calibration.modulewise import modulewise_calibrate

        modulewise_calibrate(fp_model, qmodel, layers, data, cfg, steps)
    elif spec.refine == "blockwise" and steps:
        from quantface.calibration.blockwise import reconstruct_blocks

        reconstruct_blocks(fp_model, qmodel, layers, data, cfg, steps)
    timestep, stage_steps = None, {}  # QArtSR: the tuned timestep (TRQ) and its stages' steps, in the recipe
    if spec.refine == "qartsr":
        from quantface.calibration.qartsr import qartsr_calibrate

        timestep, stage_steps = qartsr_calibrate(fp_model, qmodel, layers, data, cfg, spec, steps)
    for layer in layers.values():
        if cfg.folds_lowrank(layer.weight_bits):
            layer.fold_lowrank(spec.scale_init)
        layer.freeze()
    # Frozen means inference only. It also matters for bit-exactness: torch's matmul folds batch
    # dimensions differently when an operand requires grad, so a recipe reloaded without grads
    # would differ from this model in the last bits.
    qmodel.requires_grad_(False)
    # Recipes are written from, and reproduced on, the CPU (the frozen state is integer codes, their
    # scales and float16 factors: moving it between devices changes no value).
    qmodel.cpu()
    fp_model.cpu()
    observe_output_ranges(qmodel, layers, data.lq.cpu(), cfg.stat_images)
    seconds = time.time() - t0
    out = save_recipe(qmodel, fp_model, cfg, spec, {"calibration_seconds": round(seconds, 1), "steps": steps,
                                                    "images": len(data), "size": size,
                                                    **stage_steps},
                      sections={"allocation": allocation.meta} if allocation else None,
                      files=allocation.files if allocation else None, timestep=timestep)
    if allocation:
        allocation.cleanup()
    print(f"recipe written to {out} ({seconds:.0f}s)")
    return CalibrationResult(out, qmodel.eval(), seconds)


def add_output_ranges(recipe_dir: str | Path, data: str | None = None) -> Path:
    """Record stage 8's output ranges into a recipe written without them (its ``recipe.json`` is
    rewritten atomically; tensors, bits and scales are unchanged). The inputs are the recipe's own
    calibration images (``data`` overrides their folder), degraded with its seed."""
    recipe = read_recipe(recipe_dir)
    cfg = recipe.calibration
    fp_model = load_model(cfg["model"], cfg.get("weights"))
    qmodel = apply_recipe(fp_model, recipe)
    size = cfg.get("size") or fp_model.config.working_size
    lq = degraded_inputs(data or cfg["data"], size, cfg["stat_images"], cfg["seed"])
    ranges = observe_output_ranges(qmodel, quant_layers(qmodel), lq, cfg["stat_images"])
    rewrite_layers(recipe, output_range={n: tuple(r) for n, r in ranges.items()})
    return recipe.path
