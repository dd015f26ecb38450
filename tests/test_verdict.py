"""``quantface validate`` gives a verdict: the graph decides what it is compared with (a quantized graph
with the fake-quant model of the very recipe it stores the sha256 of, an FP32 graph with the FP model),
a wrong or missing recipe is one ``error:`` line (exit 2) before any model runs, and parity under
``--min-parity`` (default per graph kind, ``quantface.verdict``) exits 1 with a clear line."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from quantface.cli import main
from quantface.data import write_image
from quantface.verdict import MIN_PARITY_FP32, MIN_PARITY_QUANTIZED
from tests.conftest import smooth_image, write_two_tiny_weights


@pytest.fixture(scope="module")
def vx(tmp_path_factory) -> SimpleNamespace:
    """Tiny weights (and other ones), faces, two recipes of the same weights (W8A8, W6A6), the W8A8
    recipe's graph, and FP32 graphs of both weights."""
    from quantface.calibration import CalibConfig, calibrate
    from quantface.export import ExportConfig, export_onnx

    root = tmp_path_factory.mktemp("verdict")
    write_two_tiny_weights(root)
    rng = np.random.default_rng(0)
    for i in range(3):
        write_image(root / "faces" / f"{i:03d}.png", smooth_image(rng, 32))
    w = str(root / "weights" / "tiny")
    recipes = {bits: calibrate(CalibConfig(method="minmax", bits=bits, data=str(root / "faces"),
                                           out=str(root / bits), weights=w, size=32, stat_images=2)).recipe
               for bits in ("W8A8", "W6A6")}
    export_onnx(ExportConfig(weights=w, recipe=str(recipes["W8A8"]), out=str(root / "w8a8.onnx")))
    export_onnx(ExportConfig(weights=w, out=str(root / "fp32.onnx")))
    export_onnx(ExportConfig(weights=str(root / "weights" / "other"), out=str(root / "fp32_other.onnx")))
    return SimpleNamespace(root=root, weights=w, faces=root / "faces", recipes=recipes, q=root / "w8a8.onnx",
                           fp32=root / "fp32.onnx", fp32_other=root / "fp32_other.onnx")


def _validate(vx, onnx, *extra, json_out=None) -> int:
    argv = ["validate", "--weights", vx.weights, "--onnx", str(onnx), "--data", str(vx.faces), "--limit", "2",
            "--repeats", "1", "--threads", "1", *extra]
    return main(argv + (["--json", str(json_out)] if json_out else []))


def test_a_recipe_other_than_the_graphs_is_an_error(vx, capsys):
    assert _validate(vx, vx.q, "--recipe", str(vx.recipes["W6A6"])) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: recipe ") and "\n" not in err
    assert "is not the one" in err and str(vx.q) in err
    assert "parity" not in captured.out  # refused before anything ran


def test_a_quantized_graph_needs_its_recipe(vx, capsys):
    assert _validate(vx, vx.q) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is a quantized graph" in err and "--recipe" in err


def test_an_fp32_graph_takes_no_recipe(vx, capsys):
    assert _validate(vx, vx.fp32, "--recipe", str(vx.recipes["W8A8"])) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is an FP32 graph" in err and "drop --recipe" in err


def test_the_report_says_what_was_compared_and_passes(vx, tmp_path, capsys):
    report = tmp_path / "v.json"
    assert _validate(vx, vx.q, "--recipe", str(vx.recipes["W8A8"]), json_out=report) == 0
    r = json.loads(report.read_text())
    c = r["compared"]
    sha = json.loads((vx.recipes["W8A8"] / "recipe.json").read_text())["tensors_sha256"]
    assert c["recipe"] == str(vx.recipes["W8A8"]) and c["recipe_sha256"] == c["graph_recipe_sha256"] == sha
    assert c["pytorch_model"] == "fake-quant model of the recipe" and c["profile"] == "reference"
    assert c["fp_model"] == {"name": "reference", "weights": vx.weights} and c["onnx"] == str(vx.q)
    assert r["min_parity"] == MIN_PARITY_QUANTIZED and r["passed"] is True and r["parity_psnr"] >= r["min_parity"]
    captured = capsys.readouterr()
    assert "compared: reference graph" in captured.out and f"recipe {vx.recipes['W8A8']}" in captured.out
    assert captured.out.strip().splitlines()[-1].startswith("pass: parity")
    # progress while the faces run (stderr), not minutes of silence
    for stage in ("validate: ONNX Runtime", "validate: PyTorch fake-quant", "validate: latency"):
        assert stage in captured.err


def test_parity_under_the_bar_exits_1(vx, tmp_path, capsys):
    """An FP32 graph of other weights, checked against this model: a real mismatch, under the FP32 bar."""
    report = tmp_path / "v.json"
    assert _validate(vx, vx.fp32_other, json_out=report) == 1
    r = json.loads(report.read_text())
    assert r["min_parity"] == MIN_PARITY_FP32 and r["passed"] is False and r["parity_psnr"] < MIN_PARITY_FP32
    assert r["compared"]["pytorch_model"] == "FP model" and r["compared"]["recipe"] is None
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("FAIL: parity ") and f"below --min-parity {MIN_PARITY_FP32:g} dB" in err
    # the bar is the user's to set
    assert _validate(vx, vx.fp32_other, "--min-parity", f"{r['parity_psnr'] - 1:.2f}") == 0


def test_an_fp32_graph_of_the_same_weights_passes_the_fp32_bar(vx, tmp_path):
    report = tmp_path / "v.json"
    assert _validate(vx, vx.fp32, json_out=report) == 0
    r = json.loads(report.read_text())
    assert r["passed"] and r["parity_psnr"] >= MIN_PARITY_FP32


@pytest.mark.parametrize("value", ["-1", "250"])
def test_min_parity_out_of_range_is_one_line(vx, value, capsys):
    assert _validate(vx, vx.fp32, "--min-parity", value) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --min-parity {float(value)} must be a PSNR in dB between 0 and 200"
