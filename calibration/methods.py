"""The calibration methods, each described by what it does rather than by ``if method == ...``.

A method is a ``MethodSpec``: which offline transforms it folds (smoothing, randomized Hadamard), which
low-rank branches it adds, how it initialises quantizer scales, and whether a refinement stage
trains it afterwards (distillation of the branches, or PassionSR's module-wise calibration). The
driver (``calibration.run``) runs the same stages for all of them, so the comparison in the
results table is one framework, the same data, and the same step budget.

All methods but MinMax start from the same MSE-searched quantizer ranges (``quantface.quant``), so
the table isolates what each method's transform or training contributes.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantface.errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    scale_init: str = "mse"  # minmax | mse: weight and activation range initialisation
    smoothing: bool = False  # SmoothQuant per-channel scale s = max|X|^α / max|W|^(1−α)
    hadamard: bool = False  # randomized Hadamard rotation over input channels
    svd_rank: int = 0  # SVD branch rank, in units of r
    lora_rank: int = 0  # LoRA branch rank, in units of r
    refine: str | None = None  # None | "distill" | "modulewise"
    learn_scales: bool = False  # quantizer scales trained with the refinement
    # Smoothing and the Hadamard rotation only where the run's weight or activation bits are below this
    # (None: whatever the bits): their online nodes are what a lean W8A8 graph cannot carry
    # (docs/calibration_notes.md).
    balance_below_bits: int | None = None

    @property
    def has_branch(self) -> bool:
        """Whether the method adds a low-rank branch (what ``rank_budget`` allocates)."""
        return bool(self.svd_rank or self.lora_rank)

    def balances(self, weight_bits: int, act_bits: int) -> bool:
        """Whether a run with these bits folds this method's smoothing and rotation."""
        limit = self.balance_below_bits
        return limit is None or weight_bits < limit or act_bits < limit


METHODS: dict[str, MethodSpec] = {m.name: m for m in [
    MethodSpec(
        "minmax",
        "MinMax (the paper's 'MaxMin'): per-channel weight and per-tensor activation ranges from the "
        "observed minimum and maximum, round to nearest; no transform, no training.",
        scale_init="minmax",
    ),
    MethodSpec(
        "smoothquant",
        "SmoothQuant scale only (Xiao et al. 2023): per-input-channel scale s = max|X|^α / max|W|^(1−α) "
        "folded into the weights, activations divided by s online. Departs from the paper: static "
        "per-tensor activation quantization of every conv/linear input (the paper targets LLM linears), "
        "MSE-searched ranges.",
        smoothing=True,
    ),
    MethodSpec(
        "hadamard",
        "Hadamard only (QuaRot-style rotation): randomized Hadamard transform over input channels "
        "folded into the weights and applied online; no scaling, no training. Departs from QuaRot: the "
        "rotation is per layer (online on every conv/linear input) rather than fused across residuals.",
        hadamard=True,
    ),
    MethodSpec(
        "svdquant",
        "SVDQuant (Li et al. 2025): smoothing, then a rank-2r SVD branch kept in full precision that "
        "absorbs the weight outliers, residual quantized; no training. Departs from the paper: "
        "per-channel (not group-wise) 4-bit weights and static per-tensor activations.",
        smoothing=True, svd_rank=2,
    ),
    MethodSpec(
        "efficientdm",
        "EfficientDM-style (He et al. 2024): a single rank-2r LoRA branch (Gaussian/zero init) plus "
        "learnable quantizer scales, trained by distilling the full-precision model's output. Departs "
        "from the paper: one step distilled on images (no timestep-aware scales: the model runs once).",
        lora_rank=2, refine="distill", learn_scales=True,
    ),
    MethodSpec(
        "passionsr",
        "PassionSR-style (Zhu et al. 2025): learnable boundary activation quantizer (learned clipping "
        "bounds) and a learnable equivalent transformation (per-channel scale initialised by SmoothQuant), "
        "calibrated module by module to minimise each layer's output MSE against full precision. Departs "
        "from the paper: the unit of calibration is each conv/linear layer, not the UNet/VAE block.",
        smoothing=True, refine="modulewise", learn_scales=True,
    ),
    MethodSpec(
        "quantface",
        "QuantFace (this paper): rotation-scaling channel balancing (smoothing then randomized Hadamard, "
        "folded into the weights), QD-LoRA (SVD branch of rank r plus LoRA branch of rank r, residual "
        "quantized) trained by distillation with perceptual + MSE loss, then merged to rank 2r. Departs "
        "from the paper with 8-bit weights and 8-bit (or 16-bit) activations: no smoothing and no rotation "
        "there, for their online nodes' cost (docs/calibration_notes.md).",
        smoothing=True, hadamard=True, svd_rank=1, lora_rank=1, refine="distill", learn_scales=True,
        balance_below_bits=8,
    ),
]}

# Distillation: steps of batch 4 (why 600: docs/calibration_notes.md). Module-wise (PassionSR): optimiser
# steps per layer.
DEFAULT_STEPS = {"distill": 600, "modulewise": 60}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"unknown calibration method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]
