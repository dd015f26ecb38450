"""What the exporter lowers for one quantized layer: its ``LayerRecipe`` plus what only the FP model
holds (the bias, unless calibration changed it, and the convolution's geometry). Export never sees calibration's fake-quant layers:
it reads the recipe and the FP model alone."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from quantface.export.errors import ExportError
from quantface.quant import EPS, requantizable
from quantface.recipe import LayerRecipe


@dataclass
class ExportLayer:
    name: str
    recipe: LayerRecipe
    module: nn.Conv2d | nn.Linear

    def __post_init__(self) -> None:
        if isinstance(self.module, nn.Conv2d) and (self.module.groups != 1 or self.module.padding_mode != "zeros"):
            raise ExportError(f"layer {self.name}: only ungrouped, zero-padded convolutions can be exported quantized")

    @property
    def conv_args(self) -> dict | None:
        m = self.module
        return dict(stride=m.stride, padding=m.padding, dilation=m.dilation) if isinstance(m, nn.Conv2d) else None

    @property
    def weight(self) -> torch.Tensor:  # the FP weight: its shape, and the weight of a float-weight layer
        return self.module.weight.detach()

    @property
    def bias(self) -> torch.Tensor | None:
        """The recipe's bias where calibration changed it (QuantVSR's folded LBA), else the FP model's."""
        if self.recipe.bias is not None:
            return self.recipe.bias
        return None if self.module.bias is None else self.module.bias.detach()

    @property
    def weight_bits(self) -> int | None:
        return self.recipe.weight_bits

    @property
    def act_bits(self) -> int | None:
        return self.recipe.act_bits

    @property
    def a_scale(self) -> torch.Tensor | None:
        """The scale the quantizer uses: max(recipe scale, EPS), as the fake-quant model clamps it (a
        learned scale can end below zero)."""
        if self.recipe.act_scale is None:
            return None
        return torch.tensor(self.recipe.act_scale, dtype=torch.float32).clamp_min(EPS)

    @property
    def a_zero_point(self) -> int | None:
        return self.recipe.act_zero_point

    @property
    def weight_codes(self) -> torch.Tensor | None:
        return self.recipe.weight_codes

    @property
    def w_scale(self) -> torch.Tensor | None:
        return self.recipe.weight_scale

    @property
    def smooth(self) -> torch.Tensor | None:
        return self.recipe.smooth

    @property
    def rotation(self) -> torch.Tensor | None:
        return None if self.recipe.hadamard is None else self.recipe.hadamard.matrix()

    @property
    def lowrank(self) -> SimpleNamespace | None:
        r = self.recipe
        if r.lowrank_down is None:
            return None
        codes = r.lowrank_codes() if r.lowrank_bits is not None else (None, None)
        return SimpleNamespace(down=r.lowrank_down.float(), up=r.lowrank_up.float(), bits=r.lowrank_bits,
                               down_codes=codes[0], up_codes=codes[1], down_scale=r.lowrank_down_scale,
                               up_scale=r.lowrank_up_scale)

    @property
    def output_range(self) -> tuple[float, float] | None:
        return self.recipe.output_range

    def quantized_weight(self) -> torch.Tensor:
        """The weight of a layer the recipe leaves in float (only its activations are quantized)."""
        return self.weight

    def requantizable(self, wide: bool = False) -> bool:
        return requantizable(self.conv_args is not None, self.weight_bits, self.act_bits, self.output_range,
                             self.bias, self.a_scale, self.w_scale, wide)


def export_layers(recipe, fp_model: nn.Module) -> dict[str, ExportLayer]:
    """One ``ExportLayer`` per recipe layer (``recipe.check_fits(fp_model)`` first)."""
    recipe.check_fits(fp_model)
    modules = dict(fp_model.named_modules())
    return {name: ExportLayer(name, entry, modules[name]) for name, entry in recipe.layers.items()}
