"""Per-layer low-rank budgets (``CalibConfig.rank_budget``, ``--rank-budget F``; beyond the QuantFace paper).

Every method with a low-rank branch gives layer i a merged branch of rank R_i, split between the SVD
branch and the LoRA branch in the method's proportion (QuantFace: half and half, the SVD half taking
the floor). Two regimes:

* **Uniform** (F = 1.0, the default): R_i = (svd_rank + lora_rank)·r, as before, but capped below the
  layer's size n_i = min(out, in·kh·kw) of its (reshaped) weight: R_i ≤ n_i − 1. A branch of rank ≥ n_i
  holds the whole weight (its residual is zero and the "quantized" layer runs in full precision). In
  the reference model this changes three layers, the 8- and 3-channel output convs: encoder.conv_out
  and unet.conv_out (n = 8: rank 16 → 7) and decoder.conv_out (n = 3: rank 3 + 8 = 11 → 2).
* **Allocated** (F ≠ 1.0): R_i is chosen from ``RANK_CANDIDATES`` = {0, 2, 4, 8, 16, 32}, those below
  n_i, by the bit allocation's integer program (``calibration.allocation.allocate``: exactly one option
  per layer, Σ cost ≤ budget, least Σ error):

  - cost M_{i,R} (``rank_cost``): ``params`` = R·(in·kh·kw + out), the branch's parameters (down
    factor R × in × kh × kw, up factor out × R); ``macs`` = that × the layer's output positions per
    image (the branch's multiply-accumulates); or ``both``, a two-dimensional cost with one
    constraint each; ``bytes`` = what the choice stores in the ``reference`` export beyond a branch-less
    quantized layer (``option_bytes``: the factors at ``--branch-bits`` with their per-row scales, or float16;
    for ``FULL_PRECISION`` the float32 weight less the codes and scales it replaces) — the cost that prices a
    float layer at 32 bits a weight where ``params`` prices it as one branch parameter. Parameters alone
    favour the many-parameter, low-resolution UNet layers' branches for removal and keep the few-parameter, full-resolution ones, whose MACs dominate
    (on the reference model F = 0.5 by parameters leaves 1.05 × the uniform MACs);
  - budget = F × Σ_i M_{i, uniform R_i} (the capped uniform branches above), per dimension;
  - error (``rank_error``): ``output`` (default, ``rank_output_errors``: the change of the model output's MSE
    to FP with layer i alone at R), ``energy`` (``rank_energy_errors``), or ``layer``:
    L_{i,R} = ‖W′X − Q(W′ − B_R)·Q_a(X) − B_R·X‖²_F per image, B_R the rank-R truncated SVD of the
    layer's (smoothed, rotated) weight W′, Q the weight quantizer on the residual (its own scales,
    the method's scale init), Q_a the layer's activation quantizer (range from the observed
    sample, as ``prepare`` sets it), X the layer's transformed input in the unquantized model on the
    first ``mp_sweep_images`` calibration images, ∗ the layer's conv / matmul without bias. It is the
    error of the best rank-R branch the layer could start from; the branch itself starts as SVD
    (R·svd share) + zero-initialised LoRA (the rest) and is then distilled.

  R = 0 means no branch: the whole weight is quantized and the export emits no branch nodes. Besides the
  ranks, ``FULL_PRECISION``: the layer stays a float layer (not in the recipe), costed as its whole weight.
  Measurements: docs/calibration_notes.md, "Per-layer ranks, second round".

The errors are the expensive part (one forward pass per layer and candidate); ``rank_errors_from``
(``--rank-errors-from RECIPE``) takes them from an earlier allocated recipe calibrated under the same
settings (``reused_rank_errors``), so sweeping the budget, the cost or the time budget re-solves only the program.

With ``--mp-budget`` as well, the ranks are chosen first (this program) and the activation bits
then by the bit allocation on the model with those ranks: two programs in sequence, not one joint
program (the joint program is not implemented).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from quantface.bits import container_bits
from quantface.calibration.allocation import Option, allocate
from quantface.calibration.layers import QuantLayer, hooks_removed
from quantface.errors import ConfigError
from quantface.quant import EPS, act_qparams, dequantize, qrange, quantize, weight_scale
from quantface.recipe import RecipeError, read_recipe_meta

if TYPE_CHECKING:
    from quantface.calibration.config import CalibConfig
    from quantface.calibration.methods import MethodSpec

RANK_CANDIDATES = (0, 2, 4, 8, 16, 32)
# The allocated program's other option for a layer: no quantization at all (its float weight, costed as that
# many branch parameters), instead of a branch of rank ≥ its size that would hold the whole weight.
FULL_PRECISION = "fp"
ERROR_BATCH = 8


def layer_size(layer: QuantLayer) -> int:
    """n = min(out, in·kh·kw): the rank of the layer's reshaped weight at most."""
    return min(layer.weight.shape[0], layer.weight[0].numel())


def rank_cap(layer: QuantLayer) -> int:
    """The largest rank a branch may have: below the layer's size (a rank-n branch is the whole weight)."""
    return max(layer_size(layer) - 1, 0)


def uniform_rank(spec: "MethodSpec", cfg: "CalibConfig", layer: QuantLayer) -> int:
    """The merged rank without ``--rank-budget``: (svd + lora)·r, uncapped as before per-layer ranks
    (``QuantLayer.split_lowrank`` caps the SVD part at the matrix). Capping it below the layer's size
    made the demo's tiny-model ort-cpu graph fall to 33 dB parity with its simulation (unexplained yet),
    so only allocated ranks are capped (``candidates``)."""
    return (spec.svd_rank + spec.lora_rank) * cfg.rank


def split_rank(spec: "MethodSpec", rank: int) -> tuple[int, int]:
    """(SVD rank, LoRA rank) of a merged rank-``rank`` branch, in the method's proportion."""
    units = spec.svd_rank + spec.lora_rank
    svd = rank * spec.svd_rank // units if units else 0
    return svd, rank - svd


def branch_params(layer: QuantLayer, rank: int) -> int:
    return rank * (layer.weight[0].numel() + layer.out_channels)


def candidates(layer: QuantLayer) -> list[int]:
    return [r for r in RANK_CANDIDATES if r <= rank_cap(layer)]


def options_of(layer: QuantLayer) -> list[int | str]:
    """The allocated program's choices for a layer: its candidate ranks, then ``FULL_PRECISION``."""
    return [*candidates(layer), FULL_PRECISION]


def option_params(layer: QuantLayer, choice: int | str) -> int:
    """Float parameters a choice keeps: a branch's, or the whole weight's for ``FULL_PRECISION``."""
    return layer.weight.numel() if choice == FULL_PRECISION else branch_params(layer, choice)


# Bytes of one stored float: a float32 weight of a full-precision layer, a per-row scale, a float16 factor element.
FLOAT32_BYTES, FLOAT16_BYTES = 4, 2


@dataclass(frozen=True)
class Storage:
    """How the ``bytes`` cost stores a layer in the ``reference`` export: its weight codes' bits and its branch
    factors' (``--branch-bits``; None: float16 factors, as frozen recipes round them)."""
    weight_bits: int = 4
    branch_bits: int | None = None

    @classmethod
    def of(cls, cfg: "CalibConfig") -> "Storage":
        return cls(cfg.weight_bits, cfg.branch_bits)


def option_bytes(layer: QuantLayer, choice: int | str, storage: Storage) -> float:
    """The ``bytes`` cost of a choice: bytes the ``reference`` export stores for it beyond the layer quantized
    without a branch. A rank-R branch: its R·(in·kh·kw + out) factor elements as the INT4 (``branch_bits`` ≤ 4)
    or INT8 codes the export stores, plus a float32 scale per factor row (R + out), or as float16 without
    ``branch_bits``. ``FULL_PRECISION``: the float32 weight less the weight's codes (INT4 or INT8) and
    per-output-channel scales it replaces (its input's activation quantizer and rotation vector are left
    out: a few bytes a channel)."""
    if choice == FULL_PRECISION:
        out = layer.out_channels
        codes = container_bits(storage.weight_bits) / 8
        return max(layer.weight.numel() * (FLOAT32_BYTES - codes) - FLOAT32_BYTES * out, 0.0)
    if choice == 0:
        return 0.0
    elements = branch_params(layer, choice)
    if storage.branch_bits is None:
        return float(FLOAT16_BYTES * elements)
    return elements * container_bits(storage.branch_bits) / 8 + FLOAT32_BYTES * (choice + layer.out_channels)


@dataclass
class RankStats:
    positions: int = 0  # output positions per image (pixels of a conv's output, tokens of a linear)
    sq_error: dict[int, float] | None = None  # L_{i,R} per candidate rank


def _svd_parts(layer: QuantLayer, ranks: list[int]) -> dict[int, torch.Tensor]:
    """The rank-R truncated SVD of the layer's weight, with its shape, per rank (float32)."""
    w = layer.weight.detach()
    u, sigma, vh = torch.linalg.svd(w.flatten(1).double(), full_matrices=False)
    return {r: ((u[:, :r] * sigma[:r]) @ vh[:r]).to(w.dtype).reshape(w.shape) for r in ranks}


def rank_errors(model: torch.nn.Module, layers: dict[str, QuantLayer], x: torch.Tensor,
                act: dict[str, tuple[torch.Tensor, torch.Tensor]], cfg: "CalibConfig",
                spec: "MethodSpec") -> dict[str, RankStats]:
    """L_{i,R} per layer and candidate rank (module docstring), measured by hooks in one pass of the
    unquantized ``model`` (no branch split yet, quantizers off) over ``x``; ``act`` the layers'
    activation (scale, zero point)."""
    w_bits = cfg.weight_code_bits(cfg.weight_bits)
    stats = {n: RankStats(sq_error={}) for n in layers}
    residual_q: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, layer in layers.items():
        parts = _svd_parts(layer, candidates(layer))
        lo, hi = qrange(w_bits, signed=True)
        residual_q[name] = {}
        for r, b in parts.items():
            res = layer.weight.detach() - b
            s = weight_scale(res, w_bits, spec.scale_init).clamp_min(EPS).view(-1, *([1] * (res.dim() - 1)))
            residual_q[name][r] = (res, dequantize(quantize(res, s, 0.0, lo, hi), s, 0.0))

    def hook(name: str):
        def run(module: QuantLayer, args):
            xt = module.transform_input(args[0].detach())
            scale, zero = act[name]
            lo, hi = qrange(cfg.act_bits, signed=False)
            xq = dequantize(quantize(xt, scale, zero, lo, hi), scale, zero)
            st = stats[name]
            for r, (res, res_q) in residual_q[name].items():
                # W'X − (Q(res)·Q_a(X) + B·X) = res·X − Q(res)·Q_a(X): the branch cancels
                diff = module._op(xq, res_q, None) - module._op(xt, res, None)
                st.sq_error[r] = st.sq_error.get(r, 0.0) + float(diff.double().pow(2).sum())
                st.positions = diff[0].numel() // module.out_channels
        return run

    with hooks_removed(l.register_forward_pre_hook(hook(n)) for n, l in layers.items()):
        with torch.no_grad():
            for i in range(0, len(x), ERROR_BATCH):
                model(x[i:i + ERROR_BATCH])
    for st in stats.values():
        st.sq_error = {r: v / len(x) for r, v in st.sq_error.items()}
        st.sq_error[FULL_PRECISION] = 0.0
    return stats


def energy_beyond(weight: torch.Tensor, ranks: list[int]) -> list[float]:
    """E(R) = Σ_{k>R} σ_k² / Σ σ_k² of the weight reshaped to (out, rest), per rank."""
    sigma2 = torch.linalg.svdvals(weight.detach().flatten(1).double()) ** 2
    total = float(sigma2.sum())
    return [float(sigma2[r:].sum()) / total if total > 0 else 0.0 for r in ranks]


def rank_energy_errors(layers: dict[str, QuantLayer], x_positions: dict[str, int]) -> dict[str, RankStats]:
    """L_{i,R} = E_i(R) (``rank_error`` = ``energy``, QuantVSR's objective with every complexity equal): the
    share of the (smoothed, rotated) weight's squared singular values a rank-R branch leaves to the low-bit
    branch, each layer counted alike; ``x_positions`` the layers' output positions per image (for the costs)."""
    return {n: RankStats(positions=x_positions[n], sq_error={**dict(zip(candidates(l), energy_beyond(l.weight, candidates(l)))),
                                                             FULL_PRECISION: 0.0})
            for n, l in layers.items()}


def output_positions(model: torch.nn.Module, layers: dict[str, QuantLayer], x: torch.Tensor) -> dict[str, int]:
    """Each layer's output positions per image (pixels of a conv's output, tokens of a linear), from one image."""
    positions: dict[str, int] = {}

    def record(name: str):
        def run(module: QuantLayer, args, out):
            positions[name] = out[0].numel() // module.out_channels
        return run

    with hooks_removed(l.register_forward_hook(record(n)) for n, l in layers.items()):
        with torch.no_grad():
            model(x[:1])
    return positions


def rank_output_errors(model: torch.nn.Module, layers: dict[str, QuantLayer], x: torch.Tensor,
                       act: dict[str, tuple[torch.Tensor, torch.Tensor]], cfg: "CalibConfig",
                       spec: "MethodSpec") -> dict[str, RankStats]:
    """L_{i,R} measured on the image (``rank_error`` = ``output``): every layer quantized as calibration
    starts it — residual W′ − B_U under the weight quantizer (its own scales, the method's scale init),
    activations under the layer's quantizer (``act``), the rank-U truncated SVD branch B_U in FP, U the
    layer's uniform rank (capped at its size, as ``QuantLayer.split_lowrank`` caps it) —, then each
    layer alone at each candidate rank R: the change of the mean squared error of the model's output
    against the FP model's (outputs in [0, 1]) on ``x``, minus the least change among the layer's
    candidates (a constant per layer: the program's choice is unchanged, every error ≥ 0). One forward
    pass of ``x`` per layer and candidate (progress every 10 layers). ``model`` is left as it came (FP,
    no branch, quantizers off)."""
    import time

    from quantface.calibration.layers import LowRank
    from quantface.calibration.sensitivity import SWEEP_BATCH, _to01

    w_bits = cfg.weight_code_bits(cfg.weight_bits)
    folded = {n: l.weight for n, l in layers.items()}
    states: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, LowRank | None]]] = {}
    base: dict[str, int] = {}
    with torch.no_grad():
        for name, layer in layers.items():
            w = folded[name]
            base[name] = min(uniform_rank(spec, cfg, layer), layer_size(layer))
            u, sigma, vh = torch.linalg.svd(w.flatten(1).double(), full_matrices=False)
            states[name] = {}
            for r in sorted(set(candidates(layer)) | {base[name]}):
                branch = LowRank.from_svd(u, sigma, vh, r, w, layer.conv_args) if r else None
                res = w - branch.product() if branch is not None else w
                states[name][r] = (res, weight_scale(res, w_bits, spec.scale_init), branch)

    def install(name: str, rank: int | str) -> None:
        layer = layers[name]
        if rank == FULL_PRECISION:  # no quantizer: W′·x′ = W·x
            layer.weight, layer.lowrank = folded[name], None
            layer.set_weight_quant(None, None)
            layer.set_act_quant(None, None, None)
            return
        res, scale, branch = states[name][rank]
        layer.weight, layer.lowrank = res, branch
        layer.set_weight_quant(w_bits, scale)
        layer.set_act_quant(cfg.act_bits, *act[name])

    positions = output_positions(model, layers, x)

    def forward() -> torch.Tensor:
        return torch.cat([model(x[i:i + SWEEP_BATCH]) for i in range(0, len(x), SWEEP_BATCH)])

    stats = {n: RankStats(sq_error={}) for n in layers}
    try:
        with torch.no_grad():
            ref = _to01(forward())
            for name in layers:
                install(name, base[name])

            def mse() -> float:
                return float(((_to01(forward()) - ref) ** 2).mean())

            base_mse = mse()
            t0 = time.time()
            for i, (name, layer) in enumerate(layers.items()):
                row = {}
                for r in options_of(layer):
                    if r == base[name]:
                        row[r] = base_mse
                        continue
                    install(name, r)
                    row[r] = mse()
                install(name, base[name])
                least = min(row.values())
                stats[name].sq_error = {r: v - least for r, v in row.items()}
                stats[name].positions = positions[name]
                if (i + 1) % 10 == 0 or i + 1 == len(layers):
                    print(f"rank errors: {i + 1}/{len(layers)} layers ({time.time() - t0:.0f}s)", flush=True)
    finally:
        for name, layer in layers.items():
            layer.weight, layer.lowrank = folded[name], None
            layer.set_weight_quant(None, None)
            layer.set_act_quant(None, None, None)
    return stats


# Settings the measured rank errors do not depend on: what happens after the measurement (refinement, the
# bit allocation that follows the rank program), the program's own budget, and where and how the run goes.
# A recipe calibrated with every other setting equal lends its errors (``rank_errors_from``); the weights
# are compared by fingerprint, not by path.
_ERRORS_IRRELEVANT = {"out", "steps", "lr", "scale_lr", "lora_lr", "lambda_perceptual", "lambda_mse", "checkpoint_every",
                      "resume", "threads", "device", "trq_steps", "e2e_steps", "timestep_lr", "lba_steps", "lba_lr",
                      "lpips_backbone", "lpips_lin", "lpips_net", "mp_budget", "mp_latency_budget", "mp_candidates",
                      "mp_epsilon", "mp_metric", "mp_cost", "rank_budget", "rank_cost", "rank_time_budget",
                      "rank_errors_from", "weights", "branch_bits"}


def reused_rank_errors(cfg: "CalibConfig", weights_sha256: str | None = None) -> dict[str, Any]:
    """The "rank_allocation" section of the recipe in ``cfg.rank_errors_from``, checked before any work to
    have been measured under ``cfg``'s settings (all but ``_ERRORS_IRRELEVANT`` equal) and, given
    ``weights_sha256``, on the same FP weights; a clear ``ConfigError`` otherwise."""
    from quantface.calibration.config import CalibConfig

    folder = cfg.rank_errors_from
    try:
        meta = read_recipe_meta(folder)
    except RecipeError as exc:
        raise ConfigError(f"--rank-errors-from: {exc}") from None
    section = meta.get("rank_allocation")
    entries = section.get("layers") if isinstance(section, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(e, dict) and {"candidates", "errors", "output_positions"}
                                                <= set(e) for e in entries.values()):
        raise ConfigError(f"--rank-errors-from {folder}: its recipe holds no measured rank errors (it was "
                          f"calibrated without --rank-budget, or by a method that allocates no ranks this way)")
    if section.get("candidates") != [*RANK_CANDIDATES, FULL_PRECISION]:
        raise ConfigError(f"--rank-errors-from {folder} measured other candidates ({section.get('candidates')}, "
                          f"not {[*RANK_CANDIDATES, FULL_PRECISION]}: an earlier version's recipe)")
    fields = {f.name: f.default for f in dataclasses.fields(CalibConfig)}
    raw = meta.get("calibration") if isinstance(meta.get("calibration"), dict) else {}
    try:  # normalised as this code normalises its own (a method's default weight rounding, say)
        theirs = CalibConfig.from_dict({k: v for k, v in raw.items() if k in fields}).to_dict()
    except ConfigError:
        theirs = {**fields, **raw}
    mine, theirs = json.loads(json.dumps(cfg.to_dict())), json.loads(json.dumps(theirs))
    differ = [f"{k}={theirs.get(k)!r} there, {v!r} here" for k, v in mine.items()
              if k not in _ERRORS_IRRELEVANT and theirs.get(k) != v]
    if differ:
        raise ConfigError(f"--rank-errors-from {folder} measured its rank errors under other settings "
                          f"({'; '.join(differ[:3])}): calibrate with the same ones, or without --rank-errors-from")
    if weights_sha256 is not None and (meta.get("model") or {}).get("weights_sha256") != weights_sha256:
        raise ConfigError(f"--rank-errors-from {folder} was calibrated from other model weights (fingerprints "
                          f"differ): its rank errors do not apply")
    return section


def _stats_from(section: dict[str, Any], layers: dict[str, QuantLayer], images: int, folder: str) -> dict[str, RankStats]:
    """RankStats per layer from a reused "rank_allocation" section, checked against this model's layers."""
    entries = section["layers"]
    if set(entries) != set(layers) or section.get("error_images") != images:
        raise ConfigError(f"--rank-errors-from {folder}: its errors were measured on other layers or another number "
                          f"of images ({section.get('error_images')} there, {images} here)")
    stats = {}
    for name, layer in layers.items():
        e = entries[name]
        if list(e["candidates"]) != options_of(layer):
            raise ConfigError(f"--rank-errors-from {folder}: layer {name}'s candidates differ "
                              f"({e['candidates']} there, {options_of(layer)} here)")
        stats[name] = RankStats(positions=int(e["output_positions"]),
                                sq_error={c: float(v) for c, v in zip(e["candidates"], e["errors"])})
    return stats


# ``rank_cost`` names → the cost's dimensions (one budget constraint each).
COST_DIMS = {"params": ("params",), "macs": ("macs",), "both": ("params", "macs"), "time": ("time",),
             "params+time": ("params", "time"), "bytes": ("bytes",)}
_DIM_UNITS = {"params": "parameters", "macs": "multiply-accumulates per image", "time": "modelled CPU ms per image",
              "bytes": "bytes of the reference export"}
# The ``time`` cost: a branch's kernel time on ONNX Runtime's CPU EP (the ``ort-cpu`` graph: the down conv /
# MatMul, the up conv / MatMul and the Add onto the quantized product, all float32) modelled as
#     t(R) = a·(input elements) + b·(output elements) + c·(branch MACs) for R > 0, t(0) = 0,
# per image. The first two terms are what the three nodes read and write whatever the rank — the down
# factor reads the layer's whole input, the up factor writes and the Add reads and writes its whole
# output —, which is why halving every rank (the MACs) removes far less than half the time. a, b, c:
# non-negative least squares on ONNX Runtime's profiler times of the 2 × 57 branches of the reference
# model's W4A4 ort-cpu graphs at uniform rank 16 and at the --rank-budget 0.5 ranks (2 threads, 2-core x86,
# correlation 0.92 between model and measurement).
BRANCH_TIME_MS = {"input_element": 1.20e-6, "output_element": 2.49e-6, "mac": 5.96e-9}


def input_elements(layer: QuantLayer, positions: int) -> int:
    """Elements of the layer's input per image: in channels × the output positions × the stride's area."""
    stride = layer.conv_args["stride"] if layer.conv_args is not None else (1, 1)
    return layer.in_channels * positions * stride[0] * stride[1]


def branch_time(layer: QuantLayer, rank: int | str, positions: int) -> float:
    """The ``time`` cost of a rank-``rank`` branch (``BRANCH_TIME_MS``), modelled ms per image; for
    ``FULL_PRECISION`` that of a branch holding the whole weight (a float conv of the layer's MACs, where the
    quantized product it replaces is not subtracted)."""
    if rank == 0:
        return 0.0
    k = BRANCH_TIME_MS
    return (k["input_element"] * input_elements(layer, positions) + k["output_element"] * layer.out_channels * positions
            + k["mac"] * option_params(layer, rank) * positions)


def rank_cost(layer: QuantLayer, rank: int | str, positions: int, cost: str,
              storage: Storage = Storage()) -> float | tuple[float, ...]:
    """M_{i,R}: the branch's parameters (``option_params``), its MACs per image, its modelled CPU time, its
    bytes in the reference export (``option_bytes`` under ``storage``), or a tuple of several (``COST_DIMS``:
    one budget constraint each)."""
    params = float(option_params(layer, rank))
    dims = COST_DIMS[cost]
    value = {"params": params, "macs": params * positions}
    if "time" in dims:
        value["time"] = branch_time(layer, rank, positions)
    if "bytes" in dims:
        value["bytes"] = option_bytes(layer, rank, storage)
    return value[dims[0]] if len(dims) == 1 else tuple(value[d] for d in dims)


def cost_unit(cost: str) -> str:
    dims = COST_DIMS[cost]
    return _DIM_UNITS[dims[0]] if len(dims) == 1 else " and ".join(_DIM_UNITS[d] for d in dims) + ", each"


def reference_cost(layers: dict[str, QuantLayer], uniform: dict[str, int], positions: dict[str, int],
                   cost: str, storage: Storage = Storage()) -> float | tuple[float, ...]:
    """Σ_i M_{i, U_i}: the uniform branches' cost (``bytes``: stored as ``storage`` stores them), the budget's unit."""
    totals = [rank_cost(l, uniform[n], positions[n], cost, storage) for n, l in layers.items()]
    if isinstance(totals[0], tuple):
        return tuple(float(sum(t[d] for t in totals)) for d in range(len(totals[0])))
    return float(sum(totals))


def budget_fractions(cfg: "CalibConfig") -> tuple[float, ...]:
    """The budget's fraction of the uniform cost per dimension of ``cfg.rank_cost``: ``rank_budget`` for each,
    except the time dimension where ``rank_time_budget`` is set."""
    return tuple(cfg.rank_time_budget if d == "time" and cfg.rank_time_budget is not None else cfg.rank_budget
                 for d in COST_DIMS[cfg.rank_cost])


def scaled_budget(reference: float | tuple[float, ...], fraction: float) -> float | tuple[float, ...]:
    return tuple(fraction * r for r in reference) if isinstance(reference, tuple) else fraction * reference


@dataclass
class RankAllocation:
    ranks: dict[str, int | str]  # the merged branch rank per layer, or FULL_PRECISION
    meta: dict[str, Any]  # the recipe's "rank_allocation" section

    @property
    def full_precision(self) -> list[str]:
        """Layers the program keeps unquantized (``calibration.run.prepare`` unwraps them)."""
        return [n for n, r in self.ranks.items() if r == FULL_PRECISION]


def _rank(choice: int | str) -> int:
    return 0 if choice == FULL_PRECISION else choice


def allocate_ranks(model: torch.nn.Module, layers: dict[str, QuantLayer], x: torch.Tensor,
                   act: dict[str, tuple[torch.Tensor, torch.Tensor]], cfg: "CalibConfig",
                   spec: "MethodSpec") -> RankAllocation:
    """R_i per layer by the integer program (module docstring) on the unsplit, unquantized ``model``."""
    import time

    t0 = time.time()
    if cfg.rank_errors_from is not None:
        section = reused_rank_errors(cfg)
        stats = _stats_from(section, layers, len(x), cfg.rank_errors_from)
        print(f"rank errors: reused from {cfg.rank_errors_from} (measured there in {section.get('measure_seconds')} s)")
    elif cfg.rank_error == "energy":
        stats = rank_energy_errors(layers, output_positions(model, layers, x))
    else:
        stats = (rank_output_errors if cfg.rank_error == "output" else rank_errors)(model, layers, x, act, cfg, spec)
    measure_seconds = time.time() - t0
    storage = Storage.of(cfg)
    options = {n: [Option(r, stats[n].sq_error[r], rank_cost(l, r, stats[n].positions, cfg.rank_cost, storage))
                   for r in options_of(l)] for n, l in layers.items()}
    uniform = {n: uniform_rank(spec, cfg, l) for n, l in layers.items()}
    positions = {n: stats[n].positions for n in layers}
    ref_params = sum(branch_params(l, uniform[n]) for n, l in layers.items())
    ref_macs = sum(branch_params(l, uniform[n]) * positions[n] for n, l in layers.items())
    ref_time = sum(branch_time(l, uniform[n], positions[n]) for n, l in layers.items())
    ref_bytes = sum(option_bytes(l, uniform[n], storage) for n, l in layers.items())
    reference = reference_cost(layers, uniform, positions, cfg.rank_cost, storage)
    dims = reference if isinstance(reference, tuple) else (reference,)
    fractions = budget_fractions(cfg)
    budget = tuple(f * r for f, r in zip(fractions, dims))
    budget = budget if isinstance(reference, tuple) else budget[0]
    unit = cost_unit(cfg.rank_cost)

    def describe(c: float) -> str:
        return f"{c:g} branch {unit}"

    sol = allocate(options, budget, describe)
    ranks = {n: options[n][sol.choice[n]].choice for n in layers}
    params = {n: option_params(l, ranks[n]) for n, l in layers.items()}
    macs = {n: params[n] * stats[n].positions for n in layers}
    times = {n: branch_time(l, ranks[n], positions[n]) for n, l in layers.items()}
    stored = {n: option_bytes(l, ranks[n], storage) for n, l in layers.items()}
    achieved = sol.cost if isinstance(sol.cost, tuple) else (sol.cost,)
    meta = {
        "budget": cfg.rank_budget, "cost": cfg.rank_cost, "cost_unit": unit, "error": cfg.rank_error,
        "reference": f"uniform rank (svd_rank + lora_rank)·r = {(spec.svd_rank + spec.lora_rank) * cfg.rank}, "
                     f"as without --rank-budget",
        "reference_cost": reference, "budget_cost": budget, "achieved_cost": sol.cost,
        "achieved_budget": max(a / r for a, r in zip(achieved, dims)) if all(dims) else 0.0,
        "budget_fractions": dict(zip(COST_DIMS[cfg.rank_cost], fractions)),
        "achieved_fractions": dict(zip(COST_DIMS[cfg.rank_cost], (a / r if r else 0.0 for a, r in zip(achieved, dims)))),
        "branch_params": sum(params.values()), "uniform_branch_params": ref_params,
        "branch_macs_per_image": sum(macs.values()), "uniform_branch_macs_per_image": ref_macs,
        "branch_time_ms": sum(times.values()), "uniform_branch_time_ms": ref_time, "time_model": BRANCH_TIME_MS,
        "branch_bytes": sum(stored.values()), "uniform_branch_bytes": ref_bytes,
        "storage": dataclasses.asdict(storage),
        "candidates": [*RANK_CANDIDATES, FULL_PRECISION], "error_images": len(x),
        "full_precision_layers": [n for n in layers if ranks[n] == FULL_PRECISION],
        "objective": sol.objective, "solve_seconds": sol.seconds, "solver": "pulp CBC",
        "measure_seconds": round(measure_seconds, 1), "errors_from": cfg.rank_errors_from,
        "layers": {n: {"index": i, "size": layer_size(l), "uniform_rank": uniform[n],
                       "candidates": [o.choice for o in options[n]], "errors": [o.error for o in options[n]],
                       "costs": [o.cost for o in options[n]], "rank": ranks[n],
                       "svd_rank": split_rank(spec, _rank(ranks[n]))[0],
                       "lora_rank": split_rank(spec, _rank(ranks[n]))[1],
                       "output_positions": stats[n].positions}
                   for i, (n, l) in enumerate(layers.items())},
    }
    fp = meta["full_precision_layers"]
    shares = ", ".join(f"{d} {f:g}" for d, f in zip(COST_DIMS[cfg.rank_cost], fractions))
    print(f"rank allocation (budget {shares} of the uniform branches' {unit}; full precision: "
          f"{', '.join(fp) if fp else 'none'}): parameters "
          f"{sum(params.values()) / max(ref_params, 1):.3f}, MACs {sum(macs.values()) / max(ref_macs, 1):.3f} of "
          f"the uniform branches', modelled CPU time {sum(times.values()) / max(ref_time, 1e-12):.3f}, reference-export bytes "
          f"{sum(stored.values()) / max(ref_bytes, 1e-12):.3f}, solved in {sol.seconds:.2f}s")
    return RankAllocation(ranks, meta)


def activation_qparams(samples: dict[str, torch.Tensor], cfg: "CalibConfig", spec: "MethodSpec"
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: act_qparams(s, cfg.act_bits, spec.scale_init) for n, s in samples.items()}
