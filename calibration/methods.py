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

from dataclasses import dataclass, replace

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
    refine: str | None = None  # None | "distill" | "modulewise" | "blockwise" | "qartsr" | "quantvsr"
    learn_scales: bool = False  # quantizer scales trained with the refinement
    # Smoothing and the Hadamard rotation only where the run's weight or activation bits are below this
    # (None: whatever the bits): their online nodes are what a lean W8A8 graph cannot carry
    # (docs/calibration_notes.md).
    balance_below_bits: int | None = None
    # None: the branch ranks are uniform unless --rank-budget (calibration.ranks); "stca": always allocated
    # from a per-layer activation complexity under the budget (QuantVSR's STCA, calibration.quantvsr).
    rank_allocation: str | None = None
    # Weight codes where no float branch is left (``calibration.gptq``): "nearest" or "gptq". Ours (quantface)
    # takes GPTQ, measured better at W8 and on the lean targets (docs/calibration_notes.md, "GPTQ codes"); the
    # baselines keep the rounding their papers use.
    weight_rounding: str = "nearest"

    @property
    def has_branch(self) -> bool:
        """Whether the method adds a low-rank branch (what ``rank_budget`` allocates)."""
        return bool(self.svd_rank or self.lora_rank)

    def lean(self) -> "MethodSpec":
        """This method without online transforms or low-rank branch (``--target cpu``: nodes ONNX Runtime's
        CPU kernels would run in float); its ranges and refinement kept."""
        return replace(self, smoothing=False, hadamard=False, svd_rank=0, lora_rank=0, rank_allocation=None)

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
        "qdiffusion",
        "Q-Diffusion-style PTQ (Li et al. 2023) for one step: BRECQ block reconstruction (ResNet blocks, "
        "transformer blocks and the layers between them, in execution order; each block's output MSE "
        "against the FP block on the quantized model's inputs) with AdaRound weight rounding (rectified-sigmoid "
        "rounding variables, annealed regulariser, hardened to integer codes) and per-tensor activation "
        "quantizers with LSQ step sizes; no transform, no low-rank branch. Its timestep-aware calibration "
        "collapses to the one fixed timestep t = 399. Departs from the paper: one joint pass per block "
        "(weights and activation steps together) of few iterations, 16 cached images.",
        refine="blockwise", learn_scales=True,
    ),
    MethodSpec(
        "qartsr",
        "QArtSR-style (Zhu et al. 2025): timestep retraining (TRQ: the UNet's fixed timestep a trained "
        "parameter, stored in the recipe and folded by the exporter), reversed per-module quantization "
        "(RPQ: groups of layers calibrated from the output end backwards, upstream kept in full precision, "
        "with module + image losses), then an extended end-to-end stage; only quantization parameters "
        "(weight and activation step sizes) and the timestep are trained, never the weights. Departs from "
        "the paper: SmoothQuant scales folded before calibration, modules are execution-order groups of "
        "layers, the x0 conversion keeps the schedule's ᾱ at t = 399.",
        smoothing=True, refine="qartsr", learn_scales=True,
    ),
    MethodSpec(
        "quantvsr",
        "QuantVSR-style (Chai et al. 2025) for images: randomized Hadamard rotation, a full-precision SVD "
        "branch whose rank is layer-specific (STCA reduced to its spatial part: each layer's spatial "
        "complexity, the mean over channels and images of its input's standard deviation over positions, "
        "weighs the layer's unexplained weight energy in an integer program under a parameter budget, "
        "by default the uniform rank-2r branches' total; the uniform rank is always a candidate, and layers "
        "without spatial extent keep it), joint refinement of the FP and low-bit branches "
        "(the low-bit branch quantizes W − L1·L2 with the trained factors; distilled with the quantizer "
        "scales), then learnable bias alignment (a per-channel output bias initialised to the mean of each "
        "layer's quantization error, trained, folded into the bias). Departs from the paper: no temporal "
        "complexity (one image, no frames), ranks from an integer program under a budget instead of "
        "percentile thresholds with ±1 steps rounded to multiples of 8, static per-tensor activations "
        "instead of dynamic ones, QuantFace's perceptual + MSE loss instead of MSE alone, LBA initialised "
        "to the mean error instead of zero.",
        hadamard=True, svd_rank=2, refine="quantvsr", learn_scales=True, rank_allocation="stca",
    ),
    MethodSpec(
        "quantface",
        "QuantFace (this paper): rotation-scaling channel balancing (smoothing then randomized Hadamard, "
        "folded into the weights), QD-LoRA (SVD branch of rank r plus LoRA branch of rank r, residual "
        "quantized) trained by distillation with perceptual + MSE loss, then merged to rank 2r. Departs "
        "from the paper with 8-bit weights and 8-bit (or 16-bit) activations: no smoothing and no rotation "
        "there, for their online nodes' cost (docs/calibration_notes.md).",
        smoothing=True, hadamard=True, svd_rank=1, lora_rank=1, refine="distill", learn_scales=True,
        balance_below_bits=8, weight_rounding="gptq",
    ),
]}

# Distillation: steps of batch 4 (why 600: docs/calibration_notes.md). Module-wise (PassionSR): optimiser
# steps per layer. Block-wise (Q-Diffusion): optimiser steps per block. QArtSR: steps per module of its
# reversed per-module stage (its TRQ and end-to-end stages: CalibConfig.trq_steps / e2e_steps). QuantVSR:
# steps of its joint refinement (its bias-alignment stage: CalibConfig.lba_steps, default LBA_STEPS).
DEFAULT_STEPS = {"distill": 600, "modulewise": 60, "blockwise": 200, "qartsr": 20, "quantvsr": 600}
TRQ_STEPS, E2E_STEPS = 40, 80
LBA_STEPS = 100


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ConfigError(f"unknown calibration method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]
