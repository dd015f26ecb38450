"""Saving and loading model weights: safetensors for tensors, JSON for the config. Nothing is unpickled."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from quantface.paths import atomic_path, atomic_write_bytes
from quantface.errors import WeightsError
from quantface.models.reference import ReferenceConfig, ReferenceRestorer
from quantface.state_dict import load_strict, read_tensors


def save_weights(model: ReferenceRestorer, stem: str | Path) -> None:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` (both atomically)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(stem.with_suffix(".safetensors")) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_bytes(stem.with_suffix(".json"), (model.config.to_json() + "\n").encode())


def load_weights(stem: str | Path) -> ReferenceRestorer:
    """Build the reference model from ``<stem>.json`` and load ``<stem>.safetensors`` (strict)."""
    stem = Path(stem)
    cfg_path, w_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise WeightsError(f"model file {p} does not exist")
    try:
        config = ReferenceConfig.from_json(cfg_path.read_text())
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"model config {cfg_path} is invalid: {exc}") from None
    tensors, _ = read_tensors(w_path, "weights file")
    model = ReferenceRestorer(config)
    load_strict(model, tensors, w_path, "weights file", f"config {cfg_path.name}")
    return model.eval()
