"""QDQ ONNX exporter: a calibration recipe + the FP model → one ONNX graph for ONNX Runtime / phones.

``export_onnx(ExportConfig(...))`` writes the model; ``OnnxBackend(path)`` runs it as a
``quantface.pipeline`` backend; ``qnn_report(model)`` lists what Qualcomm's HTP would not take.
See ``export.api`` for the passes and ``export.profiles`` for the integer containers.

Importing ``export`` (or ``export.config``, e.g. for CLI defaults) does not import torch's exporter
or onnxruntime; the functions below are loaded on first use.
"""


from __future__ import annotations


if __name__ != "quantface.export":  # the folder imported as a bare top-level package (e.g. from the repo root)
    raise ImportError(f"export/ is the package quantface.export; import quantface.export, not {__name__}")

import importlib

from quantface.export.config import ExportConfig
from quantface.export.errors import ExportError

_LAZY = {"ExportResult": "quantface.export.api", "OnnxBackend": "quantface.export.api", "build_onnx": "quantface.export.api",
         "export_onnx": "quantface.export.api", "qnn_report": "quantface.export.qnn_check", "PROFILES": "quantface.export.profiles"}

__all__ = ["ExportConfig", "ExportError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quantface.export' has no attribute {name!r}")
