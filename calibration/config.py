"""Typed configuration of one calibration run (round-trips to JSON; stored inside every recipe)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from quantface.config import JsonConfig, check_int, check_size
from quantface.device import check_device_name
from quantface.bits import MAX_BITS, MIN_BITS, WIDE_ACT_BITS, check_bits
from quantface.calibration.methods import METHODS
from quantface.calibration.targets import COSTS as COST_MODELS, TARGETS as TARGET_CLASSES, get_target
from quantface.errors import ConfigError

# The --rank-cost choices (calibration.ranks, which needs torch: not imported here).
RANK_COSTS = ("params", "macs", "both", "time", "params+time", "bytes")
# The --rank-error choices: a layer's error at each candidate rank measured on the model's output or on its own.
RANK_ERRORS = ("output", "layer", "energy")
BITS_PATTERN = re.compile(r"^W([1-9]\d*)A([1-9]\d*)$")
# The accepted --bits forms, for help texts and errors.
BITS_FORMS = (f"W<w>A<a> with w in {MIN_BITS}..{MAX_BITS} and a in {MIN_BITS}..{MAX_BITS} or {WIDE_ACT_BITS}, "
              f"e.g. W8A8, W4A8, W6A6, W4A6, W4A4, W8A16, W4A16")
METRICS = ("ssim", "psnr", "lpips")
COSTS = tuple(COST_MODELS)  # elements, bops (calibration.targets)
WEIGHT_ROUNDINGS = ("nearest", "gptq")
TARGETS = tuple(TARGET_CLASSES)  # qnn (calibration.targets)
# Deviation thresholds ε of the sensitivity sweep (docs/calibration_notes.md says why 1e-5 for 1 − SSIM).
DEFAULT_EPSILON = {"ssim": 1e-5, "psnr": 1e-7, "lpips": 5e-4}
B_MIN, B_MAX = 2, 8  # activation bits the sensitivity sweep tries (B_max = 8)


def parse_bits(bits: str) -> tuple[int, int]:
    """'W4A4' → (4, 4). Weights take 2..8 bits; activations 2..8 or 16 (unsigned 16-bit codes, which
    every export profile holds as UINT16)."""
    m = BITS_PATTERN.match(bits) if isinstance(bits, str) else None
    w, a = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    if w is None or not MIN_BITS <= w <= MAX_BITS or not (MIN_BITS <= a <= MAX_BITS or a == WIDE_ACT_BITS):
        raise ConfigError(f"--bits {bits!r} is not one of the accepted forms: {BITS_FORMS}")
    return w, a


# Where the merged low-rank branch is folded into the quantized weight at freeze (``fold_lowrank``):
# 'auto' folds it in layers whose weights have at least this many bits.
FOLD_MIN_WEIGHT_BITS = 8
FOLD_POLICIES = ("auto", "never", "always")
# ``reduce_range``: 8-bit weights take 7-bit codes [-64, 63] in their INT8 container (ONNX Runtime's
# ``reduce_range``). x86 CPUs without VNNI run ONNX Runtime's U8S8 convolutions through pairwise 16-bit
# sums that saturate with full-range 8-bit weight and activation codes (tools/check_u8s8_saturation.py);
# with 7-bit weights they are exact. ARM CPUs, VNNI CPUs and the HTP do not need it.
REDUCED_WEIGHT_BITS = 7


@dataclass
class CalibConfig(JsonConfig):
    method: str = "quantface"
    bits: str = "W4A4"
    data: str = "../shared/data/faces_hq/calib"
    out: str = "recipes/quantface_w4a4"
    model: str = "reference"
    weights: str | None = None  # weights stem overriding the embedded model's
    seed: int = 0
    size: int | None = None  # working size; default the model's
    limit: int | None = None  # calibration images used (default: all)
    stat_images: int = 64  # images whose activations set smoothing and ranges
    rank: int = 8  # r: SVD branch rank r and LoRA rank r (QuantFace); 2r for single-branch baselines
    alpha: float = 0.5  # smoothing migration strength
    # Layers with fewer input channels are not rotated: on the RGB image the fallback H2 ⊕ 1 widens the
    # activation range instead of balancing channels (docs/calibration_notes.md).
    rotate_min_channels: int = 4
    steps: int | None = None  # distillation steps; default per method
    # QArtSR (calibration.qartsr): end-to-end steps of its timestep-retraining stage and of its extended
    # end-to-end stage (None: that module's defaults), and the timestep's learning rate (timestep units).
    trq_steps: int | None = None
    e2e_steps: int | None = None
    timestep_lr: float = 0.5
    # QuantVSR (calibration.quantvsr): steps of its bias-alignment stage (None: LBA_STEPS) and the learning
    # rate of the aligned biases.
    lba_steps: int | None = None
    lba_lr: float = 1e-4
    batch_size: int = 4
    # lr: SVD-initialised branches (the paper's 1e-5); lora_lr: LoRA-initialised ones; scale_lr: quantizer
    # scales (None: lr). The measured best (docs/calibration_notes.md): a zero-init LoRA up factor barely moves at 1e-5.
    lr: float = 1e-5
    scale_lr: float | None = 1e-4
    lora_lr: float | None = 1e-3
    # Fold the merged low-rank branch into the weight before its codes are fixed (QuantLayer.fold_lowrank):
    # 'auto' where weight bits >= FOLD_MIN_WEIGHT_BITS (an 8-bit grid holds the branch; its two float convs
    # and Add cost more time than they give back), 'never', 'always'.
    fold_lowrank: str = "auto"
    reduce_range: bool = False  # 8-bit weights as 7-bit codes (REDUCED_WEIGHT_BITS above)
    # Low-rank branch factors on a symmetric integer grid of this many bits, one scale per row
    # (quantface.quant.factor_quantize): trained through its fake-quant, stored as int8 codes (INT4 in the
    # reference export from 4 bits down) times their scales (export.lower._int_factor). None: float16 factors.
    branch_bits: int | None = None
    lambda_perceptual: float = 0.5
    lambda_mse: float = 0.5
    lpips_backbone: str | None = None  # local LPIPS backbone weights (VGG16/AlexNet features)
    lpips_lin: str | None = None  # local LPIPS linear-head weights
    lpips_net: str = "vgg"
    fp_layers: tuple[str, ...] = field(default_factory=tuple)  # glob patterns of layers kept in FP
    checkpoint_every: int = 25
    resume: bool = True
    threads: int | None = None
    device: str = "auto"  # auto (CUDA when torch sees a GPU, else CPU) | cpu | cuda | cuda:N
    # Adaptive bit-width allocation (calibration.mixed); mp_budget None keeps uniform bits.
    # Weight codes: round to nearest on the searched scales, or GPTQ (calibration.gptq) where no branch is left;
    # None: the method's (MethodSpec.weight_rounding)
    weight_rounding: str | None = None
    # mean activation bits, or with target 'qnn' / 'cpu' a fraction of the all-W8 weight bytes
    mp_budget: float | None = None
    # target 'qnn': the latency proxy's budget, a multiple of its all-A8 value (calibration.targets)
    mp_latency_budget: float | None = None
    mp_candidates: tuple[int, ...] = (3, 4, 5, 6)  # activation bit widths to choose from
    mp_epsilon: float | None = None  # sweep deviation threshold ε; default per metric (DEFAULT_EPSILON)
    mp_metric: str = "ssim"  # sweep deviation: ssim (1 − SSIM) | psnr (MSE) | lpips
    mp_sweep_images: int = 16  # calibration images of the sweep and of the layer errors
    mp_cost: str = "elements"  # elements (bits × input elements) | bops (bits × weight bits × MACs)
    # None | 'qnn': hardware-aware options (W4/W8) × (A8/A16), no online node, weight bytes + latency proxy |
    # 'cpu': W4/W8 weights, no online node, weight bytes (calibration.targets)
    target: str | None = None
    # Per-layer branch ranks (calibration.ranks): 1.0 = uniform rank (capped below each layer's size); else
    # a fraction F of the uniform branches' cost (rank_cost: parameters, MACs, both, time, or reference-export
    # bytes at branch_bits; each dimension within F) shared
    # by an integer program. QuantVSR always allocates (its STCA ranks), F = 1.0 being the uniform total.
    rank_budget: float = 1.0
    rank_cost: str = "params"
    rank_error: str = "output"
    # With a time dimension in rank_cost: the time constraint's own fraction (None: rank_budget's).
    rank_time_budget: float | None = None
    # A recipe folder whose rank allocation measured the per-layer errors under the same settings
    # (calibration.ranks.reused_rank_errors): the program reuses them instead of measuring again, so a sweep
    # over --rank-budget / --rank-cost / --rank-time-budget pays for the measurement once.
    rank_errors_from: str | None = None

    def __post_init__(self) -> None:
        parse_bits(self.bits)
        if self.fold_lowrank not in FOLD_POLICIES:
            raise ConfigError(f"--fold-lowrank {self.fold_lowrank!r} is not one of {', '.join(FOLD_POLICIES)}")
        if self.weight_rounding is None:
            self.weight_rounding = METHODS[self.method].weight_rounding if self.method in METHODS else "nearest"
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise ConfigError(f"--weight-rounding {self.weight_rounding!r} is not one of {', '.join(WEIGHT_ROUNDINGS)}")
        if self.rank < 1:
            raise ConfigError(f"--rank {self.rank} must be at least 1")
        if self.rotate_min_channels < 1:
            raise ConfigError(f"--rotate-min-channels {self.rotate_min_channels} must be at least 1")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha {self.alpha} must be in [0, 1]")
        for name in ("lr", "scale_lr", "lora_lr", "lba_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')} {value} must be positive")
        for name in ("steps", "trq_steps", "e2e_steps", "lba_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} must be non-negative")
        if not (isinstance(self.timestep_lr, (int, float)) and 0 < self.timestep_lr < math.inf):
            raise ConfigError(f"--timestep-lr {self.timestep_lr!r} must be a positive number")
        if self.batch_size < 1 or self.stat_images < 1:
            raise ConfigError("batch size and statistics images must be positive")
        check_int(self.seed, "--seed", 0)
        check_size(self.size)
        if self.limit is not None:
            check_int(self.limit, "--limit")
        if self.threads is not None:
            check_int(self.threads, "--threads")
        check_int(self.checkpoint_every, "checkpoint_every")
        if not self.out:
            raise ConfigError("--out must name the recipe folder to write")
        if (self.lpips_backbone is None) != (self.lpips_lin is None):
            raise ConfigError("LPIPS needs both --lpips-backbone and --lpips-lin")
        check_device_name(self.device)
        if self.reduce_range and self.weight_bits != 8 and self.target != "cpu":  # --target cpu: its W8 layers
            raise ConfigError(f"--reduce-range applies to 8-bit weights; --bits {self.bits} has {self.weight_bits}-bit ones")
        b = self.branch_bits
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8):
            raise ConfigError(f"--branch-bits {b!r} must be a whole number of bits from 2 to 8")
        refusal = TARGET_CLASSES[self.target].reduce_range_refusal if self.target in TARGET_CLASSES else ""
        if self.reduce_range and refusal:
            raise ConfigError(refusal)
        if self.target in TARGET_CLASSES:
            budget, latency = TARGET_CLASSES[self.target].defaults(self)
            self.mp_budget = budget if self.mp_budget is None else self.mp_budget
            self.mp_latency_budget = latency if self.mp_latency_budget is None else self.mp_latency_budget
        check_mixed_precision(self)
        budget = self.rank_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < math.inf:
            raise ConfigError(f"--rank-budget {budget!r} must be a positive number (a fraction of the uniform "
                              f"branches' cost; 1.0 keeps the uniform ranks)")
        if self.rank_cost not in RANK_COSTS:
            raise ConfigError(f"--rank-cost {self.rank_cost!r} is not one of {', '.join(RANK_COSTS)}")
        t = self.rank_time_budget
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
                raise ConfigError(f"--rank-time-budget {t!r} must be a positive number (a fraction of the uniform "
                                  f"branches' modelled time)")
            if "time" not in self.rank_cost:
                raise ConfigError(f"--rank-time-budget needs a --rank-cost with time (time or params+time), "
                                  f"not {self.rank_cost!r}")
        if self.rank_error not in RANK_ERRORS:
            raise ConfigError(f"--rank-error {self.rank_error!r} is not one of {', '.join(RANK_ERRORS)}")
        if self.rank_errors_from is not None and self.rank_budget == 1.0:
            raise ConfigError("--rank-errors-from reuses a rank allocation's measured errors; it needs a --rank-budget "
                              "other than 1.0 (the uniform ranks measure none)")

    def check(self) -> None:
        """Before any work: the calibration faces exist, the recipe folder can be written, and the
        LPIPS weights (if given) load: a bad file is refused now, not after the statistics pass."""
        from quantface.data import SHIPPED_LFW, list_images
        from quantface.paths import check_output_dir

        if self.data != SHIPPED_LFW:
            if not Path(self.data).exists():  # e.g. the default, without the data set's ../shared beside the checkout
                raise ConfigError(f"input path {self.data} does not exist; calibration needs face photos: give "
                                  f"--data DIR (the data set's faces_hq/calib or any folder of face images), or "
                                  f"--data {SHIPPED_LFW} for the 200 LFW faces scikit-image ships (what quantface "
                                  f"demo calibrates on)")
            list_images(self.data)
        out = check_output_dir(self.out, "--out")
        if out.is_dir() and any(out.iterdir()) and not (out / "recipe.json").is_file():
            # the recipe writer replaces the whole folder: never a folder that is not an earlier recipe
            raise ConfigError(f"--out {out} is a folder that holds no recipe.json; give a new folder or an "
                              f"earlier recipe's")
        if self.rank_errors_from is not None:
            from quantface.calibration.ranks import reused_rank_errors

            reused_rank_errors(self)  # readable, with an allocation measured under these settings
        if self.lpips_backbone:
            from quantface.lpips import load_lpips

            load_lpips(self.lpips_net, self.lpips_backbone, self.lpips_lin)
        from quantface.calibration.distill import checkpoint_path
        from quantface.checkpoint import checkpoint_step

        if self.resume and checkpoint_path(self).exists():
            checkpoint_step(checkpoint_path(self))  # readable; whether it fits is checked when it loads

    @property
    def weight_bits(self) -> int:
        return parse_bits(self.bits)[0]

    @property
    def act_bits(self) -> int:
        return parse_bits(self.bits)[1]

    def weight_code_bits(self, weight_bits: int) -> int:
        """The code width of a layer asked for ``weight_bits``: 7 for 8 under ``reduce_range``."""
        return REDUCED_WEIGHT_BITS if self.reduce_range and weight_bits == 8 else weight_bits

    def folds_lowrank(self, weight_bits: int | None) -> bool:
        """Whether a layer with ``weight_bits`` code bits (None: FP weights, never folded) gets its branch
        folded; under ``reduce_range`` a 7-bit layer is an 8-bit one with reduced codes."""
        if weight_bits is None or self.fold_lowrank == "never":
            return False
        if self.reduce_range and weight_bits == REDUCED_WEIGHT_BITS:
            weight_bits = 8
        return self.fold_lowrank == "always" or weight_bits >= FOLD_MIN_WEIGHT_BITS


# ------------------------------------------------------------------------------------------------
# Mixed-precision fields (the allocation itself is ``calibration.mixed``)
# ------------------------------------------------------------------------------------------------

def epsilon(cfg: CalibConfig) -> float:
    return cfg.mp_epsilon if cfg.mp_epsilon is not None else DEFAULT_EPSILON[cfg.mp_metric]


def check_mixed_precision(cfg: CalibConfig) -> None:
    """One-sentence ConfigErrors for the mixed-precision fields."""
    if cfg.mp_metric not in METRICS:
        raise ConfigError(f"--mp-metric {cfg.mp_metric!r} is not one of {', '.join(METRICS)}")
    if cfg.mp_cost not in COSTS:
        raise ConfigError(f"--mp-cost {cfg.mp_cost!r} is not one of {', '.join(COSTS)}")
    target = get_target(cfg.target)  # ConfigError if unknown
    if isinstance(cfg.mp_sweep_images, bool) or not isinstance(cfg.mp_sweep_images, int) or cfg.mp_sweep_images < 1:
        raise ConfigError(f"--mp-sweep-images {cfg.mp_sweep_images!r} must be a positive integer")
    if cfg.mp_epsilon is not None and not (isinstance(cfg.mp_epsilon, (int, float)) and 0 < cfg.mp_epsilon < math.inf):
        raise ConfigError(f"--mp-epsilon {cfg.mp_epsilon!r} must be a positive number")
    cands = cfg.mp_candidates
    if not isinstance(cands, tuple) or not cands:
        raise ConfigError(f"--mp-candidates {cands!r} must list at least one bit width, e.g. 3,4,5,6")
    for b in cands:
        check_bits(b)
    if len(set(cands)) != len(cands):
        raise ConfigError(f"--mp-candidates {','.join(map(str, cands))} lists a bit width twice")
    if cfg.mp_metric == "lpips" and not cfg.lpips_backbone:
        raise ConfigError("--mp-metric lpips needs local LPIPS weights (--lpips-backbone and --lpips-lin)")
    budget = cfg.mp_budget
    if budget is None and cfg.target is not None:
        raise ConfigError(f"--target {cfg.target} allocates bits and needs --mp-budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not 0 < budget < math.inf):
        raise ConfigError(f"--mp-budget {budget!r} must be a positive number")
    latency = cfg.mp_latency_budget
    if latency is not None and (isinstance(latency, bool) or not isinstance(latency, (int, float))
                                or not 0 < latency < math.inf):
        raise ConfigError(f"--mp-latency-budget {latency!r} must be a positive number")
    target.check(cfg)
