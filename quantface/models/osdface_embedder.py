"""OSDFace's visual representation embedder (VQ encoder → 77 codebook tokens) and its prompt
projection, as modules built from an ``EmbedderConfig`` (which ``from_state_dict`` reads off the
checkpoint's shapes; ``osdface_checkpoints.build_embedder`` loads them).

The input is resized to ``resolution`` and normalised as OSDFace does it (``(x − 0.5)/0.5`` applied to
the already [-1, 1] image); the tokens are the codebook entries of the first ``n_tokens`` distinct
nearest codes in order of distance (OSDFace's ``VectorQuantizer.inference``, written with tensor ops
so it traces to ONNX and runs per image in a batch). The 1×1 ``Conv1d`` projection is two
``nn.Linear`` layers (the same function), so it is quantized like every other layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantface.config import JsonConfig
from quantface.errors import ConfigError


@dataclass(frozen=True)
class EmbedderConfig(JsonConfig):
    """Shape of the visual representation embedder (defaults: OSDFace's ``vqvae_encoder``)."""

    resolution: int = 512
    in_channels: int = 3
    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 2, 2, 4, 8)
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = (5,)  # levels whose blocks are followed by attention (OSDFace: at 16×16)
    mid: bool = True
    z_channels: int = 512
    n_embed: int = 1024
    embed_dim: int = 512
    n_tokens: int = 77
    head_size: int = 1
    groups: int = 32
    proj_hidden: int = 256  # TwoLayerConv1x1(512, 1024): 512 → 256 → 1024
    context_dim: int = 1024

    @property
    def latent_side(self) -> int:
        return self.resolution // 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], proj: dict[str, torch.Tensor], **fixed) -> "EmbedderConfig":
        """The architecture the tensors describe (``sd``: encoder/quant_conv/quantize keys without
        prefix; ``proj``: conv1/conv2 of the projection); ``fixed``: resolution, n_tokens, head_size."""
        def get(key: str) -> torch.Tensor:
            if key not in sd:
                raise KeyError(key)
            return sd[key]

        ch = get("encoder.conv_in.weight").shape[0]
        levels = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
        blocks = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
        mult = tuple(get(f"encoder.down.{i}.block.0.conv2.weight").shape[0] // ch for i in range(levels))
        attn = tuple(i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in sd)
        codebook = get("quantize.embedding.weight")
        return cls(ch=ch, in_channels=get("encoder.conv_in.weight").shape[1], ch_mult=mult, num_res_blocks=blocks,
                   attn_levels=attn, mid="encoder.mid.block_1.conv1.weight" in sd,
                   z_channels=get("encoder.conv_out.weight").shape[0], n_embed=codebook.shape[0],
                   embed_dim=codebook.shape[1], proj_hidden=proj["conv1.weight"].shape[0],
                   context_dim=proj["conv2.weight"].shape[0], **fixed)


# --------------------------------------------------------------- the visual representation embedder
def _norm(c: EmbedderConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(c.groups, channels, eps=1e-6)


class _ResBlock(nn.Module):
    """GroupNorm → swish → conv3×3 → GroupNorm → swish → conv3×3, residual (1×1 ``nin_shortcut``)."""

    def __init__(self, c: EmbedderConfig, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(c, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class _AttnBlock(nn.Module):
    """Spatial self-attention with 1×1 conv q/k/v/proj_out (``MultiHeadAttnBlock``; its unused
    ``norm2`` is not built and its checkpoint tensors are skipped)."""

    def __init__(self, c: EmbedderConfig, channels: int):
        super().__init__()
        if channels % c.head_size:
            raise ConfigError(f"embedder attention: {channels} channels do not split into {c.head_size} heads")
        self.heads = c.head_size
        self.norm1 = _norm(c, channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, ch, hh, ww = x.shape
        h = self.norm1(x)

        def heads(t: torch.Tensor) -> torch.Tensor:  # (b, heads, hw, ch/heads)
            return t.reshape(b, self.heads, ch // self.heads, hh * ww).transpose(-1, -2)

        q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
        w = torch.softmax((q * (ch // self.heads) ** -0.5) @ k.transpose(-1, -2), dim=-1)
        out = (w @ v).transpose(-1, -2).reshape(b, ch, hh, ww)
        return x + self.proj_out(out)


class _Downsample(nn.Module):
    """Pad right/bottom by one, then conv3×3 stride 2 without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Level(nn.Module):
    def __init__(self, c: EmbedderConfig, i: int, cin: int, cout: int):
        super().__init__()
        self.block = nn.ModuleList(_ResBlock(c, cin if j == 0 else cout, cout) for j in range(c.num_res_blocks))
        self.attn = nn.ModuleList(_AttnBlock(c, cout) for _ in range(c.num_res_blocks) if i in c.attn_levels)
        self.downsample = _Downsample(cout) if i < len(c.ch_mult) - 1 else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[j](h)
        return h if self.downsample is None else self.downsample(h)


class _Mid(nn.Module):
    def __init__(self, c: EmbedderConfig, channels: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = _ResBlock(c, channels, channels), _AttnBlock(c, channels), \
            _ResBlock(c, channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class _VQEncoder(nn.Module):
    def __init__(self, c: EmbedderConfig):
        super().__init__()
        widths = [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList(_Level(c, i, c.ch if i == 0 else widths[i - 1], widths[i])
                                  for i in range(len(widths)))
        self.mid = _Mid(c, widths[-1]) if c.mid else None
        self.norm_out = _norm(c, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        if self.mid is not None:
            h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class _Codebook(nn.Module):
    def __init__(self, c: EmbedderConfig):
        super().__init__()
        self.embedding = nn.Embedding(c.n_embed, c.embed_dim)


class VisualEmbedder(nn.Module):
    """LQ image in [-1, 1] → (b, n_tokens, embed_dim) codebook tokens (OSDFace's VRE up to the projection).

    Token selection (``VectorQuantizer.inference``): every latent position's nearest codebook entry
    and its squared distance; positions sorted by that distance; the first ``n_tokens`` *distinct*
    codes in that order, their codebook vectors as the tokens (zero rows if fewer distinct codes
    exist). Done with argmin / sort / comparisons / cumsum / matmul so it traces to ONNX, per image."""

    def __init__(self, c: EmbedderConfig):
        super().__init__()
        self.config = c
        self.encoder = _VQEncoder(c)
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)
        self.quantize = _Codebook(c)
        n = c.latent_side ** 2
        self.register_buffer("earlier", torch.ones(n, n, dtype=torch.bool).tril(-1), persistent=False)
        self.register_buffer("slots", torch.arange(c.n_tokens)[None, :, None], persistent=False)

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        r = self.config.resolution
        x = lq if tuple(lq.shape[-2:]) == (r, r) else F.interpolate(lq, size=(r, r), mode="bilinear",
                                                                     align_corners=False)
        h = self.quant_conv(self.encoder((x - 0.5) / 0.5))  # OSDFace normalises the [-1, 1] input once more
        z = h.flatten(2).transpose(1, 2)  # (b, hw, c)
        codebook = self.quantize.embedding.weight
        d = (z**2).sum(2, keepdim=True) + (codebook**2).sum(1) - 2 * (z @ codebook.t())  # (b, hw, n_embed)
        dist, code = d.min(2)
        # Ascending sort as TopK (exports to ONNX). Exactly tied distances come from identical latent
        # vectors, which share their code, so their order cannot change the tokens.
        order = torch.topk(dist, dist.shape[1], dim=1, largest=False, sorted=True).indices
        codes = code.gather(1, order)  # nearest codes, closest positions first
        repeated = ((codes[:, :, None] == codes[:, None, :]) & self.earlier).any(2)
        first = ~repeated  # first occurrence of each code
        rank = first.long().cumsum(1) - 1
        pick = (first[:, None, :] & (rank[:, None, :] == self.slots)).to(z.dtype)  # (b, n_tokens, hw)
        return pick @ F.embedding(codes, codebook)


class PromptProjection(nn.Module):
    """OSDFace's ``TwoLayerConv1x1``: 1×1 Conv1d 512→256, SiLU, 1×1 Conv1d 256→1024, SiLU, over the
    tokens — as two Linear layers (the same function; the checkpoint's (out, in, 1) kernels are squeezed)."""

    def __init__(self, c: EmbedderConfig):
        super().__init__()
        self.conv1 = nn.Linear(c.embed_dim, c.proj_hidden)
        self.conv2 = nn.Linear(c.proj_hidden, c.context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.silu(self.conv2(F.silu(self.conv1(tokens))))
