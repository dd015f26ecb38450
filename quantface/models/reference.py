"""The embedded reference model: a small one-step diffusion face restorer with OSDFace's topology.

    LQ image ──► VAE encoder ──► z ──► UNet(z, t=399, tokens) ──► ε̂ ──► x0 = (z − √(1−ᾱ)·ε̂)/√ᾱ ──► VAE decoder ──► HQ
        └──────► visual prompt embedder ──► tokens (cross-attention context) ─┘

Everything is built from plain ``Conv2d``, ``Linear``, ``GroupNorm``, ``SiLU`` and hand-written
attention, so every weight layer is an ``nn.Conv2d`` or ``nn.Linear`` that the quantizers can wrap
and the exporter can lower one to one. The network is fully convolutional: it runs at any size
divisible by ``ReferenceConfig.size_multiple`` (16 with the defaults); tokens are the prompt
embedder's feature map at 1/16 of the input, so their number follows the input size.

Unlike OSDFace, which starts from Stable Diffusion's frozen VAE and UNet and trains LoRA on top, the
reference model is trained from scratch end to end (``quantface.train``): the point of this model is
to be a real, small network with the same structure for the quantization toolchain to work on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantface.config import JsonConfig
from quantface.errors import ConfigError
from quantface.models.timesteps import SinusoidalTimesteps
from quantface.points import ConstantPoint, Point

CONFIG_VERSION = 1


@dataclass(frozen=True)
class ReferenceConfig(JsonConfig):
    """Shape of the reference network; round-trips to JSON (``to_json`` / ``from_json``)."""

    version: int = CONFIG_VERSION
    image_channels: int = 3
    vae_channels: tuple[int, ...] = (32, 64, 96)  # encoder widths at 1, 1/2, 1/4 (decoder mirrors)
    latent_channels: int = 8
    unet_channels: tuple[int, ...] = (96, 128, 192)  # UNet widths at latent 1, 1/2, 1/4
    unet_attention: tuple[bool, ...] = (False, True, True)  # transformer block per UNet level
    attention_head_dim: int = 32
    context_dim: int = 128  # width of the prompt tokens
    prompt_channels: tuple[int, ...] = (32, 64, 96, 128)  # embedder widths, each level halves
    groups: int = 8  # GroupNorm groups
    timestep: int = 399
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    working_size: int = 128

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"reference config version {self.version} is not supported (expected {CONFIG_VERSION})")
        if len(self.unet_channels) != len(self.unet_attention):
            raise ConfigError("unet_channels and unet_attention must have the same length")
        if not 0 <= self.timestep < self.num_train_timesteps:
            raise ConfigError(f"timestep {self.timestep} is outside [0, {self.num_train_timesteps})")
        widths = (*self.vae_channels, *self.unet_channels, *self.prompt_channels)
        if any(c % self.groups for c in widths):
            raise ConfigError(f"every width must be divisible by groups={self.groups}")
        if self.working_size % self.size_multiple:
            raise ConfigError(f"working_size {self.working_size} is not a multiple of {self.size_multiple}")

    @property
    def size_multiple(self) -> int:
        """Input sides must be divisible by this (VAE and UNet down-sampling, prompt embedder)."""
        vae = 2 ** (len(self.vae_channels) - 1)
        unet = 2 ** (len(self.unet_channels) - 1)
        return max(vae * unet, 2 ** len(self.prompt_channels))

    @property
    def alpha_bar(self) -> float:
        """ᾱ_t of the scaled-linear schedule (Stable Diffusion's) at the fixed timestep."""
        betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, self.num_train_timesteps, dtype=torch.float64) ** 2
        return float(torch.cumprod(1.0 - betas, 0)[self.timestep])


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with quantizer points (``quantface.points``): while they are active, normalize →
    point → × γ → point → + β → point, the three ops of the QDQ graph's decomposition."""

    def __init__(self, groups: int, channels: int, eps: float = 1e-6):
        super().__init__(groups, channels, eps=eps)
        self.normalized, self.scaled, self.shifted = Point(), Point(), Point()
        self.gamma, self.beta = ConstantPoint(), ConstantPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.normalized.active:
            return super().forward(x)
        view = (1, -1) + (1,) * (x.dim() - 2)
        h = self.normalized(F.group_norm(x, self.num_groups, None, None, self.eps))
        h = self.scaled(h * self.gamma(self.weight).reshape(view))
        return self.shifted(h + self.beta(self.bias).reshape(view))


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with quantizer points, split as ``GroupNorm``'s while they are active."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.normalized, self.scaled, self.shifted = Point(), Point(), Point()
        self.gamma, self.beta = ConstantPoint(), ConstantPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.normalized.active:
            return super().forward(x)
        h = self.normalized(F.layer_norm(x, self.normalized_shape, None, None, self.eps))
        h = self.scaled(h * self.gamma(self.weight))
        return self.shifted(h + self.beta(self.bias))


class SiLU(nn.Module):
    """x · sigmoid(x); with active points, the sigmoid's output marked. The product needs no point of its
    own: every SiLU of the model feeds a quantized layer, whose input quantizer rounds it."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = Point()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gate.active:
            return F.silu(x)
        return x * self.gate(torch.sigmoid(x))


def _norm(config: ReferenceConfig, channels: int) -> GroupNorm:
    return GroupNorm(config.groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv3×3 (+ timestep projection) → GroupNorm → SiLU → conv3×3, residual."""

    def __init__(self, config: ReferenceConfig, cin: int, cout: int, temb_dim: int | None = None):
        super().__init__()
        self.norm1 = _norm(config, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, cout) if temb_dim else None
        self.norm2 = _norm(config, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.act1, self.act2 = SiLU(), SiLU()
        self.residual = Point()
        if temb_dim:
            self.temb, self.temb_added = ConstantPoint(), Point()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.act1(self.norm1(x)))
        if self.temb_proj is not None:  # the timestep path is input-independent: a constant of the graph
            h = self.temb_added(h + self.temb(self.temb_proj(F.silu(temb))[:, :, None, None]))
        h = self.conv2(self.act2(self.norm2(h)))
        return self.residual(h + (x if self.skip is None else self.skip(x)))


class Attention(nn.Module):
    """Multi-head attention with explicit q/k/v/out ``Linear`` layers (self- or cross-attention)."""

    def __init__(self, dim: int, context_dim: int, head_dim: int):
        super().__init__()
        self.heads = max(1, dim // head_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        # (the context product feeds to_out, whose input quantizer rounds it: no point of its own)
        self.scores, self.scaled, self.probs = Point(), Point(), Point()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], h, d // h).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        weights = self.probs(torch.softmax(self.scaled(self.scores(q @ k.transpose(-1, -2)) * (d // h) ** -0.5), dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(b, n, d)
        return self.to_out(out)


class TransformerBlock(nn.Module):
    """Stable Diffusion's spatial transformer, reduced: proj_in → self-attn → cross-attn → FF → proj_out."""

    def __init__(self, config: ReferenceConfig, dim: int):
        super().__init__()
        self.norm = _norm(config, dim)
        self.proj_in = nn.Linear(dim, dim)
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, dim, config.attention_head_dim)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, config.context_dim, config.attention_head_dim)
        self.norm3 = LayerNorm(dim)
        self.ff_in = nn.Linear(dim, 2 * dim)
        self.ff_out = nn.Linear(2 * dim, dim)
        self.proj_out = nn.Linear(dim, dim)
        self.added1, self.added2, self.added3, self.residual = Point(), Point(), Point(), Point()  # (GELU feeds ff_out)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (b, hw, c)
        h = self.proj_in(h)
        n1 = self.norm1(h)
        h = self.added1(h + self.attn1(n1, n1))
        h = self.added2(h + self.attn2(self.norm2(h), context))
        h = self.added3(h + self.ff_out(F.gelu(self.ff_in(self.norm3(h)))))
        h = self.proj_out(h)
        return self.residual(x + h.transpose(1, 2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """VAE-style encoder: image in [-1, 1] → latent at 1 / 2^(levels−1) resolution."""

    def __init__(self, config: ReferenceConfig):
        super().__init__()
        ch = config.vae_channels
        self.conv_in = nn.Conv2d(config.image_channels, ch[0], 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(config, ch[i], ch[i]) for i in range(len(ch)))
        self.downs = nn.ModuleList(Downsample(ch[i], ch[i + 1]) for i in range(len(ch) - 1))
        self.norm_out = _norm(config, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], config.latent_channels, 3, padding=1)
        self.act_out = SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        return self.conv_out(self.act_out(self.norm_out(h)))


class Decoder(nn.Module):
    """Mirror of the encoder: latent → image in [-1, 1] (not clamped; the pipeline clamps)."""

    def __init__(self, config: ReferenceConfig):
        super().__init__()
        ch = tuple(reversed(config.vae_channels))
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(config, ch[i], ch[i]) for i in range(len(ch)))
        self.ups = nn.ModuleList(Upsample(ch[i], ch[i + 1]) for i in range(len(ch) - 1))
        self.norm_out = _norm(config, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], config.image_channels, 3, padding=1)
        self.act_out = SiLU()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i < len(self.ups):
                h = self.ups[i](h)
        return self.conv_out(self.act_out(self.norm_out(h)))


class PromptEmbedder(nn.Module):
    """Visual prompt embedder: a small CNN of the LQ image whose 1/16 feature map becomes the tokens."""

    def __init__(self, config: ReferenceConfig):
        super().__init__()
        ch = config.prompt_channels
        layers: list[nn.Module] = []
        cin = config.image_channels
        for c in ch:
            layers += [nn.Conv2d(cin, c, 3, stride=2, padding=1), _norm(config, c), SiLU()]
            cin = c
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(ch[-1], config.context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x).flatten(2).transpose(1, 2))  # (b, tokens, context_dim)


class UNet(nn.Module):
    """Noise-prediction UNet: ResBlocks with timestep embedding, down/up-sampling, skip concatenation,
    and transformer blocks (self-attention + cross-attention to the prompt tokens) where configured."""

    def __init__(self, config: ReferenceConfig):
        super().__init__()
        ch, attn = config.unet_channels, config.unet_attention
        self.temb_dim = 4 * ch[0]
        self.time_proj: nn.Module = SinusoidalTimesteps(ch[0])
        self.time_in = nn.Linear(ch[0], self.temb_dim)
        self.time_out = nn.Linear(self.temb_dim, self.temb_dim)
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        levels = len(ch)
        self.down_blocks = nn.ModuleList(
            ResBlock(config, ch[max(i - 1, 0)], ch[i], self.temb_dim) for i in range(levels - 1)
        )
        self.down_attn = nn.ModuleList(
            TransformerBlock(config, ch[i]) if attn[i] else nn.Identity() for i in range(levels - 1)
        )
        self.downs = nn.ModuleList(Downsample(ch[i], ch[i]) for i in range(levels - 1))
        self.mid_block1 = ResBlock(config, ch[-2], ch[-1], self.temb_dim)
        self.mid_attn = TransformerBlock(config, ch[-1]) if attn[-1] else nn.Identity()
        self.mid_block2 = ResBlock(config, ch[-1], ch[-1], self.temb_dim)
        # Up path: level i receives the level below (ch[i+1]) upsampled, concatenated with skip i.
        self.ups = nn.ModuleList(Upsample(ch[i + 1], ch[i + 1]) for i in range(levels - 1))
        self.up_blocks = nn.ModuleList(
            ResBlock(config, ch[i + 1] + ch[i], ch[i], self.temb_dim) for i in range(levels - 1)
        )
        self.up_attn = nn.ModuleList(
            TransformerBlock(config, ch[i]) if attn[i] else nn.Identity() for i in range(levels - 1)
        )
        self.norm_out = _norm(config, ch[0])
        self.conv_out = nn.Conv2d(ch[0], config.latent_channels, 3, padding=1)
        self.act_out = SiLU()
        self.joined = nn.ModuleList(Point() for _ in range(levels - 1))  # the skip concatenations

    @staticmethod
    def _attend(block: nn.Module, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return h if isinstance(block, nn.Identity) else block(h, context)

    def forward(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        temb = self.time_out(F.silu(self.time_in(self.time_proj(t))))
        h = self.conv_in(z)
        skips = []
        for block, attn, down in zip(self.down_blocks, self.down_attn, self.downs):
            h = self._attend(attn, block(h, temb), context)
            skips.append(h)
            h = down(h)
        h = self.mid_block2(self._attend(self.mid_attn, self.mid_block1(h, temb), context), temb)
        for i in reversed(range(len(self.up_blocks))):
            h = self.joined[i](torch.cat([self.ups[i](h), skips[i]], dim=1))
            h = self._attend(self.up_attn[i], self.up_blocks[i](h, temb), context)
        return self.conv_out(self.act_out(self.norm_out(h)))


class ReferenceRestorer(nn.Module):
    """LQ image in [-1, 1], shape (b, 3, H, W) → restored image in [-1, 1] (same shape), one UNet step."""

    def __init__(self, config: ReferenceConfig | None = None):
        super().__init__()
        self.config = config or ReferenceConfig()
        self.encoder = Encoder(self.config)
        self.prompt_embedder = PromptEmbedder(self.config)
        self.unet = UNet(self.config)
        self.decoder = Decoder(self.config)
        alpha_bar = self.config.alpha_bar
        # Buffers rather than Python floats so they travel with .to(device) and export as constants.
        self.register_buffer("timestep", torch.tensor([self.config.timestep], dtype=torch.long), persistent=False)
        self.register_buffer("sqrt_alpha_bar", torch.tensor(alpha_bar**0.5), persistent=False)
        self.register_buffer("sqrt_one_minus_alpha_bar", torch.tensor((1.0 - alpha_bar) ** 0.5), persistent=False)
        # x0's float ops (scalar constants: stored exactly, see quantface.points.constant_codes); the
        # division feeds the decoder's first layer, whose input quantizer rounds it
        self.noise_scaled, self.denoised = Point(), Point()

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        m = self.config.size_multiple
        if lq.shape[-1] % m or lq.shape[-2] % m:
            raise ConfigError(f"input size {tuple(lq.shape[-2:])} is not divisible by {m}")
        z = self.encoder(lq)
        context = self.prompt_embedder(lq)
        eps = self.unet(z, self.timestep.expand(lq.shape[0]), context)
        x0 = self.denoised(z - self.noise_scaled(self.sqrt_one_minus_alpha_bar * eps)) / self.sqrt_alpha_bar
        return self.decoder(x0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["ReferenceConfig", "ReferenceRestorer", "count_parameters"]
