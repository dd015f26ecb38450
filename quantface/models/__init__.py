"""Models the toolchain can load by name (``--model``)."""

from __future__ import annotations

from pathlib import Path

from quantface.models.reference import ReferenceConfig, ReferenceRestorer
from quantface.errors import WeightsError
from quantface.models.store import load_weights

WEIGHTS_DIR = Path(__file__).parent / "weights"
MODEL_NAMES = ("reference", "osdface")


def load_model(name: str, weights: str | Path | None = None) -> ReferenceRestorer:
    """The named model in eval mode. ``weights`` overrides the committed weights' stem
    (``<stem>.safetensors`` + ``<stem>.json``), for example a freshly trained run. For ``osdface``
    it is the checkpoint spec of ``quantface.models.osdface.osdface_weights`` (needs ``diffusers``)."""
    if name not in MODEL_NAMES:
        raise WeightsError(f"unknown model {name!r}; available: {', '.join(MODEL_NAMES)}")
    if name == "osdface":
        from quantface.models.osdface import load_osdface

        return load_osdface(weights)
    return load_weights(weights if weights is not None else WEIGHTS_DIR / name)


__all__ = ["MODEL_NAMES", "ReferenceConfig", "ReferenceRestorer", "WeightsError", "load_model"]
