"""ONNX Runtime CPU sessions: the one home of their options (threads, log level, optimisation
level, profiler, QDQ fusions), used by the exporter's folding, the ONNX backend, packaging, tools and
tests; and what this CPU's integer kernels do (``u8s8_saturates``).

On x86 CPUs without a VNNI instruction, ONNX Runtime's U8S8 integer kernels (the ``QLinearConv`` /
``QGemm`` it fuses QDQ node units into) use ``vpmaddubsw``, whose int16 sum of two u8·s8 products
saturates for full-range 8-bit codes (2·255·127 > 32767; ``tools/check_u8s8_saturation.py`` measures it).
``quantize_static``'s guidance there is 7-bit weights (``reduce_range``). A session made with
``exact_qdq=True`` keeps those fusions off (ORT's ``session.disable_quant_qdq``): it computes the QDQ
graph as ONNX defines it, each DequantizeLinear / float op / QuantizeLinear in turn.

``onnxruntime`` is imported on first use, so importing this module costs nothing.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

CPU = ["CPUExecutionProvider"]
QUIET = 3  # ORT log severity: errors only (its warnings about unused initializers and the like are noise here)
DISABLE_QUANT_QDQ = "session.disable_quant_qdq"  # ORT session config key: no QDQ → QLinear* fusion


def cpu_has_vnni() -> bool | None:
    """Whether this CPU has a VNNI dot-product instruction (Linux /proc/cpuinfo flags); None if unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags


@lru_cache(maxsize=1)
def u8s8_saturates() -> bool:
    """Whether ONNX Runtime's fused U8S8 integer kernels saturate full-range 8-bit codes on this CPU:
    an x86/x64 CPU known to lack VNNI (``quantize_static``'s case for ``reduce_range``)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return x86 and cpu_has_vnni() is False


def cpu_session_options(threads: int | None = 1, optimization: str | None = None, profile_prefix: str | None = None,
                        optimized_model: str | Path | None = None, exact_qdq: bool = False):
    """``onnxruntime.SessionOptions`` for the CPU EP: ``threads`` intra-op threads (None: ORT's default)
    and one inter-op thread; ``optimization`` a ``GraphOptimizationLevel`` member name (ORT_DISABLE_ALL,
    ORT_ENABLE_EXTENDED, ...; None: ORT's default); ``profile_prefix`` turns on ORT's profiler
    (``session.end_profiling()`` writes the trace); ``optimized_model`` saves the optimised graph there;
    ``exact_qdq`` keeps ORT's QDQ → integer-kernel fusions off (the module docstring)."""
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
    if exact_qdq:
        options.add_session_config_entry(DISABLE_QUANT_QDQ, "1")
    return options


def cpu_session(model: str | Path | bytes, threads: int | None = 1, **options):
    """An ``onnxruntime.InferenceSession`` on the CPU EP of ``model`` (a path or serialised bytes),
    with ``cpu_session_options(threads, **options)``."""
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, cpu_session_options(threads, **options), providers=CPU)
