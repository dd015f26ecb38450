"""Qualcomm's real QNN HTP backend (onnxruntime-qnn, emulated on x86) against our graphs and our
static check: node placement and its reasons, qnn_report's agreement with the EP, the HTP runner,
offline context binaries. The real-EP tests skip (with the reason) when the extra is not installed.

Numbers are checked on hand-built products (HTP within one activation step of the CPU EP). The tiny
random-weight model is not: on the emulated HTP its output is 16–19 dB from the CPU EP's (W4A4 and
W8A8, the qnn and the ort-cpu graph alike, with or without ONNX Runtime's graph optimisations),
while the trained recipes/quantface_w4a4 graph is 44.7 dB from it (export.qnn_ep's notes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantface.calibration import CalibConfig, calibrate
from quantface.cli import main
from quantface.data import load_folder
from quantface.errors import ConfigError
from quantface.export import ExportConfig, OnnxBackend, export_onnx, qnn_report
from quantface.export.integer_units import float_ops
from quantface.export.save import read_metadata
from quantface.export.qnn_ep import (SOCS, HtpBackend, get_target, open_htp_session, parse_qnn_log, placement,
                                     qnn_available)
from quantface.package import sha256_file
from quantface.pipeline import images_to_tensor
from tests.conftest import write_tiny_assets

SIZE = 32
needs_qnn = pytest.mark.skipif(not qnn_available(), reason="onnxruntime-qnn is not installed (pip install 'quantface[qnn]')")

# Lines of a real verbose QNN EP log (onnxruntime-qnn 2.7.0, a hand-built Gemm without an output Q):
# a node unit of three nodes fails together under one REASON; a one-node unit after it.
REAL_LOG = """\
2026-12-01 23:44:45.144434784 [W:onnxruntime:, qnn_model_wrapper.cc:565 CreateQnnNode] QNN.backendValidateOpConfig() failed for node `gemm` of type `FullyConnected` with error code 3110
2026-12-01 23:44:45.144456204 [V:onnxruntime:, qnn_execution_provider.cc:1713 LogNodeSupport] Validation FAILED for 3 nodes in OrtNodeUnit (Gemm) :
\tOperator type: DequantizeLinear Node name: aDQ Node index: 1
\tOperator type: DequantizeLinear Node name: wDQ Node index: 2
\tOperator type: Gemm Node name: gemm Node index: 4
\tREASON : Failed to add node.

2026-12-01 23:41:48.758249439 [V:onnxruntime:, qnn_execution_provider.cc:1713 LogNodeSupport] Validation FAILED for 1 nodes in OrtNodeUnit (DequantizeLinear) :
\tOperator type: DequantizeLinear Node name: prompt_embedder.proj_weight_DequantizeLinear Node index: 277
\tREASON : QNN EP does not support a standalone DQ op with per-channel quantization

2026-12-01 23:41:49.349685313 [V:onnxruntime:, qnn_execution_provider.cc:1713 LogNodeSupport] Validation PASSED for 1 nodes in OrtNodeUnit (Conv) :
\tOperator type: Conv Node name: decoder.conv_out_Conv Node index: 1422
"""


def test_parse_qnn_log_reads_every_failed_node_unit():
    assert parse_qnn_log(REAL_LOG) == {
        "aDQ": "Failed to add node.", "wDQ": "Failed to add node.", "gemm": "Failed to add node.",
        "prompt_embedder.proj_weight_DequantizeLinear":
            "QNN EP does not support a standalone DQ op with per-channel quantization"}


def test_soc_table_and_unknown_soc(capsys, tmp_path):
    assert (get_target("sm8650").soc_model, get_target("SM8650").htp_arch) == (57, 75)
    assert (SOCS["SM8550"].soc_model, SOCS["SM8550"].htp_arch) == (43, 73)
    with pytest.raises(ConfigError, match="unknown Snapdragon SoC 'SM1234'; known: SM8550"):
        get_target("SM1234")
    assert main(["package", "--onnx", str(tmp_path / "g.onnx"), "--out", str(tmp_path / "p"),
                 "--qnn-context", "SM8650,SM1234"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown Snapdragon SoC 'SM1234'")


def test_missing_extra_is_one_sentence(monkeypatch, tmp_path, capsys):
    import sys

    from quantface.export import qnn_ep

    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"needs the onnxruntime-qnn package \(pip install 'quantface\[qnn\]'\)"):
        qnn_ep.htp_session_options()
    assert not qnn_ep.qnn_available()
    # validate says so before its slow CPU / PyTorch runs (the graph is never opened)
    assert main(["validate", "--onnx", str(tmp_path / "g.onnx"), "--data", str(tmp_path), "--ep", "qnn-htp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: the QNN HTP backend needs the onnxruntime-qnn package (pip install 'quantface[qnn]')"]


# ------------------------------------------------------------------- hand-built graphs, real EP
C, O, L = 16, 24, 10


def _init(name, array, elem_type=None):
    array = np.asarray(array)
    if elem_type is not None:
        array = array.astype(helper.tensor_dtype_to_np_dtype(elem_type))
    return numpy_helper.from_array(array, name)


def _graph(case: str) -> onnx.ModelProto:
    """x ─ Mul 1 ─ Q ─ DQ ─ <product of DQ'd INT8 weights> ─ Relu ─ y (float ops at both ends, so the
    EP's graph-I/O quantization offload does not move a Q/DQ to the CPU)."""
    rng = np.random.default_rng(0)
    conv = case == "conv_per_channel"
    w_shape = (O, C, 3, 3) if conv else (O, C) if case.startswith("gemm") else (C, O)
    axis = 0 if conv or case.startswith("gemm") else 1
    inits = [_init("one", np.float32(1)), _init("as", np.float32(0.02)), _init("az", np.uint8(128)),
             _init("w", rng.integers(-8, 8, w_shape), TensorProto.INT8)]
    unit_scale = case == "matmul_scales_after"
    if unit_scale:
        inits += [_init("ws", np.float32(1)), _init("wz", np.int8(0)),
                  _init("cs", (rng.random(O) * 0.01 + 1e-3).astype(np.float32))]
        w_dq = helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="w_dq")
    else:
        inits += [_init("ws", (rng.random(O) * 0.01 + 1e-3).astype(np.float32)), _init("wz", np.zeros(O), TensorProto.INT8)]
        w_dq = helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="w_dq", axis=axis)
    nodes = [helper.make_node("Mul", ["x", "one"], ["x1"], name="pre"),
             helper.make_node("QuantizeLinear", ["x1", "as", "az"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "as", "az"], ["xd"], name="x_dq"), w_dq]
    if conv:
        nodes.append(helper.make_node("Conv", ["xd", "wd"], ["p"], name="product", pads=[1, 1, 1, 1]))
    elif case.startswith("gemm"):
        nodes.append(helper.make_node("Gemm", ["xd", "wd"], ["p"], name="product", transB=1))
    else:
        nodes.append(helper.make_node("MatMul", ["xd", "wd"], ["p"], name="product"))
    last = "p"
    if case in ("matmul_out_q", "gemm_out_q"):
        nodes += [helper.make_node("QuantizeLinear", ["p", "as", "az"], ["pq"], name="p_q"),
                  helper.make_node("DequantizeLinear", ["pq", "as", "az"], ["pd"], name="p_dq")]
        last = "pd"
    if unit_scale:
        nodes.append(helper.make_node("Mul", ["p", "cs"], ["ps"], name="scales"))
        last = "ps"
    nodes.append(helper.make_node("Relu", [last], ["y"], name="post"))
    x_shape = [1, C, 8, 8] if conv else [L, C] if case.startswith("gemm") else [1, L, C]
    y_shape = [1, O, 8, 8] if conv else [L, O] if case.startswith("gemm") else [1, L, O]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


# case → the nodes the real EP (onnxruntime-qnn 2.7.0, SM8650) puts on the CPU
HAND_BUILT = {
    "matmul_per_channel": {"w_dq"},  # standalone per-channel DQ (no Q on the product)
    "conv_per_channel": {"w_dq"},  # the same for a conv
    "gemm_per_channel": {"x_dq", "w_dq", "product"},  # the HTP rejects FullyConnected with a float output
    "matmul_out_q": set(),  # a full QDQ node unit
    "gemm_out_q": set(),
    "matmul_scales_after": set(),  # unit-scale per-tensor DQ → MatMul → Mul (the qnn profile's Linear)
}


@needs_qnn
@pytest.mark.parametrize("case", list(HAND_BUILT))
def test_qnn_report_agrees_with_the_real_ep_on_hand_built_graphs(case, tmp_path):
    path = tmp_path / f"{case}.onnx"
    onnx.save(_graph(case), str(path))
    where = placement(path)
    assert {n.name for n in where.cpu_nodes} == HAND_BUILT[case]
    assert all(n.reason for n in where.cpu_nodes)  # each with the EP's REASON line
    assert where.nodes_on_qnn + where.nodes_on_cpu == where.nodes_total
    assert where.qnn_partitions == (1 if not HAND_BUILT[case] else 2 if case.startswith("gemm") else 1)
    report = qnn_report(path)
    assert bool(report) == bool(HAND_BUILT[case]), report
    flagged = {line.split(":")[0].removeprefix("node ") for line in report}
    assert flagged <= HAND_BUILT[case]


# ------------------------------------------------------------------------ tiny model, real EP
@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory) -> dict[str, Path]:
    """The tiny model (Linear layers in its attention block), MinMax W4A4, exported for qnn and ort-cpu."""
    root = tmp_path_factory.mktemp("qnn_ep")
    write_tiny_assets(root, SIZE)
    recipe = calibrate(CalibConfig(method="minmax", bits="W4A4", data=str(root / "faces"), out=str(root / "recipe"),
                                   weights=str(root / "weights" / "tiny"), size=SIZE, stat_images=4)).recipe
    out = {"root": root, "recipe": recipe}
    for profile in ("qnn", "ort-cpu"):
        out[profile] = root / f"{profile}.onnx"
        export_onnx(ExportConfig(weights=str(root / "weights" / "tiny"), recipe=str(recipe), profile=profile,
                                 out=str(out[profile])))
    return out


def _face(tiny_exports) -> np.ndarray:
    return images_to_tensor(load_folder(str(tiny_exports["root"] / "faces"), SIZE, 1).images).numpy()


@needs_qnn
def test_tiny_qnn_export_runs_wholly_on_the_htp_and_qnn_report_agrees(tiny_exports):
    qnn = placement(tiny_exports["qnn"])
    assert qnn.nodes_on_cpu == 0 and qnn.qnn_partitions == 1 and qnn.nodes_on_qnn == qnn.nodes_total > 100
    assert qnn_report(tiny_exports["qnn"]) == []
    # The ort-cpu graph of the same recipe (its Linear layers as ONNX Runtime's contrib
    # MatMulIntegerToFloat, which QNN does not know): partly on the CPU, and the static check must say
    # so, naming the same nodes.
    cpu = placement(tiny_exports["ort-cpu"])
    assert cpu.nodes_on_cpu > 0
    report = qnn_report(tiny_exports["ort-cpu"])
    flagged = {line.split(":")[0].removeprefix("node ") for line in report}
    assert all("com.microsoft::MatMulIntegerToFloat" in line for line in report)
    assert flagged and flagged == {n.name for n in cpu.cpu_nodes}


@needs_qnn
@pytest.mark.parametrize("case", list(HAND_BUILT))
def test_htp_computes_the_hand_built_graphs_like_the_cpu_ep(case, tmp_path):
    """Numbers, not only placement: the emulated HTP (FP16 float ops) within one activation step
    (0.02) of the CPU EP on every hand-built product, the qnn profile's scales-after-product included."""
    path = tmp_path / f"{case}.onnx"
    model = _graph(case)
    onnx.save(model, str(path))
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).uniform(-2, 2, shape).astype(np.float32)
    y_htp = open_htp_session(path).run(None, {"x": x})[0]
    y_cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(y_cpu).max() > 0.1 and np.abs(y_htp - y_cpu).max() <= 0.02 * 1.01


@needs_qnn
def test_htp_backend_runs_the_tiny_qnn_export(tiny_exports):
    x = _face(tiny_exports)
    htp = HtpBackend(tiny_exports["qnn"], cpu_fallback=False)  # creation fails if a node needed the CPU
    y = htp(np.concatenate([x, x]))  # a static batch of 1, run twice through OnnxBackend's batching
    assert y.shape == (2, *x.shape[1:]) and np.isfinite(y).all() and np.array_equal(y[0], y[1])
    assert htp.metadata["quantface.profile"] == "qnn"


@needs_qnn
def test_target_qnn_mixed_w4_a8_a16_graph_runs_wholly_on_the_htp(tiny_exports):
    """``calibrate --bits W4A8 --target qnn`` (W4/W8 x A8/A16 per layer, no online node): its qnn graph is
    integer node units only (the recipe's quantizer points), every node on the HTP (a session without CPU
    fallback opens and runs), and the HTP computes it like the CPU EP."""
    root = tiny_exports["root"]
    recipe = calibrate(CalibConfig(method="quantface", bits="W4A8", target="qnn", mp_budget=0.7, mp_latency_budget=1.5,
                                   data=str(root / "faces"), out=str(root / "recipe_target_qnn"), steps=0,
                                   weights=str(root / "weights" / "tiny"), size=SIZE, stat_images=4,
                                   mp_sweep_images=2)).recipe
    layers = json.loads((recipe / "recipe.json").read_text())["layers"].values()
    assert {e["act_bits"] for e in layers} == {8, 16} and {e["weight_bits"] for e in layers} == {4, 8}
    path = root / "target_qnn.onnx"
    export_onnx(ExportConfig(weights=str(root / "weights" / "tiny"), recipe=str(recipe), profile="qnn", out=str(path)))
    model = onnx.load(str(path))
    assert float_ops(model) == [] and read_metadata(model)["integer_units"] == "true"
    where = placement(path)
    assert where.nodes_on_cpu == 0 and where.qnn_partitions == 1 and where.nodes_on_qnn == where.nodes_total
    assert qnn_report(path) == []
    x = _face(tiny_exports)
    y_htp = HtpBackend(path, cpu_fallback=False)(x)
    y_cpu = OnnxBackend(path)(x)
    # Fixed-point arithmetic on the HTP (16-bit sigmoid, softmax, norms) is not the CPU EP's float: close,
    # not equal (measured 37.3 dB on this random-weight model; the trained model's graph: see docs/deploy_bench.md).
    psnr = 10 * np.log10(1 / np.mean(((y_htp.clip(-1, 1) - y_cpu.clip(-1, 1)) / 2) ** 2))
    assert np.abs(y_cpu).max() > 0.1 and psnr >= 35, psnr


@needs_qnn
def test_context_binaries_compile_load_and_match_the_plain_graph(tiny_exports, tmp_path, capsys):
    out = tmp_path / "pkg"
    assert main(["package", "--onnx", str(tiny_exports["qnn"]), "--out", str(out), "--format", "onnx",
                 "--qnn-context", "SM8650,sm8550"]) == 0
    assert "QNN context for SM8550" in capsys.readouterr().out
    manifest = json.loads((out / "model.json").read_text())
    entries = {c["soc"]: c for c in manifest["qnn_contexts"]}
    assert set(entries) == {"SM8650", "SM8550"}
    x = _face(tiny_exports)
    for soc, c in entries.items():
        target = get_target(soc)
        assert (c["soc_model"], c["htp_arch"]) == (target.soc_model, target.htp_arch)
        assert sha256_file(out / c["model_file"]) == c["model_sha256"]
        assert sha256_file(out / c["binary_file"]) == c["binary_sha256"]
        assert (out / c["binary_file"]).stat().st_size == c["binary_bytes"] > 0
        assert c["check_max_abs"] == 0.0
        ctx = HtpBackend(out / c["model_file"], target, cpu_fallback=False)  # loads the binary, no CPU node
        assert np.array_equal(ctx(x), HtpBackend(tiny_exports["qnn"], target)(x))  # one face, bit for bit


@needs_qnn
def test_validate_reports_htp_placement_and_parity(tiny_exports, tmp_path):
    from quantface.degradation import degrade
    from quantface.metrics import PSNR_CAP, output_psnr
    from quantface.validate import ValidateConfig, validate
    from quantface.jobs import ModelSpec

    spec = ModelSpec(weights=str(tiny_exports["root"] / "weights" / "tiny"), recipe=str(tiny_exports["recipe"]))
    r = validate(ValidateConfig(onnx=str(tiny_exports["qnn"]), data=str(tiny_exports["root"] / "faces"), model=spec,
                                limit=2, repeats=1, ep="qnn-htp", htp_limit=1, json_out=str(tmp_path / "v.json")))
    h = json.loads((tmp_path / "v.json").read_text())["htp"]
    assert h == r["htp"] and h["n"] == 1 and h["soc"] == "SM8650"
    assert h["nodes_on_cpu"] == 0 and h["cpu_nodes"] == [] and h["nodes_on_qnn"] == h["nodes_total"]
    # The parity fields are the HTP's output on the first face against the CPU EP's (recomputed here;
    # the tiny random-weight model itself is not HTP-stable: see the module docstring).
    lq = degrade(load_folder(str(tiny_exports["root"] / "faces"), SIZE, 1).images[0], 0, 0)[0]
    x = images_to_tensor([lq]).numpy()
    y_htp, y_cpu = HtpBackend(tiny_exports["qnn"])(x), OnnxBackend(tiny_exports["qnn"])(x)
    assert h["parity_psnr_to_cpu"] == pytest.approx(output_psnr(y_htp.astype(np.float64), y_cpu.astype(np.float64)))
    assert h["parity_max_abs_to_cpu"] == pytest.approx(float(np.abs(y_htp - y_cpu).max()))
    assert 0 < h["parity_psnr_to_torch"] < PSNR_CAP
    with pytest.raises(ConfigError, match="unknown --ep"):
        ValidateConfig(onnx="g.onnx", data="d", ep="gpu")
