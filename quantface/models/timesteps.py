"""Sinusoidal timestep embeddings whose frequencies are a buffer computed by torch.

A one-step restorer runs its UNet at one fixed timestep, so the embedding's frequency vector
``exp(-ln(max_period)·i/d)`` is a constant. Computed inside ``forward`` it reaches the exported graph
as an ``Exp`` over constants, which the exporters fold differently (the TorchScript one with torch, the
dynamo one leaves it to ``export.fold``, i.e. ONNX Runtime, whose last bits differ and move the codes
of the quantized timestep layers). As a buffer built by torch it is the same constant for every
exporter and for the PyTorch simulation. ``sin``/``cos`` of the product stay in the graph.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalTimesteps(nn.Module):
    """The reference model's embedding: cos first (flip_sin_to_cos=True), frequencies exp(-ln 10⁴·i/half)."""

    def __init__(self, dim: int):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DiffusersTimesteps(nn.Module):
    """diffusers' ``Timesteps`` (``get_timestep_embedding``, max_period 10⁴) with its frequencies as a
    buffer; the same operations in the same order, so the same values bit for bit (tested)."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1):
        super().__init__()
        self.num_channels, self.flip_sin_to_cos, self.scale = num_channels, flip_sin_to_cos, scale
        self.half = num_channels // 2
        exponent = -math.log(10000) * torch.arange(start=0, end=self.half, dtype=torch.float32)
        exponent = exponent / (self.half - downscale_freq_shift)
        self.register_buffer("freqs", torch.exp(exponent), persistent=False)

    @classmethod
    def replacing(cls, module: nn.Module) -> nn.Module:
        """The buffer form of a diffusers ``Timesteps`` module; any other module is returned as it is."""
        needed = ("num_channels", "flip_sin_to_cos", "downscale_freq_shift", "scale")
        if type(module).__name__ != "Timesteps" or not all(hasattr(module, a) for a in needed):
            return module
        return cls(*(getattr(module, a) for a in needed))

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        emb = timesteps[:, None].float() * self.freqs[None, :]
        emb = self.scale * emb
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
        if self.flip_sin_to_cos:
            emb = torch.cat([emb[:, self.half:], emb[:, :self.half]], dim=-1)
        if self.num_channels % 2 == 1:
            emb = nn.functional.pad(emb, (0, 1, 0, 0))
        return emb


def set_timestep(model: nn.Module, t: float | torch.Tensor) -> None:
    """Run ``model``'s UNet at timestep ``t`` (a float: TRQ tunes it, ``quantface.calibration.qartsr``)
    instead of its configured integer one. Only the timestep embedding sees ``t``; the x0 conversion
    keeps ᾱ of the configured timestep. A tensor ``t`` (one element, float32) is used as it is, so a
    trained tensor carries its gradient; a float becomes a float32 constant."""
    from quantface.errors import ConfigError

    current = getattr(model, "timestep", None)
    if not isinstance(current, torch.Tensor):
        raise ConfigError(f"{type(model).__name__} has no fixed timestep to tune")
    if not isinstance(t, torch.Tensor):
        t = torch.tensor([float(t)], dtype=torch.float32, device=current.device)
    model.timestep = t.reshape(current.shape)


def model_timestep(model: nn.Module) -> float:
    """The timestep ``model`` runs its UNet at (``set_timestep``'s value, else the configured one)."""
    return float(model.timestep.detach().reshape(-1)[0])
