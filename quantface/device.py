"""Which torch device a job runs on: one home for the ``--device`` option.

``auto`` picks the first CUDA GPU when torch sees one and the CPU otherwise; ``cpu``, ``cuda`` and
``cuda:N`` name one. Under ``torchrun`` (``quantface.distributed``), ``auto`` and ``cuda`` pick this
rank's GPU, ``cuda:LOCAL_RANK``, so the ranks on one machine each get their own. Asking for a GPU that is not there is a user error (one sentence), not a crash
deep inside a forward pass. Nothing requires a GPU: every job runs on the CPU.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from quantface.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
HELP = ("auto (a CUDA GPU when torch sees one, else the CPU; under torchrun cuda:LOCAL_RANK), cpu, cuda or "
        "cuda:N (default: auto)")


def check_device_name(name: str) -> str:
    """Validate the spelling of a device option (availability is checked when the job starts)."""
    if not isinstance(name, str) or not DEVICE_PATTERN.match(name):
        raise ConfigError(f"--device {name!r} is not one of auto, cpu, cuda, cuda:N")
    return name


def resolve_device(name: str) -> "torch.device":
    """``auto`` → cuda when available, else cpu; a named CUDA device must exist. Under ``torchrun``
    ``auto`` (with a GPU) and ``cuda`` are ``cuda:LOCAL_RANK``."""
    import torch

    from quantface.distributed import launched, local_rank

    check_device_name(name)
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = "cuda"
    if name == "cuda" and launched():
        name = f"cuda:{local_rank()}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} asks for a CUDA GPU, but this torch build sees none "
                              f"(torch {torch.__version__}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name} does not exist: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def describe(device: "torch.device") -> str:
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
