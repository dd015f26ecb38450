"""One entry point for every method: ``calibrate(CalibConfig) -> recipe folder``.

Stages (each method's ``MethodSpec`` switches them on or off):

1. data: calibration HQ faces, degraded with (seed, index), and the FP model's outputs for them;
2. wrap every Conv2d / Linear in a ``QuantLayer`` (FP layers by pattern stay untouched);
3. statistics on ``stat_images`` images: per-input-channel max|X| of every layer;
4. fold transforms: smoothing s = max|X|^α / max|W|^(1−α), randomized Hadamard, SVD split (each layer's
   branch rank uniform and capped below its size, or with ``rank_budget`` ≠ 1 chosen by an integer
   program on measured layer errors: ``calibration.ranks``; QuantVSR's from each layer's activation
   complexity under the budget: ``calibration.quantvsr``);
5. quantizers: per-channel weight scales on the (residual) weight, per-tensor activation ranges
   from the *transformed* inputs; LoRA branches added;
   (with ``mp_budget``) adaptive bit widths: sensitivity sweep, integer program, each layer's
   activation (and for ``target='qnn'`` weight) bits set to its choice (``calibration.mixed``);
6. refinement: distillation (QD-LoRA / EfficientDM), module-wise MSE (PassionSR), block reconstruction
   with AdaRound (Q-Diffusion), QArtSR's timestep retraining + reversed per-module + end-to-end stages,
   or QuantVSR's joint refinement of both branches + learnable bias alignment;
7. freeze (merge branches; where ``fold_lowrank`` says so, fold them into the weight; fold a learned bias
   alignment into the bias; fix integer codes);
8. output ranges: per layer, the (min, max) of its frozen quantized product on the ``stat_images``
   images (where the ``ort-cpu`` export requantizes convolution outputs to 8 bits), and write the recipe.

Under ``torchrun`` (``quantface.distributed``) the same stages run data-parallel, and the recipe is the
single process's: the FP outputs (stage 1) in chunks of 16 images, the statistics passes (3, 5, 8) in
batches of 8, are sharded strided over the ranks (batch k on rank k mod world) and gathered or reduced
exactly (max|X|, min, max: MAX / MIN; the range-search samples gathered in the single process's
order, drawn from the one seeded generator each rank replays over the batches it does not see); the
distillation (``calibration.distill``) splits each global batch; the sensitivity sweep
(``calibration.sensitivity``) splits its layers. Rank 0 alone prints, shows the bars and writes.
"""

from __future__ import annotations

import copy
import fnmatch
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quantface import distributed as dist
from quantface.calibration.config import CalibConfig
from quantface.calibration.layers import QuantLayer, quant_layers, unwrap_layer, wrap_layers
from quantface.calibration.methods import DEFAULT_STEPS, MethodSpec, get_method
from quantface.calibration.ranks import allocate_ranks, reused_rank_errors, split_rank, uniform_rank
from quantface.calibration.sensitivity import QParams
from quantface.calibration.targets import get_target
from quantface.calibration.recipe import apply_recipe, save_recipe
from quantface.degradation import degraded_inputs
from quantface.device import describe as describe_device
from quantface.device import resolve_device
from quantface.errors import ConfigError, QuantFaceError
from quantface.models import load_model
from quantface.points import ConstantPoint, Point, QuantConstant, RangeObserver
from quantface.points import install as install_points
from quantface.points import points as model_points
from quantface.quant import act_qparams, act_range_method, weight_scale
from quantface.recipe import HadamardSpec, read_recipe, rewrite_layers, weights_fingerprint

# Values kept per layer and batch for activation-range search (random positions).
SAMPLES_PER_BATCH = 1 << 14
FP_CHUNK = 16  # images per forward pass of the FP model over the calibration inputs
STAT_BATCH = 8  # images per forward pass of the statistics passes


@dataclass
class CalibData:
    """Degraded calibration inputs and the FP model's outputs for them, (N, 3, H, W) in [-1, 1]."""

    lq: torch.Tensor
    fp_out: torch.Tensor

    @classmethod
    def build(cls, fp_model: torch.nn.Module, cfg: CalibConfig, size: int) -> "CalibData":
        device = next(fp_model.parameters()).device  # the data lives where the models run
        lq = degraded_inputs(cfg.data, size, cfg.limit, cfg.seed).to(device)
        starts = range(0, len(lq), FP_CHUNK)
        outs: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            for c in dist.shard(len(starts)):  # every chunk here, or this rank's share under torchrun
                outs[c] = fp_model(lq[starts[c]:starts[c] + FP_CHUNK])
        if dist.active():
            outs = {c: t.to(device) for part in dist.all_gather_object({c: t.cpu() for c, t in outs.items()})
                    for c, t in part.items()}
        return cls(lq=lq, fp_out=torch.cat([outs[c] for c in range(len(starts))]))

    def __len__(self) -> int:
        return len(self.lq)


def _batches(x: torch.Tensor, n: int, batch_size: int):
    for i in range(0, min(n, len(x)), batch_size):
        yield x[i:min(i + batch_size, n)]


class _InputObserver:
    """Forward pre-hook recording, per layer, per-channel max|x| and a random sample of values of
    the layer's input after its online transform (what its activation quantizer will see).

    The sample positions come from one generator seeded with ``seed``, drawn call by call in batch
    order. A rank that does not see a batch replays that batch's draws (``skip``), so under
    ``torchrun`` every batch gets the positions the single process would give it."""

    def __init__(self, layers: dict[str, QuantLayer], transformed: bool, seed: int):
        self.layers = layers
        self.absmax: dict[str, torch.Tensor] = {}
        self.samples: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        self.sample_batches: dict[str, list[int]] = {n: [] for n in layers}  # global batch of each sample
        self.lo: dict[str, torch.Tensor] = {}
        self.hi: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(seed)
        self.batch = 0  # global index of the batch being observed
        self.calls: list[int] = []  # input elements of each hook call, in order, over the batches observed
        self.handles = [layer.register_forward_pre_hook(self._hook(name, transformed))
                        for name, layer in layers.items()]

    def _draw(self, numel: int) -> torch.Tensor:
        n = min(SAMPLES_PER_BATCH, numel)
        return torch.randint(0, numel, (n,), generator=self.generator, device="cpu")  # seeded on the CPU

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
            self.calls.append(flat.numel())
            idx = self._draw(flat.numel())
            self.samples[name].append(flat[idx.to(flat.device)])
            self.sample_batches[name].append(self.batch)
        return hook

    def skip(self, calls: list[int]) -> None:
        """Advance the generator over a batch another rank observes (its hook calls' input sizes)."""
        for numel in calls:
            self._draw(numel)

    def reduce(self) -> None:
        """Under ``torchrun``: every rank's statistics combined, so each holds what one process observing
        every batch would (max|X| and max by MAX, min by MIN; the samples gathered in batch order)."""
        if not dist.active():
            return
        for name, layer in self.layers.items():
            like = layer.weight
            seen = dist.all_reduce_max(torch.tensor([float(name in self.absmax)], device=like.device))
            if not seen.item():
                continue
            self.absmax[name] = dist.all_reduce_max(self.absmax.get(name, torch.zeros(
                layer.in_channels, dtype=like.dtype, device=like.device)))
            inf = torch.tensor(float("inf"), dtype=like.dtype, device=like.device)
            self.lo[name] = dist.all_reduce_min(self.lo.get(name, inf))
            self.hi[name] = dist.all_reduce_max(self.hi.get(name, -inf))
        mine = {n: [(k, t.cpu()) for k, t in zip(self.sample_batches[n], self.samples[n])] for n in self.layers}
        parts = dist.all_gather_object(mine)
        for name, layer in self.layers.items():
            merged = sorted((e for part in parts for e in part[name]), key=lambda e: e[0])  # stable: call order kept
            self.samples[name] = [t.to(layer.weight.device) for _, t in merged]
            self.sample_batches[name] = [k for k, _ in merged]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def observe(model: torch.nn.Module, layers: dict[str, QuantLayer], data: CalibData, cfg: CalibConfig,
            transformed: bool, desc: str) -> _InputObserver:
    """The observer's statistics over the first ``stat_images`` inputs in batches of ``STAT_BATCH``;
    under ``torchrun`` batch k on rank k mod world, reduced so every rank holds them all."""
    obs = _InputObserver(layers, transformed, cfg.seed)
    batches = list(_batches(data.lq, cfg.stat_images, STAT_BATCH))
    mine = dist.shard(len(batches))
    try:
        with torch.inference_mode():
            if not dist.active():
                for k, batch in enumerate(dist.progress(batches, desc=desc)):
                    obs.batch = k
                    model(batch)
            else:
                # Every batch but the last is full, and a full batch's hook calls are the same for all: rank 0
                # records them on batch 0 and sends them, so the others can replay the batches they skip.
                bar = dist.progress(total=len(mine), desc=f"{desc} (rank 0's {len(mine)} of {len(batches)} batches)")
                pos = 0  # the global batch the generator stands at
                full_calls = None
                if dist.is_main() and mine:
                    model(batches[0])
                    bar.update()
                    full_calls, pos = list(obs.calls), 1
                if len(batches) > 1:
                    full_calls = dist.broadcast_object(full_calls)
                for k in mine:
                    if k < pos:
                        continue
                    for _ in range(pos, k):
                        obs.skip(full_calls)
                    obs.batch = k
                    model(batches[k])
                    bar.update()
                    pos = k + 1
                bar.close()
    finally:
        obs.remove()
    obs.reduce()
    return obs


def observe_output_ranges(model: torch.nn.Module, layers: dict[str, QuantLayer], lq: torch.Tensor,
                          n_images: int) -> dict[str, tuple[float, float]]:
    """Per layer, (min, max) of its quantized product (``QuantLayer.quantized_product``: the
    quantized conv / matmul plus bias, without the low-rank branch) over the first ``n_images``
    inputs ``lq``, and stored on the layer as ``output_range``. Run on the frozen model; under
    ``torchrun`` each rank takes its share of the batches and the ranges are reduced (MIN / MAX)."""
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}

    def hook(name: str):
        def record(module: QuantLayer, args):
            y = module.quantized_product(module.transform_input(args[0]))
            lo[name] = min(lo.get(name, float("inf")), float(y.min()))
            hi[name] = max(hi.get(name, float("-inf")), float(y.max()))
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    batches = list(_batches(lq, n_images, STAT_BATCH))
    try:
        with torch.inference_mode():
            for k in dist.progress(dist.shard(len(batches)), desc="output ranges"):
                model(batches[k])
    finally:
        for h in handles:
            h.remove()
    if dist.active():  # float64 holds each float32 extreme exactly
        names = list(layers)
        lo_t = dist.all_reduce_min(torch.tensor([lo.get(n, float("inf")) for n in names], dtype=torch.float64))
        hi_t = dist.all_reduce_max(torch.tensor([hi.get(n, float("-inf")) for n in names], dtype=torch.float64))
        lo = {n: float(a) for n, a in zip(names, lo_t.tolist()) if a != float("inf")}
        hi = {n: float(b) for n, b in zip(names, hi_t.tolist()) if n in lo}
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
            observed: QParams | None = None, sections: dict | None = None) -> dict[str, QuantLayer]:
    """Stages 2–5 on ``model`` (modified in place); returns its quant layers. ``observed``, if given,
    records each layer's observed transformed-input sample (what its activation range came from) and its
    extremes (a 16-bit option's range), for the bit allocation;
    ``sections``, if given, the recipe's "rank_allocation" section where ``rank_budget`` allocates
    the branch ranks (``calibration.ranks``)."""
    patterns = cfg.fp_layers
    originals = dict(model.named_modules())  # the float modules, for layers the rank program keeps in FP
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
    obs = None
    if spec.rank_allocation == "stca":  # QuantVSR: ranks from the layers' activation complexity, always
        from quantface.calibration.quantvsr import stca_ranks

        allocation = stca_ranks(model, layers, data.lq[:cfg.stat_images], cfg, spec)
        ranks = allocation.ranks
        if sections is not None:
            sections["rank_allocation"] = allocation.meta
    elif cfg.rank_budget != 1.0 and spec.has_branch:
        # Allocated ranks: the activation ranges first (they do not depend on the split: the model is
        # still FP), then each layer's error at every candidate rank with them, then the program.
        obs = observe(model, layers, data, cfg, transformed=True, desc="activation ranges")
        method = act_range_method(cfg.act_bits, spec.scale_init)
        act = {n: act_qparams(_act_sample(obs, n, method), cfg.act_bits, method) for n in layers}
        allocation = allocate_ranks(model, layers, data.lq[:cfg.mp_sweep_images], act, cfg, spec)
        ranks = allocation.ranks
        if sections is not None:
            sections["rank_allocation"] = allocation.meta
        for name in allocation.full_precision:  # the float layer back in place: not in the recipe, as --fp-layers
            unwrap_layer(model, name, originals[name])
            del layers[name]
        if not layers:
            raise ConfigError("the rank program kept every layer in full precision: nothing is left to quantize "
                              "(a larger --rank-budget than the whole model's weights?)")
    else:
        ranks = {n: uniform_rank(spec, cfg, layer) for n, layer in layers.items()}
    for name, layer in layers.items():
        svd_rank = split_rank(spec, ranks[name])[0]
        if svd_rank:
            layer.split_lowrank(svd_rank)
        bits = cfg.weight_code_bits(cfg.weight_bits)
        layer.set_weight_quant(bits, weight_scale(layer.weight, bits, spec.scale_init))
    if obs is None:
        obs = observe(model, layers, data, cfg, transformed=True, desc="activation ranges")
    for name, layer in layers.items():
        method = act_range_method(cfg.act_bits, spec.scale_init)
        sample = _act_sample(obs, name, method)
        if observed is not None:
            observed.record(name, sample, obs.lo[name], obs.hi[name])
        scale, zp = act_qparams(sample, cfg.act_bits, method)
        layer.set_act_quant(cfg.act_bits, scale, zp)
    if spec.lora_rank:
        gen = torch.Generator().manual_seed(cfg.seed)
        for name, layer in layers.items():
            lora_rank = split_rank(spec, ranks[name])[1]
            if lora_rank:
                layer.add_lora(lora_rank, gen)
    return layers


def _act_sample(obs: _InputObserver, name: str, method: str) -> torch.Tensor:
    """The values a layer's activation range is computed from (for a ``minmax`` range, the extremes too)."""
    sample = torch.cat(obs.samples[name])
    if method == "minmax":
        sample = torch.cat([sample, obs.lo[name].reshape(1), obs.hi[name].reshape(1)])
    return sample


@dataclass
class CalibrationResult:
    recipe: Path  # the recipe folder written
    model: torch.nn.Module  # the calibrated fake-quant model (frozen), as the recipe describes it
    seconds: float


def calibrate(cfg: CalibConfig) -> CalibrationResult:
    """Run ``cfg.method`` on ``cfg.model`` and write the recipe to ``cfg.out``; under ``torchrun``
    data-parallel on every rank (the module docstring), the recipe written by rank 0."""
    spec = get_method(cfg.method)
    if cfg.rank_budget != 1.0 and not spec.has_branch:
        raise ConfigError(f"--rank-budget allocates low-rank branch ranks; method {cfg.method} has no branch")
    if dist.active() and spec.refine in ("blockwise", "qartsr", "quantvsr"):
        raise ConfigError(f"method {cfg.method} does not run data-parallel yet: run it without torchrun")
    if get_target(cfg.target).lean:  # --target cpu / qnn: no smoothing, rotation or branch (calibration.targets)
        spec = spec.lean()
    try:
        device, device_error = resolve_device(cfg.device), None
    except QuantFaceError as exc:  # raised on every rank below, once the ranks have compared notes
        device, device_error = None, exc
    with dist.session(device):
        return _calibrate(cfg, spec, dist.agree(lambda: _checked(cfg, device, device_error)))


def _checked(cfg: CalibConfig, device: torch.device | None, error: QuantFaceError | None) -> torch.device:
    """The user's inputs checked before any work (``CalibConfig.check``); the device to run on."""
    cfg.check()
    if error is not None:
        raise error
    return device


def _calibrate(cfg: CalibConfig, spec: MethodSpec, device: torch.device) -> CalibrationResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    t0 = time.time()
    fp_model = load_model(cfg.model, cfg.weights).to(device)
    if cfg.rank_errors_from is not None:  # the lent rank errors were measured on these weights
        reused_rank_errors(cfg, weights_fingerprint(fp_model))
    size = cfg.size if cfg.size is not None else fp_model.config.working_size
    if size % fp_model.config.size_multiple:
        raise ConfigError(f"--size {size} is not a multiple of {fp_model.config.size_multiple}, which the model needs")
    data = CalibData.build(fp_model, cfg, size)
    ranks = f" x {dist.world_size()} ranks" if dist.active() else ""
    dist.log(f"{cfg.method} {cfg.bits}: {len(data)} calibration images at {size}px on {describe_device(device)}{ranks}")
    qmodel = copy.deepcopy(fp_model)
    observed = QParams() if cfg.mp_budget is not None else None
    sections: dict = {}
    layers = prepare(qmodel, data, cfg, spec, observed, sections)
    # Every rank computed the same prepared model from the same reduced statistics; rank 0's values are
    # sent anyway, so no kernel's nondeterminism on some device can make the ranks train different models.
    dist.broadcast_module(qmodel)
    allocation = None
    if cfg.mp_budget is not None:  # adaptive bit widths (paper §3.4), then the usual refinement with them
        from quantface.calibration.mixed import allocate_bits

        allocation = allocate_bits(qmodel, layers, data, cfg, spec, observed, weights_fingerprint(fp_model))
        observed = None
    target = get_target(cfg.target)
    default_steps = target.default_steps if target.default_steps is not None else DEFAULT_STEPS.get(spec.refine or "", 0)
    steps = cfg.steps if cfg.steps is not None else default_steps
    stats: dict = {}
    for layer in layers.values():  # the branches train on their integer grid (QuantLayer.branch_bits)
        layer.branch_bits = cfg.branch_bits
    if spec.refine == "distill" and steps:
        from quantface.calibration.distill import distill

        stats["distill_loss"] = distill(qmodel, layers, data, cfg, spec, steps)
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
    if spec.refine == "quantvsr":
        from quantface.calibration.quantvsr import quantvsr_calibrate

        stats.update(quantvsr_calibrate(qmodel, layers, data, cfg, spec, steps))
    for layer in layers.values():
        if cfg.folds_lowrank(layer.weight_bits):
            layer.fold_lowrank(spec.scale_init)
    if cfg.weight_rounding == "gptq":  # codes chosen against each layer's input statistics (calibration.gptq)
        from quantface.calibration.gptq import apply_gptq

        apply_gptq(qmodel, layers, data.lq[:cfg.stat_images], cfg.seed)
    for layer in layers.values():
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
    point_ranges = observe_points(qmodel, data.lq.cpu(), cfg.stat_images)
    if point_ranges:
        sections = {**sections, "points": point_ranges}
    seconds = time.time() - t0
    out = None
    if dist.is_main():  # the one rank that writes
        out = save_recipe(qmodel, fp_model, cfg, spec, {"calibration_seconds": round(seconds, 1), "steps": steps,
                                                        "images": len(data), "size": size,
                                                        "world_size": dist.world_size(), **stats, **stage_steps},
                          sections={**sections, **({"allocation": allocation.meta} if allocation else {})} or None,
                          files=allocation.files if allocation else None, timestep=timestep)
        if allocation:
            allocation.cleanup()
        print(f"recipe written to {out} ({seconds:.0f}s)")
    out = dist.broadcast_object(out)  # the others return once the recipe is there
    return CalibrationResult(out, qmodel.eval(), seconds)


@contextmanager
def _integer_units(layers: dict[str, QuantLayer]):
    """The layers computing their products as the ``qnn`` profile's integer node units do (requantized
    outputs, Linear layers and 16-bit inputs included), restored after."""
    saved = {n: (l.requant_output, l.requant_wide) for n, l in layers.items()}
    try:
        for layer in layers.values():
            layer.requant_output = layer.requant_wide = True
        yield
    finally:
        for n, layer in layers.items():
            layer.requant_output, layer.requant_wide = saved[n]


def observe_points(model: torch.nn.Module, lq: torch.Tensor, n_images: int) -> dict[str, list[float]]:
    """Per quantizer point of the model (``quantface.points``: the outputs of its float ops), [min, max]
    of its tensor over the first ``n_images`` inputs ``lq``, in the model as the ``qnn`` profile's integer
    node units compute it; the recipe's ``points`` section. Empty for a model without points. Under
    ``torchrun`` each rank takes its share of the batches and the ranges are reduced (MIN / MAX)."""
    if not model_points(model):
        return {}
    observers: dict[str, RangeObserver] = {}

    def observer(name: str) -> RangeObserver:
        observers[name] = RangeObserver()
        return observers[name]

    layers = quant_layers(model)
    batches = list(_batches(lq, n_images, STAT_BATCH))
    install_points(model, observer, lambda name: QuantConstant())
    try:
        with torch.inference_mode(), _integer_units(layers):
            for k in dist.progress(dist.shard(len(batches)), desc="point ranges"):
                model(batches[k])
    finally:
        install_points(model, lambda name: Point(), lambda name: ConstantPoint())
    names = list(observers)
    lo = torch.tensor([observers[n].lo for n in names], dtype=torch.float64, device="cpu")
    hi = torch.tensor([observers[n].hi for n in names], dtype=torch.float64, device="cpu")
    if dist.active():  # float64 holds each float32 extreme exactly
        lo, hi = dist.all_reduce_min(lo), dist.all_reduce_max(hi)
    return {n: [float(a), float(b)] for n, a, b in zip(names, lo.tolist(), hi.tolist()) if a <= b}


def add_points(recipe_dir: str | Path, data: str | None = None) -> Path:
    """Record the quantizer points' ranges (``observe_points``) into a recipe written without them: its
    ``recipe.json`` gets a ``points`` section, rewritten atomically; tensors, bits and scales are unchanged.
    The inputs are the recipe's own calibration images (``data`` overrides their folder)."""
    recipe = read_recipe(recipe_dir)
    cfg = recipe.calibration
    fp_model = load_model(cfg["model"], cfg.get("weights"))
    if not model_points(fp_model):
        raise ConfigError(f"model {cfg['model']!r} has no quantizer points to record")
    qmodel = apply_recipe(fp_model, recipe)
    size = cfg.get("size") or fp_model.config.working_size
    lq = degraded_inputs(data or cfg["data"], size, cfg["stat_images"], cfg["seed"])
    recipe.sections["points"] = observe_points(qmodel, lq, cfg["stat_images"])
    rewrite_layers(recipe)
    return recipe.path


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
