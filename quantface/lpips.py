"""LPIPS perceptual distance (Zhang et al. 2018), in plain torch, loaded from local weight files only.

The network reproduces the official ``lpips`` package (v0.1, ``lpips=True``): a scaling layer
(``(x - shift) / scale`` on images in [-1, 1]), a VGG16 or AlexNet ``features`` backbone tapped after
five ReLUs, channel-wise unit normalisation (eps 1e-10), squared feature differences, a 1×1 "lin"
conv per layer (no bias), spatial average, sum over layers.

Public API::

    LPIPS(net: str = "vgg")                                   # "vgg" or "alex"; weights left random
    LPIPS.forward(x, y, normalize=False) -> Tensor of shape (N,)
    load_lpips(net, backbone_path, lin_path=None) -> LPIPS    # frozen, eval mode
    save_lpips(model, path) -> None                           # combined .safetensors

The output is shape (N,) (the official package returns (N, 1, 1, 1)). Inputs are (N, 3, H, W) in
[-1, 1], or in [0, 1] with ``normalize=True``; H, W must be ≥ 16 for VGG and ≥ 31 for AlexNet (pooling).

Accepted files (``.pth``/``.pt`` are read with ``torch.load(weights_only=True)``: nothing but plain
tensor state dicts; ``.safetensors`` with safetensors):

* ``backbone_path`` + ``lin_path``: the backbone in torchvision format (keys ``features.N.weight`` /
  ``features.N.bias`` with torchvision's indices; ``classifier.*`` keys of a full torchvision model file
  are ignored, any other extra or missing key is an error) and the head in the lpips package format
  (keys ``lin0.model.1.weight`` … ``lin4.model.1.weight``, shape (1, C, 1, 1)), e.g. torchvision's
  ``vgg16-397923af.pth`` with lpips' ``weights/v0.1/vgg.pth``.
* ``backbone_path`` alone: a combined file as written by :func:`save_lpips`, i.e. ``LPIPS.state_dict()``
  with keys ``backbone.features.N.*`` and ``lin.lin0.model.1.weight`` ….

Every loading problem (missing file, unknown extension, truncated file, pickled non-tensor objects,
missing/unexpected keys, shape mismatch) raises :class:`quantface.errors.WeightsError` naming the file.

The returned module is frozen (parameters have ``requires_grad=False``, it stays in eval mode even if
a parent calls ``.train()``) but differentiable w.r.t. its inputs, for use as a loss λ·LPIPS(I_q, I_fp).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from quantface.errors import WeightsError
from quantface.paths import atomic_path
from quantface.state_dict import load_strict, read_tensors

WHAT = "LPIPS weights file"  # how errors name the files
CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}
# Indices in torchvision's `features` of the ReLUs whose outputs LPIPS compares.
_TAPS = {"vgg": (3, 8, 15, 22, 29), "alex": (1, 4, 7, 9, 11)}


def _features(net: str) -> nn.Sequential:
    """torchvision's ``features`` layout, cut after the last tapped ReLU (later layers have no parameters)."""
    if net == "vgg":  # VGG16 configuration "D"
        layers, c_in = [], 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU()]
                c_in = v
        return nn.Sequential(*layers)
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())


class _Backbone(nn.Module):
    """Holds ``features`` so that its state dict is exactly torchvision's ``features.*`` keys."""

    def __init__(self, net: str):
        super().__init__()
        self.features = _features(net)
        self.taps = frozenset(_TAPS[net])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


class _NetLin(nn.Module):
    """One 1×1 "lin" layer. The official package puts nn.Dropout at ``model.0``; a parameter-free
    nn.Identity keeps the key ``model.1.weight`` without ever dropping out if a parent calls .train()."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _LinHead(nn.Module):
    """``lin0`` … ``lin4``; its state dict is exactly the lpips package's weight file."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        for i, c in enumerate(channels):
            self.add_module(f"lin{i}", _NetLin(c))


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # Same value as the official x / (sqrt(sum x²) + eps), but vector_norm's backward is 0 where the
    # norm is 0, whereas sqrt's backward gives 0·∞ = NaN at positions where every ReLU channel is dead.
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + eps)


class LPIPS(nn.Module):
    """LPIPS distance; ``forward(x, y)`` returns shape (N,). Weights are random until loaded."""

    def __init__(self, net: str = "vgg"):
        super().__init__()
        if net not in CHANNELS:
            raise WeightsError(f"unknown LPIPS backbone {net!r}; expected 'vgg' or 'alex'.")
        self.net = net
        self.backbone = _Backbone(net)
        self.lin = _LinHead(CHANNELS[net])
        # Non-persistent: constants of the method, not weights, so they stay out of the state dict.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """A frozen metric: always stays in eval mode, whatever a parent module asks."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Distance per image between ``x`` and ``y`` (N, 3, H, W) in [-1, 1] ([0, 1] with ``normalize``)."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS needs two (N, 3, H, W) tensors of equal shape, got {tuple(x.shape)} "
                             f"and {tuple(y.shape)}")
        if normalize:
            x, y = 2 * x - 1, 2 * y - 1
        # One backbone pass over both batches (cheaper than two passes for small N).
        feats = self.backbone((torch.cat([x, y]) - self.shift) / self.scale)
        total = x.new_zeros(x.shape[0])
        for lin, f in zip(self.lin.children(), feats):
            fx, fy = f.chunk(2)
            diff = (_unit_normalize(fx) - _unit_normalize(fy)) ** 2
            total = total + lin(diff).mean(dim=(1, 2, 3))  # 1 output channel: mean over H, W
        return total


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A flat name → tensor mapping from ``.pth``/``.pt`` (weights_only) or ``.safetensors``."""
    if path.is_file() and path.suffix.lower() not in (".safetensors", ".pth", ".pt"):
        raise WeightsError(f"LPIPS weights file {path} has an unsupported extension; "
                           "expected .pth, .pt or .safetensors.")
    return read_tensors(path, WHAT)[0]


def load_lpips(net: str, backbone_path: str | os.PathLike, lin_path: str | os.PathLike | None = None) -> LPIPS:
    """Build a frozen ``LPIPS(net)`` from local files (see the module docstring for the formats)."""
    model = LPIPS(net)
    backbone_path = Path(backbone_path)
    if lin_path is None:
        load_strict(model, _read_tensors(backbone_path), backbone_path, WHAT, f"combined LPIPS-{net} model")
    else:
        # torchvision's full-model files also carry the classifier, which LPIPS does not use.
        tensors = {k: v for k, v in _read_tensors(backbone_path).items() if not k.startswith("classifier.")}
        load_strict(model.backbone, tensors, backbone_path, WHAT, f"{net} backbone (torchvision features.* keys)")
        lin_path = Path(lin_path)
        load_strict(model.lin, _read_tensors(lin_path), lin_path, WHAT, f"LPIPS-{net} lin head (lpips package keys)")
    model.requires_grad_(False)
    return model.eval()


def save_lpips(model: LPIPS, path: str | os.PathLike) -> None:
    """Write ``model``'s weights as one combined ``.safetensors`` file (atomically), loadable by
    ``load_lpips(model.net, path)``."""
    path = Path(path)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
