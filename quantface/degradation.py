"""Synthetic face degradation (GFPGAN-style), reproducible from (seed, index).

One stage is: Gaussian blur → downsample → Gaussian noise → JPEG → upsample back to the input size.
GFPGAN samples blur σ ∈ [0.1, 10], downscale ×[1, 8], noise σ ∈ [0, 15] (of 255) and JPEG quality
∈ [60, 100]; those are the defaults here. ``second_stage=True`` applies a second, milder pass to the
already degraded image before the final upsampling, as in two-stage pipelines (Real-ESRGAN, WaveFace).

All randomness comes from ``numpy.random.default_rng([seed, index])``: the same (seed, index) gives
the same degraded image on every machine and in every process, whatever order samples are drawn in.

``degraded_inputs`` is the one place that turns a folder of HQ faces into network inputs this way:
calibration and ONNX Runtime's peer quantizers (``quantface.export.peers``) feed exactly its arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from quantface.config import JsonConfig
from quantface.data import SHIPPED_LFW, load_folder, shipped_lfw_faces
from quantface.errors import ConfigError


@dataclass(frozen=True)
class DegradationConfig(JsonConfig):
    blur_sigma: tuple[float, float] = (0.1, 10.0)
    downscale: tuple[float, float] = (1.0, 8.0)
    noise_sigma: tuple[float, float] = (0.0, 15.0)  # in units of 1/255
    jpeg_quality: tuple[int, int] = (60, 100)
    second_stage: bool = False
    # The second stage's ranges (milder, as in two-stage pipelines).
    second_blur_sigma: tuple[float, float] = (0.1, 3.0)
    second_downscale: tuple[float, float] = (1.0, 2.0)
    second_noise_sigma: tuple[float, float] = (0.0, 8.0)
    second_jpeg_quality: tuple[int, int] = (70, 100)

    def __post_init__(self) -> None:
        checks = {
            "blur_sigma": (self.blur_sigma, 0.0),
            "downscale": (self.downscale, 1.0),
            "noise_sigma": (self.noise_sigma, 0.0),
            "jpeg_quality": (self.jpeg_quality, 1),
            "second_blur_sigma": (self.second_blur_sigma, 0.0),
            "second_downscale": (self.second_downscale, 1.0),
            "second_noise_sigma": (self.second_noise_sigma, 0.0),
            "second_jpeg_quality": (self.second_jpeg_quality, 1),
        }
        for name, ((lo, hi), minimum) in checks.items():
            if not minimum <= lo <= hi:
                raise ConfigError(f"degradation range {name}=({lo}, {hi}) must satisfy {minimum} <= low <= high")
        if self.jpeg_quality[1] > 100 or self.second_jpeg_quality[1] > 100:
            raise ConfigError("JPEG quality cannot exceed 100")


@dataclass(frozen=True)
class StageParams:
    """The parameters one degradation stage drew; returned so tests and logs can inspect them."""

    blur_sigma: float
    downscale: float
    noise_sigma: float
    jpeg_quality: int


def _draw(rng: np.random.Generator, blur, down, noise, jpeg) -> StageParams:
    return StageParams(
        blur_sigma=float(rng.uniform(*blur)),
        downscale=float(rng.uniform(*down)),
        noise_sigma=float(rng.uniform(*noise)),
        jpeg_quality=int(rng.integers(jpeg[0], jpeg[1] + 1)),
    )


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3.0 * sigma)))
    return cv2.GaussianBlur(img, (2 * radius + 1, 2 * radius + 1), sigmaX=sigma, sigmaY=sigma,
                            borderType=cv2.BORDER_REFLECT_101)


def _stage(img: np.ndarray, p: StageParams, rng: np.random.Generator) -> np.ndarray:
    """One pass on a float32 HWC RGB image in [0, 255]; returns the small (downscaled) image."""
    h, w = img.shape[:2]
    img = _blur(img, p.blur_sigma)
    small = (max(1, round(w / p.downscale)), max(1, round(h / p.downscale)))
    img = cv2.resize(img, small, interpolation=cv2.INTER_LINEAR)
    img = img + rng.normal(0.0, p.noise_sigma, img.shape).astype(np.float32)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, p.jpeg_quality])
    if not ok:  # pragma: no cover - OpenCV only fails here on invalid arguments
        raise RuntimeError("OpenCV could not JPEG-encode the degraded image")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1].astype(np.float32)


def degrade(hq: np.ndarray, seed: int, index: int, config: DegradationConfig | None = None
            ) -> tuple[np.ndarray, list[StageParams]]:
    """Degrade an HWC uint8 RGB image; returns the LQ image (uint8, same size) and the drawn params."""
    if hq.dtype != np.uint8 or hq.ndim != 3 or hq.shape[2] != 3:
        raise ValueError(f"degrade expects an HxWx3 uint8 RGB image, got {hq.dtype} {hq.shape}")
    config = config or DegradationConfig()
    rng = np.random.default_rng([seed, index])
    h, w = hq.shape[:2]
    first = _draw(rng, config.blur_sigma, config.downscale, config.noise_sigma, config.jpeg_quality)
    img = _stage(hq.astype(np.float32), first, rng)
    params = [first]
    if config.second_stage:
        second = _draw(rng, config.second_blur_sigma, config.second_downscale,
                       config.second_noise_sigma, config.second_jpeg_quality)
        img = _stage(img, second, rng)
        params.append(second)
    lq = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(np.round(lq), 0, 255).astype(np.uint8), params


def degraded_inputs(data: str, size: int, limit: int | None, seed: int) -> "torch.Tensor":
    """The calibration inputs: HQ faces of ``data`` (a folder, or ``SHIPPED_LFW``: the LFW faces scikit-image
    ships) degraded with (seed, index), (N, 3, H, W) in [-1, 1]."""
    from quantface.pipeline import images_to_tensor  # torch: imported where the tensor is made

    if str(data) == SHIPPED_LFW:
        images = shipped_lfw_faces(size, limit)
    else:
        loaded = load_folder(data, size, limit)
        if loaded.skipped:
            from quantface.distributed import log

            log(loaded.report())
        images = loaded.images
    return images_to_tensor([degrade(hq, seed, i)[0] for i, hq in enumerate(images)])
