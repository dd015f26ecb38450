"""Errors of the exporter. Each is a ``QuantFaceError`` (the CLI prints its one sentence and exits 2).

A recipe that does not fit the model raises ``calibration.recipe.RecipeError`` (also a
``QuantFaceError``), from the same check ``apply_recipe`` makes, so export and the PyTorch fake-quant
model accept exactly the same recipes.
"""

from __future__ import annotations

from quantface.errors import QuantFaceError


class ExportError(QuantFaceError):
    """The model or recipe cannot be expressed in the requested ONNX profile, or the ONNX file cannot be used."""
