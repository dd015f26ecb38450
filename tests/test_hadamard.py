import numpy as np
import pytest
import torch
import torch.nn.functional as F

from quantface.errors import ConfigError
from quantface.hadamard import (block_hadamard, fold_into_weight, hadamard_matrix, has_hadamard, kron_factors,
                                random_hadamard, rotate_channels)

WIDTHS = [4, 12, 20, 28, 36, 40, 52, 60, 128, 256, 320, 512, 640, 960, 1280, 1920, 2560]
REFERENCE_WIDTHS = [8, 16, 32, 64, 96, 128, 192, 224, 256]
AWKWARD = [3, 6, 7, 94, 100, 1000]


@pytest.mark.parametrize("n", sorted(set(WIDTHS + REFERENCE_WIDTHS)))
def test_hadamard_matrix_is_hadamard(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == np.float64
    assert np.array_equal(np.abs(h), np.ones((n, n)))
    assert np.array_equal(h @ h.T, n * np.eye(n))
    q = h / np.sqrt(n)
    assert np.abs(q @ q.T - np.eye(n)).max() < 1e-6
    assert has_hadamard(n)


def test_hadamard_matrix_returns_independent_copies():
    h = hadamard_matrix(12)
    h[0, 0] = 7
    assert hadamard_matrix(12)[0, 0] == 1


@pytest.mark.parametrize("n", [3, 6, 10, 92])
def test_unconstructed_order_raises_config_error(n):
    assert not has_hadamard(n)
    with pytest.raises(ConfigError, match=f"order {n}"):
        hadamard_matrix(n)


@pytest.mark.parametrize("n", AWKWARD + [1, 2, 12, 52])
def test_block_hadamard_is_orthogonal(n):
    q = block_hadamard(n)
    assert q.shape == (n, n)
    assert np.abs(q @ q.T - np.eye(n)).max() < 1e-10
    if has_hadamard(n):
        assert np.array_equal(q, hadamard_matrix(n) / np.sqrt(n))


def test_block_hadamard_fallback_is_block_diagonal():
    q = block_hadamard(7)  # greedy 4 + 2 + 1
    expected = np.zeros((7, 7))
    expected[:4, :4] = hadamard_matrix(4) / 2
    expected[4:6, 4:6] = hadamard_matrix(2) / np.sqrt(2)
    expected[6, 6] = 1
    assert np.array_equal(q, expected)


def test_random_hadamard_is_deterministic_orthogonal_signed():
    a, b, c = random_hadamard(20, seed=1), random_hadamard(20, seed=1), random_hadamard(20, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.abs(a @ a.T - np.eye(20)).max() < 1e-10
    d = np.sign(a[:, 0] / block_hadamard(20)[:, 0])  # Q = diag(d) @ H_norm: rows scaled by ±1
    assert np.array_equal(a, d[:, None] * block_hadamard(20))


@pytest.mark.parametrize("n", [12, 7])
def test_linear_folding_identity(n):
    torch.manual_seed(0)
    q = torch.from_numpy(random_hadamard(n, seed=0))
    x, w, bias = torch.randn(3, 5, n, dtype=torch.float64), torch.randn(9, n, dtype=torch.float64), torch.randn(9)
    ref = F.linear(x, w, bias.double())
    out = F.linear(rotate_channels(x, q, dim=-1), fold_into_weight(w, q), bias.double())
    assert (out - ref).abs().max() <= 1e-10


@pytest.mark.parametrize("n, stride, padding", [(16, 1, 0), (12, 2, 1), (6, 2, 1)])
def test_conv_folding_identity_float64(n, stride, padding):
    torch.manual_seed(0)
    q = torch.from_numpy(random_hadamard(n, seed=3))
    x, w = torch.randn(2, n, 9, 9, dtype=torch.float64), torch.randn(5, n, 3, 3, dtype=torch.float64)
    ref = F.conv2d(x, w, stride=stride, padding=padding)
    out = F.conv2d(rotate_channels(x, q), fold_into_weight(w, q), stride=stride, padding=padding)
    assert (out - ref).abs().max() <= 1e-10


def test_conv_folding_identity_float32_keeps_dtype():
    torch.manual_seed(0)
    q = torch.from_numpy(random_hadamard(64, seed=4)).float()
    x, w = torch.randn(2, 64, 8, 8), torch.randn(8, 64, 3, 3)
    xr, wr = rotate_channels(x, q), fold_into_weight(w, q)
    assert xr.dtype == wr.dtype == torch.float32
    ref = F.conv2d(x, w, stride=2, padding=1)
    out = F.conv2d(xr, wr, stride=2, padding=1)
    assert ((out - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_rotate_channels_rejects_mismatched_rotation():
    with pytest.raises(ValueError, match="does not fit"):
        rotate_channels(torch.zeros(1, 8, 2, 2), torch.eye(4))


# Stable Diffusion's UNet/VAE widths and the reference model's, as in the tests above.
@pytest.mark.parametrize("n", [8, 32, 64, 96, 128, 192, 224, 256, 320, 384, 512, 640, 960, 1280, 1920, 2560])
def test_kron_factors_rebuild_the_hadamard_rotation(n):
    a, b = kron_factors(n)
    assert a.shape[0] * b.shape[0] == n and a.shape[0] > 1 and b.shape[0] > 1
    np.testing.assert_allclose(np.kron(a, b), block_hadamard(n), atol=1e-12)
    for f in (a, b):
        np.testing.assert_allclose(f @ f.T, np.eye(len(f)), atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 6, 7])
def test_kron_factors_absent_without_a_split(n):
    assert kron_factors(n) is None
