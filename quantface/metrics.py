"""Image quality metrics: PSNR and SSIM, one home for both (evaluation, training losses, sweeps).

Conventions (stated because papers differ): images are RGB in [0, 1]; PSNR uses the mean squared
error over all pixels and channels with peak 1; SSIM is Wang et al. (2004) with an 11×11 Gaussian
window (σ = 1.5), K1 = 0.01, K2 = 0.03, computed per channel on the valid region (no padding) and
averaged over channels and positions. SSIM is written in torch so it is differentiable and can
serve as a loss (1 − SSIM).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _as_tensor(img: np.ndarray | torch.Tensor) -> torch.Tensor:
    """HWC uint8 array → (1, 3, H, W) float64 in [0, 1]; tensors (N, C, H, W) pass through."""
    if isinstance(img, torch.Tensor):
        return img
    arr = np.asarray(img)
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    return torch.from_numpy(arr.astype(np.float64) / scale).permute(2, 0, 1)[None]


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """PSNR in dB between two images (HWC uint8 arrays, or tensors in [0, 1]); ∞ if identical."""
    ta, tb = _as_tensor(a).double(), _as_tensor(b).double()
    mse = float(torch.mean((ta - tb) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


PSNR_CAP = 200.0  # dB: what ``output_psnr`` gives identical outputs (a finite number for JSON reports)


def output_psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two model outputs in [-1, 1] (arrays), clipped and mapped to [0, 1] with peak 1;
    at most ``PSNR_CAP``. Parity of a graph with its model (validate, tests)."""
    a01, b01 = (np.clip(a, -1, 1) + 1) / 2, (np.clip(b, -1, 1) + 1) / 2
    mse = float(np.mean((a01 - b01) ** 2))
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else float(10 * np.log10(1.0 / mse))


def _gaussian_window(channels: int, dtype: torch.dtype, device: torch.device, size: int = 11,
                     sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of (N, C, H, W) tensors in [0, 1]; returns shape (N,). Differentiable."""
    if x.shape != y.shape:
        raise ValueError(f"SSIM needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    c = x.shape[1]
    win = _gaussian_window(c, x.dtype, x.device)
    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = F.conv2d(x, win, groups=c), F.conv2d(y, win, groups=c)
    sxx = F.conv2d(x * x, win, groups=c) - mu_x**2
    syy = F.conv2d(y * y, win, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, win, groups=c) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def ssim(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """SSIM between two images (HWC uint8 arrays, or (1, C, H, W) tensors in [0, 1])."""
    return float(ssim_map(_as_tensor(a).double(), _as_tensor(b).double()).mean())
