import numpy as np
import pytest

from quantface.degradation import DegradationConfig, degrade
from quantface.errors import ConfigError
from tests.conftest import smooth_image


@pytest.fixture
def hq():
    return smooth_image(np.random.default_rng(1), 64)


def test_same_seed_and_index_give_identical_output(hq):
    a, pa = degrade(hq, seed=3, index=7)
    b, pb = degrade(hq, seed=3, index=7)
    assert np.array_equal(a, b) and pa == pb


def test_independent_of_draw_order(hq):
    forward = [degrade(hq, 0, i)[0] for i in range(4)]
    backward = [degrade(hq, 0, i)[0] for i in reversed(range(4))][::-1]
    assert all(np.array_equal(f, b) for f, b in zip(forward, backward))


def test_different_index_or_seed_differs(hq):
    assert not np.array_equal(degrade(hq, 0, 0)[0], degrade(hq, 0, 1)[0])
    assert not np.array_equal(degrade(hq, 0, 0)[0], degrade(hq, 1, 0)[0])


def test_shape_dtype_and_parameter_ranges(hq):
    cfg = DegradationConfig()
    for i in range(50):
        lq, (p,) = degrade(hq, 0, i, cfg)
        assert lq.shape == hq.shape and lq.dtype == np.uint8
        assert cfg.blur_sigma[0] <= p.blur_sigma <= cfg.blur_sigma[1]
        assert cfg.downscale[0] <= p.downscale <= cfg.downscale[1]
        assert cfg.noise_sigma[0] <= p.noise_sigma <= cfg.noise_sigma[1]
        assert cfg.jpeg_quality[0] <= p.jpeg_quality <= cfg.jpeg_quality[1]


def test_degradation_lowers_fidelity(hq):
    from quantface.metrics import psnr

    lq, _ = degrade(hq, 0, 0, DegradationConfig(blur_sigma=(4, 4), downscale=(4, 4), noise_sigma=(10, 10)))
    assert psnr(lq, hq) < 35


def test_second_stage(hq):
    one, p1 = degrade(hq, 0, 0)
    two, p2 = degrade(hq, 0, 0, DegradationConfig(second_stage=True))
    assert len(p1) == 1 and len(p2) == 2 and p2[0] == p1[0]
    assert not np.array_equal(one, two)


def test_config_validation_and_bad_input(hq):
    with pytest.raises(ConfigError, match="downscale"):
        DegradationConfig(downscale=(0.5, 2.0))
    with pytest.raises(ConfigError, match="JPEG"):
        DegradationConfig(jpeg_quality=(60, 101))
    with pytest.raises(ValueError, match="uint8 RGB"):
        degrade(hq.astype(np.float32), 0, 0)
    assert DegradationConfig.from_json(DegradationConfig(second_stage=True).to_json()) == DegradationConfig(second_stage=True)
