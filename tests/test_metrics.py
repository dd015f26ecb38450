import numpy as np
import pytest
import torch

from quantface.metrics import psnr, ssim, ssim_map


def test_psnr_known_values():
    a = np.full((8, 8, 3), 100, np.uint8)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 1) == pytest.approx(20 * np.log10(255.0), abs=1e-9)


def test_ssim_matches_scikit_image_reference():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    ref = structural_similarity(a / 255.0, b / 255.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=1.0)
    assert ssim(a, b) == pytest.approx(ref, abs=1e-9)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_ssim_is_differentiable():
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    (1 - ssim_map(x, torch.rand(1, 3, 16, 16)).mean()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
