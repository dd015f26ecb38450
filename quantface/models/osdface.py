"""The real OSDFace model (Wang et al., CVPR 2025) from its released checkpoints, for the toolchain.

    LQ ──► SD VAE encoder (posterior mean × scaling factor) ──► z ──► SD UNet + LoRA (t = 399) ──► ε̂
     │                                                                  ▲ cross-attention context
     └──► visual representation embedder (VQ encoder → 77 codebook tokens) → 1×1 projection ──┘
    x0 = (z − √(1−ᾱ₃₉₉)·ε̂)/√ᾱ₃₉₉ ──► SD VAE decoder (x0 / scaling factor) ──► restored

``load_osdface(spec)`` builds it from two folders (``OSDFaceSpec``: Stable Diffusion 2.1-base in
diffusers layout and OSDFace's ``pretrained/`` folder). Three modules:

* ``osdface_embedder``: the visual representation embedder and the prompt projection (modules);
* ``osdface_checkpoints``: the spec, safe checkpoint reading, LoRA merging, building the parts;
* this one: the restorer and its assembly from the parts (``assemble``, ``load_osdface``).

What follows OSDFace's ``infer.py`` / ``lq_embed`` and what these modules assume is in
docs/osdface.md. In short: the embedder is rebuilt from the shapes of its checkpoint (channel
widths, levels, residual blocks, attention levels, codebook size), and the VAE latent is the
posterior *mean* (OSDFace samples it; the SD VAE's posterior standard deviation is tiny and a
deterministic model is what calibration needs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quantface.config import JsonConfig
from quantface.errors import ConfigError, WeightsError
from quantface.models.osdface_checkpoints import (EMBEDDER_FILES, LORA_FILES, PROJECTION_FILES, OSDFaceSpec,
                                                  _check_sd_folder, _diffusers, _find, _from_pretrained,
                                                  build_embedder, load_tensors, merge_lora, osdface_weights,
                                                  parse_spec, scheduler_alpha_bar)
from quantface.models.osdface_embedder import EmbedderConfig, PromptProjection, VisualEmbedder
from quantface.models.timesteps import DiffusersTimesteps


# ------------------------------------------------------------------------------------- configs
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


# ------------------------------------------------------------------------------------------- build
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
