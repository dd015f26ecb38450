"""Typed configuration of one export (round-trips to JSON like the other configs)."""

from __future__ import annotations

from dataclasses import dataclass

from quantface.export.profiles import PROFILES
from quantface.config import JsonConfig
from quantface.errors import ConfigError
from quantface.models import MODEL_NAMES
from quantface.paths import check_input_dir, check_output_file

# torch.onnx exporters (export.trace): the TorchScript one (default; deprecated by torch) and the
# torch.export-based one (dynamo=True).
EXPORTERS = ("dynamo", "torchscript")


@dataclass
class ExportConfig(JsonConfig):
    """What to export and how.

    ``recipe`` None exports the FP32 graph. ``size`` is the static input side (default: the model's
    working size); ``batch`` the static batch. ``rotation=False`` exports the same layout *without*
    the Hadamard nodes, for measuring what they cost: the weights still expect rotated inputs, so
    that model's outputs are wrong and must not be used for quality numbers. ``exporter`` picks the
    torch.onnx exporter (``EXPORTERS``; see ``export.trace``).
    """

    model: str = "reference"
    weights: str | None = None  # weights stem overriding the embedded model's
    recipe: str | None = None  # calibration recipe folder; None → FP32 graph
    profile: str = "reference"  # reference | ort-cpu | qnn (see export.profiles)
    out: str = "model.onnx"
    size: int | None = None
    batch: int = 1
    rotation: bool = True
    exporter: str = "dynamo"

    def __post_init__(self) -> None:
        if self.model not in MODEL_NAMES:
            raise ConfigError(f"unknown model {self.model!r}; available: {', '.join(MODEL_NAMES)}")
        if self.profile not in PROFILES:
            raise ConfigError(f"unknown export profile {self.profile!r}; available: {', '.join(PROFILES)}")
        if not isinstance(self.batch, int) or isinstance(self.batch, bool) or self.batch < 1:
            raise ConfigError(f"--batch {self.batch!r} must be a positive integer")
        if self.size is not None and (not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1):
            raise ConfigError(f"--size {self.size!r} must be a positive integer")
        if not isinstance(self.rotation, bool):
            raise ConfigError(f"rotation must be true or false, got {self.rotation!r}")
        if self.exporter not in EXPORTERS:
            raise ConfigError(f"unknown exporter {self.exporter!r}; available: {', '.join(EXPORTERS)}")
        if not self.out or self.out.endswith(("/", "\\")):
            raise ConfigError(f"--out {self.out!r} must name a file")

    def check(self) -> None:
        """Before any work: the recipe folder exists and ``out`` can be written as a file."""
        if self.recipe is not None:
            check_input_dir(self.recipe, "recipe folder")
        check_output_file(self.out, "--out")
