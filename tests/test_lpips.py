"""LPIPS: hand-written backbones load torchvision/lpips-format files (.pth and .safetensors) and
reproduce the in-memory model; metric properties; every bad file is a WeightsError naming it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantface.errors import WeightsError
from quantface.lpips import LPIPS, _unit_normalize, load_lpips, save_lpips

NETS = ("vgg", "alex")


@dataclasses.dataclass
class Meta:
    """A custom class: torch.load(weights_only=True) must refuse to unpickle it."""
    note: str = "hello"


def _random_lpips(net: str) -> LPIPS:
    torch.manual_seed(0)
    model = LPIPS(net)
    with torch.no_grad():  # trained lin weights are non-negative (the lpips package clamps them)
        for p in model.lin.parameters():
            p.uniform_(0.0, 1.0)
    return model


def _images(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, 64, 64, generator=g) * 2 - 1, torch.rand(1, 3, 64, 64, generator=g) * 2 - 1


def _save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    return path


def _split_files(model: LPIPS, tmp_path: Path, suffix: str) -> tuple[Path, Path]:
    """Backbone in torchvision format (with a classifier key, as in torchvision's own files) and
    the lin head in lpips-package format."""
    backbone = dict(model.backbone.state_dict(), **{"classifier.0.weight": torch.zeros(2, 2)})
    return (_save(backbone, tmp_path / f"{model.net}_backbone{suffix}"),
            _save(model.lin.state_dict(), tmp_path / f"{model.net}_lin{suffix}"))


def test_state_dict_keys_match_torchvision_and_lpips_formats():
    vgg, alex = LPIPS("vgg"), LPIPS("alex")
    conv_idx = sorted({int(k.split(".")[1]) for k in vgg.backbone.state_dict()})
    assert conv_idx == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert sorted({int(k.split(".")[1]) for k in alex.backbone.state_dict()}) == [0, 3, 6, 8, 10]
    for model, channels in ((vgg, (64, 128, 256, 512, 512)), (alex, (64, 192, 384, 256, 256))):
        lin = model.lin.state_dict()
        assert {k: tuple(v.shape) for k, v in lin.items()} == {
            f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate(channels)}


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loaded_model_matches_in_memory_model(tmp_path, net, suffix):
    model = _random_lpips(net)
    x, y = _images()
    expected = model(x, y)
    loaded = load_lpips(net, *_split_files(model, tmp_path, suffix))
    torch.testing.assert_close(loaded(x, y), expected)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("net", NETS)
def test_combined_safetensors_round_trip(tmp_path, net):
    model = _random_lpips(net)
    save_lpips(model, tmp_path / "lpips.safetensors")
    x, y = _images()
    torch.testing.assert_close(load_lpips(net, tmp_path / "lpips.safetensors")(x, y), model(x, y))


@pytest.mark.parametrize("net", NETS)
def test_metric_properties(net):
    model = _random_lpips(net)
    x, y = _images()
    d = model(x, y)
    assert d.shape == (1,)
    assert float(d) > 0
    torch.testing.assert_close(model(y, x), d)
    assert float(model(x, x)) == 0.0
    # normalize=True takes [0, 1] images and means the same as the [-1, 1] ones
    torch.testing.assert_close(model((x + 1) / 2, (y + 1) / 2, normalize=True), d)


@pytest.mark.parametrize("net", NETS)
def test_gradient_reaches_input_but_not_weights(net):
    model = _random_lpips(net)
    model.train()  # e.g. a parent module switching to training: LPIPS must stay frozen in eval mode
    assert not model.training
    x, y = _images()
    x.requires_grad_(True)
    model(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_unit_normalize_has_finite_gradient_where_all_features_are_zero():
    f = torch.zeros(1, 4, 2, 2)
    f[0, :, 0, 0] = torch.tensor([1.0, 2.0, 0.0, 0.5])
    f.requires_grad_(True)
    _unit_normalize(f).sum().backward()
    assert torch.isfinite(f.grad).all()


def test_missing_file(tmp_path):
    lin = _save(LPIPS("alex").lin.state_dict(), tmp_path / "lin.pth")
    with pytest.raises(WeightsError, match="nowhere.pth"):
        load_lpips("alex", tmp_path / "nowhere.pth", lin)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file(tmp_path, suffix):
    backbone, lin = _split_files(LPIPS("alex"), tmp_path, suffix)
    backbone.write_bytes(backbone.read_bytes()[: backbone.stat().st_size // 2])
    with pytest.raises(WeightsError, match=backbone.name):
        load_lpips("alex", backbone, lin)


def test_key_mismatch(tmp_path):
    model = LPIPS("alex")
    # keys without the "features." prefix are not torchvision's format: refused, not guessed
    bare = _save(model.backbone.features.state_dict(), tmp_path / "bare.safetensors")
    _, lin = _split_files(model, tmp_path, ".safetensors")
    with pytest.raises(WeightsError, match="bare.safetensors.*missing features.0.weight"):
        load_lpips("alex", bare, lin)


def test_shape_mismatch_vgg_head_into_alex(tmp_path):
    alex_backbone, _ = _split_files(LPIPS("alex"), tmp_path, ".pth")
    _, vgg_lin = _split_files(LPIPS("vgg"), tmp_path, ".pth")
    with pytest.raises(WeightsError, match=r"vgg_lin.pth.*mis-shaped lin1.model.1.weight \(1, 128, 1, 1\)"):
        load_lpips("alex", alex_backbone, vgg_lin)


def test_pickled_custom_class_is_refused(tmp_path):
    model = LPIPS("alex")
    backbone, _ = _split_files(model, tmp_path, ".pth")
    evil = tmp_path / "evil_lin.pth"
    torch.save(dict(model.lin.state_dict(), meta=Meta()), evil)
    with pytest.raises(WeightsError, match="evil_lin.pth.*pickled"):
        load_lpips("alex", backbone, evil)


def test_nested_dict_and_unknown_extension_are_refused(tmp_path):
    model = LPIPS("alex")
    backbone, lin = _split_files(model, tmp_path, ".pth")
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": model.lin.state_dict()}, nested)
    with pytest.raises(WeightsError, match="nested.pth"):
        load_lpips("alex", backbone, nested)
    odd = tmp_path / "lin.bin"
    odd.write_bytes(lin.read_bytes())
    with pytest.raises(WeightsError, match="lin.bin"):
        load_lpips("alex", backbone, odd)
