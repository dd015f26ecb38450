"""Quantizer points and the qnn profile's integer node units (quantface.points, export.integer_units) on the
tiny seeded model: the FP path untouched, constants stored exactly where the simulation rounds them, the
recipe's points section, a qnn graph with no float op outside a QDQ node unit that ONNX Runtime computes
like the PyTorch simulation, and the exactness of the graph rewrites. (The real QNN EP's placement of that
graph: tests/test_qnn_ep.py.)"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from quantface.calibration import CalibConfig, calibrate
from quantface.calibration.recipe import apply_recipe
from quantface.data import load_folder
from quantface.export import ExportConfig, OnnxBackend, export_onnx
from quantface.export.integer_units import float_ops, layer_norms_as_instance_norms, widen_norm_inputs
from quantface.export.save import read_metadata
from quantface.models import load_model
from quantface.models.reference import GroupNorm, ReferenceRestorer
from quantface.pipeline import images_to_tensor
from quantface.points import (ActiveConstant, ActivePoint, QuantPoint, constant_codes, dequantized_constant, install,
                              points)
from quantface.recipe import RecipeError, read_recipe
from tests.conftest import TINY, write_tiny_assets

SIZE = 32


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(4 / np.mean((np.clip(a, -1, 1) - np.clip(b, -1, 1)) ** 2)))


@pytest.fixture(scope="module")
def units(tmp_path_factory) -> dict:
    """A tiny W4A8 --target qnn recipe (points recorded by calibration), a copy without its points section,
    and the qnn graph of each."""
    root = tmp_path_factory.mktemp("units")
    weights, faces = write_tiny_assets(root, SIZE)
    recipe = calibrate(CalibConfig(method="quantface", bits="W4A8", target="qnn", mp_budget=0.7, mp_latency_budget=1.5,
                                   data=str(faces), out=str(root / "recipe"), steps=0, weights=str(weights), size=SIZE,
                                   stat_images=4, mp_sweep_images=2)).recipe
    bare = root / "bare"
    shutil.copytree(recipe, bare)
    meta = json.loads((bare / "recipe.json").read_text())
    del meta["points"]
    (bare / "recipe.json").write_text(json.dumps(meta))
    out = {"root": root, "weights": weights, "faces": faces, "recipe": recipe, "bare": bare}
    for name, r in (("qnn", recipe), ("qnn_bare", bare)):
        out[name] = root / f"{name}.onnx"
        export_onnx(ExportConfig(weights=str(weights), recipe=str(r), profile="qnn", out=str(out[name])))
    return out


def test_points_leave_the_fp_path_alone_and_the_split_path_is_the_same_math(tiny_model):
    x = torch.randn(2, 8, 6, 6)
    norm = GroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    assert torch.equal(norm(x), F.group_norm(x, 4, norm.weight, norm.bias, 1e-6))  # inactive: the one FP op
    lq = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        fused = tiny_model(lq)
        install(tiny_model, lambda name: ActivePoint(), lambda name: ActiveConstant())  # split, no rounding
        split = tiny_model(lq)
    assert (fused - split).abs().max() < 1e-5
    assert sum(p.numel() for p in ReferenceRestorer(TINY).parameters()) == sum(p.numel() for p in tiny_model.parameters())


def test_constant_codes_are_exact_for_repeated_values_and_are_what_onnx_runtime_dequantizes():
    for c in (0.25, -3.0, 0.0, 1 / 3):
        v = torch.full((5,), c)
        assert torch.equal(dequantized_constant(v), v)
    gamma = torch.randn(64) * 0.3 + 1.0
    codes, scale, zero = constant_codes(gamma)
    assert codes.min() >= 0 and codes.max() <= 65535
    assert (dequantized_constant(gamma) - gamma).abs().max() <= scale / 2 * 1.0001
    node = helper.make_node("DequantizeLinear", ["c", "s", "z"], ["y"])
    graph = helper.make_graph([node], "dq", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])], [
        numpy_helper.from_array(codes.numpy().astype(np.uint16), "c"),
        numpy_helper.from_array(np.array(scale, np.float32), "s"),
        numpy_helper.from_array(np.array(zero, np.uint16), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    assert np.array_equal(y, dequantized_constant(gamma).numpy())


def test_calibration_records_every_point_and_the_simulation_rounds_at_each(units):
    recipe = read_recipe(units["recipe"])
    fp = load_model("reference", str(units["weights"]))
    assert set(recipe.sections["points"]) == set(points(fp)) and len(points(fp)) > 50
    assert all(lo <= hi for lo, hi in recipe.sections["points"].values())
    sim = apply_recipe(fp, recipe, points=True)
    assert all(isinstance(p, QuantPoint) for p in points(sim).values())
    assert not any(isinstance(p, QuantPoint) for p in points(apply_recipe(fp, recipe)).values())
    with pytest.raises(RecipeError, match="records no quantizer points"):
        apply_recipe(fp, units["bare"], points=True)
    recipe.sections["points"].pop(next(iter(recipe.sections["points"])))
    with pytest.raises(RecipeError, match="does not match the model's quantizer points"):
        apply_recipe(fp, recipe, points=True)


def test_qnn_graph_with_points_is_integer_units_only_and_matches_the_simulation(units):
    model = onnx.load(str(units["qnn"]))
    assert float_ops(model) == [] and read_metadata(model)["integer_units"] == "true"
    ops = {n.op_type for n in model.graph.node}
    assert {"Gemm", "InstanceNormalization", "Softmax", "Sigmoid"} <= ops and "LayerNormalization" not in ops
    # Without the points section the same recipe exports the float form: the check can fail
    bare = onnx.load(str(units["qnn_bare"]))
    assert read_metadata(bare)["integer_units"] == "false" and len(float_ops(bare)) > 50
    x = images_to_tensor(load_folder(str(units["faces"]), SIZE, 2).images)
    y_graph = OnnxBackend(units["qnn"])(x.numpy())
    sim = apply_recipe(load_model("reference", str(units["weights"])), units["recipe"], points=True)
    with torch.no_grad():
        y_sim = sim(x).numpy()
    # Float ops of ONNX Runtime vs torch in front of 16-bit quantizers move a few codes; this random-weight
    # model amplifies them (measured 40.5 dB; the trained model's W4A8 qnn graph: 56.0 dB on 8 faces).
    assert np.abs(y_sim).max() > 0.1 and _psnr(y_graph, y_sim) >= 36


def _config_entry(session, key: str) -> str | None:
    try:
        return session.get_session_options().get_session_config_entry(key)
    except RuntimeError:  # ORT raises for a key the options do not hold
        return None


def test_with_qdq_fusions_off_onnx_runtime_computes_full_range_w8a8_codes_exactly_on_any_cpu():
    """ORT's fused U8S8 convolution saturates full-range W8A8 codes exactly where ``u8s8_saturates`` says
    (x86 without VNNI); a session with its QDQ fusions off (``exact_qdq``) is exact everywhere."""
    from quantface.onnx_runtime import u8s8_saturates
    from tools.check_u8s8_saturation import mismatch

    assert mismatch(127, 255, exact_qdq=True) == (0.0, 0.0)
    assert (mismatch(127, 255)[0] > 0.01) == u8s8_saturates()
    assert mismatch(63, 255) == (0.0, 0.0)  # 7-bit weights (reduce_range): exact with the fusions on too


def test_onnx_backend_runs_a_qnn_graph_without_qdq_fusions_where_they_saturate_and_others_as_ort_does(
        units, tmp_path, monkeypatch):
    import quantface.export.api as api
    from quantface.onnx_runtime import DISABLE_QUANT_QDQ

    ort_cpu = tmp_path / "ort_cpu.onnx"
    export_onnx(ExportConfig(weights=str(units["weights"]), recipe=str(units["recipe"]), profile="ort-cpu",
                             out=str(ort_cpu)))
    for saturates in (True, False):
        monkeypatch.setattr(api, "u8s8_saturates", lambda: saturates)
        qnn, cpu = OnnxBackend(units["qnn"]), OnnxBackend(ort_cpu)
        assert (qnn.exact_qdq, cpu.exact_qdq) == (saturates, False)
        assert (_config_entry(qnn.session, DISABLE_QUANT_QDQ) == "1") == saturates
        assert (qnn.exact_qdq_note() is not None) == saturates and cpu.exact_qdq_note() is None
        assert not OnnxBackend(units["qnn"], exact_qdq=False).exact_qdq and OnnxBackend(ort_cpu, exact_qdq=True).exact_qdq
    x = images_to_tensor(load_folder(str(units["faces"]), SIZE, 1).images).numpy()
    monkeypatch.setattr(api, "u8s8_saturates", lambda: True)
    assert np.array_equal(OnnxBackend(units["qnn"])(x), OnnxBackend(units["qnn"], exact_qdq=True)(x))


def test_other_profiles_and_recipes_with_online_ops_ignore_the_points(units, tmp_path):
    for profile in ("ort-cpu", "reference"):
        a, b = tmp_path / f"{profile}_a.onnx", tmp_path / f"{profile}_b.onnx"
        for r, path in ((units["recipe"], a), (units["bare"], b)):
            export_onnx(ExportConfig(weights=str(units["weights"]), recipe=str(r), profile=profile, out=str(path)))
        ga, gb = onnx.load(str(a)).graph, onnx.load(str(b)).graph
        assert [n.op_type for n in ga.node] == [n.op_type for n in gb.node]
    rotated = calibrate(CalibConfig(method="quantface", bits="W4A4", data=str(units["faces"]), out=str(tmp_path / "r"),
                                    steps=0, weights=str(units["weights"]), size=SIZE, stat_images=4)).recipe
    assert "points" in json.loads((rotated / "recipe.json").read_text())
    path = tmp_path / "rotated.onnx"
    export_onnx(ExportConfig(weights=str(units["weights"]), recipe=str(rotated), profile="qnn", out=str(path)))
    assert read_metadata(onnx.load(str(path)))["integer_units"] == "false"  # online rotation, float branches


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_layer_norm_as_instance_norm_and_the_widened_norm_input_compute_the_same():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 12, 16)).astype(np.float32) * 3 + 1
    ln = helper.make_node("LayerNormalization", ["x", "one"], ["y"], name="/blk/norm/LayerNormalization", axis=-1,
                          epsilon=1e-5)
    graph = helper.make_graph([ln], "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12, 16])],
                              [numpy_helper.from_array(np.ones(16, np.float32), "one")],
                              value_info=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    before = _run(onnx.ModelProto.FromString(model.SerializeToString()), {"x": x})
    after = layer_norms_as_instance_norms(model)
    assert [n.op_type for n in after.graph.node] == ["Reshape", "InstanceNormalization", "Reshape"]
    assert np.abs(_run(after, {"x": x}) - before).max() < 1e-5
    # An 8-bit input widened to 16 bits before InstanceNormalization: the same values
    codes = rng.integers(0, 256, (1, 4, 10)).astype(np.uint8)
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq"),
             helper.make_node("InstanceNormalization", ["d", "g", "b"], ["y"], name="norm", epsilon=1e-6)]
    inits = [numpy_helper.from_array(np.array(0.0371, np.float32), "s"), numpy_helper.from_array(np.array(117, np.uint8), "z"),
             numpy_helper.from_array(np.ones(4, np.float32), "g"), numpy_helper.from_array(np.zeros(4, np.float32), "b")]
    graph = helper.make_graph(nodes, "in", [helper.make_tensor_value_info("q", TensorProto.UINT8, [1, 4, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    before = _run(onnx.ModelProto.FromString(model.SerializeToString()), {"q": codes})
    after = widen_norm_inputs(model)
    assert [n.op_type for n in after.graph.node] == ["DequantizeLinear", "QuantizeLinear", "DequantizeLinear",
                                                     "InstanceNormalization"]
    assert np.abs(_run(after, {"q": codes}) - before).max() < 1e-5


def test_add_points_reproduces_what_calibration_recorded(units, tmp_path):
    """tools/add_points.py on a recipe written without points records calibration's own ranges."""
    from quantface.calibration.run import add_points

    copy = tmp_path / "copy"
    shutil.copytree(units["bare"], copy)
    add_points(copy, str(units["faces"]))
    assert read_recipe(copy).sections["points"] == read_recipe(units["recipe"]).sections["points"]
    assert read_recipe(copy).sha256 == read_recipe(units["recipe"]).sha256  # tensors untouched


def test_every_integer_unit_layer_matches_its_simulation_layer_by_layer(units):
    """Each quantized layer of the integer-unit graph (requantized convs, 16-bit ones included, Linear
    layers as Gemm units) computes what ``apply_recipe(..., points=True)`` simulates, on the graph's own input."""
    from quantface.onnx_runtime import cpu_has_vnni
    from tests.parity import layer_parity

    recipe = json.loads((units["recipe"] / "recipe.json").read_text())["layers"]
    sim = apply_recipe(load_model("reference", str(units["weights"])), units["recipe"], points=True)
    x = images_to_tensor(load_folder(str(units["faces"]), SIZE, 1).images).numpy()
    parity = layer_parity(units["qnn"], sim, x)
    assert any(recipe[n]["kind"] == "linear" for n in parity) and any(recipe[n]["act_bits"] == 16 for n in parity)
    # (8-bit x 8-bit codes saturate ONNX Runtime's U8S8 kernels on x86 without VNNI: tools/check_u8s8_saturation.py)
    exact = {n: p for n, p in parity.items() if cpu_has_vnni() is not False
             or (recipe[n]["weight_bits"], recipe[n]["act_bits"]) != (8, 8)}
    assert exact and all(p.rel_l2 <= 1e-4 and p.exact_fraction >= 0.99 for p in exact.values()), \
        {n: p for n, p in exact.items() if p.rel_l2 > 1e-4 or p.exact_fraction < 0.99}
