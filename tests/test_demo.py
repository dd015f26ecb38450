"""``quantface demo``: the grid shows the quantized model's faces (input | FP | W4A4 (PyTorch) | ORT graph
| GT), validation shows progress, the summary lines are the last lines printed, and the FP-only demo
does not run a recipe while saying it uses the FP model."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from quantface.cli import main
from quantface.data import read_image, shipped_faces

CELL, HEADER = 160, 24  # jobs.make_grid's layout


def _cell(grid: np.ndarray, row: int, col: int) -> np.ndarray:
    return grid[HEADER + row * CELL: HEADER + (row + 1) * CELL, col * CELL:(col + 1) * CELL]


def test_demo_grid_shows_the_quantized_faces_and_the_summary_comes_last(tiny_weights, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a checkout: nothing is copied into android_demo/
    out = tmp_path / "demo"
    assert main(["demo", "--weights", str(tiny_weights), "--out", str(out), "--steps", "2", "--calib-faces", "4",
                 "--threads", "1", "--no-package"]) == 0
    s = json.loads((out / "summary.json").read_text())
    captured = capsys.readouterr()
    printed = [line for line in captured.out.splitlines() if line.strip()]
    assert printed[-len(s["lines"]):] == s["lines"]  # nothing after the summary
    assert s["lines"][-1].startswith(f"before/after grid: {out / 'grid.png'}")
    assert "validate: ONNX Runtime" in captured.err and "timing round" in captured.out  # progress, not silence

    g = s["grid"]
    assert g["columns"] == ["FP", "W4A4 (PyTorch)", "ORT graph"]
    grid = read_image(g["path"])
    faces = g["faces"]
    assert faces[0] == "astronaut" and grid.shape == (HEADER + CELL * len(faces), CELL * 5, 3)
    # the faces the grid shows are held out of calibration
    calib = {p.stem for p in (out / "faces" / "calibration").glob("*.png")}
    assert calib and not calib & set(faces)
    # GT: the astronaut's HQ crop; grey for the genuinely low-quality LFW photos
    hq = shipped_faces(32, lfw_count=0)[0][0]
    assert np.array_equal(_cell(grid, 0, 4), cv2.resize(hq, (CELL, CELL), interpolation=cv2.INTER_CUBIC))
    assert all((_cell(grid, r, 4)[:, :, 0] >= 200).mean() > 0.9 for r in range(1, len(faces)))
    # FP, fake-quant and graph columns are the three models' own outputs: each is the model's restoration
    fp = read_image(out / "fp" / "astronaut_restored.png")
    assert np.array_equal(_cell(grid, 0, 1), cv2.resize(fp, (CELL, CELL), interpolation=cv2.INTER_CUBIC))
    assert not np.array_equal(_cell(grid, 0, 1), _cell(grid, 0, 2))  # W4A4 is not the FP model
    assert set(g["astronaut_psnr"]) == set(g["columns"])
    assert s["validate"]["passed"] is True and "bar 40 dB: pass" in s["lines"][0]
    # the CPU deployment graph (W8A8 ort-cpu) beside ONNX Runtime's quantize_static, timed in the same run
    assert {"W8A8 ort-cpu", "quantize_static"} <= set(s["graphs"]) and s["validate_cpu"]["passed"] is True
    cpu = next(line for line in s["lines"] if line.startswith("cpu "))
    assert "W8A8 ort-cpu vs ONNX Runtime quantize_static" in cpu and "parity" in cpu and ": pass" in cpu
    assert s["quantize_static"]["settings"]["quantizer"] == "onnxruntime.quantization.quantize_static"
    assert s["quantize_static"]["psnr_to_fp"] > 20 and s["passed"] is True


@pytest.mark.parametrize("fp_only", [True, False])
def test_demo_refuses_a_recipe_it_would_not_use_as_said(fp_only, tiny_weights, tmp_path, capsys):
    """``demo --fp-only --recipe X`` used the recipe while printing "with the FP model"; the full demo
    calibrates its own recipe. Both refuse --recipe in one line, before writing anything."""
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "recipe.json").write_text("{}")
    out = tmp_path / "demo"
    argv = ["demo", "--weights", str(tiny_weights), "--out", str(out), "--recipe", str(recipe)]
    assert main(argv + (["--fp-only"] if fp_only else [])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--recipe and --onnx do not apply" in err
    assert ("--fp-only restores the shipped faces with the FP model" in err) == fp_only
    assert not out.exists()


def test_fp_only_grid_has_input_fp_and_gt_columns(tiny_weights, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--weights", str(tiny_weights), "--out", str(out), "--fp-only"]) == 0
    grid = read_image(out / "grid.png")
    assert grid.shape == (HEADER + CELL * 6, CELL * 3, 3)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"before/after grid: {out / 'grid.png'} (input | FP | GT)"
