"""QDQ ONNX exporter: a calibration recipe + the FP model → one ONNX graph for ONNX Runtime / phones.

``export_onnx(ExportConfig(...))`` writes the model; ``OnnxBackend(path)`` runs it as a
``quantface.pipeline`` backend; ``qnn_report(model)`` lists what Qualcomm's HTP would not take.
See ``export.api`` for the passes and ``export.profiles`` for the integer containers.

Importing ``export`` (or ``export.config``, e.g. for CLI defaults) does not import torch's exporter
or onnxruntime; the functions below are loaded on first use.
"""

from __future__ import annotations

import importlib

from export.config import ExportConfig
from export.errors import ExportError

_LAZY = {"ExportResult": "export.api", "OnnxBackend": "export.api", "build_onnx": "export.api",
         "export_onnx": "export.api", "qnn_report": "export.qnn_check", "PROFILES": "export.profiles"}

__all__ = ["ExportConfig", "ExportError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
