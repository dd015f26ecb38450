import math

import pytest
import torch

from quantface.errors import ConfigError, WeightsError
from quantface.models import load_model
from quantface.models.reference import ReferenceConfig, ReferenceRestorer, count_parameters
from quantface.models.store import load_weights, save_weights
from quantface.points import Point
from tests.conftest import TINY


@pytest.mark.parametrize("hw", [(32, 32), (48, 64), (64, 32)])
def test_output_shape_follows_input(tiny_model, hw):
    x = torch.rand(2, 3, *hw) * 2 - 1
    with torch.no_grad():
        assert tiny_model(x).shape == x.shape


def test_size_not_divisible_is_rejected(tiny_model):
    with pytest.raises(ConfigError, match="not divisible by 16"):
        tiny_model(torch.zeros(1, 3, 40, 40))


def test_default_model_size_and_topology():
    model = ReferenceRestorer()
    n = count_parameters(model)
    assert 1e6 < n <= 12e6
    names = {name.split(".")[0] for name, m in model.named_modules() if name and not isinstance(m, Point)}
    assert names == {"encoder", "prompt_embedder", "unet", "decoder"}
    # x0's float ops are the top level's only other modules: parameter-free quantizer points
    assert {n for n, m in model.named_children() if isinstance(m, Point)} == {"noise_scaled", "denoised"}
    # Self- and cross-attention exist; cross-attention keys read the prompt tokens' width.
    attn2 = [m for name, m in model.named_modules() if name.endswith("attn2")]
    assert attn2 and all(m.to_k.in_features == model.config.context_dim for m in attn2)
    assert model.config.size_multiple == 16


def test_alpha_bar_matches_scaled_linear_schedule():
    cfg = ReferenceConfig()
    betas = [(cfg.beta_start**0.5 + (cfg.beta_end**0.5 - cfg.beta_start**0.5) * i / 999) ** 2 for i in range(1000)]
    expected = math.prod(1 - b for b in betas[: cfg.timestep + 1])
    assert cfg.alpha_bar == pytest.approx(expected, rel=1e-12)


def test_one_step_x0_formula(tiny_model):
    """The forward pass is decoder((z − √(1−ᾱ)·ε̂)/√ᾱ) with ε̂ the UNet at t = 399."""
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    m = tiny_model
    with torch.no_grad():
        z = m.encoder(x)
        eps = m.unet(z, torch.tensor([399]), m.prompt_embedder(x))
        a = m.config.alpha_bar
        expected = m.decoder((z - (1 - a) ** 0.5 * eps) / a**0.5)
        assert torch.allclose(m(x), expected, atol=1e-6)


def test_deterministic_construction_and_forward():
    x = torch.rand(1, 3, 32, 32)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        with torch.no_grad():
            outs.append(ReferenceRestorer(TINY).eval()(x))
    assert torch.equal(outs[0], outs[1])


def test_config_json_round_trip_and_validation():
    assert ReferenceConfig.from_json(TINY.to_json()) == TINY
    with pytest.raises(ConfigError, match="unknown ReferenceConfig keys: bogus"):
        ReferenceConfig.from_json('{"bogus": 1}')
    with pytest.raises(ConfigError, match="divisible by groups"):
        ReferenceConfig(vae_channels=(30, 64, 96))


def test_weights_round_trip(tiny_model, tiny_weights):
    loaded = load_weights(tiny_weights)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), tiny_model(x))


def test_weights_errors(tmp_path, tiny_weights):
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(tmp_path / "missing")
    w = tiny_weights.with_suffix(".safetensors")
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(WeightsError, match="unreadable or truncated"):
        load_weights(tiny_weights)
    other = tmp_path / "other"
    save_weights(ReferenceRestorer(TINY), other)
    other.with_suffix(".json").write_text(ReferenceConfig(working_size=32, latent_channels=8).to_json())
    with pytest.raises(WeightsError, match="does not fit"):
        load_weights(other)
    with pytest.raises(WeightsError, match="unknown model"):
        load_model("nope")


def test_embedded_reference_weights_load_and_run():
    model = load_model("reference")
    assert model.config.working_size == 128
    with torch.no_grad():
        y = model(torch.zeros(1, 3, 128, 128))
    assert y.shape == (1, 3, 128, 128) and torch.isfinite(y).all()
