"""ONNX Runtime's own one-call quantizers on our FP32 graph: the peers our exported graphs are compared with.

A user who has our FP32 graph (``quantface export --fp32``) can quantize it with ONNX Runtime alone.
``build_peer(fp32, spec, reader, out)`` does that with each recipe's documented settings, calibrated on
exactly the inputs ``quantface calibrate`` feeds the model (``quantface.degradation.degraded_inputs``:
HQ faces degraded with (seed, index), at the graph's input size, in [-1, 1]):

* ``StaticPeer`` — ``onnxruntime.quantization.quantize_static``, QDQ format, activations
  ``QUInt8``, weights ``QInt8`` per channel, MinMax or Percentile calibration. Before it, the
  preprocessing ORT recommends (``quant_pre_process``: symbolic shape inference, ORT's graph
  optimisation, ONNX shape inference). ``reduce_range`` follows ``quantize_static``'s own CPU guidance
  unless the caller sets it: 7-bit weights on an x86 CPU without VNNI (saturation of U8S8 products),
  8-bit with VNNI and elsewhere.
* ``QnnPeer`` — ORT's QNN recipe: ``qnn_preprocess_model`` (after stripping ``metadata_props``, on which
  it fails in ORT 1.31), ``execution_providers.qnn.get_qnn_qdq_config`` and ``quantize``; activations
  ``QUInt8`` (A8W8) or ``QUInt16`` (A16W8), weights ``QInt8`` per channel (symmetric: the HTP's weights
  have zero points 0).

Calibration runs in chunks of ``CALIB_CHUNK`` faces (ORT's ``CalibStridedMinMax`` / ``stride``): the
Percentile calibrator otherwise holds every calibrated tensor of every face at once (about 215 MB a
face for the reference model at 128×128). Chunking leaves MinMax ranges unchanged; Percentile merges
its histograms across chunks (ORT's own merge).

Every peer graph is written without our FP32 graph's ``quantface.*`` metadata (it is not our export)
and with ``quantface.peer`` describing how it was made. ORT's quantizers log a warning on the root logger
for every 1-D weight they skip per-channel quantization of (norm scales: "Axis 1 is out-of-range");
``build_peer`` keeps the root logger at ERROR while they run, so those do not bury the caller's output.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from quantface.degradation import degraded_inputs
from quantface.errors import ConfigError
from quantface.export.save import add_metadata, save_atomic
from quantface.onnx_runtime import u8s8_saturates

CALIB_CHUNK = 4  # faces per calibration pass (see the module docstring)


def default_reduce_range() -> bool:
    """``quantize_static``'s guidance for CPU inference: ``reduce_range=True`` on x86/x64 without VNNI."""
    return u8s8_saturates()


class FaceCalibrationReader:
    """An ONNX Runtime ``CalibrationDataReader`` over our calibration inputs, one face per ``get_next``
    (our graphs take a static batch of 1). ``set_range`` and ``len`` let ORT calibrate in chunks."""

    def __init__(self, inputs: np.ndarray, input_name: str):
        if inputs.ndim != 4 or not len(inputs):
            raise ConfigError(f"calibration inputs must be a non-empty (N, C, H, W) array, got shape {inputs.shape}")
        self.inputs = np.ascontiguousarray(inputs, dtype=np.float32)
        self.input_name = input_name
        self.set_range(0, len(self.inputs))

    @classmethod
    def from_faces(cls, fp32: str | Path, data: str, limit: int | None, seed: int) -> "FaceCalibrationReader":
        """The calibration faces of ``data`` (``degraded_inputs``) at the input size of the graph ``fp32``."""
        name, shape = graph_input(fp32)
        if shape[0] != 1 or shape[2] != shape[3]:
            raise ConfigError(f"the FP32 graph {fp32} must take one square image (1, 3, S, S), got {shape}")
        return cls(degraded_inputs(data, shape[2], limit, seed).numpy(), name)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        self._next += 1
        return {self.input_name: self.inputs[self._next - 1:self._next]}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def __len__(self) -> int:
        return len(self.inputs)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self.inputs))

    def rewind(self) -> None:
        self.set_range(0, len(self.inputs))

    def chunk(self) -> int:
        """Faces per calibration pass: the largest divisor of the set size not above ``CALIB_CHUNK``
        (ORT requires the stride to divide it)."""
        n = len(self.inputs)
        return next(d for d in range(min(CALIB_CHUNK, n), 0, -1) if n % d == 0)


def graph_input(path: str | Path) -> tuple[str, list[int]]:
    """Name and static shape of a graph's single input."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ConfigError(f"{path} must have one input, it has {len(inputs)}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or None in dims:
        raise ConfigError(f"{path} must have a static 4-D input, got {dims}")
    return inputs[0].name, dims


def _without_metadata(src: str | Path, dst: Path) -> Path:
    model = onnx.load(str(src))
    del model.metadata_props[:]
    onnx.save_model(model, str(dst))
    return dst


# What ORT's calibrators do with no options set (onnxruntime.quantization.calibrate.create_calibrator).
_CALIBRATION_DEFAULTS = {
    "MinMax": "ORT defaults (asymmetric min/max over all faces)",
    "Percentile": "ORT defaults (99.999th percentile of |x|, 2048 histogram bins, symmetric ranges)",
}


@dataclass(frozen=True)
class StaticPeer:
    """``quantize_static`` QDQ, U8 activations / S8 per-channel weights, after ``quant_pre_process``."""

    name: str
    calibrate_method: str  # a member of onnxruntime.quantization.CalibrationMethod: MinMax | Percentile

    def settings(self, reduce_range: bool) -> dict:
        return {"quantizer": "onnxruntime.quantization.quantize_static", "preprocess": "quant_pre_process",
                "quant_format": "QDQ", "activation_type": "QUInt8", "weight_type": "QInt8", "per_channel": True,
                "reduce_range": reduce_range, "calibrate_method": self.calibrate_method,
                "calibration_options": _CALIBRATION_DEFAULTS[self.calibrate_method]}

    def quantize(self, fp32: Path, reader: FaceCalibrationReader, out: Path, tmp: Path, reduce_range: bool) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = tmp / "preprocessed.onnx"
        quant_pre_process(str(_without_metadata(fp32, tmp / "fp32.onnx")), str(pre))
        quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=reduce_range, calibrate_method=CalibrationMethod[self.calibrate_method],
                        extra_options={"CalibStridedMinMax": reader.chunk()})


@dataclass(frozen=True)
class QnnPeer:
    """ORT's QNN recipe: ``qnn_preprocess_model`` → ``get_qnn_qdq_config`` → ``quantize``, S8 per-channel weights."""

    name: str
    activation_type: str  # QUInt8 (A8W8) | QUInt16 (A16W8)

    def settings(self, reduce_range: bool) -> dict:  # reduce_range is a CPU option; the QNN recipe has none
        return {"quantizer": "onnxruntime.quantization.quantize + execution_providers.qnn.get_qnn_qdq_config",
                "preprocess": "qnn_preprocess_model (metadata_props stripped)", "quant_format": "QDQ",
                "activation_type": self.activation_type, "weight_type": "QInt8", "per_channel": True,
                "calibrate_method": "MinMax", "calibration_options": _CALIBRATION_DEFAULTS["MinMax"],
                "target": "qnn"}

    def quantize(self, fp32: Path, reader: FaceCalibrationReader, out: Path, tmp: Path, reduce_range: bool) -> None:
        from onnxruntime.quantization import QuantType, quantize
        from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

        src = _without_metadata(fp32, tmp / "fp32.onnx")
        pre = tmp / "qnn_preprocessed.onnx"
        if qnn_preprocess_model(str(src), str(pre)):
            src = pre
        config = get_qnn_qdq_config(str(src), reader, activation_type=QuantType[self.activation_type],
                                    weight_type=QuantType.QInt8, per_channel=True, stride=reader.chunk())
        quantize(str(src), str(out), config)


PeerSpec = StaticPeer | QnnPeer

PEERS: dict[str, PeerSpec] = {p.name: p for p in (
    StaticPeer("ort-static-minmax", "MinMax"),
    StaticPeer("ort-static-percentile", "Percentile"),
    QnnPeer("ort-qnn-a8w8", "QUInt8"),
    QnnPeer("ort-qnn-a16w8", "QUInt16"),
)}


@dataclass
class PeerGraph:
    name: str
    path: Path
    settings: dict
    seconds: float  # preprocessing + calibration + quantization

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


@contextlib.contextmanager
def _root_logger_errors_only():
    """ORT's quantizers warn through the root logger (see the module docstring); only errors pass here."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def get_peer(name: str) -> PeerSpec:
    if name not in PEERS:
        raise ConfigError(f"unknown peer quantizer {name!r}; available: {', '.join(PEERS)}")
    return PEERS[name]


def build_peer(fp32: str | Path, spec: PeerSpec, reader: FaceCalibrationReader, out: str | Path,
               reduce_range: bool | None = None) -> PeerGraph:
    """Quantize the FP32 graph ``fp32`` with ``spec``, calibrated on ``reader``; writes ``out`` atomically.
    ``reduce_range`` None follows ``quantize_static``'s CPU guidance for this machine (``default_reduce_range``)."""
    fp32, out = Path(fp32), Path(out)
    if not fp32.is_file():
        raise ConfigError(f"FP32 graph {fp32} does not exist")
    reduce_range = default_reduce_range() if reduce_range is None else reduce_range
    settings = {**spec.settings(reduce_range), "calibration_faces": len(reader), "calibration_chunk": reader.chunk()}
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.is_dir() else None))
    try:
        reader.rewind()
        with _root_logger_errors_only():
            spec.quantize(fp32, reader, tmp / "quantized.onnx", tmp, reduce_range)
        model = onnx.load(str(tmp / "quantized.onnx"))
        del model.metadata_props[:]
        add_metadata(model, {"peer": {"name": spec.name, **settings}})
        save_atomic(model, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        reader.rewind()
    return PeerGraph(spec.name, out, settings, time.perf_counter() - t0)
