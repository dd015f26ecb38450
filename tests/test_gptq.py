"""GPTQ weight rounding (calibration.gptq): the algorithm on hand-made layers, the codes it installs, and a
tiny-model calibration with it."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from quantface.calibration import CalibConfig, calibrate
from quantface.calibration.gptq import gptq_codes, input_hessians
from quantface.calibration.layers import wrap_layers
from quantface.calibration.recipe import apply_recipe
from quantface.cli import main
from quantface.errors import ConfigError
from quantface.quant import qrange, weight_scale


def _correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    return torch.randn(n, k, generator=g) @ mix * torch.linspace(0.2, 3, k)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_lowers_the_output_error_against_round_to_nearest(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    x = _correlated_inputs(4096, 64).double()
    scale = weight_scale(w, bits)
    h = x.T @ x / len(x)
    codes = gptq_codes(w, scale, bits, h)
    lo, hi = qrange(bits, signed=True)
    assert codes.shape == w.shape and torch.equal(codes, torch.round(codes))
    assert lo <= int(codes.min()) and int(codes.max()) <= hi
    nearest = torch.clamp(torch.round(w / scale[:, None]), lo, hi)

    def out_error(c: torch.Tensor) -> float:
        return float(((x @ (w.double() - c.double() * scale[:, None].double()).T) ** 2).mean())

    assert out_error(codes) < 0.8 * out_error(nearest)
    assert (codes != nearest).any()


def test_gptq_with_uncorrelated_equal_inputs_is_round_to_nearest():
    torch.manual_seed(1)
    w = torch.randn(8, 32)
    scale = weight_scale(w, 4)
    nearest = torch.clamp(torch.round(w / scale[:, None]), *qrange(4, signed=True))
    assert torch.equal(gptq_codes(w, scale, 4, torch.eye(32, dtype=torch.float64)), nearest)


def test_conv_hessian_is_that_of_the_unfolded_patches():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, stride=2))
    layers = wrap_layers(model)
    x = torch.randn(2, 3, 6, 6)
    h = input_hessians(model, layers, x)["0"]
    cols = nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27).double()
    assert h.shape == (27, 27) and torch.allclose(h, cols.T @ cols / len(cols), rtol=1e-10, atol=1e-12)


def test_installed_codes_survive_freeze():
    torch.manual_seed(3)
    layer = wrap_layers(nn.Sequential(nn.Linear(12, 5)))["0"]
    layer.set_weight_quant(4, weight_scale(layer.weight, 4))
    codes = torch.randint(-8, 8, (5, 12)).float()
    layer.set_weight_codes(codes)
    layer.freeze()
    assert torch.equal(layer.weight_codes.float(), codes)
    with pytest.raises(ValueError, match="outside the 4-bit range"):
        fresh = wrap_layers(nn.Sequential(nn.Linear(12, 5)))["0"]
        fresh.set_weight_quant(4, weight_scale(fresh.weight, 4))
        fresh.set_weight_codes(codes * 2)


def test_tiny_calibration_with_gptq_is_closer_to_fp(image_folder, tmp_path, tiny_weights, tiny_model):
    """W8A8 (branches folded: every layer's whole weight quantized): GPTQ changes codes, the recipe reloads
    bit for bit, and the model is closer to FP on its calibration faces than the round-to-nearest one."""
    common = dict(method="quantface", bits="W4A8", target="cpu", mp_budget=0.6, data=str(image_folder),
                  weights=str(tiny_weights), size=32, stat_images=4, mp_sweep_images=2, steps=0)
    results = {r: calibrate(CalibConfig(**common, weight_rounding=r, out=str(tmp_path / r))) for r in ("nearest", "gptq")}
    meta = json.loads((results["gptq"].recipe / "recipe.json").read_text())
    assert meta["calibration"]["weight_rounding"] == "gptq"
    from quantface.data import load_folder
    from quantface.degradation import degrade
    from quantface.pipeline import images_to_tensor

    x = images_to_tensor([degrade(h, 0, i)[0] for i, h in enumerate(load_folder(str(image_folder), 32, 4).images)])
    with torch.no_grad():
        fp = tiny_model(x)
        errors = {r: float(((res.model(x) - fp) ** 2).mean()) for r, res in results.items()}
        assert torch.equal(apply_recipe(tiny_model, results["gptq"].recipe)(x), results["gptq"].model(x))
    assert errors["gptq"] < errors["nearest"], errors


def test_bad_rounding_is_one_sentence(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--weight-rounding 'best' is not one of nearest, gptq"):
        CalibConfig(weight_rounding="best")
    with pytest.raises(SystemExit) as exit_:  # argparse's choices: its usage line and one error line
        main(["calibrate", "--out", str(tmp_path / "r"), "--data", str(tmp_path), "--weight-rounding", "x"])
    assert exit_.value.code == 2 and "argument --weight-rounding: invalid choice: 'x'" in capsys.readouterr().err
