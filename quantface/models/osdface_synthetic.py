"""Synthetic OSDFace checkpoints: random weights written in exactly the layouts ``load_osdface`` reads.

For tests (a tiny UNet/VAE) and ``tools/bench_osdface_scale.py`` (the full SD 2.1-base sizes), where
the real checkpoints cannot be downloaded. ``write_checkpoints(root, ...)`` makes::

    root/sd/unet/{config.json, diffusion_pytorch_model.safetensors}     (diffusers save_pretrained)
    root/sd/vae/{config.json, diffusion_pytorch_model.safetensors}
    root/sd/scheduler/scheduler_config.json
    root/osdface/pytorch_lora_weights.safetensors   LoRA on the UNet (PEFT, diffusers-old or kohya keys)
    root/osdface/embedding_change_weights.pth       TwoLayerConv1x1 state dict, Conv1d (out, in, 1) kernels
    root/osdface/associate_2.ckpt                   {"state_dict": {"vqvae_LQ.encoder.…", …}} plus tensors
                                                    the loader must skip (decoder, attention norm2, HQ branch)

Everything is seeded. Needs ``diffusers``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quantface.models.osdface_checkpoints import _diffusers
from quantface.models.osdface_embedder import EmbedderConfig, PromptProjection, VisualEmbedder, _AttnBlock

# SD 2.1-base's scheduler_config.json (diffusers layout): PNDM with the scaled-linear betas.
SD21_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                  "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True,
                  "steps_offset": 1, "trained_betas": None}
# OSDFace's LoRA target modules are not published with its inference code; these are the usual
# OSEDiff/OSDFace-style targets (attention, feed-forward, transformer projections, ResNet convs).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "conv_shortcut")
LORA_FORMATS = ("peft", "diffusers", "kohya")


def lora_tensors(unet: nn.Module, rank: int, seed: int, fmt: str = "peft", alpha: float | None = None,
                 targets: tuple[str, ...] = LORA_TARGETS, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Random LoRA factors for every Linear / Conv2d of ``unet`` whose name ends with a target, in
    the key layout ``fmt`` (``alpha`` adds per-layer ``.alpha`` tensors, kohya style)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, m in unet.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or not any(name == t or name.endswith("." + t) for t in targets):
            continue
        w = m.weight
        down = torch.randn((rank, *w.shape[1:]), generator=g) * std
        up = torch.randn((w.shape[0], rank, *([1, 1] if w.dim() == 4 else [])), generator=g) * std
        if fmt == "peft":
            keys = (f"unet.{name}.lora_A.weight", f"unet.{name}.lora_B.weight", f"unet.{name}.alpha")
        elif fmt == "diffusers":
            keys = (f"unet.{name}.lora.down.weight", f"unet.{name}.lora.up.weight", f"unet.{name}.alpha")
        elif fmt == "kohya":
            flat = "lora_unet_" + name.replace(".", "_")
            keys = (f"{flat}.lora_down.weight", f"{flat}.lora_up.weight", f"{flat}.alpha")
        else:
            raise ValueError(f"unknown LoRA format {fmt!r}; one of {LORA_FORMATS}")
        out[keys[0]], out[keys[1]] = down.contiguous(), up.contiguous()
        if alpha is not None:
            out[keys[2]] = torch.tensor(float(alpha))
    return out


def embedder_checkpoint(config: EmbedderConfig, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(associate checkpoint state dict, projection state dict) of a random embedder, in OSDFace's
    key layout and shapes."""
    torch.manual_seed(seed)
    embedder, projection = VisualEmbedder(config), PromptProjection(config)
    with torch.no_grad():  # OSDFace's codebook init is uniform(±1/n); spread it so codes differ
        embedder.quantize.embedding.weight.normal_(0.0, 1.0)
    sd = {f"vqvae_LQ.{k}": v.clone() for k, v in embedder.state_dict().items()}
    for name, m in embedder.named_modules():
        if isinstance(m, _AttnBlock):
            c = m.norm1.num_channels
            sd[f"vqvae_LQ.{name}.norm2.weight"], sd[f"vqvae_LQ.{name}.norm2.bias"] = torch.ones(c), torch.zeros(c)
    sd["vqvae_LQ.decoder.conv_in.weight"] = torch.zeros(4, config.z_channels, 3, 3)  # skipped: decoder
    sd["vqvae_HQ.quant_conv.weight"] = torch.zeros(2, 2, 1, 1)  # skipped: another branch
    proj = {k: (v[..., None] if k.endswith("weight") else v).clone() for k, v in projection.state_dict().items()}
    return sd, proj


def write_checkpoints(root: str | Path, unet_config: dict, vae_config: dict, embedder: EmbedderConfig, seed: int = 0,
                      lora_rank: int = 4, lora_format: str = "peft", lora_alpha: float | None = None,
                      scheduler_config: dict | None = None) -> tuple[Path, Path]:
    """Write random SD + OSDFace checkpoints under ``root``; returns (sd_path, osdface_ckpt)."""
    from safetensors.torch import save_file

    d = _diffusers()
    root = Path(root)
    sd_path, ckpt = root / "sd", root / "osdface"
    torch.manual_seed(seed)
    unet = d.UNet2DConditionModel(**unet_config)
    unet.save_pretrained(str(sd_path / "unet"), safe_serialization=True)
    lora = lora_tensors(unet, lora_rank, seed + 1, lora_format, lora_alpha)
    del unet
    torch.manual_seed(seed + 2)
    d.AutoencoderKL(**vae_config).save_pretrained(str(sd_path / "vae"), safe_serialization=True)
    (sd_path / "scheduler").mkdir(parents=True, exist_ok=True)
    (sd_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config or SD21_SCHEDULER))
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file(lora, str(ckpt / "pytorch_lora_weights.safetensors"))
    assoc, proj = embedder_checkpoint(embedder, seed + 3)
    torch.save({"state_dict": assoc, "epoch": 1}, ckpt / "associate_2.ckpt")
    torch.save(proj, ckpt / "embedding_change_weights.pth")
    return sd_path, ckpt


__all__ = ["LORA_FORMATS", "LORA_TARGETS", "SD21_SCHEDULER", "embedder_checkpoint", "lora_tensors",
           "write_checkpoints"]
