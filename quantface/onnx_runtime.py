"""ONNX Runtime CPU sessions: the one home of their options (threads, log level, optimisation
level, profiler), used by the exporter's folding, the ONNX backend, packaging, tools and tests.

``onnxruntime`` is imported on first use, so importing this module costs nothing.
"""

from __future__ import annotations

from pathlib import Path

CPU = ["CPUExecutionProvider"]
QUIET = 3  # ORT log severity: errors only (its warnings about unused initializers and the like are noise here)


def cpu_session_options(threads: int | None = 1, optimization: str | None = None, profile_prefix: str | None = None,
                        optimized_model: str | Path | None = None):
    """``onnxruntime.SessionOptions`` for the CPU EP: ``threads`` intra-op threads (None: ORT's default)
    and one inter-op thread; ``optimization`` a ``GraphOptimizationLevel`` member name (ORT_DISABLE_ALL,
    ORT_ENABLE_EXTENDED, ...; None: ORT's default); ``profile_prefix`` turns on ORT's profiler
    (``session.end_profiling()`` writes the trace); ``optimized_model`` saves the optimised graph there."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = QUIET
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimization:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if optimized_model:
        options.optimized_model_filepath = str(optimized_model)
    return options


def cpu_session(model: str | Path | bytes, threads: int | None = 1, **options):
    """An ``onnxruntime.InferenceSession`` on the CPU EP of ``model`` (a path or serialised bytes),
    with ``cpu_session_options(threads, **options)``."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, cpu_session_options(threads, **options), providers=CPU)
