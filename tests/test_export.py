"""The QDQ ONNX exporter on the tiny model (32×32): graph structure against the recipe, numerical
parity with the PyTorch fake-quant model, the FP32 graph, atomic writing and clear errors.

One quantized layer in the exported graph (names are the recipe's layer names)::

    x ─ P_Smooth ─ P_Hadamard ─┬─ [P_Clip] ─ P_QuantizeLinear ─ P_DequantizeLinear ─┐
                               │        P.weight_codes ─ P_weight_DequantizeLinear ─┴─ P_Conv ─┐
                               └─ P_LowRankDown ─ P_LowRankUp ──────────────────────── P_LowRankAdd ─ y

Calibrations and exports are cached per module (``_Cache``) so the file runs in well under a minute.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from safetensors.torch import load_file

from quantface.calibration import CalibConfig, calibrate
from quantface.calibration.recipe import apply_recipe
from quantface.recipe import RecipeError, read_recipe
from quantface.export import ExportConfig, ExportError, OnnxBackend, export_onnx, qnn_report
from quantface.export import save as save_mod
from quantface.export.graph import all_names
from quantface.export.save import read_metadata
from quantface import __version__
from quantface.data import write_image
from quantface.errors import ConfigError, QuantFaceError
from quantface.models.reference import ReferenceRestorer
from quantface.pipeline import RestorationPipeline, TorchBackend
from quantface.quant import EPS
from tests.conftest import TINY, smooth_image
from quantface.metrics import output_psnr
from tests.parity import float_products_of_weight_codes, fused_qlinearconvs, layer_parity

SIZE = 32
PARITY_PSNR_DB = 40.0  # ORT vs PyTorch fake-quant, outputs mapped to [0, 1]
FP32_MAX_ABS = 1e-4  # ORT FP32 graph vs the PyTorch FP model
# Layers on the fixed-timestep path: input-independent, so folded into constants by export.fold.
TIMESTEP_LAYERS = {"unet.time_in", "unet.time_out", "unet.down_blocks.0.temb_proj", "unet.mid_block1.temb_proj",
                   "unet.mid_block2.temb_proj", "unet.up_blocks.0.temb_proj"}
CASES = [("quantface", "W4A4"), ("minmax", "W4A4"), ("svdquant", "W6A6")]  # rotation+LoRA / plain / 6-bit
PROFILES = ["reference", "ort-cpu", "qnn"]


def _tiny_fp() -> ReferenceRestorer:
    torch.manual_seed(0)  # the same weights as conftest's ``tiny_model``
    return ReferenceRestorer(TINY).eval()


class _Cache:
    """Tiny weights, calibration images, recipes and exports shared by the module's tests."""

    def __init__(self, root: Path):
        from quantface.models.store import save_weights

        self.root = root
        self.fp = _tiny_fp()
        self.weights = root / "weights" / "tiny"
        save_weights(self.fp, self.weights)
        rng = np.random.default_rng(0)
        for i in range(4):
            write_image(root / "faces" / f"{i:03d}.png", smooth_image(rng, SIZE))
        self.recipes: dict[tuple[str, str], Path] = {}
        self.exports: dict[tuple, Path] = {}

    def recipe(self, method: str, bits: str) -> Path:
        key = (method, bits)
        if key not in self.recipes:
            cfg = CalibConfig(method=method, bits=bits, data=str(self.root / "faces"),
                              out=str(self.root / "recipes" / f"{method}_{bits}"), weights=str(self.weights),
                              size=SIZE, stat_images=4, rank=2, batch_size=2, steps=2)
            self.recipes[key] = calibrate(cfg).recipe
        return self.recipes[key]

    def recipe_layers(self, method: str, bits: str) -> dict[str, dict]:
        return json.loads((self.recipe(method, bits) / "recipe.json").read_text())["layers"]

    def export(self, method: str | None, bits: str = "W4A4", profile: str = "reference", **kw) -> Path:
        key = (method, bits, profile, tuple(sorted(kw.items())))
        if key not in self.exports:
            out = self.root / "onnx" / f"{method}_{bits}_{profile}_{len(self.exports)}.onnx"
            recipe = str(self.recipe(method, bits)) if method else None
            export_onnx(ExportConfig(weights=str(self.weights), recipe=recipe, profile=profile, out=str(out), **kw))
            self.exports[key] = out
        return self.exports[key]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> _Cache:
    return _Cache(tmp_path_factory.mktemp("export"))


def _input(batch: int = 2, seed: int = 1) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch, 3, SIZE, SIZE, generator=g) * 2 - 1).numpy()


def _initializer_types(model: onnx.ModelProto) -> dict[str, int]:
    return {i.name: i.data_type for i in model.graph.initializer}


# ---------------------------------------------------------------------------------------- structure
def _exporter_kw(exporter: str) -> dict:
    return {} if exporter == "dynamo" else {"exporter": exporter}


# The default (dynamo) exporter on every case; the deprecated TorchScript one, kept to compare with, on
# the rotated + low-rank case and the plain one.
EXPORTER_CASES = [(m, b, "dynamo") for m, b in CASES] + [("quantface", "W4A4", "torchscript"),
                                                          ("minmax", "W4A4", "torchscript")]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("method,bits,exporter", EXPORTER_CASES)
def test_graph_structure_follows_the_recipe(cache, method, bits, exporter, profile):
    path = cache.export(method, bits, profile, **_exporter_kw(exporter))
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert model.ir_version == 10 and {(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")} \
        == {("", 21)}
    recipe = cache.recipe(method, bits)
    layers = cache.recipe_layers(method, bits)  # recipe.json as written (not through the typed reader)
    tensors = load_file(str(recipe / "recipe.safetensors"))
    meta = read_metadata(model)
    nodes = {n.name: n for n in model.graph.node}
    ops = [n.op_type for n in model.graph.node]
    types = _initializer_types(model)
    initializers = {i.name: i for i in model.graph.initializer}
    assert set(json.loads(meta["constant_layers"])) == TIMESTEP_LAYERS
    live = {n: e for n, e in layers.items() if n not in TIMESTEP_LAYERS}
    w_bits, a_bits = int(bits[1]), int(bits[3])

    # Q/DQ counts: one Q and one DQ per quantized activation, one DQ per quantized weight; in the
    # ort-cpu and qnn profiles also an 8-bit Q/DQ on each quantized conv's output and a DQ of its INT32 bias.
    n_act = sum(e["act_bits"] is not None for e in live.values())
    n_w = sum(e["weight_bits"] is not None for e in live.values())
    # Requantized (ort-cpu, qnn): every quantized conv (the tiny recipes all record output ranges and
    # have inputs of at most 8 bits) but those whose bias codes b / (s_x·s_w) would leave the ±2^24
    # grid: in svdquant's recipe the SVD takes the three 8-channel conv_out layers whole, leaving
    # channels of their residual weight at the scale floor EPS. Stated from the recipe's scales, not
    # through the exporter's predicate (quant.requantizable).
    convs = {n for n, e in live.items() if e["kind"] == "conv" and e["weight_bits"] is not None}
    assert all(live[n]["act_bits"] <= 8 and live[n]["output_range"] is not None for n in convs)
    degenerate = {n for n in convs if float(tensors[live[n]["weight_scale"]].min()) <= float(np.float32(EPS))}
    assert bool(degenerate) == (method == "svdquant")
    requant = convs - degenerate if profile in ("ort-cpu", "qnn") else set()
    biased = {n for n in requant if cache.fp.get_submodule(n).bias is not None}
    assert set(json.loads(meta["requantized_layers"])) == requant
    assert len(requant) >= len(live) // 2 or profile == "reference"
    # ort-cpu: quantized Linear layers (8-bit containers: all of them at these bits) as
    # Q → com.microsoft.MatMulIntegerToFloat, no DQ of their input or weights (export.lower.integer_linears).
    int_linear = {n for n, e in live.items() if e["kind"] == "linear" and e["weight_bits"] is not None} \
        if profile == "ort-cpu" else set()
    assert bool(int_linear) == (profile == "ort-cpu")
    assert ops.count("MatMulIntegerToFloat") == len(int_linear)
    assert any(o.domain == "com.microsoft" for o in model.opset_import) == bool(int_linear)
    assert ops.count("QuantizeLinear") == n_act + len(requant)
    assert ops.count("DequantizeLinear") == n_act + n_w + len(requant) + len(biased) - 2 * len(int_linear)
    # ort-cpu and qnn store codes of <= 4 bits as INT4 behind a Cast to INT8 (export.profiles: int4_storage).
    int4_stored = profile in ("ort-cpu", "qnn") and w_bits <= 4

    def code_init(name: str) -> str:
        return f"{name}.weight_codes_int4" if int4_stored else f"{name}.weight_codes"

    def stored_codes(name: str) -> str:
        """The value the weight DQ / MatMulIntegerToFloat reads its codes from; checks the Cast."""
        if not int4_stored:
            return f"{name}.weight_codes"
        cast = nodes[f"{name}.weight_codes_Cast"]
        assert cast.input[:] == [f"{name}.weight_codes_int4"]
        assert {a.name: a.i for a in cast.attribute}["to"] == TensorProto.INT8
        assert f"{name}.weight_codes" not in types
        return cast.output[0]

    for name, e in live.items():
        assert nodes[f"{name}_QuantizeLinear"].op_type == "QuantizeLinear"
        # reference, ort-cpu: the Hadamard node's sign vector carries the smoothing, D = d · (1/s) (export.lower)
        carried = profile != "qnn" and bool(e["smoothing"]) and e["hadamard"] is not None
        assert (f"{name}_Smooth" in nodes) == (bool(e["smoothing"]) and not carried)
        if carried:
            d_vec = numpy_helper.to_array(initializers[nodes[f"{name}_Hadamard"].input[1]]).reshape(-1)
            inv = (1.0 / tensors[e["smoothing"]]).numpy()
            assert np.array_equal(d_vec, inv * tensors[e["hadamard"]["signs"]].numpy().astype(np.float32))
            assert f"{name}.smooth_inv" not in types and f"{name}.hadamard_signs" not in types
        if name in int_linear:
            mm, q = nodes[f"{name}_MatMulIntegerToFloat"], nodes[f"{name}_QuantizeLinear"]
            assert mm.domain == "com.microsoft"
            assert mm.input[:6] == [q.output[0], stored_codes(name), q.input[1], f"{name}.weight_scale",
                                    q.input[2], f"{name}.weight_zero_point"]
            assert mm.input[6:] == ([f"{name}.bias"] if cache.fp.get_submodule(name).bias is not None else [])
            codes = numpy_helper.to_array(initializers[code_init(name)])
            assert codes.shape == tuple(cache.fp.get_submodule(name).weight.shape[::-1])  # (in, out)
            assert not any(f"{name}_{op}" in nodes for op in ("DequantizeLinear", "weight_DequantizeLinear",
                                                               "MatMul", "BiasAdd"))
            assert (f"{name}_LowRankAdd" in nodes) == bool(e["lowrank_rank"])
            assert types[f"{name}.act_zero_point"] == TensorProto.UINT8
            assert (f"{name}_Clip" in nodes) == (a_bits < 8)
            continue
        assert nodes[f"{name}_DequantizeLinear"].input[0] == nodes[f"{name}_QuantizeLinear"].output[0]
        wdq = nodes[f"{name}_weight_DequantizeLinear"]
        conv = e["kind"] == "conv"
        assert (f"{name}_Conv" if conv else f"{name}_MatMul") in nodes
        if profile == "qnn" and name not in requant:  # scales after the product (export.profiles)
            scale_mul = nodes[f"{name}_WeightScale"]
            assert numpy_helper.to_array(initializers[wdq.input[1]]).shape == ()  # unit per-tensor scale
            assert numpy_helper.to_array(initializers[wdq.input[1]]) == 1.0
            assert scale_mul.input[0] == nodes[f"{name}_Conv" if conv else f"{name}_MatMul"].output[0]
            assert numpy_helper.to_array(initializers[scale_mul.input[1]]).size == cache.fp.get_submodule(name).weight.shape[0]
        else:
            assert {a.name: a.i for a in wdq.attribute}["axis"] == (0 if conv else 1)  # the output channel
            assert f"{name}_WeightScale" not in nodes
        w_type = TensorProto.INT4 if (profile == "reference" and w_bits <= 4) or int4_stored else TensorProto.INT8
        a_type = TensorProto.UINT4 if (profile == "reference" and a_bits <= 4) else TensorProto.UINT8
        assert wdq.input[0] == stored_codes(name)
        assert types[code_init(name)] == w_type
        assert types[f"{name}.act_zero_point"] == a_type
        assert (f"{name}_Clip" in nodes) == (a_type == TensorProto.UINT8 and a_bits < 8)
        assert (f"{name}_LowRankAdd" in nodes) == bool(e["lowrank_rank"])
        if e["lowrank_rank"]:  # one merged branch; float16-stored (+ Cast) except in the qnn profile
            half = profile != "qnn"
            for factor in ("down", "up"):
                assert types.get(f"{name}.lowrank_{factor}{'_fp16' if half else ''}") == \
                    (TensorProto.FLOAT16 if half else TensorProto.FLOAT)
                assert (f"{name}.lowrank_{factor}_Cast" in nodes) == half
        if profile == "reference":  # symmetric weight codes: DequantizeLinear's default zero point
            assert len(wdq.input) == 2 and f"{name}.weight_zero_point" not in types
        assert (f"{name}_OutputQuantizeLinear" in nodes) == (name in requant)
        if name in requant:  # Conv → Q → DQ (→ low-rank add), the bias as INT32 codes on s_x·s_w
            main, q = nodes[f"{name}_Conv"], nodes[f"{name}_OutputQuantizeLinear"]
            assert q.input[0] == main.output[0] and nodes[f"{name}_OutputDequantizeLinear"].input[0] == q.output[0]
            assert types[f"{name}.output_zero_point"] == TensorProto.UINT8
            lo, hi = e["output_range"]
            scale = numpy_helper.to_array(initializers[f"{name}.output_scale"]).item()
            assert lo <= hi and scale == pytest.approx((max(hi, 0) - min(lo, 0)) / 255, rel=1e-6)
            if name in biased:
                assert main.input[2] == nodes[f"{name}_bias_DequantizeLinear"].output[0]
                assert types[f"{name}.bias_codes"] == TensorProto.INT32
    for name in TIMESTEP_LAYERS:
        assert not any(n.startswith(f"{name}_") for n in nodes)

    # The rotation: a quantface::Hadamard function node, or inline Mul + Conv/MatMul for QNN.
    rotated = [n for n, e in live.items() if e["hadamard"]]
    assert bool(rotated) == (method == "quantface")
    functions = {(f.domain, f.name, f.overload) for f in model.functions}
    if rotated and profile != "qnn":
        from quantface.export.profiles import get_profile
        from quantface.hadamard import kron_factors

        kron_from = get_profile(profile).kron_min_order  # reference: every order that splits (a smaller file)

        def overload(n: str) -> str:
            order = live[n]["hadamard"]["order"]
            kron = order >= kron_from and kron_factors(order) is not None
            return ("nchw" if live[n]["kind"] == "conv" else "channels_last") + ("_kron" if kron else "")

        assert {overload(n) for n in rotated} >= ({"nchw_kron", "channels_last_kron"} if profile == "reference"
                                                  else {"nchw", "channels_last"})
        assert functions == {("quantface", "Hadamard", overload(n)) for n in rotated}
        assert all(nodes[f"{n}_Hadamard"].overload == overload(n) for n in rotated)
        assert [nodes[f"{n}_Hadamard"].domain for n in rotated] == ["quantface"] * len(rotated)
        assert ops.count("Hadamard") == len(rotated)
    else:
        assert not functions and "Hadamard" not in ops
        assert all(o.domain != "quantface" for o in model.opset_import)
        assert sum(n.endswith("_Hadamard_Mul") for n in nodes) == len(rotated if profile == "qnn" else [])

    # No trace of the unmerged LoRA branch; metadata as the recipe says.
    assert not [n for n in all_names(model) if "lora" in n.lower()]
    assert json.loads(meta["layer_bits"]) == {n: {"weight_bits": e["weight_bits"], "act_bits": e["act_bits"]}
                                             for n, e in layers.items()}
    assert meta["profile"] == profile and meta["tool_version"] == __version__
    assert meta["recipe_sha256"] == json.loads((recipe / "recipe.json").read_text())["tensors_sha256"]
    report = qnn_report(path)
    if profile == "qnn":
        assert report == []
    if rotated and profile != "qnn":
        assert any("custom op quantface::Hadamard" in line for line in report)
    if profile == "reference" and a_bits <= 4:
        assert any("UINT4" in line for line in report)


def test_qnn_report_flags_what_htp_cannot_take():
    from onnx import helper

    codes = numpy_helper.from_array(np.zeros((4, 4), np.uint8), "w")  # unsigned, per-tensor weights
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], name="w_dq"),
             helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm"),
             helper.make_node("Mish", ["y"], ["z"], name="mish"),
             helper.make_node("QuantizeLinear", ["z", "s", "zp"], ["q"], name="q_int8"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["out"], name="dq_int8")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4])],
                              [codes, numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                               numpy_helper.from_array(np.array(0, np.int8), "zp")])
    report = "\n".join(qnn_report(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])))
    for expected in ("graph input x: shape is not static", "node mish: op Mish is not supported",
                     "w_dq: weights stored as UINT8",
                     "q_int8: activations quantized to INT8", "dq_int8: activations dequantized from INT8",
                     "node mm: output y has no static shape"):
        assert expected in report


def test_onnx_runtime_fuses_each_requantized_convolution(cache, tmp_path):
    """The point of the ort-cpu profile's output Q/DQ: ONNX Runtime turns every quantized conv into
    an integer QLinearConv (without the output Q it dequantizes the weights and convolves in float)."""
    path = cache.export("quantface", "W4A4", "ort-cpu")
    requant = [n for n in onnx.load(str(path)).graph.node if n.name.endswith("_OutputQuantizeLinear")]
    assert requant and fused_qlinearconvs(path, tmp_path) == len(requant)


def test_int4_stored_codes_are_folded_by_onnx_runtime_into_the_same_graph(cache, tmp_path, monkeypatch):
    """ort-cpu's INT4-stored codes (``Profile.int4_storage``): the file holds 4-bit codes (smaller than the
    INT8-stored export of the same recipe), ONNX Runtime folds each Cast at session start (the optimized
    graph has no Cast left on them, the same QLinearConv / MatMulIntegerToFloat count) and the outputs are
    bit for bit the INT8-stored graph's."""
    import dataclasses

    from quantface.export import profiles

    stored = cache.export("quantface", "W4A4", "ort-cpu")
    profile = profiles.PROFILES["ort-cpu"]
    monkeypatch.setitem(profiles.PROFILES, "ort-cpu", dataclasses.replace(profile, int4_storage=False))
    plain = tmp_path / "int8_stored.onnx"
    export_onnx(ExportConfig(weights=str(cache.weights), recipe=str(cache.recipe("quantface", "W4A4")),
                             profile="ort-cpu", out=str(plain)))
    casts = [n for n in onnx.load(str(stored)).graph.node if n.name.endswith(".weight_codes_Cast")]
    assert casts and not [n for n in onnx.load(str(plain)).graph.node if n.name.endswith(".weight_codes_Cast")]
    assert stored.stat().st_size < plain.stat().st_size
    x = _input(batch=1)
    outs = []
    for path in (stored, plain):
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"{path.stem}.opt.onnx")
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        outs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
        opt = onnx.load(so.optimized_model_filepath)
        assert not [n for n in opt.graph.node if n.op_type == "Cast" and "weight_codes" in n.input[0]]
    np.testing.assert_array_equal(outs[0], outs[1])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert fused_qlinearconvs(stored, tmp_path / "a") == fused_qlinearconvs(plain, tmp_path / "b") > 0


def test_quantface_w8a8_ort_cpu_graph_is_lean(cache, tmp_path):
    """QuantFace W8A8 (branches folded into the 8-bit weights, no smoothing or rotation at A8): the
    ort-cpu graph has no low-rank, Hadamard, smoothing or Clip node, and ONNX Runtime fuses every
    requantized conv into a QLinearConv. (No layer-by-layer parity here: on x86 CPUs without VNNI,
    ONNX Runtime's U8S8 kernels saturate int16 pair sums when 8-bit weight codes meet 8-bit activation
    codes — tools/check_u8s8_saturation.py, docs/calibration_notes.md — so full-range W8A8 is not
    bit-exact there; the lowering itself is the one the W4A4 / W6A6 parity tests check.)"""
    layers = cache.recipe_layers("quantface", "W8A8")
    assert all(e["lowrank_rank"] == 0 and not e["hadamard"] and not e["smoothing"] for e in layers.values())
    path = cache.export("quantface", "W8A8", "ort-cpu")
    names = [n.name for n in onnx.load(str(path)).graph.node]
    assert not [n for n in names if n.endswith(("_LowRankAdd", "_Smooth", "_Clip")) or "_Hadamard" in n]
    requant = [n for n in names if n.endswith("_OutputQuantizeLinear")]
    assert requant and fused_qlinearconvs(path, tmp_path) == len(requant)
    # Linear layers: integer products too (MatMulIntegerToFloat), no float Gemm on per-call dequantized weights.
    assert [n for n in names if n.endswith("_MatMulIntegerToFloat")]
    assert float_products_of_weight_codes(path, tmp_path) == []


def test_kernel_time_by_part_finds_every_part_of_an_ort_cpu_graph(cache):
    from quantface.export.bench import PARTS, kernel_time_by_part

    parts = kernel_time_by_part(cache.export("quantface", "W4A4", "ort-cpu"), threads=1, runs=2)
    assert list(parts) == list(PARTS)
    for part in ("integer convolutions (QLinearConv)", "low-rank branches", "Hadamard rotations",
                 "activation quantizers (Clip, Q, DQ)", "other float ops"):
        assert parts[part] > 0, part
    assert kernel_time_by_part(cache.export(None), threads=1, runs=2)["integer convolutions (QLinearConv)"] == 0


def test_branch_time_by_layer_sums_to_the_branch_part_and_names_branched_layers(cache):
    """``profile_kernel_time``'s per-layer branch times (tools/bench_ranks.py) split the branch part
    among the layers that carry a branch, and only those."""
    from quantface.export.bench import profile_kernel_time

    branched = {name for name, e in cache.recipe_layers("quantface", "W4A4").items() if e.get("lowrank_rank")}
    parts, layers = profile_kernel_time(cache.export("quantface", "W4A4", "ort-cpu"), threads=1, runs=2)
    assert layers and set(layers) <= branched
    assert sum(layers.values()) == pytest.approx(parts["low-rank branches"], rel=1e-9)


def test_output_ranges_added_to_an_old_recipe_are_the_calibrated_ones(cache, tmp_path):
    """``add_output_ranges`` (tools/add_output_ranges.py) reproduces calibration's stage 8 exactly;
    without ranges the ort-cpu export keeps its convolutions in float (no output Q/DQ)."""
    import shutil

    from quantface.calibration.run import add_output_ranges

    old = tmp_path / "old"
    shutil.copytree(cache.recipe("quantface", "W4A4"), old)
    meta = json.loads((old / "recipe.json").read_text())
    calibrated = {n: e["output_range"] for n, e in meta["layers"].items()}
    assert all(r is not None and r[0] <= r[1] for r in calibrated.values())
    for e in meta["layers"].values():
        e["output_range"] = None
    (old / "recipe.json").write_text(json.dumps(meta))
    out = tmp_path / "old.onnx"
    export_onnx(ExportConfig(weights=str(cache.weights), recipe=str(old), profile="ort-cpu", out=str(out)))
    assert not [n for n in onnx.load(str(out)).graph.node if n.name.endswith("_OutputQuantizeLinear")]

    add_output_ranges(old, str(cache.root / "faces"))
    added = {n: e["output_range"] for n, e in json.loads((old / "recipe.json").read_text())["layers"].items()}
    assert added == calibrated
    assert read_recipe(old).sha256 == meta["tensors_sha256"]


def test_qnn_report_takes_int32_conv_biases_only():
    from onnx import helper

    def init(name, array):
        return numpy_helper.from_array(array, name)

    inits = [init("w", np.zeros((2, 2, 1, 1), np.int8)), init("ws", np.ones(2, np.float32)),
             init("wz", np.zeros(2, np.int8)), init("b", np.zeros(2, np.int32)), init("bs", np.ones(2, np.float32)),
             init("bz", np.array([0, 1], np.int32)), init("m", np.zeros(2, np.int32)),
             init("s", np.array(0.1, np.float32)), init("z", np.array(0, np.uint8))]
    # x ─ Q ─ DQ ─┐
    #   w ─ w_dq ─┼─ conv ─ Q ─ DQ ─ add ─ y      (a full QDQ conv unit)
    #   b ─ b_dq ─┘           m ─ m_dq ─┘
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="x_q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="x_dq"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="w_dq", axis=0),
             helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bd"], name="b_dq", axis=0),
             helper.make_node("DequantizeLinear", ["m", "bs"], ["md"], name="m_dq", axis=0),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], name="conv"),
             helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"], name="c_q"),
             helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["cd"], name="c_dq"),
             helper.make_node("Add", ["cd", "md"], ["y"], name="add")]
    shape = [1, 2, 4, 4]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    report = qnn_report(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert "node b_dq: bias zero points are not 0" in report  # an INT32 conv bias is fine, its zero point not
    assert "node m_dq: weights stored as INT32 (QNN takes INT8/INT4)" in report  # INT32 elsewhere is not
    assert not [line for line in report if line.startswith("node w_dq")]


# ---------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("method,bits,exporter", EXPORTER_CASES[:len(CASES) + 1])
def test_onnx_runtime_matches_the_fake_quant_model(cache, method, bits, exporter, profile):
    """Every quantized layer of the graph computes what the PyTorch layer computes on the same input
    (ORT's own value of it; ``tests.parity``): observed max |Δ| ≤ 1e-6, all elements equal to float
    rounding. End to end, float-order differences outside the layers can flip a quantizer code that
    the random tiny model amplifies (29–150 dB by CPU), so there the graph must only be the quantized
    model rather than the FP one; end-to-end parity is measured on the trained model below."""
    x = _input()
    # ort-cpu and qnn requantize conv outputs to 8 bits (QLinearConv): the PyTorch side simulates that too.
    qmodel = apply_recipe(cache.fp, cache.recipe(method, bits), requant_outputs=profile != "reference")
    path = cache.export(method, bits, profile, **_exporter_kw(exporter))
    for i in range(len(x)):
        layers = layer_parity(path, qmodel, x[i:i + 1])
        assert len(layers) == len(cache.recipe_layers(method, bits)) - len(TIMESTEP_LAYERS)
        worst = max(layers, key=lambda n: layers[n].rel_l2)
        print(f"{method} {bits} {profile} {exporter} input {i}: worst layer {worst} {layers[worst]}")
        assert all(p.rel_l2 <= 1e-4 and p.exact_fraction >= 0.99 for p in layers.values()), worst
    with torch.no_grad():
        ref = np.concatenate([qmodel(torch.from_numpy(x[i:i + 1])).numpy() for i in range(len(x))])
        fp = cache.fp(torch.from_numpy(x)).numpy()
    out = OnnxBackend(path, threads=1)(x)
    assert output_psnr(out, ref) > output_psnr(out, fp)  # it is the quantized model, not the FP one


@pytest.mark.parametrize("profile", ["reference", "ort-cpu"])
def test_trained_model_graphs_match_the_fake_quant_model_end_to_end(profile, tmp_path):
    """The issue's parity bar on the committed QuantFace W4A4 recipe and the embedded model, on real
    faces scikit-image ships: ONNX Runtime vs PyTorch ≥ 40 dB (``quantface validate`` measures it on
    20 test faces: docs/export_bench.md)."""
    from quantface.data import shipped_faces
    from quantface.degradation import degrade
    from quantface.models import load_model
    from quantface.package import REPO
    from quantface.pipeline import images_to_tensor

    recipe = REPO / "recipes" / "quantface_w4a4"
    out = tmp_path / f"{profile}.onnx"
    export_onnx(ExportConfig(recipe=str(recipe), profile=profile, out=str(out)))
    requantized = json.loads(read_metadata(onnx.load(str(out)))["requantized_layers"])
    assert bool(requantized) == (profile == "ort-cpu")  # the committed recipe has output ranges
    fp = load_model("reference")
    qmodel = apply_recipe(fp, recipe, requant_outputs=bool(requantized))
    faces, _ = shipped_faces(fp.config.working_size, lfw_count=3)
    x = images_to_tensor([degrade(face, 0, i)[0] for i, face in enumerate(faces)])
    with torch.no_grad():
        want = np.concatenate([qmodel(x[i:i + 1]).numpy() for i in range(len(x))])
    got = OnnxBackend(out, threads=2)(x.numpy())
    psnr = output_psnr(got, want)
    print(f"{profile}: ONNX Runtime vs PyTorch {psnr:.1f} dB on {len(x)} faces")
    assert psnr >= PARITY_PSNR_DB


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_fp32_export_matches_the_torch_model(cache, exporter):
    path = cache.export(None, **_exporter_kw(exporter))
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear", "Hadamard", "Shape", "Constant", "Identity", "Cos",
                      "GroupNormalization"}
    assert "InstanceNormalization" in ops and not any(n.metadata_props for n in model.graph.node)
    assert "/encoder/conv_in/Conv" in {n.name for n in model.graph.node}  # torch's module-path names
    assert [i.name for i in model.graph.input] == ["lq"] and [o.name for o in model.graph.output] == ["restored"]
    x = _input()
    with torch.no_grad():
        ref = cache.fp(torch.from_numpy(x)).numpy()
    assert np.abs(OnnxBackend(path)(x) - ref).max() <= FP32_MAX_ABS
    assert read_metadata(model)["method"] == "fp32"


@pytest.mark.parametrize("profile", ["ort-cpu", "qnn"])
def test_rotation_off_removes_exactly_the_hadamard_nodes(cache, profile):
    """Without rotation the graph is the rotated one less its Hadamard nodes and tensors, plus — where a
    Hadamard node's signs carried the layer's smoothing (ort-cpu) — that layer's explicit Smooth Mul, in
    the Hadamard node's place; qnn's inline rotation never carries it."""
    full = onnx.load(str(cache.export("quantface", "W4A4", profile)))
    bare = onnx.load(str(cache.export("quantface", "W4A4", profile, rotation=False)))

    def is_rotation(name: str) -> bool:
        return name.endswith("_Hadamard") or "_Hadamard_" in name or name.startswith("hadamard.") \
            or name.endswith((".hadamard_signs", ".hadamard_signs_smooth_inv"))

    carried = {n.name[:-len("_Hadamard")] for n in full.graph.node
               if n.name.endswith("_Hadamard") and n.input[1].endswith(".hadamard_signs_smooth_inv")}
    assert bool(carried) == (profile == "ort-cpu")

    def put_back(name: str) -> bool:  # the carried layers' Smooth Mul and its vector, back without rotation
        return any(name in (f"{p}_Smooth", f"{p}.smooth_inv") for p in carried)

    assert [(n.name, n.op_type) for n in full.graph.node if not is_rotation(n.name)] == \
        [(n.name, n.op_type) for n in bare.graph.node if not put_back(n.name)]
    assert {n.name for n in bare.graph.node if put_back(n.name)} == {f"{p}_Smooth" for p in carried}
    assert {i.name for i in full.graph.initializer if not is_rotation(i.name)} == \
        {i.name for i in bare.graph.initializer if not put_back(i.name)}
    assert {i.name for i in bare.graph.initializer if put_back(i.name)} == {f"{p}.smooth_inv" for p in carried}
    assert not bare.functions and read_metadata(bare)["rotation"] == "false"


# ---------------------------------------------------------------------------------------- writing
def test_export_writes_atomically(cache, tmp_path, monkeypatch):
    recipe = str(cache.recipe("minmax", "W4A4"))
    out = tmp_path / "out" / "model.onnx"
    result = export_onnx(ExportConfig(weights=str(cache.weights), recipe=recipe, out=str(out)))
    assert result.path == out and result.bytes == out.stat().st_size
    assert result.node_counts["QuantizeLinear"] == len(read_recipe(recipe).layers) - len(TIMESTEP_LAYERS)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no temp file left
    before = out.read_bytes()

    def broken_save(proto, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(save_mod.onnx, "save_model", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_onnx(ExportConfig(weights=str(cache.weights), recipe=recipe, out=str(out)))
    with pytest.raises(OSError, match="disk full"):
        export_onnx(ExportConfig(weights=str(cache.weights), recipe=recipe, out=str(out.with_name("new.onnx"))))
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no partial, no temp file
    assert out.read_bytes() == before  # the earlier export is intact


@pytest.mark.parametrize("method,exporter", [("minmax", "torchscript"), ("minmax", "dynamo"), (None, "dynamo")])
def test_large_models_use_external_data(cache, tmp_path, monkeypatch, method, exporter):
    """Above the threshold the tensors go to ``<name>.data``; with the dynamo exporter the trace's
    weights too are written to disk at once and copied from there (for FP32, the timestep path's
    folding reads its weights back from the work folder)."""
    monkeypatch.setattr(save_mod, "EXTERNAL_DATA_THRESHOLD", 1)  # stand-in for 2 GB
    out = tmp_path / "big.onnx"
    result = export_onnx(ExportConfig(weights=str(cache.weights), recipe=str(cache.recipe(method, "W4A4")) if method
                                      else None, out=str(out), exporter=exporter))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]  # no work folder left
    assert result.bytes == out.stat().st_size + (tmp_path / "big.onnx.data").stat().st_size
    model = onnx.load(str(out), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {"big.onnx.data"}
    x = _input(1)
    assert np.array_equal(OnnxBackend(out)(x), OnnxBackend(cache.export(method, **_exporter_kw(exporter)))(x))


def test_dynamo_export_warns_of_no_deprecation(cache):
    """The dynamo path uses no deprecated torch.onnx API (the TorchScript path is deprecated: the
    check below does see its warning). torch 2.13's own ``run_decompositions`` deep-copies a pytree
    ``LeafSpec`` and warns ``isinstance(treespec, LeafSpec) is deprecated`` (a FutureWarning from
    torch's internals, not from a call of ours); it is neither silenced nor counted here."""
    import io
    import warnings

    from quantface.export import build_onnx

    def deprecations(rec):
        return [f"{w.category.__name__}: {w.message}" for w in rec
                if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))
                or "torch/onnx" in w.filename.replace("\\", "/") or "torch.onnx" in str(w.message)]

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        build_onnx(ExportConfig(weights=str(cache.weights), recipe=str(cache.recipe("minmax", "W4A4")),
                                exporter="dynamo"))
    assert deprecations(rec) == []
    with warnings.catch_warnings(record=True) as rec:  # the check is not vacuous
        warnings.simplefilter("always")
        torch.onnx.export(torch.nn.Conv2d(3, 4, 3), (torch.zeros(1, 3, 8, 8),), io.BytesIO(), dynamo=False)
    assert deprecations(rec)


def test_dynamo_graphs_have_the_torchscript_graphs_nodes(cache):
    """Both exporters give the same nodes: the same op counts, and every quantized layer's nodes with
    the same names, in the same order, reading the same values and initializers of that layer; and
    the same outputs, bit for bit (the timestep path's constants are torch's in both)."""
    from collections import Counter

    layers = cache.recipe_layers("quantface", "W4A4")

    def ours(model):
        def mine(v):
            return v.startswith("hadamard.") or any(v.startswith((f"{n}.", f"{n}_")) for n in layers)

        return [(n.name, n.op_type, [i for i in n.input if mine(i)]) for n in model.graph.node if mine(n.name)]

    x = _input()
    for profile in PROFILES:
        old_path = cache.export("quantface", "W4A4", profile, exporter="torchscript")
        new_path = cache.export("quantface", "W4A4", profile)
        assert np.array_equal(OnnxBackend(old_path)(x), OnnxBackend(new_path)(x)), profile
        old, new = onnx.load(str(old_path)), onnx.load(str(new_path))
        assert Counter(n.op_type for n in old.graph.node) == Counter(n.op_type for n in new.graph.node), profile
        assert ours(old) == ours(new) and len(ours(old)) > 5 * len(layers) // 2, profile
        assert [(f.name, f.overload) for f in old.functions] == [(f.name, f.overload) for f in new.functions]


def test_group_norm_becomes_instance_norm():
    """x ─ GroupNormalization(G=2) ─ y  becomes  Reshape ─ InstanceNormalization ─ Reshape ─ Mul ─ Add,
    computing torch's group_norm."""
    from onnx import helper

    from quantface.export.fold import fold_constants
    from quantface.export.norms import group_norm_to_instance_norm

    rng = np.random.default_rng(0)
    gamma, beta = rng.standard_normal(6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    shape = [2, 6, 5, 3]
    graph = helper.make_graph(
        [helper.make_node("GroupNormalization", ["x", "g", "b"], ["y"], name="/enc/norm/GroupNormalization",
                          num_groups=2, epsilon=1e-6)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(gamma, "g"), numpy_helper.from_array(beta, "b")])
    model = group_norm_to_instance_norm(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)],
                                                          ir_version=10))
    model = fold_constants(model)  # the Shape of x
    assert [(n.name, n.op_type) for n in model.graph.node] == [
        ("/enc/norm/Reshape", "Reshape"), ("/enc/norm/InstanceNormalization", "InstanceNormalization"),
        ("/enc/norm/Reshape_1", "Reshape"), ("/enc/norm/Mul", "Mul"), ("/enc/norm/Add", "Add")]
    onnx.checker.check_model(model, full_check=True)
    x = rng.standard_normal(shape).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = torch.nn.functional.group_norm(torch.from_numpy(x), 2, torch.from_numpy(gamma), torch.from_numpy(beta), 1e-6)
    np.testing.assert_allclose(y, want.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------- errors
def test_recipe_of_other_weights_is_one_clear_error(cache, tmp_path):
    from quantface.models.store import save_weights

    torch.manual_seed(1)
    save_weights(ReferenceRestorer(TINY), tmp_path / "other")
    out = tmp_path / "model.onnx"
    with pytest.raises(RecipeError, match="other model weights") as info:
        export_onnx(ExportConfig(weights=str(tmp_path / "other"), recipe=str(cache.recipe("minmax", "W4A4")),
                                 out=str(out)))
    assert isinstance(info.value, QuantFaceError) and "\n" not in str(info.value)
    assert not out.exists()


def test_config_validation_and_round_trip():
    cfg = ExportConfig(recipe="r", profile="qnn", size=64, batch=2, rotation=False, exporter="dynamo")
    assert ExportConfig.from_json(cfg.to_json()) == cfg
    for bad in (dict(profile="tflite"), dict(batch=0), dict(size=-32), dict(model="sd15"), dict(out="dir/"),
                dict(exporter="jit")):
        with pytest.raises(ConfigError):
            ExportConfig(**bad)
    with pytest.raises(ConfigError, match="multiple of 16"):
        from quantface.export import build_onnx

        build_onnx(ExportConfig(size=40))


def test_onnx_backend_runs_in_the_pipeline(cache, tmp_path):
    path = cache.export(None)
    rng = np.random.default_rng(3)
    images = [smooth_image(rng, SIZE) for _ in range(3)]
    onnx_out = RestorationPipeline(OnnxBackend(path, threads=1), batch_size=2)(images)  # static batch 1
    torch_out = RestorationPipeline(TorchBackend(cache.fp), batch_size=2)(images)
    for a, b in zip(onnx_out, torch_out):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    with pytest.raises(ConfigError, match="input of shape"):
        OnnxBackend(path)(np.zeros((1, 3, 64, 64), np.float32))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ExportError, match="cannot be loaded"):
        OnnxBackend(tmp_path / "junk.onnx")
    with pytest.raises(ExportError, match="does not exist"):
        OnnxBackend(tmp_path / "missing.onnx")


@pytest.mark.parametrize("conv", [True, False], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("n,overload", [(96, "dense"), (128, "kron"), (192, "kron"), (320, "kron")])
def test_hadamard_node_computes_the_rotation(n, overload, conv):
    """The quantface::Hadamard function (dense body below KRON_MIN_ORDER, A ⊗ B factored body from
    it) run by ONNX Runtime equals x·Q in float64 to float32 accuracy."""
    from onnx import helper

    from quantface.export.graph import GraphBuilder
    from quantface.export.rotation import DOMAIN, VERSION, emit_rotation, hadamard_functions
    from quantface.hadamard import random_hadamard, rotate_channels

    q = random_hadamard(n, seed=n)
    shape = [1, n, 5, 7] if conv else [2, 9, n]
    graph = helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    nodes = emit_rotation(GraphBuilder(graph), "layer", "x", q, conv, inline=False)
    assert [nd.op_type for nd in nodes] == ["Hadamard"]
    assert nodes[0].overload == ("nchw" if conv else "channels_last") + ("_kron" if overload == "kron" else "")
    nodes[0].output[0] = "y"
    graph.node.extend(nodes)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, VERSION)],
                              functions=hadamard_functions({nodes[0].overload}), ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    stored = sum(numpy_helper.to_array(i).size for i in graph.initializer)
    assert stored < n * n if overload == "kron" else stored == n * n + n
    x = np.random.default_rng(n).standard_normal(shape).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    expected = rotate_channels(torch.from_numpy(x).double(), torch.from_numpy(q), 1 if conv else -1).numpy()
    np.testing.assert_allclose(y, expected, atol=2e-5)


@pytest.mark.parametrize("conv", [True, False], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("n", [32, 96])
def test_reference_hadamard_node_factors_small_orders_and_carries_the_smoothing(n, conv):
    """The ``reference`` profile's form (``Profile.kron_min_order`` 4, ``signs_carry_smoothing``): the
    Kronecker-factored body at orders below KRON_MIN_ORDER, D = d·(1/s), and ONNX Runtime computes
    (x/s)·Q to float32 accuracy, storing fewer numbers than the dense matrix and the two vectors."""
    from onnx import helper

    from quantface.export.graph import GraphBuilder
    from quantface.export.profiles import get_profile
    from quantface.export.rotation import DOMAIN, VERSION, emit_rotation, hadamard_functions
    from quantface.hadamard import random_hadamard, rotate_channels

    profile = get_profile("reference")
    q = random_hadamard(n, seed=n)
    s = np.random.default_rng(n + 1).uniform(0.5, 4.0, n).astype(np.float32)
    shape = [1, n, 5, 7] if conv else [2, 9, n]
    graph = helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    nodes = emit_rotation(GraphBuilder(graph), "layer", "x", q, conv, inline=False,
                          kron_min_order=profile.kron_min_order, smooth_inv=(1.0 / s).astype(np.float32))
    assert [nd.op_type for nd in nodes] == ["Hadamard"] and nodes[0].overload.endswith("_kron")
    nodes[0].output[0] = "y"
    graph.node.extend(nodes)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, VERSION)],
                              functions=hadamard_functions({nodes[0].overload}), ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    assert sum(numpy_helper.to_array(i).size for i in graph.initializer) < n * n // 2 + n
    x = np.random.default_rng(n).standard_normal(shape).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    view = (1, n, 1, 1) if conv else (1, 1, n)
    expected = rotate_channels(torch.from_numpy(x / s.reshape(view)).double(), torch.from_numpy(q),
                               1 if conv else -1).numpy()
    np.testing.assert_allclose(y, expected, atol=2e-5)
