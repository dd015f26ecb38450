"""The real OSDFace model (Wang et al., CVPR 2025) from its released checkpoints, for the toolchain.

    LQ ──► SD VAE encoder (posterior mean × scaling factor) ──► z ──► SD UNet + LoRA (t = 399) ──► ε̂
     │                                                                  ▲ cross-attention context
     └──► visual representation embedder (VQ encoder → 77 codebook tokens) → 1×1 projection ──┘
    x0 = (z − √(1−ᾱ₃₉₉)·ε̂)/√ᾱ₃₉₉ ──► SD VAE decoder (x0 / scaling factor) ──► restored

``load_osdface(spec)`` builds it from two folders:

* ``sd_path``: Stable Diffusion 2.1-base in diffusers layout (``unet/``, ``vae/``, ``scheduler/``);
  UNet2DConditionModel and AutoencoderKL come from ``diffusers`` (the optional extra
  ``pip install .[osdface]``; nothing else in quantface imports it), ᾱ from the scheduler config.
* ``osdface_ckpt``: OSDFace's ``pretrained/`` folder: ``pytorch_lora_weights.safetensors`` (UNet
  LoRA, merged into the UNet's conv and linear weights with scale alpha/rank),
  ``embedding_change_weights.pth`` (the 1×1 projection 512 → 1024 of the visual prompt) and
  ``associate_2.ckpt`` (the VQ encoder of the visual representation embedder, keys
  ``state_dict/vqvae_LQ.{encoder,quant_conv,quantize}.*``).

What follows OSDFace's ``infer.py`` / ``lq_embed`` and what this module assumes is in
docs/osdface.md. In short: the embedder is rebuilt from the shapes of its checkpoint (channel
widths, levels, residual blocks, attention levels, codebook size), its input is resized to 512×512
and normalised as OSDFace does it (``(x − 0.5)/0.5`` applied to the already [-1, 1] image), the
77 tokens are the codebook entries of the first 77 distinct nearest codes in order of distance
(OSDFace's ``VectorQuantizer.inference``, written with tensor ops so it traces to ONNX and runs
per image in a batch), and the VAE latent is the posterior *mean* (OSDFace samples it; the SD
VAE's posterior standard deviation is tiny and a deterministic model is what calibration needs).
The 1×1 ``Conv1d`` projection is loaded into ``nn.Linear`` layers (the same function), so it is
quantized like every other layer.

Loading is safe: safetensors, or ``torch.load(weights_only=True)`` for ``.pth``/``.ckpt``/``.bin``;
a checkpoint that would need code unpickled is refused with one sentence naming the file.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from quantface.config import JsonConfig
from quantface.errors import ConfigError, WeightsError
from quantface.models.timesteps import DiffusersTimesteps

EXTRA = "osdface"
LORA_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "pytorch_lora_weights.bin")
PROJECTION_FILES = ("embedding_change_weights.safetensors", "embedding_change_weights.pth", "embedding_change.pth")
EMBEDDER_FILES = ("associate_2.safetensors", "associate_2.ckpt", "associate_2.pth")
EMBEDDER_PREFIX = "vqvae_LQ."  # OSDFace keeps the LQ branch of an associate (DAEFR-style) checkpoint
EMBEDDER_PARTS = ("encoder.", "quant_conv.", "quantize.")


# ------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class OSDFaceSpec(JsonConfig):
    """Where the checkpoints are and the few choices a checkpoint cannot tell. Travels as the model's
    ``weights`` string (JSON, see ``osdface_weights``) through ModelSpec, CalibConfig and ExportConfig."""

    sd_path: str = ""
    osdface_ckpt: str = ""
    lora_alpha: float | None = None  # None: from the LoRA file (alpha tensors, metadata), else alpha = rank
    embedder_weights: str | None = None  # default: the first of EMBEDDER_FILES in osdface_ckpt
    embedder_resolution: int = 512  # the embedder resizes its input to this (OSDFace: 512)
    embedder_head_size: int = 1  # heads of the embedder's attention blocks (OSDFace: 1)
    n_tokens: int = 77  # visual prompt tokens (OSDFace: 77, the length of a CLIP prompt)
    timestep: int = 399
    working_size: int = 512
    gradient_checkpointing: bool = True  # UNet/VAE recompute activations in backward (calibration memory)

    def __post_init__(self) -> None:
        if not self.sd_path or not self.osdface_ckpt:
            raise ConfigError("model osdface needs both --sd-path and --osdface-ckpt")
        for name in ("embedder_resolution", "embedder_head_size", "n_tokens", "working_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"osdface {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"osdface lora_alpha must be positive, got {self.lora_alpha!r}")


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


@dataclass(frozen=True)
class OSDFaceConfig(JsonConfig):
    """What the pipeline, calibration and export read (``working_size``, ``size_multiple``,
    ``image_channels``), plus what the checkpoints determined; stored in every recipe."""

    image_channels: int = 3
    working_size: int = 512
    timestep: int = 399
    alpha_bar: float = 0.0  # ᾱ_t of the scheduler, as diffusers computes it (float32)
    scaling_factor: float = 0.18215  # VAE latent scaling
    vae_factor: int = 8  # VAE down-sampling
    unet_factor: int = 8  # UNet down-sampling
    lora_layers: int = 0  # UNet layers a LoRA delta was merged into
    sd_path: str = ""
    osdface_ckpt: str = ""
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)

    @property
    def size_multiple(self) -> int:
        return self.vae_factor * self.unet_factor


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


# -------------------------------------------------------------------------------------- the model
class OSDFaceRestorer(nn.Module):
    """LQ face in [-1, 1], (b, 3, H, W) → restored face in [-1, 1] (same shape, not clamped; the
    pipeline clamps), one UNet step. Same interface as ``ReferenceRestorer``."""

    def __init__(self, config: OSDFaceConfig, unet: nn.Module, vae: nn.Module, embedder: VisualEmbedder,
                 prompt_proj: PromptProjection):
        super().__init__()
        self.config = config
        self.vae, self.unet, self.embedder, self.prompt_proj = vae, unet, embedder, prompt_proj
        if hasattr(unet, "time_proj"):  # the frequencies as a torch-built buffer (models.timesteps)
            unet.time_proj = DiffusersTimesteps.replacing(unet.time_proj)
        a = config.alpha_bar
        self.register_buffer("timestep", torch.tensor([config.timestep], dtype=torch.long), persistent=False)
        self.register_buffer("sqrt_alpha_bar", torch.tensor(a**0.5), persistent=False)
        self.register_buffer("sqrt_one_minus_alpha_bar", torch.tensor((1.0 - a) ** 0.5), persistent=False)

    def encode(self, lq: torch.Tensor) -> torch.Tensor:
        """Scaled latent: the VAE posterior mean × scaling factor."""
        moments = self.vae.encoder(lq)
        if getattr(self.vae, "quant_conv", None) is not None:
            moments = self.vae.quant_conv(moments)
        return moments[:, : moments.shape[1] // 2] * self.config.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z / self.config.scaling_factor
        if getattr(self.vae, "post_quant_conv", None) is not None:
            z = self.vae.post_quant_conv(z)
        return self.vae.decoder(z)

    def prompt(self, lq: torch.Tensor) -> torch.Tensor:
        return self.prompt_proj(self.embedder(lq))

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        m = self.config.size_multiple
        if lq.shape[-1] % m or lq.shape[-2] % m:
            raise ConfigError(f"input size {tuple(lq.shape[-2:])} is not divisible by {m}")
        z = self.encode(lq)
        eps = self.unet(z, self.timestep.expand(lq.shape[0]), encoder_hidden_states=self.prompt(lq),
                        return_dict=False)[0]
        x0 = (z - self.sqrt_one_minus_alpha_bar * eps) / self.sqrt_alpha_bar
        return self.decode(x0)


# --------------------------------------------------------------------------------- safe loading
def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise WeightsError(f"model osdface needs the diffusers package: pip install -e '.[{EXTRA}]' "
                           f"(or quantface[{EXTRA}])") from None
    return diffusers


def _torch_load(path: Path) -> object:
    """torch.load with weights_only=True (memory-mapped when the file allows it)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(f"checkpoint {path} contains pickled Python objects beyond tensors and is refused "
                           f"(weights_only loading); convert it to safetensors as docs/osdface.md shows") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise WeightsError(f"checkpoint {path} is unreadable or truncated: {str(exc).splitlines()[0]}") from None


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a checkpoint file, nothing unpickled. A torch checkpoint's
    nested ``state_dict`` is unwrapped; non-tensor entries are dropped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"checkpoint {path} is unreadable or truncated: {exc}") from None
    obj = _torch_load(path)
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"checkpoint {path} holds a {type(obj).__name__}, not a dictionary of tensors")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}, {}


def _find(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"{what} not found in {folder} (looked for {', '.join(names)})")


def _strip_module(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in sd.items()}


# ---------------------------------------------------------------------------------- LoRA merging
_LORA_PATTERNS = [
    # PEFT / diffusers ≥ 0.25: <module>.lora_A[.<adapter>].weight, lora_B
    (re.compile(r"^(?P<m>.+)\.lora_(?P<p>[AB])(?:\.[^.]+)?\.weight$"), {"A": "down", "B": "up"}),
    # diffusers LoRACompatible layers: <module>.lora.down.weight / .lora.up.weight
    (re.compile(r"^(?P<m>.+)\.lora\.(?P<p>down|up)\.weight$"), {"down": "down", "up": "up"}),
    # diffusers attention processors: <attn>.processor.to_q_lora.down.weight, to_out_lora → to_out.0
    (re.compile(r"^(?P<m>.+)\.processor\.(?P<t>to_q|to_k|to_v|to_out)_lora\.(?P<p>down|up)\.weight$"),
     {"down": "down", "up": "up"}),
    # kohya / A1111: lora_unet_<module with _>.lora_down.weight / .lora_up.weight (+ .alpha)
    (re.compile(r"^(?P<m>lora_unet_.+?)\.lora_(?P<p>down|up)\.weight$"), {"down": "down", "up": "up"}),
]
_ALPHA = re.compile(r"^(?P<m>.+?)(?:\.processor\.(?P<t>to_q|to_k|to_v|to_out)_lora)?\.alpha$")
_PREFIXES = ("base_model.model.", "unet.", "model.")


def _module_name(raw: str, flat: dict[str, str]) -> str | None:
    for prefix in _PREFIXES:
        raw = raw.removeprefix(prefix)
    if raw.startswith("lora_unet_"):
        return flat.get(raw[len("lora_unet_"):])
    return raw


def _pattern_value(patterns: dict, module: str):
    """PEFT's rank/alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _lora_settings(metadata: dict[str, str], folder: Path) -> dict:
    """lora_alpha / alpha_pattern / use_rslora from the safetensors metadata diffusers writes
    (``lora_adapter_metadata``, keys prefixed ``unet.``) or a PEFT ``adapter_config.json``."""
    settings: dict = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError:
            meta = {}
        settings = {k.removeprefix("unet."): v for k, v in meta.items() if not k.startswith("text_encoder")}
    elif (folder / "adapter_config.json").is_file():
        try:
            settings = json.loads((folder / "adapter_config.json").read_text())
        except json.JSONDecodeError as exc:
            raise WeightsError(f"{folder / 'adapter_config.json'} is not valid JSON ({exc})") from None
    return settings if isinstance(settings, dict) else {}


def merge_lora(unet: nn.Module, tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None,
               alpha: float | None = None) -> int:
    """Merge every LoRA pair of ``tensors`` into ``unet``'s weights in place: W += (alpha/rank)·up·down
    (alpha/√rank with rsLoRA); returns how many layers changed. ``alpha`` overrides the file's
    (``.alpha`` tensors, then metadata / adapter_config.json); without any, alpha = rank (scale 1,
    OSDFace's lora_alpha = lora_rank = 16)."""
    modules = dict(unet.named_modules())
    flat = {name.replace(".", "_"): name for name in modules}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, value in tensors.items():
        m = _ALPHA.match(key)
        if m and not key.endswith(".weight"):
            name = _module_name(m.group("m"), flat)
            if m.group("t") and name:
                name = f"{name}.{m.group('t')}" + (".0" if m.group("t") == "to_out" else "")
            if name is None:
                raise WeightsError(f"LoRA file {path}: {key} names no layer of the UNet")
            alphas[name] = float(value.reshape(-1)[0])
            continue
        for pattern, roles in _LORA_PATTERNS:
            m = pattern.match(key)
            if m:
                name = _module_name(m.group("m"), flat)
                if name is not None and "t" in m.groupdict() and m.group("t"):
                    name = f"{name}.{m.group('t')}" + (".0" if m.group("t") == "to_out" else "")
                if name is None or name not in modules:
                    raise WeightsError(f"LoRA file {path}: {key} names no layer of the UNet")
                pairs.setdefault(name, {})[roles[m.group("p")]] = value
                break
        else:
            raise WeightsError(f"LoRA file {path}: tensor {key} is not in a LoRA layout this loader knows "
                               "(PEFT lora_A/lora_B, diffusers lora.down/up, kohya lora_unet_*)")
    if not pairs:
        raise WeightsError(f"LoRA file {path} holds no LoRA tensors")
    settings = _lora_settings(metadata or {}, path.parent)
    rslora = bool(settings.get("use_rslora", False))
    merged = 0
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"down", "up"}:
            raise WeightsError(f"LoRA file {path}: layer {name} has a {next(iter(pair))} matrix but not its partner")
        layer = modules[name]
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise WeightsError(f"LoRA file {path}: {name} is a {type(layer).__name__}, not a Linear or Conv2d")
        down, up = pair["down"].double(), pair["up"].double()
        rank = down.shape[0]
        w = layer.weight
        if up.flatten(1).shape != (w.shape[0], rank) or down[0].numel() != w[0].numel():
            raise WeightsError(f"LoRA file {path}: layer {name} has LoRA shapes {tuple(down.shape)} / "
                               f"{tuple(up.shape)} that do not fit its weight {tuple(w.shape)}")
        a = alpha
        if a is None:
            a = alphas.get(name)
        if a is None:
            a = _pattern_value(settings.get("alpha_pattern"), name)
        if a is None:
            a = settings.get("lora_alpha")
        scale = 1.0 if a is None else float(a) / (math.sqrt(rank) if rslora else rank)
        delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape) * scale
        with torch.no_grad():
            w.add_(delta.to(w.dtype))
        merged += 1
    return merged


# ------------------------------------------------------------------------------------------- build
def osdface_weights(sd_path: str | Path, osdface_ckpt: str | Path, **options) -> str:
    """The ``weights`` string that selects these checkpoints for ``load_model('osdface', weights)``
    (a JSON object; folders made absolute so a recipe or config stays valid from elsewhere)."""
    spec = OSDFaceSpec(sd_path=str(Path(sd_path).expanduser().resolve()),
                       osdface_ckpt=str(Path(osdface_ckpt).expanduser().resolve()), **options)
    return json.dumps(spec.to_dict(), sort_keys=True)


def parse_spec(weights: str | Path | None) -> OSDFaceSpec:
    """``weights`` as given to ``load_model('osdface', ...)``: the JSON of ``osdface_weights`` or a
    .json file holding it."""
    if weights is None:
        raise ConfigError("model osdface needs both --sd-path and --osdface-ckpt")
    text = str(weights).strip()
    if not text.startswith("{"):
        path = Path(text)
        if path.suffix != ".json" or not path.is_file():
            raise ConfigError(f"model osdface takes --sd-path and --osdface-ckpt (or a JSON spec), "
                              f"not weights {text!r}")
        text = path.read_text()
    return OSDFaceSpec.from_json(text)


def _check_sd_folder(sd: Path) -> None:
    if not sd.is_dir():
        raise WeightsError(f"Stable Diffusion folder {sd} does not exist")
    parts = (("unet", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
             ("vae", ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
             ("scheduler", ("scheduler_config.json",)))
    for sub, _ in parts:
        if not (sd / sub).is_dir():
            raise WeightsError(f"Stable Diffusion folder {sd} has no {sub}/ subfolder (diffusers layout expected)")
    for sub, files in parts:
        if sub != "scheduler" and not (sd / sub / "config.json").is_file():
            raise WeightsError(f"Stable Diffusion folder {sd / sub} has no config.json")
        if not any((sd / sub / f).is_file() for f in files):
            raise WeightsError(f"Stable Diffusion folder {sd / sub} has none of {', '.join(files)}")


def _from_pretrained(cls, folder: Path, sub: str):
    from diffusers.utils import is_accelerate_available

    kwargs = dict(subfolder=sub, local_files_only=True, low_cpu_mem_usage=is_accelerate_available())
    if (folder / sub / "diffusion_pytorch_model.safetensors").is_file():
        kwargs["use_safetensors"] = True
    try:
        return cls.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:
        raise WeightsError(f"cannot load {folder / sub} with diffusers {cls.__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def scheduler_alpha_bar(scheduler_config: dict, timestep: int) -> float:
    """ᾱ_t as OSDFace reads it: ``DDIMScheduler(config).alphas_cumprod[t]`` (float32 arithmetic)."""
    sched = _diffusers().DDIMScheduler.from_config(scheduler_config)  # other schedulers' keys are ignored
    if not 0 <= timestep < len(sched.alphas_cumprod):
        raise ConfigError(f"timestep {timestep} is outside the scheduler's {len(sched.alphas_cumprod)} steps")
    return float(sched.alphas_cumprod[timestep])


def _embedder_tensors(path: Path) -> dict[str, torch.Tensor]:
    raw, _ = load_tensors(path)
    raw = _strip_module(raw)
    if any(k.startswith(EMBEDDER_PREFIX) for k in raw):
        raw = {k[len(EMBEDDER_PREFIX):]: v for k, v in raw.items() if k.startswith(EMBEDDER_PREFIX)}
    sd = {k: v for k, v in raw.items() if k.startswith(EMBEDDER_PARTS)}
    # MultiHeadAttnBlock.norm2 exists in the checkpoint but self-attention never uses it.
    return {k: v for k, v in sd.items() if not re.search(r"attn(_1|\.\d+)\.norm2\.", k)}


def _projection_tensors(path: Path) -> dict[str, torch.Tensor]:
    sd = _strip_module(load_tensors(path)[0])
    needed = ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias")
    missing = [k for k in needed if k not in sd]
    if missing or len(sd) != len(needed):
        raise WeightsError(f"projection checkpoint {path} does not hold TwoLayerConv1x1 weights (conv1, conv2): "
                           f"found {', '.join(sorted(sd)[:4]) or 'no tensors'}")
    return {k: (v[..., 0] if v.dim() == 3 else v) for k, v in sd.items()}


def _load_strict(module: nn.Module, sd: dict[str, torch.Tensor], path: Path, what: str) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in sd.items()}
    if expected != found:
        missing = sorted(expected.keys() - found.keys())
        unexpected = sorted(found.keys() - expected.keys())
        reshaped = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
        first = (missing or unexpected or reshaped)[0]
        raise WeightsError(f"{what} checkpoint {path} does not fit the {what}: {len(missing)} missing, "
                           f"{len(unexpected)} unexpected and {len(reshaped)} differently shaped tensors "
                           f"(first: {first})")
    module.load_state_dict(sd)


def build_embedder(spec: OSDFaceSpec, embedder_path: Path, projection_path: Path
                   ) -> tuple[VisualEmbedder, PromptProjection]:
    sd, proj = _embedder_tensors(embedder_path), _projection_tensors(projection_path)
    if "encoder.conv_in.weight" not in sd or not any(k.startswith("encoder.down.0.block.") for k in sd):
        raise WeightsError(f"embedder checkpoint {embedder_path} holds no VQ encoder tensors "
                           f"({EMBEDDER_PREFIX}encoder.conv_in, encoder.down.*, quant_conv, quantize)")
    try:
        config = EmbedderConfig.from_state_dict(sd, proj, resolution=spec.embedder_resolution, n_tokens=spec.n_tokens,
                                                head_size=spec.embedder_head_size)
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"embedder checkpoint {embedder_path} lacks the VQ encoder tensors "
                           f"({EMBEDDER_PREFIX}encoder/quant_conv/quantize; missing {exc})") from None
    if config.resolution % 2 ** (len(config.ch_mult) - 1):
        raise ConfigError(f"embedder resolution {config.resolution} is not divisible by its down-sampling "
                          f"{2 ** (len(config.ch_mult) - 1)}")
    embedder, projection = VisualEmbedder(config), PromptProjection(config)
    _load_strict(embedder, sd, embedder_path, "embedder")
    _load_strict(projection, proj, projection_path, "projection")
    return embedder, projection


def assemble(unet: nn.Module, vae: nn.Module, embedder: VisualEmbedder, projection: PromptProjection,
             alpha_bar: float, spec: OSDFaceSpec | None = None, lora_layers: int = 0) -> OSDFaceRestorer:
    """The restorer from built parts (also how tools build one with random weights)."""
    spec = spec or OSDFaceSpec(sd_path="-", osdface_ckpt="-")
    ctx = unet.config.cross_attention_dim
    ctx = ctx[0] if isinstance(ctx, (list, tuple)) else ctx
    if embedder.config.context_dim != ctx:
        raise WeightsError(f"the prompt projection gives {embedder.config.context_dim}-wide tokens but the UNet's "
                           f"cross-attention takes {ctx}")
    if vae.config.latent_channels != unet.config.in_channels:
        raise WeightsError(f"the VAE has {vae.config.latent_channels} latent channels, the UNet takes "
                           f"{unet.config.in_channels}")
    config = OSDFaceConfig(
        image_channels=vae.config.in_channels, working_size=spec.working_size, timestep=spec.timestep,
        alpha_bar=alpha_bar, scaling_factor=float(vae.config.scaling_factor),
        vae_factor=2 ** (len(vae.config.block_out_channels) - 1),
        unet_factor=2 ** (len(unet.config.down_block_types) - 1), lora_layers=lora_layers,
        sd_path=spec.sd_path, osdface_ckpt=spec.osdface_ckpt, embedder=embedder.config)
    if config.working_size % config.size_multiple:
        raise ConfigError(f"working size {config.working_size} is not a multiple of {config.size_multiple}")
    if spec.gradient_checkpointing:
        for part in (unet, vae):
            part.enable_gradient_checkpointing()
    return OSDFaceRestorer(config, unet, vae, embedder, projection).eval()


def load_osdface(weights: str | Path | None) -> OSDFaceRestorer:
    """The OSDFace model ``weights`` (see ``parse_spec``) selects, in eval mode, LoRA merged."""
    spec = parse_spec(weights)
    sd_path, ckpt = Path(spec.sd_path), Path(spec.osdface_ckpt)
    _check_sd_folder(sd_path)
    if not ckpt.is_dir():
        raise WeightsError(f"OSDFace checkpoint folder {ckpt} does not exist")
    lora_path = _find(ckpt, LORA_FILES, "OSDFace LoRA weights")
    projection_path = _find(ckpt, PROJECTION_FILES, "OSDFace prompt projection weights")
    embedder_path = Path(spec.embedder_weights) if spec.embedder_weights else \
        _find(ckpt, EMBEDDER_FILES, "OSDFace visual representation embedder weights")
    embedder, projection = build_embedder(spec, embedder_path, projection_path)
    d = _diffusers()
    try:
        scheduler_config = json.loads((sd_path / "scheduler" / "scheduler_config.json").read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{sd_path / 'scheduler' / 'scheduler_config.json'} is not valid JSON ({exc})") from None
    alpha_bar = scheduler_alpha_bar(scheduler_config, spec.timestep)
    unet = _from_pretrained(d.UNet2DConditionModel, sd_path, "unet")
    vae = _from_pretrained(d.AutoencoderKL, sd_path, "vae")
    tensors, metadata = load_tensors(lora_path)
    merged = merge_lora(unet, tensors, lora_path, metadata, spec.lora_alpha)
    del tensors
    return assemble(unet.float(), vae.float(), embedder, projection, alpha_bar, spec, merged)


__all__ = ["EmbedderConfig", "OSDFaceConfig", "OSDFaceRestorer", "OSDFaceSpec", "PromptProjection", "VisualEmbedder",
           "assemble", "load_osdface", "load_tensors", "merge_lora", "osdface_weights", "parse_spec",
           "scheduler_alpha_bar"]
