"""The --device option: its spelling, what `auto` picks, a clear error for a GPU that is not there,
and calibration keeping every tensor it creates on the models' device."""

import copy

import numpy as np
import pytest
import torch

import quantface.calibration.run as run
from quantface.calibration import CalibConfig, calibrate
from quantface.device import check_device_name, resolve_device
from quantface.cli import main
from quantface.errors import ConfigError
from quantface.jobs import ModelSpec

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA GPU")


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_accepted(name):
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:x", "mps0", "", "cpu:0 "])
def test_device_names_rejected_in_one_sentence(name):
    with pytest.raises(ConfigError, match=r"^--device .* is not one of auto, cpu, cuda, cuda:N$"):
        check_device_name(name)
    with pytest.raises(ConfigError):
        CalibConfig(device=name)
    with pytest.raises(ConfigError):
        ModelSpec(device=name)


def test_auto_picks_the_gpu_torch_sees_and_a_named_gpu_must_exist(monkeypatch):
    """With two CUDA GPUs as torch reports them (faked: this is a CPU build), ``auto`` is the first,
    ``cuda:1`` exists, ``cuda:2`` does not, and ``cpu`` stays the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"^--device cuda:2 does not exist: torch sees 2 CUDA GPU\(s\)$"):
        resolve_device("cuda:2")
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
def test_auto_falls_back_to_the_cpu_without_a_gpu():
    assert resolve_device("auto") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_asking_for_a_missing_gpu_is_a_user_error(name):
    with pytest.raises(ConfigError, match=rf"^--device {name} asks for a CUDA GPU, but this torch build sees none"):
        resolve_device(name)


@pytest.mark.parametrize("method, extra", [
    ("quantface", {}),  # smoothing, Hadamard, SVD split, LoRA, distillation
    ("passionsr", {}),  # module-wise refinement
    ("quantface", {"mp_budget": 4.0, "mp_sweep_images": 2}),  # sensitivity sweep and allocation
], ids=["quantface", "passionsr", "quantface-mp"])
def test_calibration_creates_no_tensor_off_the_models_device(method, extra, image_folder, tiny_model, tmp_path,
                                                             monkeypatch):
    """Calibration runs on the CPU here while torch's *default* device is 'meta': any tensor the code makes
    without taking the device from the model or the data (what would break a CUDA run on a GPU machine)
    lands on 'meta', and the first op mixing it with the CPU tensors fails, or it ends up in the
    calibrated model, which the recipe writer would then meet."""
    monkeypatch.setattr(run, "load_model", lambda name, weights=None: copy.deepcopy(tiny_model))
    seen = {}
    save = run.save_recipe

    def checked_save(qmodel, *args, **kwargs):
        seen["meta"] = [n for n, t in [*qmodel.named_parameters(), *qmodel.named_buffers()] if t.device.type == "meta"]
        return save(qmodel, *args, **kwargs)

    monkeypatch.setattr(run, "save_recipe", checked_save)
    cfg = CalibConfig(method=method, data=str(image_folder), out=str(tmp_path / "recipe"), size=32, stat_images=4,
                      rank=2, batch_size=2, steps=2, device="cpu", **extra)
    with torch.device("meta"):
        result = calibrate(cfg)
    assert seen["meta"] == []
    assert all(t.device.type == "cpu" for t in result.model.state_dict().values())


def test_model_spec_runs_the_pytorch_model_on_its_device_and_keeps_it_for_the_fp_reference(tiny_weights, tiny_model,
                                                                                            monkeypatch):
    """Where ``auto`` would pick a GPU (faked; this CPU build cannot move a tensor there), ``--device cpu``
    keeps the model and the FP reference derived from the spec on the CPU, and they compute the model."""
    spec = ModelSpec(weights=str(tiny_weights), recipe="r", device="cpu")
    assert ModelSpec.from_json(spec.to_json()) == spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises((AssertionError, RuntimeError)):  # what "auto" would do here
        ModelSpec(weights=str(tiny_weights)).torch_backend()
    backend = spec.fp_spec().torch_backend()
    assert {t.device.type for t in backend.module.state_dict().values()} == {"cpu"}
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert np.array_equal(backend(x.numpy()), tiny_model(x).numpy())


@no_cuda
@pytest.mark.parametrize("command", ["eval", "restore"])
def test_eval_and_restore_on_a_missing_gpu_is_one_line(command, image_folder, tiny_weights, tmp_path, capsys):
    io = ["--data", str(image_folder)] if command == "eval" else ["--input", str(image_folder), "--output",
                                                                  str(tmp_path / "out")]
    assert main([command, "--weights", str(tiny_weights), "--device", "cuda", *io]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --device cuda asks for a CUDA GPU")
    assert not (tmp_path / "out").exists()
