"""Quantization primitives: bit-exact against a NumPy reference and against ONNX's QuantizeLinear."""

import numpy as np
import pytest
import torch

from quantface.errors import ConfigError
from quantface.quant import (act_qparams, check_bits, dequantize, fake_quantize, pack_int4, qrange, quantize,
                             unpack_int4, weight_scale)


def np_quantize(x, s, z, lo, hi):
    return np.clip(np.round(x / s) + z, lo, hi)  # np.round is round-half-to-even


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_matches_numpy_reference_bit_exactly(bits, signed):
    rng = np.random.default_rng(bits)
    x = rng.normal(0, 3, 4096).astype(np.float32)
    lo, hi = qrange(bits, signed)
    s, z = np.float32(0.37), (0.0 if signed else float(2 ** (bits - 1)))
    ours = quantize(torch.from_numpy(x), torch.tensor(s), z, lo, hi).numpy()
    ref = np_quantize(x, s, np.float32(z), lo, hi)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(dequantize(torch.from_numpy(ours), torch.tensor(s), z).numpy(),
                                  (ref - np.float32(z)) * s)


def test_round_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    assert quantize(x, torch.tensor(1.0), 0.0, -8, 7).tolist() == [0, 2, 2, -0, -2, -2]


def test_ranges_and_bits_validation():
    assert qrange(4, True) == (-8, 7) and qrange(4, False) == (0, 15) and qrange(8, False) == (0, 255)
    for bad in (1, 9, 4.0):
        with pytest.raises(ConfigError):
            check_bits(bad)


def test_matches_onnxruntime_quantize_linear():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    x = np.random.default_rng(0).normal(0, 2, (64, 64)).astype(np.float32)
    x[0, :6] = [0.5, 1.5, 2.5, -0.5, 127.5, -300]  # ties and saturation
    scale, zp = np.float32(0.05), np.uint8(128)
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("q", TensorProto.UINT8, x.shape)],
                              [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]),
                               helper.make_tensor("z", TensorProto.UINT8, [], [int(zp)])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = sess.run(None, {"x": x})[0]
    ours = quantize(torch.from_numpy(x), torch.tensor(scale), float(zp), 0, 255).numpy().astype(np.uint8)
    np.testing.assert_array_equal(ours, theirs)


def test_fake_quantize_forward_is_exact_and_gradient_is_straight_through():
    x = torch.linspace(-3, 3, 101, requires_grad=True)
    s, z = torch.tensor(0.1), 3.0
    y = fake_quantize(x, s, z, 0, 15)
    assert torch.equal(y, dequantize(quantize(x, s, z, 0, 15), s, z))
    y.sum().backward()
    code = torch.round(x.detach() / s) + z  # before clamping: the gradient passes where it is in range
    inside = (code >= 0) & (code <= 15)
    assert torch.equal(x.grad, inside.float())


def test_scale_gradient_flows():
    s = torch.tensor(0.1, requires_grad=True)
    fake_quantize(torch.randn(100), s, 0.0, -8, 7).pow(2).sum().backward()
    assert s.grad is not None and s.grad != 0


def test_weight_scales():
    w = torch.randn(16, 8, 3, 3)
    w[3, 0, 0, 0] = 40.0  # an outlier channel
    mm = weight_scale(w, 4, "minmax")
    assert torch.allclose(mm * 7, w.abs().flatten(1).amax(1))
    mse = weight_scale(w, 4, "mse")

    def err(s):
        sv = s.view(-1, 1, 1, 1)
        return ((dequantize(quantize(w, sv, 0.0, -8, 7), sv, 0.0) - w) ** 2).flatten(1).sum(1)

    assert (err(mse) <= err(mm) + 1e-6).all() and err(mse).sum() < err(mm).sum()


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_activation_qparams_hold_zero_and_mse_helps(method):
    x = torch.cat([torch.randn(10000).abs() * 0.5 + 0.1, torch.tensor([25.0])])  # all positive, one outlier
    s, z = act_qparams(x, 4, method)
    assert z == 0  # the range is widened to include 0, which must be representable exactly
    assert dequantize(quantize(torch.tensor(0.0), s, z, 0, 15), s, z) == 0
    if method == "mse":
        def err(sz):
            return ((dequantize(quantize(x, sz[0], sz[1], 0, 15), sz[0], sz[1]) - x) ** 2).mean()
        assert err((s, z)) < err(act_qparams(x, 4, "minmax"))


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_int4_pack_round_trip(n):
    codes = torch.randint(-8, 8, (n,), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert torch.equal(unpack_int4(packed, n), codes)


def _reference_fake_quantize(x, s, z, lo, hi):
    """The composed definition (RoundSTE, autograd does the rest) the fused op must equal."""
    from quantface.quant import RoundSTE

    return (torch.clamp(RoundSTE.apply(x / s) + z, lo, hi) - z) * s


@pytest.mark.parametrize("scale_shape", [(), (6, 1, 1, 1)])
def test_fused_fake_quantize_matches_composed_definition(scale_shape):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 5, 5, generator=g, dtype=torch.float64) * 2
    s0 = torch.rand(scale_shape, generator=g, dtype=torch.float64) * 0.3 + 0.05
    outs = []
    for fn in (fake_quantize, _reference_fake_quantize):
        x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
        y = fn(x, s, torch.tensor(3.0, dtype=torch.float64), 0, 15)
        (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
        outs.append((y.detach(), x.grad, s.grad))
    assert torch.equal(outs[0][0], outs[1][0])
    # Autograd of the composition multiplies by (1/s)·s, the fused op by exactly 1: equal to rounding.
    assert torch.allclose(outs[0][1], outs[1][1], rtol=1e-12, atol=1e-15)
    assert torch.allclose(outs[0][2], outs[1][2], rtol=1e-10, atol=1e-12)


def _sqnr_db(x: torch.Tensor, xq: torch.Tensor) -> float:
    return float(10 * torch.log10((x.double() ** 2).sum() / ((x - xq).double() ** 2).sum()))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_quantizers_keep_an_sqnr_floor(bits):
    """Signal-to-quantization-noise floors of the two quantizers calibration starts from (MSE-searched
    scales): per-channel symmetric weights on Gaussian weights, per-tensor asymmetric activations on
    SiLU outputs. The floor is 6.02·b − 6.5 dB (weights) and 6.02·b − 7.5 dB (activations): the 6 dB
    per bit of a uniform grid less what clipping a Gaussian tail costs (the best uniform 4-bit grid for a
    Gaussian reaches 20.2 dB). Measured (seed 0), b = 2, 3, 4, 5, 6, 8: weights 8.2, 13.9, 19.5, 25.1,
    31.1, 43.0 dB; activations 12.0, 15.7, 20.2, 26.7, 31.7, 42.5 dB. A scale off by 2× or rounding
    by truncation costs about 6 dB and falls below the floor at 8 bits."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, 3, 3, generator=g)
    s = weight_scale(w, bits, "mse").view(-1, 1, 1, 1)
    w_sqnr = _sqnr_db(w, fake_quantize(w, s, 0.0, *qrange(bits, signed=True)))
    x = torch.nn.functional.silu(2 * torch.randn(200_000, generator=g))
    a_s, a_z = act_qparams(x, bits, "mse")
    a_sqnr = _sqnr_db(x, fake_quantize(x, a_s, a_z, *qrange(bits, signed=False)))
    print(f"\nW{bits}: {w_sqnr:.2f} dB, A{bits}: {a_sqnr:.2f} dB")
    assert w_sqnr >= 6.02 * bits - 6.5
    assert a_sqnr >= 6.02 * bits - 7.5
