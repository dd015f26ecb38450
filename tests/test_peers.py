"""ONNX Runtime's peer quantizers (``quantface.export.peers``) and the deploy benchmark
(``quantface.deploy_bench``) on the tiny seeded model (32×32) and a few synthetic faces.

What a peer graph's quantized convolution looks like (ORT's QDQ format)::

    x ─ QuantizeLinear(u8|u16) ─ DequantizeLinear ─┐
        W codes (int8, per output channel) ─ DequantizeLinear(axis 0) ─┴─ Conv ─ QuantizeLinear ─ ...
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from quantface.data import write_image
from quantface.errors import ConfigError
from quantface.export import ExportConfig, OnnxBackend, export_onnx
from quantface.export.peers import PEERS, FaceCalibrationReader, build_peer, get_peer
from quantface.models.reference import ReferenceRestorer
from quantface.metrics import output_psnr
from tests.conftest import TINY, smooth_image

SIZE = 32
# A peer graph's output vs the FP32 graph's on a calibration-like face, outputs mapped to [0, 1]. ORT's
# QNN config quantizes MatMul weights per tensor (the HTP's rule; quantize_static's preprocessing fuses
# MatMul + Add into Gemm with per-channel weights): at A8W8 that costs the untrained tiny model ~10 dB.
PEER_PSNR_DB = {"ort-static-minmax": 25.0, "ort-static-percentile": 25.0, "ort-qnn-a8w8": 15.0, "ort-qnn-a16w8": 25.0}


class _Setup:
    def __init__(self, root: Path):
        from quantface.models.store import save_weights

        torch.manual_seed(0)
        self.fp = ReferenceRestorer(TINY).eval()
        self.root = root
        self.weights = root / "weights" / "tiny"
        save_weights(self.fp, self.weights)
        rng = np.random.default_rng(0)
        for i in range(4):
            write_image(root / "faces" / f"{i:03d}.png", smooth_image(rng, 40))  # resized to 32 on loading
        self.faces = root / "faces"
        self.fp32 = export_onnx(ExportConfig(weights=str(self.weights), out=str(root / "fp32.onnx"))).path
        self.peers: dict[str, Path] = {}

    def peer(self, name: str) -> Path:
        if name not in self.peers:
            reader = FaceCalibrationReader.from_faces(self.fp32, str(self.faces), 4, 0)
            self.peers[name] = build_peer(self.fp32, get_peer(name), reader, self.root / f"{name}.onnx").path
        return self.peers[name]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> _Setup:
    return _Setup(tmp_path_factory.mktemp("peers"))


def test_reader_yields_exactly_the_calibration_inputs(setup):
    from quantface.calibration.config import CalibConfig
    from quantface.calibration.run import CalibData

    for seed in (0, 3):
        cfg = CalibConfig(method="minmax", bits="W8A8", data=str(setup.faces), out=str(setup.root / "unused"),
                          weights=str(setup.weights), size=SIZE, seed=seed, limit=3)
        expected = CalibData.build(setup.fp, cfg, SIZE).lq.numpy()
        reader = FaceCalibrationReader.from_faces(setup.fp32, str(setup.faces), 3, seed)
        fed = [item[reader.input_name] for item in reader]
        assert len(fed) == len(reader) == 3
        assert all(f.shape == (1, 3, SIZE, SIZE) and f.dtype == np.float32 for f in fed)
        np.testing.assert_array_equal(np.concatenate(fed), expected)
    other = FaceCalibrationReader.from_faces(setup.fp32, str(setup.faces), 3, 1)
    assert not np.array_equal(other.inputs, expected)  # the seed matters
    reader.set_range(1, 2)  # ORT's chunked calibration (CalibStridedMinMax / stride)
    np.testing.assert_array_equal(reader.get_next()[reader.input_name], expected[1:2])
    assert reader.get_next() is None


def _conv_weight_dqs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    producer = {o: n for n in model.graph.node for o in n.output}
    return [(n, producer.get(n.input[1])) for n in model.graph.node if n.op_type == "Conv"]


@pytest.mark.parametrize("name", list(PEERS))
def test_peer_is_a_qdq_graph_with_per_channel_int8_conv_weights(setup, name):
    path = setup.peer(name)
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    pairs = _conv_weight_dqs(model)
    assert len(pairs) == sum(1 for n in onnx.load(str(setup.fp32)).graph.node if n.op_type == "Conv")
    for conv, dq in pairs:
        assert dq is not None and dq.op_type == "DequantizeLinear", conv.name
        codes, scale = inits[dq.input[0]], numpy_helper.to_array(inits[dq.input[1]])
        assert codes.data_type == TensorProto.INT8, conv.name
        assert scale.shape == (codes.dims[0],) and codes.dims[0] > 1, conv.name  # one scale per output channel
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        assert axis == 0, conv.name
        if len(dq.input) > 2:  # symmetric weights: zero points 0
            assert not numpy_helper.to_array(inits[dq.input[2]]).any(), conv.name
    act_type = TensorProto.UINT16 if name == "ort-qnn-a16w8" else TensorProto.UINT8
    q_types = {inits[n.input[2]].data_type for n in model.graph.node
               if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits}
    assert q_types == {act_type}
    meta = {p.key: p.value for p in model.metadata_props}
    assert set(meta) == {"quantface.peer"} and json.loads(meta["quantface.peer"])["name"] == name

    x = FaceCalibrationReader.from_faces(setup.fp32, str(setup.faces), 1, 5).inputs  # a face, other degradation
    out, ref = OnnxBackend(path)(x), OnnxBackend(setup.fp32)(x)
    assert out.shape == ref.shape
    assert output_psnr(out, ref) > PEER_PSNR_DB[name]


def test_unknown_peer_and_bad_graph_specs_are_one_sentence(setup):
    from quantface.deploy_bench import DeployBenchConfig, GraphSpec

    with pytest.raises(ConfigError, match="unknown peer quantizer"):
        get_peer("ort-dynamic")
    with pytest.raises(ConfigError, match="NAME=PATH"):
        GraphSpec.parse("no-equals-sign.onnx")
    assert GraphSpec.parse("ours=a/b.onnx@recipes/x") == GraphSpec("ours", "a/b.onnx", "recipes/x")
    assert GraphSpec.parse("ours=a/b.onnx") == GraphSpec("ours", "a/b.onnx", None)
    with pytest.raises(ConfigError, match="does not exist"):
        DeployBenchConfig(calib="c", test="t", graphs=[GraphSpec("ours", str(setup.root / "missing.onnx"))])
    with pytest.raises(ConfigError, match="unique"):
        DeployBenchConfig(calib="c", test="t", graphs=[GraphSpec("FP32", str(setup.fp32))])


def test_deploy_bench_reports_every_graph(setup, tmp_path):
    from quantface.calibration import CalibConfig, calibrate
    from quantface.deploy_bench import DeployBenchConfig, GraphSpec, deploy_bench

    recipe = calibrate(CalibConfig(method="minmax", bits="W4A4", data=str(setup.faces), out=str(tmp_path / "recipe"),
                                   weights=str(setup.weights), size=SIZE, stat_images=2, batch_size=2)).recipe
    ours = export_onnx(ExportConfig(weights=str(setup.weights), recipe=str(recipe), profile="ort-cpu",
                                    out=str(tmp_path / "ours.onnx"))).path
    ours_qnn = export_onnx(ExportConfig(weights=str(setup.weights), recipe=str(recipe), profile="qnn",
                                        out=str(tmp_path / "ours-qnn.onnx"))).path
    cfg = DeployBenchConfig(calib=str(setup.faces), test=str(setup.faces), weights=str(setup.weights),
                            graphs=[GraphSpec("ours", str(ours), str(recipe)),
                                    GraphSpec("ours-qnn", str(ours_qnn), str(recipe))], peers=("ort-static-minmax",),
                            calib_limit=2, test_limit=2, htp_faces=1,
                            threads=1, repeats=2, profile_runs=1, out=str(tmp_path / "bench.md"),
                            json_out=str(tmp_path / "bench.json"), command="pytest")
    r = deploy_bench(cfg)
    assert list(r["graphs"]) == ["FP32", "ort-static-minmax", "ours", "ours-qnn"]
    keys = {"kind", "path", "recipe", "file_bytes", "size_vs_fp32", "median_ms", "min_ms", "speedup_vs_fp32",
            "speedup_vs_static_minmax", "kernel_ms_by_part", "quality", "test_faces"}
    for name, row in r["graphs"].items():
        assert keys <= set(row), name
        assert set(row["quality"]) == {"psnr", "ssim", "psnr_to_fp", "ssim_to_fp"}, name
        assert list(row["kernel_ms_by_part"]) == r["parts"] and sum(row["kernel_ms_by_part"].values()) > 0, name
        assert row["test_faces"] == 2 and row["file_bytes"] > 0 and row["median_ms"] > 0, name
    g = r["graphs"]
    assert g["FP32"]["size_vs_fp32"] == 1.0 and g["FP32"]["speedup_vs_fp32"] == 1.0
    assert g["ort-static-minmax"]["speedup_vs_static_minmax"] == 1.0
    for row in g.values():  # (the tiny model's weights are too small for INT8 to shrink its file)
        assert row["size_vs_fp32"] == row["file_bytes"] / g["FP32"]["file_bytes"]
    assert g["ort-static-minmax"]["kernel_ms_by_part"]["integer convolutions (QLinearConv)"] > 0
    assert g["ours"]["recipe"] == str(recipe) and g["ours"]["kind"] == "ours"
    assert g["ours"]["export"]["profile"] == "ort-cpu" and g["ours"]["export"]["method"] == "minmax"
    fp_q = g["FP32"]["quality"]  # the FP32 graph is the FP model: (near-)identical outputs
    assert fp_q["psnr_to_fp"] == "inf" or fp_q["psnr_to_fp"] > 45
    assert r["calibration_faces"] == 2
    htp = importlib.util.find_spec("onnxruntime_qnn") is not None
    # HTP placement only for the HTP graph, measured by the real QNN EP where it is installed
    assert [n for n, row in g.items() if "htp_placement" in row] == (["ours-qnn"] if htp else [])
    assert (r["htp_placement_reason"] == "") == htp
    if htp:
        p = g["ours-qnn"]["htp_placement"]
        assert p["nodes_total"] == p["nodes_on_qnn"] + p["nodes_on_cpu"] and p["nodes_on_qnn"] > 0
        # its output on one face emulated on the HTP against the CPU EP's (FP16 float ops there: not equal; the
        # tiny W4A4 model's x0 step amplifies the difference, so only that it was measured is checked here)
        assert p["parity_faces"] == 1 and p["psnr_htp_vs_cpu"] > 0 and p["max_abs_htp_vs_cpu"] > 0
        assert p["emulated_seconds_per_face"] > 0 and "(1 faces)" in (tmp_path / "bench.md").read_text()
    assert json.loads((tmp_path / "bench.json").read_text())["graphs"].keys() == g.keys()
    text = (tmp_path / "bench.md").read_text()
    assert "`pytest`" in text and all(f"| {name} |" in text for name in g)
    assert ("Qualcomm HTP placement (the real QNN EP" in text) == htp
    assert ("no VNNI" in text) == (r["cpu_has_vnni"] is False)


def test_bench_tool_reports_a_bad_graph_spec_in_one_line(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_deploy", Path(__file__).parents[1] / "tools" / "bench_deploy.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--graph", "missing-equals.onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --graph 'missing-equals.onnx' must look like NAME=PATH")


def test_evaluate_scores_against_given_fp_restorations_as_against_its_own(setup):
    from quantface.jobs import EvalConfig, ModelSpec, evaluate, fp_restorations

    cfg = EvalConfig(data=str(setup.faces), limit=2, model=ModelSpec(weights=str(setup.weights),
                                                                   onnx=str(setup.peer("ort-static-minmax"))))
    own, given = evaluate(cfg), evaluate(cfg, fp_out=fp_restorations(cfg))
    assert [r["psnr_to_fp"] for r in own["per_image"]] == [r["psnr_to_fp"] for r in given["per_image"]]
    with pytest.raises(ConfigError, match="do not match"):
        evaluate(cfg, fp_out=fp_restorations(cfg)[:1])


def test_building_a_peer_logs_no_warnings_of_ort_and_restores_the_root_level(setup, tmp_path, caplog):
    """ORT's quantize_static warns on the root logger for every 1-D norm weight it leaves per tensor
    ("Axis 1 is out-of-range"; dozens of lines for the reference model); build_peer keeps them out."""
    import logging

    reader = FaceCalibrationReader.from_faces(setup.fp32, str(setup.faces), 4, 0)
    root = logging.getLogger()
    before = root.level
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        build_peer(setup.fp32, get_peer("ort-static-minmax"), reader, tmp_path / "minmax.onnx")
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert root.level == logging.WARNING  # caplog's level, back after the build
    assert root.level == before
    assert not [w for w in warnings if "out-of-range" in w], warnings[:3]
