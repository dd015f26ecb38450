"""OSDFace's checkpoints: where they are (``OSDFaceSpec``), reading them safely, merging the UNet
LoRA, and building the embedder and the diffusers parts from them.

* ``sd_path``: Stable Diffusion 2.1-base in diffusers layout (``unet/``, ``vae/``, ``scheduler/``);
  UNet2DConditionModel and AutoencoderKL come from ``diffusers`` (the optional extra
  ``pip install .[osdface]``; nothing else in quantface imports it), ᾱ from the scheduler config.
* ``osdface_ckpt``: OSDFace's ``pretrained/`` folder: ``pytorch_lora_weights.safetensors`` (UNet
  LoRA, merged into the UNet's conv and linear weights with scale alpha/rank),
  ``embedding_change_weights.pth`` (the 1×1 projection 512 → 1024 of the visual prompt) and
  ``associate_2.ckpt`` (the VQ encoder of the visual representation embedder, keys
  ``state_dict/vqvae_LQ.{encoder,quant_conv,quantize}.*``).

Loading is safe (``quantface.state_dict``): safetensors, or ``torch.load(weights_only=True)`` for
``.pth``/``.ckpt``/``.bin``; a checkpoint that would need code unpickled is refused with one sentence
naming the file.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantface.config import JsonConfig
from quantface.errors import ConfigError, WeightsError
from quantface.models.osdface_embedder import EmbedderConfig, PromptProjection, VisualEmbedder
from quantface.state_dict import load_strict, read_tensors

EXTRA = "osdface"
LORA_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "pytorch_lora_weights.bin")
PROJECTION_FILES = ("embedding_change_weights.safetensors", "embedding_change_weights.pth", "embedding_change.pth")
EMBEDDER_FILES = ("associate_2.safetensors", "associate_2.ckpt", "associate_2.pth")
EMBEDDER_PREFIX = "vqvae_LQ."  # OSDFace keeps the LQ branch of an associate (DAEFR-style) checkpoint
EMBEDDER_PARTS = ("encoder.", "quant_conv.", "quantize.")


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


# --------------------------------------------------------------------------------- safe loading
def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise WeightsError(f"model osdface needs the diffusers package: pip install -e '.[{EXTRA}]' "
                           f"(or quantface[{EXTRA}])") from None
    return diffusers


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a checkpoint file, nothing unpickled. A torch checkpoint's
    nested ``state_dict`` is unwrapped; non-tensor entries are dropped."""
    return read_tensors(path, "checkpoint", nested=True, hint="; convert it to safetensors as docs/osdface.md shows")


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


# ---------------------------------------------------------------------------------- the parts
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
    load_strict(embedder, sd, embedder_path, "embedder checkpoint", "embedder")
    load_strict(projection, proj, projection_path, "projection checkpoint", "projection")
    return embedder, projection
