"""Models the toolchain can load by name (``--model``)."""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

from quantface.errors import WeightsError

if TYPE_CHECKING:
    from quantface.models.reference import ReferenceRestorer

WEIGHTS_DIR = Path(__file__).parent / "weights"
MODEL_NAMES = ("reference", "osdface")


def load_model(name: str, weights: str | Path | None = None) -> "ReferenceRestorer":
    """The named model in eval mode. ``weights`` overrides the committed weights' stem
    (``<stem>.safetensors`` + ``<stem>.json``), for example a freshly trained run. For ``osdface``
    it is the checkpoint spec of ``quantface.models.osdface.osdface_weights`` (needs ``diffusers``)."""
    if name not in MODEL_NAMES:
        raise WeightsError(f"unknown model {name!r}; available: {', '.join(MODEL_NAMES)}")
    if name == "osdface":
        from quantface.models.osdface import load_osdface

        return load_osdface(weights)
    from quantface.models.store import load_weights

    return load_weights(weights if weights is not None else WEIGHTS_DIR / name)


def __getattr__(name: str):  # torch-free import: the model classes load on first use
    if name in ("ReferenceConfig", "ReferenceRestorer"):
        from quantface.models import reference

        return getattr(reference, name)
    raise AttributeError(f"module 'quantface.models' has no attribute {name!r}")


__all__ = ["MODEL_NAMES", "ReferenceConfig", "ReferenceRestorer", "WeightsError", "load_model"]
