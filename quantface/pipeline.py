"""The restoration pipeline: images in, restored images out, whatever runs the network.

The pipeline owns the pre/post-processing contract (HWC uint8 RGB → NCHW float32 in [-1, 1]; the
network's output clamped to [-1, 1] and rounded back to uint8) and batching. The network itself is a
*backend*: any callable from such an input array to an output array of the same shape. The FP model,
a fake-quant model and an ONNX Runtime session are all backends, so parity checks and the demo share
this one path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

Backend = Callable[[np.ndarray], np.ndarray]


def images_to_tensor(images: Iterable[np.ndarray]) -> torch.Tensor:
    """HWC uint8 RGB images (same size) → (N, 3, H, W) float32 tensor in [-1, 1]."""
    batch = np.stack([np.asarray(im) for im in images]).astype(np.float32)
    return torch.from_numpy(batch).permute(0, 3, 1, 2).div(127.5).sub(1.0).contiguous()


def tensor_to_images(t: torch.Tensor | np.ndarray) -> list[np.ndarray]:
    """(N, 3, H, W) in [-1, 1] → HWC uint8 RGB images (clamped, rounded half to even)."""
    arr = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
    arr = np.round((np.clip(arr, -1.0, 1.0) + 1.0) * 127.5)
    return [np.ascontiguousarray(a.transpose(1, 2, 0).astype(np.uint8)) for a in arr]


class TorchBackend:
    """Runs a PyTorch module (FP or fake-quant) as a pipeline backend, without autograd."""

    def __init__(self, module: torch.nn.Module, device: str | torch.device = "cpu"):
        self.module = module.eval().to(device)
        self.device = torch.device(device)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.module(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()


class RestorationPipeline:
    """Restores lists of same-sized face images with a backend, ``batch_size`` at a time."""

    def __init__(self, backend: Backend, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.backend = backend
        self.batch_size = batch_size

    def _batches(self, images: list[np.ndarray]) -> Iterator[list[np.ndarray]]:
        for i in range(0, len(images), self.batch_size):
            yield images[i:i + self.batch_size]

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for chunk in self._batches(images):
            batch = images_to_tensor(chunk).numpy()
            out.extend(tensor_to_images(self.backend(batch)))
        return out
