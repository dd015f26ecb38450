"""Adaptive bit-width allocation (QuantFace paper §3.4, "QuantFace-MP", e.g. W4A3.98).

Called by ``calibration.run.calibrate`` right after ``prepare`` when ``CalibConfig.mp_budget`` is set,
on the *prepared* model (transforms folded, SVD split, zero-initialised LoRA: exactly the FP model
while its quantizers are switched off). Four steps:

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
   (the whole model's deviation adds up over all of them), hence small. On the reference model
   (QuantFace transforms, 91 layers, measured on 4 calibration faces) 1 − SSIM at 2 bits ranges from
   7e-2 (encoder.conv_in) down to 1e-12 (the three conv_out layers, whose rank-8 SVD branch holds
   the whole weight, and much of the cross-attention / timestep path). Number of layers with
   B_i = 2, 3, …, 8 for some ε:

   ==========  ============================  ====================================
   1 − SSIM ε  B_i histogram (2 … 8)          remark
   ==========  ============================  ====================================
   1e-3        75 10  3  2  1  0  0            almost every layer at 2 bits: no ranking
   1e-4        49 16 12 10  2  1  1
   1e-5        40  5  5 19  9  9  4            **default**: all of 2..8 used
   1e-6        30  5  6  5  7 17 21            most sensitive layers pinned at 7–8
   ==========  ============================  ====================================

   1e-5 spreads B_i over the whole range: insensitive layers (attention K/Q/V, timestep, prompt
   path, conv_out) at 2, the UNet's ResNet convolutions at 4–6, the VAE encoder and decoder at 5–8.
   The MSE default 1e-7 (PSNR 70 dB) gives nearly the same histogram (40 4 6 16 15 7 3). LPIPS's
   5e-4 is not measured here (no local LPIPS weights): set ``mp_epsilon`` when using it.
   Per-layer results are cached in ``.<out>.mp_cache/sensitivity.json`` beside the output (written
   atomically after every layer) and reused on restart when the configuration matches; the cache is
   removed once the recipe is written.

2. **Layer errors.** L_{i,o} = w_i² · ‖W X − Q(W) Q_b(X)‖²_F per image, X the layer's (transformed)
   input on the sweep images in the unquantized model, W its residual weight (after the SVD split),
   Q(W) its weight quantizer, Q_b(X) the activation quantizer at b bits, W X the layer's conv / linear
   op without bias. The low-rank branches run in FP on x' on both sides and cancel.

3. **Integer program** (``allocate``, pulp + its bundled CBC): binary a_{i,o}, exactly one option per
   layer, Σ M_{i,o} a_{i,o} ≤ budget, minimise Σ L_{i,o} a_{i,o}. Costs (``mp_cost``):

   * ``elements`` (default): M_{i,b} = b · E_i, E_i the number of elements of layer i's input per
     image (activation storage / traffic in bits). Budget = ``mp_budget`` × Σ E_i, so ``mp_budget`` is
     the element-weighted mean activation bit width (4.0 → "A4"; the achieved mean is reported, the
     paper's 3.98);
   * ``bops``: M_{i,b} = b · w_bits · MACs_i (bit operations); budget = ``mp_budget`` × w_bits × Σ MACs_i,
     again a mean activation bit width, MAC-weighted.

   ``target='qnn'`` (hardware-aware): options are (weight bits ∈ {4, 8}) × (activation bits ∈
   {8, 16}), the widths Qualcomm's HTP runs; the cost is the layer's bytes (``QNN_BYTE_TABLE``):
   E_i · a/8 (its input activation at that precision) + P_i · w/8 (its quantized residual weight,
   P_i parameters; the FP low-rank branch is the same for every option and left out). ``mp_budget``
   is a fraction (0, 1] of the all-A16/W8 cost Σ (2 E_i + P_i).

4. **Apply**: each layer's activation scale / zero point is recomputed for its chosen b from the same
   observed sample (and, for 'qnn', its weight scales for the chosen weight bits); the caller then
   runs the usual refinement with those bits. ``AllocationResult.meta`` is the recipe's "allocation"
   section (every input of the program: w_i, B_i, L, M, budget, achieved mean bits, solve seconds),
   ``files`` the per-layer JSON and the two plots written into the recipe folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from quantface.calibration.layers import QuantLayer
from quantface.calibration.methods import get_method
from quantface.data import atomic_write_bytes
from quantface.errors import ConfigError
from quantface.metrics import ssim_map
from quantface.calibration.config import COSTS, DEFAULT_EPSILON, METRICS, TARGETS, epsilon  # noqa: F401
from quantface.quant import EPS, act_qparams, check_bits, dequantize, qrange, quantize, weight_scale

if TYPE_CHECKING:
    from quantface.calibration.config import CalibConfig
    from quantface.calibration.methods import MethodSpec

B_MIN, B_MAX = 2, 8  # sensitivity sweep range (B_max = 8)
QNN_WEIGHT_BITS, QNN_ACT_BITS = (4, 8), (8, 16)
QNN_BYTE_TABLE = ("bytes of option (w, a) of layer i = E_i·a/8 (input activation elements per image at a bits) "
                  "+ P_i·w/8 (quantized residual weight parameters at w bits); low-rank branches excluded "
                  "(FP, identical for every option)")
SWEEP_BATCH = 8
CACHE_SUFFIX = ".mp_cache"
# Configuration fields that do not change the sweep's results (the cache ignores them).
_SWEEP_IRRELEVANT = {"out", "steps", "batch_size", "lr", "scale_lr", "lora_lr", "lambda_perceptual", "lambda_mse",
                     "checkpoint_every", "resume", "threads", "mp_budget", "mp_candidates", "mp_cost", "target",
                     "bits", "fold_lowrank"}


# ------------------------------------------------------------------------------------------------
# The integer program
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One candidate of a layer: what it means (``choice``: activation bits b, or (weight bits,
    activation bits)), its error L and its cost M."""

    choice: Any
    error: float
    cost: float


@dataclass
class Solution:
    choice: dict[str, int]  # index of the chosen option per layer
    objective: float  # Σ L of the chosen options
    cost: float  # Σ M of the chosen options (≤ budget)
    budget: float
    seconds: float  # wall time of the solve (building the model and running CBC)
    status: str


def minimum_cost(options: Mapping[str, Sequence[Option]]) -> float:
    return float(sum(min(o.cost for o in opts) for opts in options.values()))


def check_budget(options: Mapping[str, Sequence[Option]], budget: float,
                 describe: Callable[[float], str] = lambda c: f"{c:g}") -> None:
    """ConfigError when even every layer's cheapest option exceeds ``budget``."""
    lowest = minimum_cost(options)
    if lowest > budget:
        raise ConfigError(f"the bit budget {describe(budget)} is infeasible: the minimum achievable is "
                          f"{describe(lowest)} (every layer at its cheapest option)")


def allocate(options: Mapping[str, Sequence[Option]], budget: float,
             describe: Callable[[float], str] = lambda c: f"{c:g}") -> Solution:
    """Exactly one option per layer with Σ cost ≤ ``budget`` and the least Σ error (a multiple-choice
    knapsack, solved exactly by CBC). ``describe`` words a cost for error messages."""
    import warnings

    import pulp

    if not options or any(not opts for opts in options.values()):
        raise ConfigError("bit allocation needs at least one option for every layer")
    check_budget(options, budget, describe)
    names = list(options)
    # Scale the objective so that its lower bound (every layer at its least error) is 1e4 and the
    # budget row so that its right-hand side is 1. CBC's optimality tolerances are absolute (it
    # stops once an improvement would be below about 1e-5), so this makes them relative to the
    # optimum, about 1e-9: on 300 random problems the result then equals brute force exactly,
    # where scaling to 1 missed the optimum by up to 3e-6 (relative) and scaling by the largest
    # error by far more when the optimum is tiny next to the worst option.
    lower = sum(min(o.error for o in opts) for opts in options.values())
    positive = [o.error for opts in options.values() for o in opts if o.error > 0]
    err_scale = (lower if lower > 0 else (min(positive) if positive else 1.0)) / 1e4
    cost_scale = abs(budget) or 1.0
    t0 = time.perf_counter()
    rhs = budget / cost_scale
    for _attempt in range(2):
        prob = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
        if hasattr(prob, "add_variable"):  # PuLP ≥ 3.3; LpVariable(...) alone is deprecated there
            def binary(name):
                return prob.add_variable(name, 0, 1, cat="Binary")
        else:
            def binary(name):
                return pulp.LpVariable(name, cat="Binary")
        a = {(i, j): binary(f"a_{i}_{j}") for i, n in enumerate(names) for j in range(len(options[n]))}
        prob += pulp.lpSum(options[n][j].error / err_scale * a[i, j]
                           for i, n in enumerate(names) for j in range(len(options[n])))
        for i, n in enumerate(names):
            prob += pulp.lpSum(a[i, j] for j in range(len(options[n]))) == 1
        prob += pulp.lpSum(options[n][j].cost / cost_scale * a[i, j]
                           for i, n in enumerate(names) for j in range(len(options[n]))) <= rhs
        with warnings.catch_warnings():  # PuLP 3.3 deprecates PULP_CBC_CMD (its bundled CBC) for 4.0
            warnings.simplefilter("ignore", DeprecationWarning)
            # "preprocess off": CBC 2.10.3's (the one PuLP bundles) integer preprocessing fixes
            # variables wrongly on some of these problems and reports a poor choice as optimal
            # (test_mixed.py keeps one such problem); the program is small enough without it.
            solver = pulp.PULP_CBC_CMD(msg=False, gapRel=0, gapAbs=0, threads=1, options=["preprocess off"])
        status = pulp.LpStatus[prob.solve(solver)]
        if status != "Optimal":
            raise ConfigError(f"the bit-allocation program for budget {describe(budget)} was not solved to "
                              f"optimality (CBC status {status})")
        choice = {n: max(range(len(options[n])), key=lambda j, i=i: a[i, j].value() or 0.0)
                  for i, n in enumerate(names)}
        cost = float(sum(options[n][choice[n]].cost for n in names))
        if cost <= budget:
            break
        # CBC's feasibility tolerance let the rounded choice overshoot: tighten by the overshoot, once.
        rhs -= 2 * (cost - budget) / cost_scale
    else:
        raise ConfigError(f"the bit-allocation program found no choice within the budget {describe(budget)}")
    seconds = time.perf_counter() - t0
    objective = float(sum(options[n][choice[n]].error for n in names))
    return Solution(choice, objective, cost, float(budget), seconds, status)


# ------------------------------------------------------------------------------------------------
# Measuring the model
# ------------------------------------------------------------------------------------------------

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
    transformed-input sample, computed once."""

    def __init__(self, samples: dict[str, torch.Tensor]):
        self.samples = samples
        self._cache: dict[tuple[str, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, name: str, bits: int, method: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
        key = (name, bits, method)
        if key not in self._cache:
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


def sensitivity_sweep(model: torch.nn.Module, layers: dict[str, QuantLayer], x: torch.Tensor, cfg: "CalibConfig",
                      qparams: QParams, weights_sha256: str) -> dict[str, dict]:
    """B_i per layer: {name: {"bits": B_i, "deviation": {b: deviation}}} (see the module docstring).
    Restartable: finished layers are cached and reused when the configuration matches."""
    from tqdm import tqdm

    eps = epsilon(cfg)
    deviation = deviation_fn(cfg)
    key = sweep_key(cfg, list(layers), weights_sha256)
    path = cache_dir(cfg) / "sensitivity.json"
    results: dict[str, dict] = {}
    if cfg.resume and path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            cached = {}
        if isinstance(cached, dict) and cached.get("key") == key:
            results = {n: r for n, r in cached.get("layers", {}).items() if n in layers}
            if results:
                print(f"sensitivity sweep: reusing {len(results)} cached layer(s) from {path}")
    todo = [n for n in layers if n not in results]
    with quantizers_off(layers):
        ref = _forward(model, x)
        for name in tqdm(todo, desc=f"sensitivity sweep ({cfg.mp_metric} ≤ {eps:g})", dynamic_ncols=True):
            layer = layers[name]
            devs: dict[str, float] = {}
            for b in range(B_MIN, B_MAX + 1):
                layer.set_act_quant(b, *qparams(name, b, "mse"))
                devs[str(b)] = float(deviation(_forward(model, x), ref).mean())
                if devs[str(b)] <= eps:
                    break
            layer.act_bits = None
            results[name] = {"bits": b, "deviation": devs}
            atomic_write_bytes(path, (json.dumps({"key": key, "layers": results}, indent=1) + "\n").encode())
    return {n: results[n] for n in layers}


@dataclass
class LayerStats:
    elements: int = 0  # elements of the layer's input, per image
    macs: int = 0  # multiply-accumulates of its conv / linear op, per image
    weights: int = 0  # parameters of its quantized residual weight
    sq_error: dict[Any, float] = field(default_factory=dict)  # ‖W X − Q(W) Q_b(X)‖²_F per image, per option


def layer_errors(model: torch.nn.Module, layers: dict[str, QuantLayer], x: torch.Tensor,
                 choices: Sequence[tuple[int, int]], qparams: QParams, spec: "MethodSpec") -> dict[str, LayerStats]:
    """For each layer and each (weight bits, activation bits) choice: ‖W X − Q(W) Q_b(X)‖²_F per image
    on the layer's transformed inputs in the unquantized model; plus E_i, MACs_i and P_i."""
    stats = {n: LayerStats(weights=l.weight.numel()) for n, l in layers.items()}
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
            st.elements = xt[0].numel()
            st.macs = ref[0].numel() * module.weight[0].numel()
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
        handles = [l.register_forward_pre_hook(hook(n)) for n, l in layers.items()]
        try:
            _forward(model, x)
        finally:
            for h in handles:
                h.remove()
    for st in stats.values():
        st.sq_error = {k: v / len(x) for k, v in st.sq_error.items()}
    return stats


# ------------------------------------------------------------------------------------------------
# Plots (Pillow only)
# ------------------------------------------------------------------------------------------------

_PALETTE = {2: (215, 48, 39), 3: (244, 109, 67), 4: (253, 174, 97), 5: (171, 217, 233), 6: (116, 173, 209),
            7: (69, 117, 180), 8: (49, 54, 149), 16: (20, 20, 60)}


def bits_plot(panels: Sequence[tuple[str, Sequence[float]]], title: str, y_max: int) -> bytes:
    """PNG bar chart(s), one panel per (label, per-layer values): layer index on x, bits on y."""
    from PIL import Image, ImageDraw, ImageFont

    n = max((len(v) for _, v in panels), default=0)
    bar = max(4, min(14, 900 // max(n, 1)))
    left, right, top, panel_h, gap = 56, 20, 34, 190, 46
    width = left + right + bar * n
    height = top + len(panels) * (panel_h + gap)
    img = Image.new("RGB", (max(width, 360), height), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((left, 8), title, fill="black", font=font)
    step = 1 if y_max <= 8 else 4
    for p, (label, values) in enumerate(panels):
        y0 = top + p * (panel_h + gap) + 16  # top of the plot area
        y1 = y0 + panel_h - 16  # the x axis

        def y_of(v: float) -> float:
            return y1 - (y1 - y0) * min(v, y_max) / y_max

        d.text((left, y0 - 16), label, fill="black", font=font)
        for t in range(0, y_max + 1, step):
            d.line([(left, y_of(t)), (left + bar * n, y_of(t))], fill=(225, 225, 225))
            d.text((left - 8 - 6 * len(str(t)), y_of(t) - 6), str(t), fill="black", font=font)
        for i, v in enumerate(values):
            x = left + i * bar
            color = _PALETTE.get(int(round(v)), (120, 120, 120))
            d.rectangle([x + 1, y_of(v), x + bar - 1, y1], fill=color)
        d.line([(left, y0), (left, y1), (left + bar * n, y1)], fill="black")
        tick = 10 if n > 20 else 1
        for i in range(0, n, tick):
            x = left + i * bar + bar // 2
            d.line([(x, y1), (x, y1 + 3)], fill="black")
            d.text((x - 3 * len(str(i)), y1 + 5), str(i), fill="black", font=font)
        d.text((left + bar * n // 2 - 30, y1 + 18), "layer index", fill="black", font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# The whole allocation, as calibrate() runs it
# ------------------------------------------------------------------------------------------------

@dataclass
class AllocationResult:
    meta: dict  # the recipe's "allocation" section
    files: dict[str, bytes]  # extra files for the recipe folder
    cache: Path  # the sweep cache folder (removed once the recipe is written)

    def cleanup(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)


def candidate_choices(cfg: "CalibConfig", weight_bits: int) -> list[tuple[int, int]]:
    """(weight bits, activation bits) options of every layer."""
    if cfg.target == "qnn":
        return [(w, a) for w in QNN_WEIGHT_BITS for a in QNN_ACT_BITS]
    return [(weight_bits, b) for b in sorted(cfg.mp_candidates)]


def build_problem(stats: dict[str, LayerStats], sensitivity: dict[str, int], choices: list[tuple[int, int]],
                  cfg: "CalibConfig", weight_bits: int) -> tuple[dict[str, list[Option]], float, Callable, dict]:
    """Options per layer (L, M), the budget in cost units, a describer of costs, and budget notes."""
    E = {n: s.elements for n, s in stats.items()}
    if cfg.target == "qnn":
        def cost(n, w, a):
            return stats[n].elements * a / 8 + stats[n].weights * w / 8
        reference = sum(2 * s.elements + s.weights for s in stats.values())
        unit = "of the all-A16/W8 bytes"
        notes = {"cost_unit": "bytes", "reference_cost": reference, "byte_table": QNN_BYTE_TABLE}
    elif cfg.mp_cost == "bops":
        def cost(n, w, a):
            return a * w * stats[n].macs
        reference = weight_bits * sum(s.macs for s in stats.values())
        unit = "mean activation bits (MAC-weighted)"
        notes = {"cost_unit": "bit operations per image (act bits × weight bits × MACs)", "reference_cost": reference}
    else:
        def cost(n, w, a):
            return a * E[n]
        reference = sum(E.values())
        unit = "mean activation bits"
        notes = {"cost_unit": "activation bits per image (act bits × input elements)", "reference_cost": reference}
    options = {n: [Option(c if cfg.target == "qnn" else c[1], (2 ** sensitivity[n] - 1) ** 2 * stats[n].sq_error[c],
                          cost(n, *c)) for c in choices] for n in stats}

    def describe(c: float) -> str:
        return f"{c / reference:.4g} {unit}"

    return options, cfg.mp_budget * reference, describe, notes


def _check_cost_only(stats: dict[str, LayerStats], choices, cfg: "CalibConfig", weight_bits: int) -> None:
    options, budget, describe, _ = build_problem(stats, {n: B_MIN for n in stats}, choices, cfg, weight_bits)
    check_budget(options, budget, describe)


def allocate_bits(model: torch.nn.Module, layers: dict[str, QuantLayer], data, cfg: "CalibConfig",
                  spec: "MethodSpec", samples: dict[str, torch.Tensor], weights_sha256: str) -> AllocationResult:
    """Steps 1–4 of the module docstring on the prepared ``model``; leaves every layer at its chosen bits."""
    t0 = time.time()
    x = data.lq[:cfg.mp_sweep_images]
    qparams = QParams(samples)
    weight_bits = cfg.weight_code_bits(cfg.weight_bits)
    choices = candidate_choices(cfg, weight_bits)
    # Layer statistics and errors first: cheap, and they tell an infeasible budget before the sweep.
    stats = layer_errors(model, layers, x, choices, qparams, spec)
    _check_cost_only(stats, choices, cfg, weight_bits)
    sweep = sensitivity_sweep(model, layers, x, cfg, qparams, weights_sha256)
    sweep_seconds = time.time() - t0
    sens = {n: r["bits"] for n, r in sweep.items()}
    options, budget, describe, notes = build_problem(stats, sens, choices, cfg, weight_bits)
    sol = allocate(options, budget, describe)
    # Apply the chosen bits: ranges (and for 'qnn' weight scales) recomputed for them.
    with torch.no_grad():
        for name, layer in layers.items():
            w_bits, a_bits = choices[sol.choice[name]]
            if w_bits != layer.weight_bits:
                layer.set_weight_quant(w_bits, weight_scale(layer.weight, w_bits, spec.scale_init))
            layer.set_act_quant(a_bits, *qparams(name, a_bits, spec.scale_init))
    total_e = sum(s.elements for s in stats.values())
    mean_bits = sum(choices[sol.choice[n]][1] * stats[n].elements for n in layers) / total_e
    meta: dict[str, Any] = {
        "mode": "qnn" if cfg.target == "qnn" else "activation_bits",
        "target": cfg.target,
        "metric": cfg.mp_metric, "epsilon": epsilon(cfg), "sweep_images": len(x), "b_range": [B_MIN, B_MAX],
        "cost": "qnn_bytes" if cfg.target == "qnn" else cfg.mp_cost,
        **notes,
        "candidates": [list(c) if cfg.target == "qnn" else c[1] for c in choices],
        "budget": cfg.mp_budget, "budget_cost": budget,
        "achieved_cost": sol.cost, "achieved_budget": sol.cost / notes["reference_cost"],
        "achieved_mean_act_bits": mean_bits,
        "label": (f"W{weight_bits}A{mean_bits:.2f}" if cfg.target != "qnn" else
                  f"qnn {sol.cost / notes['reference_cost']:.3f} of A16/W8 bytes"),
        "objective": sol.objective, "solve_seconds": sol.seconds, "solver": "pulp CBC",
        "sweep_and_error_seconds": round(sweep_seconds, 1),
        "layers": {n: {"index": i, "sensitivity_bits": sens[n], "weight": 2 ** sens[n] - 1,
                       "deviation": sweep[n]["deviation"], "input_elements": stats[n].elements,
                       "macs": stats[n].macs, "weight_params": stats[n].weights,
                       "sq_error": [stats[n].sq_error[c] for c in choices],
                       "errors": [o.error for o in options[n]], "costs": [o.cost for o in options[n]],
                       "choice": sol.choice[n], "weight_bits": choices[sol.choice[n]][0],
                       "act_bits": choices[sol.choice[n]][1]}
                   for i, n in enumerate(layers)},
    }
    print(f"bit allocation: {meta['label']} (budget {describe(budget)}, achieved {describe(sol.cost)}), "
          f"solved in {sol.seconds:.2f}s")
    names = list(layers)
    act_max = 16 if cfg.target == "qnn" else B_MAX
    panels = [("chosen activation bits", [choices[sol.choice[n]][1] for n in names])]
    if cfg.target == "qnn":
        panels.append(("chosen weight bits", [choices[sol.choice[n]][0] for n in names]))
    files = {
        "sensitivity.json": (json.dumps({"metric": cfg.mp_metric, "epsilon": epsilon(cfg), "b_range": [B_MIN, B_MAX],
                                         "layers": {n: {"index": i, **sweep[n]} for i, n in enumerate(names)}},
                                        indent=1) + "\n").encode(),
        "sensitivity.png": bits_plot([("B_i: bits to reach the deviation threshold", [sens[n] for n in names])],
                                     f"sensitivity sweep: {cfg.mp_metric} deviation <= {epsilon(cfg):g}", B_MAX),
        "allocation.png": bits_plot(panels, f"bit allocation {meta['label']} (budget {describe(budget)})", act_max),
    }
    return AllocationResult(meta, files, cache_dir(cfg))
