"""Saving and loading model weights: safetensors for tensors, JSON for the config. Nothing is unpickled."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from quantface.paths import atomic_path, atomic_write_bytes
from quantface.errors import WeightsError
from quantface.models.reference import ReferenceConfig, ReferenceRestorer


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
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"weights file {w_path} is unreadable or truncated: {exc}") from None
    model = ReferenceRestorer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        missing = len(expected.keys() - found.keys())
        unexpected = len(found.keys() - expected.keys())
        reshaped = sum(1 for k in expected.keys() & found.keys() if expected[k] != found[k])
        raise WeightsError(f"weights file {w_path} does not fit the config {cfg_path.name}: {missing} missing, "
                           f"{unexpected} unexpected and {reshaped} differently shaped tensors")
    model.load_state_dict(tensors)
    return model.eval()
