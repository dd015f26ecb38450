import json

import numpy as np
import pytest

from quantface.cli import main
from quantface.jobs import EvalConfig, ModelSpec
from quantface.data import read_image

# How much closer (PSNR, dB) the demo's ort-cpu graph is to its recipe's model than to the FP model:
# measured 33.56 vs 21.51 dB (tiny random model, 2 distillation steps); a parity taken against the FP
# model would have a margin of about 0.
PARITY_MARGIN_DB = 5.0


def test_eval_writes_json_with_required_fields(image_folder, tiny_weights, tmp_path, capsys):
    out = tmp_path / "res" / "eval.json"
    rc = main(["eval", "--weights", str(tiny_weights), "--data", str(image_folder), "--limit", "3", "--seed", "1",
               "--size", "32", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    for key in ("n", "psnr", "ssim", "psnr_lq", "ssim_lq", "per_image", "seed", "size"):
        assert key in r
    assert r["n"] == 3 and len(r["per_image"]) == 3 and r["seed"] == 1 and r["size"] == 32
    assert r["psnr"] == pytest.approx(np.mean([p["psnr"] for p in r["per_image"]]))
    assert set(r["per_image"][0]) == {"file", "psnr", "ssim", "psnr_lq", "ssim_lq"}
    assert "n=3" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temp file left behind


def test_eval_is_reproducible(image_folder, tiny_weights, tmp_path):
    runs = []
    for name in ("a.json", "b.json"):
        main(["eval", "--weights", str(tiny_weights), "--data", str(image_folder), "--size", "32",
              "--json", str(tmp_path / name)])
        runs.append(json.loads((tmp_path / name).read_text()))
    assert runs[0]["per_image"] == runs[1]["per_image"]


def test_restore_folder_skips_bad_files(image_folder, tiny_weights, tmp_path, capsys):
    (image_folder / "broken.jpg").write_bytes(b"junk")
    out = tmp_path / "restored"
    rc = main(["restore", "--weights", str(tiny_weights), "--input", str(image_folder), "--output", str(out),
               "--size", "32"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{i:03d}.png" for i in range(5)]
    assert read_image(out / "000.png").shape == (32, 32, 3)
    err = capsys.readouterr().err
    assert "skipped 1 unreadable file(s)" in err and "broken.jpg" in err


@pytest.mark.parametrize("argv, message", [
    (["restore", "--input", "/no/such/path", "--output", "x"], "input path /no/such/path does not exist"),
    (["eval", "--data", "/no/such/dir"], "input path /no/such/dir does not exist"),
    (["eval", "--data", ".", "--size", "50"], "--size 50 must be a positive multiple of 16"),
    (["eval", "--data", ".", "--limit", "0"], "--limit 0 must be at least 1"),
    (["demo", "--weights", "/no/weights"], "model file /no/weights.json does not exist"),
    (["calibrate", "--out", "r", "--device", "gpu"], "--device 'gpu' is not one of auto, cpu, cuda, cuda:N"),
])
def test_user_errors_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {message}"


def test_demo_runs_the_chain(tiny_weights, tiny_model, tmp_path, capsys, monkeypatch):
    """The main job on a tiny model: FP restore, fast calibration, export, validate, package."""
    monkeypatch.chdir(tmp_path)  # not a checkout: nothing is copied into android_demo/
    out = tmp_path / "demo"
    assert main(["demo", "--weights", str(tiny_weights), "--out", str(out), "--steps", "2", "--calib-faces", "4",
                 "--threads", "1"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["fp_demo"]["faces"][0] == "astronaut"
    assert len(list((out / "faces" / "calibration").glob("*.png"))) == 4
    assert s["validate"]["n"] == 9  # astronaut + 8 LFW faces
    # The summary is the validate report's (written beside it), and that compares the graph with its
    # recipe's model: much closer to it than to the FP model it was calibrated from.
    report = json.loads((out / "validate.json").read_text())
    assert {k: report[k] for k in s["validate"]} == s["validate"]
    print(f"\ndemo: parity {report['parity_psnr']:.2f} dB, to FP {report['psnr_to_fp']:.2f} dB")
    assert report["parity_psnr"] >= report["psnr_to_fp"] + PARITY_MARGIN_DB
    # Parity of the demo's ort-cpu graph with its recipe, layer by layer (tests.parity: end to end, the
    # random tiny model amplifies float-order code flips; the trained model's is in test_export).
    from quantface.calibration.recipe import apply_recipe
    from quantface.pipeline import images_to_tensor
    from tests.parity import layer_parity

    qmodel = apply_recipe(tiny_model, out / "recipe", requant_outputs=True)
    face = read_image(sorted((out / "faces" / "validation").glob("*.png"))[0])
    layers = layer_parity(out / "onnx" / "ort_cpu.onnx", qmodel, images_to_tensor([face]).numpy())
    assert layers and all(p.rel_l2 <= 1e-4 and p.exact_fraction >= 0.99 for p in layers.values())
    assert set(s["graphs"]) == {"fp32", "reference", "ort-cpu", "W8A8 ort-cpu", "quantize_static"}
    assert s["package"]["copied_to"] == [] and (out / "package" / "model.json").is_file()
    printed = capsys.readouterr().out
    for line in ("parity ", "quality ", "size ", "speed ", "cpu ", "before/after grid"):
        assert line in printed


def test_demo_fp_only_writes_grid_and_summary(tiny_weights, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--weights", str(tiny_weights), "--out", str(out), "--fp-only"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["faces"][0] == "astronaut" and len(summary["faces"]) == 6
    grid = read_image(out / "grid.png")
    assert grid.shape[0] > grid.shape[1]  # one row per face, two columns
    assert "before/after grid" in capsys.readouterr().out


def test_configs_round_trip_to_json():
    cfg = EvalConfig(data="d", json_out="o.json", model=ModelSpec(weights="w"), limit=4, seed=2, size=64)
    assert EvalConfig.from_json(cfg.to_json()) == cfg


def test_calibrate_export_validate_chain(image_folder, tiny_weights, tiny_model, tmp_path, capsys):
    """The CLI chain on a tiny model: calibrate → export → validate → eval --onnx."""
    from quantface.calibration.recipe import apply_recipe

    recipe, onnx_path = tmp_path / "recipe", tmp_path / "out" / "model.onnx"
    w = ["--weights", str(tiny_weights)]
    assert main(["calibrate", *w, "--method", "quantface", "--bits", "W4A4", "--data", str(image_folder),
                 "--out", str(recipe), "--size", "32", "--steps", "1", "--rank", "2", "--stat-images", "2"]) == 0
    assert main(["export", *w, "--recipe", str(recipe), "--profile", "ort-cpu", "--out", str(onnx_path)]) == 0
    report = tmp_path / "validate.json"
    assert main(["validate", *w, "--onnx", str(onnx_path), "--recipe", str(recipe), "--data", str(image_folder),
                 "--limit", "2", "--repeats", "2", "--threads", "1", "--json", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["n"] == 2 and r["threads"] == 1 and r["file_bytes"] == onnx_path.stat().st_size
    # The parity is the graph against the recipe's requantized model on validate's degraded faces:
    # recomputed here from the public pieces, it is the same number.
    from quantface.data import load_folder
    from quantface.degradation import degrade
    from quantface.export import OnnxBackend
    from quantface.metrics import output_psnr
    from quantface.pipeline import TorchBackend, images_to_tensor

    lqs = [degrade(hq, 0, i)[0] for i, hq in enumerate(load_folder(image_folder, 32, 2).images)]
    onnx_backend = OnnxBackend(onnx_path, threads=1)
    torch_backend = TorchBackend(apply_recipe(tiny_model, recipe, requant_outputs=True))
    # one face a run and float64, as validate does
    graph = np.concatenate([onnx_backend(images_to_tensor([lq]).numpy()) for lq in lqs]).astype(np.float64)
    model = np.concatenate([torch_backend(images_to_tensor([lq]).numpy()) for lq in lqs]).astype(np.float64)
    print(f"\nvalidate: parity {r['parity_psnr']:.2f} dB, to FP {r['psnr_to_fp']:.2f} dB")
    assert r["parity_psnr"] == pytest.approx(output_psnr(graph, model), rel=1e-9)
    assert r["parity_max_abs"] == pytest.approx(float(np.abs(graph - model).max()), rel=1e-9)
    # Parity layer by layer (tests.parity; end to end the random tiny model amplifies code flips).
    from tests.parity import layer_parity

    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    layers = layer_parity(onnx_path, apply_recipe(tiny_model, recipe, requant_outputs=True), x)
    assert layers and all(p.rel_l2 <= 1e-4 and p.exact_fraction >= 0.99 for p in layers.values())
    ev = tmp_path / "eval.json"
    assert main(["eval", *w, "--onnx", str(onnx_path), "--data", str(image_folder), "--limit", "2",
                 "--json", str(ev)]) == 0
    e = json.loads(ev.read_text())
    assert e["size"] == 32 and "psnr_to_fp" in e
    assert "parity ONNX vs PyTorch" in capsys.readouterr().out


def test_export_needs_recipe_or_fp32(tmp_path, capsys):
    assert main(["export", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "--recipe" in capsys.readouterr().err
