"""Latency of exported graphs, measured as ratios within one run.

``compare_latency`` times several ONNX files on the same input with the same thread count,
*interleaved* (one run of each model per round, the order rotated every round), so that whatever
else the machine is doing at a given moment slows every model alike; it reports each model's
median and its ratio to a baseline. Absolute milliseconds depend on the machine; the ratios are the
numbers to compare.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantface.export.api import OnnxBackend
from quantface.export.save import file_bytes
from quantface.errors import ConfigError


@dataclass
class Timing:
    label: str
    path: Path
    median_ms: float
    min_ms: float
    file_bytes: int


def compare_latency(models: dict[str, str | Path], threads: int = 2, repeats: int = 30, warmup: int = 3,
                    seed: int = 0, progress: bool = True) -> dict[str, Timing]:
    """Median single-batch latency of each model (same random input in [-1, 1]), interleaved."""
    if not models:
        raise ConfigError("no models to time")
    if threads < 1 or repeats < 1:
        raise ConfigError("threads and repeats must be positive")
    # Timed as ONNX Runtime runs each graph by default (its QDQ fusions on, whatever the CPU): OnnxBackend's
    # exact QDQ reference for HTP graphs is for quality, not speed.
    backends = {label: OnnxBackend(path, threads=threads, exact_qdq=False) for label, path in models.items()}
    shapes = {tuple(b.input_shape) for b in backends.values()}
    if len(shapes) != 1 or not all(isinstance(d, int) for d in next(iter(shapes))):
        raise ConfigError(f"the models must share one static input shape to be compared, got {sorted(shapes)}")
    x = np.random.default_rng(seed).uniform(-1, 1, next(iter(shapes))).astype(np.float32)
    labels = list(backends)
    for _ in range(warmup):
        for label in labels:
            backends[label](x)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(repeats):
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        for label in order:
            t0 = time.perf_counter()
            backends[label](x)
            times[label].append(1000 * (time.perf_counter() - t0))
        if progress:
            print(f"\rtiming round {r + 1}/{repeats}", end="", flush=True)
    if progress:
        print()
    return {label: Timing(label, Path(models[label]), statistics.median(t), min(t), file_bytes(models[label]))
            for label, t in times.items()}


# Parts of a graph's kernel time, by ONNX Runtime's node (after its fusions) — see ``kernel_time_by_part``.
PARTS = ("integer convolutions (QLinearConv)", "other integer ops (QLinearMatMul, QGemm, QLinear*)",
         "float convolutions", "low-rank branches", "Hadamard rotations", "activation quantizers (Clip, Q, DQ)",
         "layout (Transpose, Reorder)", "other float ops")
# Parts that exist only to carry our graphs' transforms and requantization (none of them in an FP32 graph).
OVERHEAD_PARTS = (PARTS[3], PARTS[4], PARTS[5])
# Integer kernels ONNX Runtime's CPU EP fuses QDQ node units into, besides QLinearConv (ORT's own
# quantizers produce them for MatMul / Gemm / Add / Mul / Sigmoid / Softmax / Concat / pools).
_INTEGER_OPS = frozenset({"QGemm", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger", "QAttention",
                          "DynamicQuantizeMatMul", "QuickGeluInteger"})


def _part(node_name: str, op: str) -> str:
    if "_LowRank" in node_name:
        return PARTS[3]
    if "Hadamard" in node_name:
        return PARTS[4]
    if op == "QLinearConv":
        return PARTS[0]
    if op.startswith("QLinear") or op in _INTEGER_OPS:
        return PARTS[1]
    if op in ("Conv", "FusedConv"):
        return PARTS[2]
    if op in ("QuantizeLinear", "DequantizeLinear", "Clip"):
        return PARTS[5]
    if op in ("Transpose", "ReorderInput", "ReorderOutput"):
        return PARTS[6]
    return PARTS[7]


def kernel_time_by_part(path: str | Path, threads: int = 2, runs: int = 20, seed: int = 0) -> dict[str, float]:
    """Mean milliseconds per run that ONNX Runtime's profiler attributes to each of ``PARTS`` (node
    kernel times summed; a run's wall time adds scheduling between nodes). Nodes are classified by
    the exporter's names (``<layer>_LowRank*``, ``<layer>_Hadamard`` and its inlined body) and by op."""
    return profile_kernel_time(path, threads, runs, seed)[0]


def profile_kernel_time(path: str | Path, threads: int = 2, runs: int = 20,
                        seed: int = 0) -> tuple[dict[str, float], dict[str, float]]:
    """One profiled session: ``kernel_time_by_part``'s parts, and the low-rank branch kernel time of
    each layer (mean milliseconds per run, keyed by the layer's name in the exporter's node names)."""
    with tempfile.TemporaryDirectory() as tmp:
        backend = OnnxBackend(path, threads=threads, profile_prefix=str(Path(tmp) / "profile"), exact_qdq=False)
        x = np.random.default_rng(seed).uniform(-1, 1, backend.input_shape).astype(np.float32)
        for _ in range(runs):
            backend(x)
        events = json.loads(Path(backend.session.end_profiling()).read_text())
    totals = dict.fromkeys(PARTS, 0.0)
    branches: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            ms = e["dur"] / 1000.0 / runs
            totals[_part(e["name"], e["args"].get("op_name", ""))] += ms
            if "_LowRank" in e["name"]:
                layer = e["name"].split("_LowRank")[0]
                branches[layer] = branches.get(layer, 0.0) + ms
    return totals, branches
