"""Qualcomm's real QNN HTP backend in the loop: ONNX Runtime sessions on the QNN execution provider
(``onnxruntime-qnn``, the optional ``[qnn]`` extra), where each node of a graph is placed, and
offline-compiled context binaries for named Snapdragon SoCs.

On x86 the wheel's ``libQnnHtp.so`` *emulates* the HTP: results are the HTP's arithmetic, speed is
not (25–50 s for one 128² face); use it for checks, never for timing.

* ``htp_session_options(target, ...)`` — the one home of the QNN EP's session options (backend path,
  ``htp_arch`` / ``soc_model``, CPU-fallback switch, EPContext compile options). ``OnnxBackend`` in
  ``export.api`` builds the CPU EP's.
* ``placement(path, target)`` — a ``Placement`` report: how many nodes of the session's graph (after
  ONNX Runtime's own level-1 rewrites) the QNN EP took and which ones went to the CPU, each with the
  EP's reason parsed from its verbose log (``parse_qnn_log``), and the number of QNN partitions.
* ``HtpBackend(path, target)`` — an ``OnnxBackend``-compatible pipeline backend on the HTP.
* ``compile_context(path, out_dir, target)`` — an EPContext model (``*_ctx.onnx`` + ``.bin``).

Measured (onnxruntime-qnn 2.7.0, SM8650): the HTP rejects an integer Gemm / FullyConnected with a
float output (backendValidateOpConfig error 3110), and a per-channel weight DQ outside a full QDQ node
unit runs on the CPU; the ``qnn`` export profile therefore applies the weight scales after the
product (``export.profiles``). recipes/quantface_w4a4 ``--profile qnn``: 40 CPU nodes before that,
none after; HTP vs the PyTorch simulation 44.9 dB on 2 test faces (CPU EP vs PyTorch 45.8 dB). The
tiny random-weight test model is not HTP-stable (16–19 dB HTP vs CPU EP, with any lowering).

The node counts come from ONNX Runtime's own record of the assignment
(``session.record_ep_graph_assignment_info``); only the reasons need the log. ONNX Runtime's C++
logger writes to the process's file descriptor 2, so ``placement`` points fd 2 at a temporary file
around session creation (``_captured_fd2``).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantface.errors import ConfigError
from quantface.export.api import OnnxBackend
from quantface.export.errors import ExportError

EXTRA_HINT = "pip install 'quantface[qnn]'"


@dataclass(frozen=True)
class HtpTarget:
    """One Snapdragon SoC as the QNN HTP backend names it (QNN SDK ``QnnTypes.h`` soc model ids)."""

    soc: str  # Qualcomm part number, e.g. SM8650
    marketing: str  # e.g. Snapdragon 8 Gen 3
    soc_model: int
    htp_arch: int  # Hexagon tensor processor version (v73, v75, ...)


# SoC model ids and HTP versions as the QNN SDK numbers them (checked against ExecuTorch's Qualcomm
# backend table, backends/qualcomm/serialization/qc_schema.py: SM8550 = 43 v73, SM8650 = 57 v75,
# SM8750 = 69 v79).
SOCS: dict[str, HtpTarget] = {t.soc: t for t in [
    HtpTarget("SM8550", "Snapdragon 8 Gen 2", soc_model=43, htp_arch=73),
    HtpTarget("SM8650", "Snapdragon 8 Gen 3", soc_model=57, htp_arch=75),
    HtpTarget("SM8750", "Snapdragon 8 Elite", soc_model=69, htp_arch=79),
]}
DEFAULT_TARGET = SOCS["SM8650"]


def get_target(name: str) -> HtpTarget:
    """The SoC called ``name`` (part number, case-insensitive)."""
    target = SOCS.get(name.strip().upper())
    if target is None:
        known = ", ".join(f"{t.soc} ({t.marketing})" for t in SOCS.values())
        raise ConfigError(f"unknown Snapdragon SoC {name!r}; known: {known}")
    return target


def _qnn():
    """The ``onnxruntime_qnn`` module, with its EP library registered with ONNX Runtime (once)."""
    try:
        import onnxruntime_qnn
    except ImportError:
        raise ConfigError(f"the QNN HTP backend needs the onnxruntime-qnn package ({EXTRA_HINT})") from None
    import onnxruntime as ort

    if not any(d.ep_name == onnxruntime_qnn.get_ep_name() for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(onnxruntime_qnn.get_ep_name(), onnxruntime_qnn.get_library_path())
    return onnxruntime_qnn


def require_qnn() -> None:
    """ConfigError (one sentence) unless ``onnxruntime-qnn`` is installed."""
    _qnn()


def qnn_available() -> bool:
    """Whether ``onnxruntime-qnn`` is installed (tests skip the real-EP checks without it)."""
    try:
        _qnn()
    except ConfigError:
        return False
    return True


def htp_session_options(target: HtpTarget = DEFAULT_TARGET, *, threads: int | None = None, verbose: bool = False,
                        cpu_fallback: bool = True, context_path: str | Path | None = None,
                        record_assignment: bool = False):
    """``onnxruntime.SessionOptions`` with the QNN EP on the HTP backend for ``target``.

    ``cpu_fallback=False`` makes session creation fail if any node would run on the CPU;
    ``context_path`` compiles an EPContext model there (its ``.bin`` beside it, not embedded);
    ``verbose`` logs every node's validation (what ``placement`` parses)."""
    import onnxruntime as ort

    qnn = _qnn()
    options = ort.SessionOptions()
    if threads:  # for the CPU EP's share of the graph
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 0 if verbose else 3
    if record_assignment:
        options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    if not cpu_fallback:
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if context_path is not None:
        options.add_session_config_entry("ep.context_enable", "1")
        options.add_session_config_entry("ep.context_file_path", str(context_path))
        options.add_session_config_entry("ep.context_embed_mode", "0")
    devices = [d for d in ort.get_ep_devices() if d.ep_name == qnn.get_ep_name()]
    # offload_graph_io_quantization=0: a graph-input Q / graph-output DQ runs on the HTP too (the EP's
    # default leaves them to the CPU, a cheap conversion, which placement would list as CPU nodes).
    options.add_provider_for_devices(devices, {"backend_path": qnn.get_qnn_htp_path(),
                                               "htp_arch": str(target.htp_arch), "soc_model": str(target.soc_model),
                                               "offload_graph_io_quantization": "0"})
    return options


def _session(path: str | Path, options):
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX model {path} does not exist")
    try:
        return ort.InferenceSession(str(path), options)
    except Exception as exc:  # onnxruntime raises its own pybind error types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExportError(f"ONNX model {path} cannot be loaded on the QNN HTP backend: {first}") from None


def open_htp_session(path: str | Path, target: HtpTarget = DEFAULT_TARGET, **options):
    """An ``onnxruntime.InferenceSession`` for ``path`` on the QNN HTP backend (options as
    ``htp_session_options``)."""
    return _session(path, htp_session_options(target, **options))


# ------------------------------------------------------------------------------------ placement
@dataclass
class CpuNode:
    name: str
    op_type: str
    reason: str  # the QNN EP's "REASON :" line for the node, or "" if it gave none


@dataclass
class Placement:
    soc: str
    nodes_total: int  # nodes of the session's graph (after ONNX Runtime's level-1 rewrites)
    nodes_on_qnn: int
    nodes_on_cpu: int
    qnn_partitions: int
    cpu_nodes: list[CpuNode] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def reasons(self) -> dict[str, int]:
        """How many CPU nodes each reason covers."""
        counts: dict[str, int] = {}
        for n in self.cpu_nodes:
            counts[n.reason or "(no reason logged)"] = counts.get(n.reason or "(no reason logged)", 0) + 1
        return counts


# A failed validation in the QNN EP's verbose log:
#   ... LogNodeSupport] Validation FAILED for 1 nodes in OrtNodeUnit (DequantizeLinear) :
#   	Operator type: DequantizeLinear Node name: p_weight_DequantizeLinear Node index: 277
#   	REASON : QNN EP does not support a standalone DQ op with per-channel quantization
# (a node unit of several nodes lists one "Operator type:" line per node, then one REASON).
_FAILED = re.compile(r"Validation FAILED for \d+ nodes in OrtNodeUnit[^\n]*\n((?:[ \t]*Operator type:[^\n]*\n)+)"
                     r"[ \t]*REASON : ([^\n]*)")
_NODE = re.compile(r"Node name: (.*?) Node index:")


def parse_qnn_log(text: str) -> dict[str, str]:
    """Node name → the QNN EP's reason for rejecting it, from a verbose (severity 0) session log.
    The EP validates twice (before and after the layout transform): the last reason wins."""
    reasons: dict[str, str] = {}
    for block, reason in _FAILED.findall(text):
        for name in _NODE.findall(block):
            reasons[name] = reason.strip()
    return reasons


@contextmanager
def _captured_fd2():
    """Everything written to file descriptor 2 (ONNX Runtime's C++ log) inside the block; the
    yielded list gets the text when the block ends."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


def placement(path: str | Path, target: HtpTarget = DEFAULT_TARGET) -> Placement:
    """Where the QNN EP puts each node of ``path`` for ``target`` (see ``Placement``)."""
    options = htp_session_options(target, verbose=True, record_assignment=True)
    with _captured_fd2() as log:
        session = _session(path, options)
    reasons = parse_qnn_log(log[0])
    qnn = cpu = partitions = 0
    cpu_nodes: list[CpuNode] = []
    for subgraph in session.get_provider_graph_assignment_info():
        nodes = subgraph.get_nodes()
        if subgraph.ep_name == _qnn().get_ep_name():
            qnn += len(nodes)
            partitions += 1
        else:
            cpu += len(nodes)
            cpu_nodes += [CpuNode(n.name, n.op_type, reasons.get(n.name, "")) for n in nodes]
    return Placement(target.soc, qnn + cpu, qnn, cpu, partitions, cpu_nodes)


# ---------------------------------------------------------------------------------- running it
class HtpBackend(OnnxBackend):
    """Runs an exported model on the QNN HTP backend (emulated on x86), as a pipeline backend with
    ``OnnxBackend``'s interface: (N, 3, H, W) float32 in [-1, 1] → the model's output, a static
    batch b run b images at a time. Nodes the EP rejects run on the CPU EP unless
    ``cpu_fallback=False``."""

    def __init__(self, path: str | Path, target: HtpTarget = DEFAULT_TARGET, threads: int | None = None,
                 cpu_fallback: bool = True):
        # OnnxBackend's __call__ (shape check, static-batch chunks) runs this session unchanged.
        self.session = open_htp_session(path, target, threads=threads, cpu_fallback=cpu_fallback)
        inp = self.session.get_inputs()[0]
        self.input_name, self.input_shape = inp.name, list(inp.shape)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.target = target


# ---------------------------------------------------------------------------- context binaries
@dataclass
class ContextModel:
    soc: str
    onnx: Path  # the EPContext model (*_ctx.onnx)
    binary: Path  # the context binary it points to
    compile_s: float
    bytes: int  # of the .bin


def compile_context(path: str | Path, out: str | Path, target: HtpTarget) -> ContextModel:
    """Compile ``path`` for ``target`` offline into the EPContext model ``out`` (``*_ctx.onnx``)
    and its context binary beside it (``ep.context_embed_mode=0``). Every node must go to the HTP."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    before = set(out.parent.iterdir())
    options = htp_session_options(target, cpu_fallback=False, context_path=out)
    t0 = time.perf_counter()
    _session(path, options)
    seconds = time.perf_counter() - t0
    bins = sorted(p for p in set(out.parent.iterdir()) - before if p.suffix == ".bin")
    if not out.is_file() or len(bins) != 1:
        raise ExportError(f"the QNN EP wrote no single context binary beside {out}")
    return ContextModel(target.soc, out, bins[0], seconds, bins[0].stat().st_size)
