"""The fake-quant layer every calibration method builds on.

``QuantLayer`` replaces one ``nn.Conv2d`` or ``nn.Linear``. With input x and original weight W::

    x' = (x · 1/s) · Q                              online: smoothing, then randomized Hadamard Q
    W' = (W · diag(s)) · Q = L1·L2 + R              offline: folded, then split by SVD (paper Eq. 9)
    y  = Q_a(x') ∗ Q_w(R) + x' ∗ (L1·L2) + x' ∗ (A·B) + bias                       (paper Eq. 10)

where ∗ is the layer's op (conv at every kernel position, or matmul), Q_a is per-tensor asymmetric
activation fake-quantization and Q_w per-output-channel symmetric weight fake-quantization
(``quantface.quant``). Both low-rank branches run in full precision on the *unquantized* x', as in
SVDQuant, and export as a parallel path. Every piece is optional: no s, no Q, no branches and no
quantizers is the original layer, bit for bit.

After calibration a layer is *frozen*: its residual is replaced by integer codes and their
dequantized values, and the two branches are merged into one of rank 2r; a recipe stores exactly the
frozen state, so loading a recipe reproduces the calibrated model bit for bit. Before freezing, a
layer with fine enough weight bits may have its merged branch folded back into the weight
(``fold_lowrank``): W = R + L1·L2 + A·B, re-scaled and later quantized as one, no branch left.

Two pieces QuantVSR (``calibration.quantvsr``) adds, both off by default:

* a *joint residual* (``set_joint_residual``): the layer keeps the whole transformed weight W′ and its
  quantized product uses Q_w(W′ − L1·L2) with the branch's *current* factors, so training the branch
  moves the low-bit branch with it; ``freeze`` fixes R = W′ − L1·L2 from the float16-rounded factors;
* a learned per-output-channel bias ``lba`` added to the output (learnable bias alignment), which
  ``fold_lba`` (called by ``freeze``) adds into the layer's bias: y = … + bias + lba = … + (bias + lba).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from quantface.errors import ConfigError
from quantface.hadamard import fold_into_weight, rotate_channels
from quantface.quant import (EPS, act_qparams_from_range, adaround_codes, adaround_fake_quantize,
                             adaround_init, bias_codes, dequantize, factor_fake_quantize, factor_quantize,
                             fake_quantize, qrange, quantize, requant_bits, requantizable, requantize, weight_scale)
from quantface.recipe import HadamardSpec


class LowRank(nn.Module):
    """A rank-r branch x ↦ up(down(x)): down is a k×k conv (the layer's geometry) or a Linear to r
    channels, up a 1×1 conv or Linear back to the layer's outputs. Full precision."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, conv_args: dict | None):
        super().__init__()
        # Contiguous copies: a strided view would make the conv pick other kernels than a reloaded
        # recipe's contiguous tensors, and the two would differ in the last bits.
        self.down = nn.Parameter(down.detach().contiguous().clone())  # (r, in, kh, kw) or (r, in)
        self.up = nn.Parameter(up.detach().contiguous().clone())  # (out, r, 1, 1) or (out, r)
        self.conv_args = conv_args
        # Once ``round_to_grid`` put the factors on an integer grid: its bits and per-row scales.
        self.bits: int | None = None
        self.down_scale: torch.Tensor | None = None
        self.up_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @classmethod
    def from_svd(cls, u: torch.Tensor, sigma: torch.Tensor, vh: torch.Tensor, rank: int,
                 weight: torch.Tensor, conv_args: dict | None) -> "LowRank":
        """The rank-``rank`` truncated SVD branch of ``weight`` (reshaped to (out, rest)) from its SVD
        u·diag(σ)·vh: up = U_r·Σ_r, down = V_rᵀ (with the weight's kernel shape for a conv)."""
        r = min(rank, sigma.numel())
        up = (u[:, :r] * sigma[:r]).to(weight.dtype)
        down = vh[:r].to(weight.dtype)
        if conv_args is not None:
            return cls(down.reshape(r, *weight.shape[1:]), up[:, :, None, None], conv_args)
        return cls(down, up, None)

    def round_to_grid(self, bits: int) -> None:
        """Put both factors on their symmetric ``bits``-bit per-row grids (``quantface.quant.factor_quantize``):
        each becomes codes · scale in float32, which is what the recipe stores and the export dequantizes."""
        with torch.no_grad():
            for p, attr in ((self.down, "down_scale"), (self.up, "up_scale")):
                codes, scale = factor_quantize(p, bits)
                p.copy_(dequantize(codes, scale.view(-1, *[1] * (p.dim() - 1)), 0.0))
                setattr(self, attr, scale.detach().clone())
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return branch_op(x, self.down, self.up, self.conv_args)

    def product(self) -> torch.Tensor:
        """The branch as one weight with the layer's shape (up · down)."""
        if self.conv_args is not None:
            return torch.einsum("or,rikl->oikl", self.up[:, :, 0, 0], self.down)
        return self.up @ self.down


def branch_op(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, conv_args: dict | None) -> torch.Tensor:
    """x ↦ up(down(x)): the down factor with the layer's geometry, the up factor 1×1 (or Linear)."""
    if conv_args is not None:
        return F.conv2d(F.conv2d(x, down, None, **conv_args), up)
    return F.linear(F.linear(x, down), up)


class QuantLayer(nn.Module):
    def __init__(self, layer: nn.Conv2d | nn.Linear, name: str = ""):
        super().__init__()
        self.name = name
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.padding_mode != "zeros":
                raise ConfigError(f"layer {name}: only ungrouped, zero-padded convolutions can be quantized")
            self.conv_args: dict | None = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
        elif isinstance(layer, nn.Linear):
            self.conv_args = None
        else:
            raise ConfigError(f"layer {name} is a {type(layer).__name__}, not a Conv2d or Linear")
        # The weight the quantized product uses: W, then W' after folding, then R after the SVD split.
        self.register_buffer("weight", layer.weight.detach().clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.register_buffer("smooth", None)  # s, shape (in,)
        self.register_buffer("rotation", None)  # Q, shape (in, in), orthogonal
        self.hadamard: HadamardSpec | None = None  # the signs Q was built from (stored in the recipe)
        self.lowrank: LowRank | None = None  # SVD branch L1·L2
        self.lora: LowRank | None = None  # LoRA branch A·B
        # Branch factors on an integer grid (``--branch-bits``): trained through its fake-quant (the two
        # branches as the one merged branch the recipe stores), rounded to it at ``freeze``. None: float16.
        self.branch_bits: int | None = None
        self.weight_bits: int | None = None
        self.act_bits: int | None = None
        self.w_scale: nn.Parameter | None = None  # (out,)
        self.a_scale: nn.Parameter | None = None  # ()
        # AdaRound's V (quantface.quant.adaround_*) while block reconstruction learns this layer's rounding.
        self.rounding: nn.Parameter | None = None
        self.register_buffer("a_zero_point", None)  # (), integer-valued
        self.register_buffer("weight_codes", None)  # int8 codes once frozen
        self.register_buffer("weight_dq", None)  # dequantized codes once frozen
        # (min, max) of the quantized product's output (before the low-rank branch) on calibration
        # images, once frozen: where the ``ort-cpu`` export requantizes it to 8 bits (export.lower).
        self.output_range: tuple[float, float] | None = None
        # Simulate that requantization (``apply_recipe(..., requant_outputs=True)``), so the PyTorch
        # model computes what the ``ort-cpu`` graph computes.
        self.requant_output = False
        # ... and the ``qnn`` profile's integer node units: Linear layers and 16-bit inputs too (quant.requantizable)
        self.requant_wide = False
        # QuantVSR: W′ while the residual follows the trained branch (``set_joint_residual``), and the
        # learned bias alignment (``add_lba``); ``bias_calibrated`` once ``fold_lba`` changed the bias, so
        # the recipe stores this bias rather than the FP model's.
        self.register_buffer("full_weight", None)
        self.lba: nn.Parameter | None = None
        self.bias_calibrated = False

    # ---- geometry -------------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def channel_dim(self) -> int:
        return 1 if self.conv_args is not None else -1

    @property
    def frozen(self) -> bool:
        return self.weight_dq is not None

    def _op(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.conv_args is not None:
            return F.conv2d(x, w, bias, **self.conv_args)
        return F.linear(x, w, bias)

    def _channel_view(self, v: torch.Tensor) -> torch.Tensor:
        return v.view(-1, 1, 1) if self.conv_args is not None else v

    # ---- the online activation transform ------------------------------------------------------
    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x * self._channel_view(1.0 / self.smooth)
        if self.rotation is not None:
            x = rotate_channels(x, self.rotation, self.channel_dim)
        return x

    # ---- offline folding ----------------------------------------------------------------------
    def fold_smoothing(self, s: torch.Tensor) -> None:
        """x ↦ x/s online, W ↦ W·diag(s) offline (before any rotation)."""
        if self.smooth is not None or self.rotation is not None or self.lowrank is not None:
            raise ConfigError(f"layer {self.name}: smoothing must be folded first and only once")
        shape = (1, -1, 1, 1) if self.conv_args is not None else (1, -1)
        self.weight = self.weight * s.view(shape)
        self.smooth = s.detach().clone()

    def fold_rotation(self, hadamard: HadamardSpec) -> None:
        """x ↦ x·Q online, W ↦ W·Q offline (per kernel position for convs), Q = ``hadamard.matrix()``."""
        if self.rotation is not None or self.lowrank is not None:
            raise ConfigError(f"layer {self.name}: the rotation must be folded before the SVD split, once")
        q = hadamard.matrix().to(device=self.weight.device, dtype=self.weight.dtype)
        self.weight = fold_into_weight(self.weight, q)
        self.rotation = q
        self.hadamard = hadamard

    def split_lowrank(self, rank: int) -> None:
        """W' = L1·L2 + R by truncated SVD (L1 = U_r·Σ_r, L2 = V_rᵀ); the layer keeps R."""
        u, sigma, vh = torch.linalg.svd(self.weight.flatten(1).double(), full_matrices=False)
        branch = LowRank.from_svd(u, sigma, vh, rank, self.weight, self.conv_args)
        self.lowrank = branch
        self.weight = self.weight - branch.product().detach()

    def add_lora(self, rank: int, generator: torch.Generator) -> None:
        """LoRA branch: A Gaussian (std 1/√fan_in), B zero, so the layer's output is unchanged."""
        fan_in = self.weight[0].numel()
        # Drawn on the CPU from the seeded generator, so the initialisation is the same on every device.
        down = torch.randn((rank, *self.weight.shape[1:]), generator=generator, device="cpu") / fan_in**0.5
        up = torch.zeros((self.out_channels, rank, 1, 1) if self.conv_args is not None else (self.out_channels, rank),
                         dtype=self.weight.dtype, device=self.weight.device)
        self.lora = LowRank(down.to(self.weight), up, self.conv_args)

    def merge_branches(self) -> None:
        """Concatenate the SVD and LoRA branches into one branch of rank r_svd + r_lora."""
        branches = [b for b in (self.lowrank, self.lora) if b is not None]
        if len(branches) < 2:
            self.lowrank, self.lora = (branches[0] if branches else None), None
            return
        down = torch.cat([b.down.detach() for b in branches], 0)
        up = torch.cat([b.up.detach() for b in branches], 1)
        self.lowrank, self.lora = LowRank(down, up, self.conv_args), None

    def set_joint_residual(self) -> None:
        """From now on the quantized weight is Q_w(W′ − L1·L2) with the SVD branch's current factors
        (QuantVSR's joint refinement): W′ = R + L1·L2 is kept; ``weight`` stays the residual at the
        factors' last fixed value (``fix_residual``)."""
        if self.lowrank is None or self.lora is not None or self.frozen:
            raise ConfigError(f"layer {self.name}: a joint residual needs one unfrozen SVD branch and no LoRA branch")
        self.full_weight = (self.weight + self.lowrank.product().detach()).clone()

    def _residual(self) -> torch.Tensor:
        """The weight the quantized product quantizes: R, or W′ − L1·L2 under a joint residual."""
        if self.full_weight is None:
            return self.weight
        return self.full_weight - self.lowrank.product()

    def fix_residual(self) -> None:
        """End the joint residual: R = W′ − L1·L2 at the branch's current factors."""
        if self.full_weight is not None:
            with torch.no_grad():
                self.weight = (self.full_weight - self.lowrank.product()).detach().clone()
            self.full_weight = None

    def add_lba(self, init: torch.Tensor | None = None) -> None:
        """Learnable bias alignment: a per-output-channel bias added to the layer's output (zeros, or
        ``init``, e.g. the mean of the layer's quantization error: ``calibration.quantvsr``)."""
        value = torch.zeros(self.out_channels, dtype=self.weight.dtype, device=self.weight.device) if init is None \
            else init.detach().to(self.weight).reshape(self.out_channels)
        self.lba = nn.Parameter(value.clone())

    def fold_lba(self) -> None:
        """bias ← bias + lba (a layer without a bias gets lba as its bias); the output is unchanged up
        to float rounding, and the bias is then the recipe's (``bias_calibrated``)."""
        if self.lba is None:
            return
        with torch.no_grad():
            lba = self.lba.detach().clone()
            self.bias = lba if self.bias is None else self.bias + lba
        self.lba = None
        self.bias_calibrated = True

    # ---- quantizers -------------------------------------------------------------------------
    def set_weight_quant(self, bits: int | None, scale: torch.Tensor | None) -> None:
        self.weight_bits = bits
        self.w_scale = None if bits is None else nn.Parameter(scale.detach().clone().clamp_min(EPS))

    def set_act_quant(self, bits: int | None, scale: torch.Tensor | None, zero_point: torch.Tensor | None) -> None:
        self.act_bits = bits
        self.a_scale = None if bits is None else nn.Parameter(scale.detach().clone().reshape(()).clamp_min(EPS))
        self.a_zero_point = None if bits is None else zero_point.detach().clone().reshape(())

    def _w_scale_view(self) -> torch.Tensor:
        return self.w_scale.view(-1, *([1] * (self.weight.dim() - 1)))

    def quantized_weight(self) -> torch.Tensor:
        if self.frozen:
            return self.weight_dq
        if self.weight_bits is None:
            return self._residual()
        qmin, qmax = qrange(self.weight_bits, signed=True)
        if self.rounding is not None:
            return adaround_fake_quantize(self.weight, self._w_scale_view().clamp_min(EPS), self.rounding, qmin, qmax)
        return fake_quantize(self._residual(), self._w_scale_view().clamp_min(EPS), 0.0, qmin, qmax)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is None:
            return x
        qmin, qmax = qrange(self.act_bits, signed=False)
        return fake_quantize(x, self.a_scale.clamp_min(EPS), self.a_zero_point, qmin, qmax)

    def init_rounding(self) -> None:
        """Start learning this layer's weight rounding (AdaRound) at its current weight scales."""
        if self.frozen or self.weight_bits is None:
            raise ConfigError(f"layer {self.name}: only an unfrozen layer with quantized weights can learn its rounding")
        self.rounding = nn.Parameter(adaround_init(self.weight, self._w_scale_view().clamp_min(EPS)))

    def harden_rounding(self) -> torch.Tensor:
        """Fix the learned rounding (V ≥ 0 rounds up) and return its integer codes. The weight becomes
        codes · s, so ``freeze``'s round to nearest gives back exactly these codes."""
        qmin, qmax = qrange(self.weight_bits, signed=True)
        with torch.no_grad():
            scale = self._w_scale_view().clamp_min(EPS)
            codes = adaround_codes(self.weight, scale, self.rounding, qmin, qmax)
            self.weight = dequantize(codes, scale.detach(), 0.0)
        self.rounding = None
        return codes

    def set_weight_codes(self, codes: torch.Tensor) -> None:
        """Install integer weight codes (e.g. ``calibration.gptq``'s) on the current scales: the weight becomes
        codes · s, so ``freeze``'s round to nearest gives back exactly these codes. Before ``freeze``; a layer
        with quantized weights and no branch (whose residual is the weight itself)."""
        if self.frozen or self.weight_bits is None or self.lowrank is not None or self.lora is not None:
            raise ConfigError(f"layer {self.name}: only an unfrozen layer with quantized weights and no branch can "
                              f"take weight codes")
        qmin, qmax = qrange(self.weight_bits, signed=True)
        if codes.min() < qmin or codes.max() > qmax or not torch.equal(codes, torch.round(codes)):
            raise ValueError(f"layer {self.name}: weight codes outside the {self.weight_bits}-bit range")
        with torch.no_grad():
            self.weight = dequantize(codes.to(self.weight), self._w_scale_view().detach().clamp_min(EPS), 0.0)

    def fold_lowrank(self, scale_method: str = "mse") -> None:
        """Fold the branches into the quantized weight: W = R + L1·L2 + A·B (float32), fresh per-output-
        channel scales for it (``quantface.quant.weight_scale``, ``scale_method``), branches dropped. The
        product then quantizes the input the branch used to see unquantized, so the layer's output moves
        by about (x' − Q_a(x'))·(L1·L2 + A·B) plus the re-rounding of W. Before ``freeze``; weights only."""
        if self.frozen or self.weight_bits is None:
            raise ConfigError(f"layer {self.name}: only an unfrozen layer with quantized weights can fold its branch")
        self.fix_residual()
        self.merge_branches()
        if self.lowrank is None:
            return
        with torch.no_grad():
            self.weight = self.weight + self.lowrank.product().detach().to(self.weight)
            self.lowrank = None
            self.set_weight_quant(self.weight_bits, weight_scale(self.weight, self.weight_bits, scale_method))

    def freeze(self) -> None:
        """Fix the weight codes, merge the branches and round the merged factors to float16; from
        now on the forward uses stored values only.

        The low-rank branch stays floating point (it is what absorbs the outliers) but, as in
        SVDQuant, 16-bit floating point is precision enough for it: the factors are rounded to the
        nearest float16 and the fake-quant model computes with exactly those values (in float32),
        so the recipe and the exported graph can store them at half the size with no difference.
        """
        if self.rounding is not None:
            self.harden_rounding()
        self.fold_lba()
        self.merge_branches()
        if self.lowrank is not None and self.branch_bits is not None:
            self.lowrank.round_to_grid(self.branch_bits)
        elif self.lowrank is not None:
            with torch.no_grad():
                for p in (self.lowrank.down, self.lowrank.up):
                    p.copy_(p.half().float())
        self.fix_residual()  # a joint residual from the float16 factors the recipe stores
        if self.weight_bits is None:
            return
        qmin, qmax = qrange(self.weight_bits, signed=True)
        with torch.no_grad():
            scale = self.w_scale.detach().clamp_min(EPS)
            self.w_scale = nn.Parameter(scale, requires_grad=False)
            codes = quantize(self.weight, self._w_scale_view(), 0.0, qmin, qmax)
            self.load_frozen(codes.to(torch.int8), scale)

    def load_frozen(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Install integer weight codes and their per-channel scales (from ``freeze`` or a recipe)."""
        self.weight_codes = codes.to(torch.int8)
        self.w_scale = nn.Parameter(scale.detach().clone(), requires_grad=False)
        self.weight_dq = dequantize(self.weight_codes.float(), self._w_scale_view(), 0.0)

    # ---- forward ------------------------------------------------------------------------------
    @property
    def requantizable(self) -> bool:
        """Whether the ``ort-cpu`` export requantizes this layer's product (``quantface.quant.requantizable``)."""
        return requantizable(self.conv_args is not None, self.weight_bits, self.act_bits, self.output_range,
                             self.bias, None if self.a_scale is None else self.a_scale.detach(), self.w_scale,
                             self.requant_wide)

    def quantized_product(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized path's output for an already transformed input (no low-rank branch); with
        ``requant_output``, what ONNX Runtime's QLinearConv computes for it, bit for bit: the exact
        integer accumulator of the activation and weight codes (in float64) plus the bias as INT32
        codes on its grid s_x·s_w, requantized to ``quant.requant_bits`` over ``output_range``."""
        if not (self.requant_output and self.requantizable and self.weight_codes is not None):
            return self._op(self.quantized_input(x), self.quantized_weight(), self.bias)
        qmin, qmax = qrange(self.act_bits, signed=False)
        a_scale = self.a_scale.detach().clamp_min(EPS)
        x_codes = quantize(x, a_scale, self.a_zero_point, qmin, qmax) - self.a_zero_point
        acc = self._op(x_codes.double(), self.weight_codes.double(), None)
        if self.bias is not None:
            acc = acc + self._channel_view(bias_codes(self.bias, a_scale, self.w_scale)[0].double())
        bits = requant_bits(self.act_bits)
        out_scale, out_zero = act_qparams_from_range(*self.output_range, bits)
        return requantize(acc, a_scale, self._channel_view(self.w_scale), out_scale, out_zero, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform_input(x)
        out = self.quantized_product(x)
        branches = [b for b in (self.lowrank, self.lora) if b is not None]
        if self.branch_bits is not None and branches and branches[0].bits is None:
            # Training on the integer grid: the branches as the one merged branch ``freeze`` rounds, fake-quantized.
            down = torch.cat([b.down for b in branches], 0)
            up = torch.cat([b.up for b in branches], 1)
            return self._with_lba(out + branch_op(x, factor_fake_quantize(down, self.branch_bits),
                                                  factor_fake_quantize(up, self.branch_bits), self.conv_args))
        for branch in branches:
            out = out + branch(x)
        return self._with_lba(out)

    def _with_lba(self, out: torch.Tensor) -> torch.Tensor:
        if self.lba is not None:
            out = out + self._channel_view(self.lba)
        return out

    def extra_repr(self) -> str:
        parts = [self.name, f"W{self.weight_bits or 'fp'}A{self.act_bits or 'fp'}"]
        if self.smooth is not None:
            parts.append("smooth")
        if self.rotation is not None:
            parts.append("hadamard")
        for label, b in (("svd", self.lowrank), ("lora", self.lora)):
            if b is not None:
                parts.append(f"{label}_rank={b.rank}")
        if self.full_weight is not None:
            parts.append("joint_residual")
        if self.lba is not None:
            parts.append("lba")
        return ", ".join(parts)


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}


def wrap_layers(model: nn.Module, include: callable = lambda name: True) -> dict[str, QuantLayer]:
    """Replace every Conv2d / Linear whose name passes ``include`` by a ``QuantLayer`` (in place)."""
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and include(name)]
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLayer(layer, name))
    return quant_layers(model)


def unwrap_layer(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` (the float Conv2d / Linear ``wrap_layers`` replaced) back in place of layer ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not isinstance(getattr(parent, child), QuantLayer):
        raise ValueError(f"layer {name} is not wrapped")
    setattr(parent, child, module)


@contextmanager
def hooks_removed(handles: Iterable[RemovableHandle]):
    """Runs the block with the given (already registered) hooks, and removes them however it ends."""
    handles = list(handles)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def call_order(model: nn.Module, modules: dict[str, nn.Module], probe: torch.Tensor) -> list[str]:
    """Names of ``modules`` in the order a forward pass of ``model`` on ``probe`` first calls them
    (modules the probe does not reach are left out)."""
    order: list[str] = []
    with hooks_removed(m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name)
                                                   if name not in order else None) for name, m in modules.items()):
        with torch.no_grad():
            model(probe)
    return order
