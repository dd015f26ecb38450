"""Weight files read safely and loaded strictly: the one home for both (OSDFace checkpoints, LPIPS
weights, the reference model's weights).

Reading never unpickles code: ``.safetensors`` with safetensors, anything else with
``torch.load(weights_only=True)`` (memory-mapped when the file allows it). Every failure is one
``WeightsError`` sentence naming the file. Loading checks every key and shape before
``load_state_dict``, so a mismatch names the file and its first offending tensors.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from quantface.errors import WeightsError


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _torch_load(path: Path, what: str, hint: str) -> object:
    """torch.load with weights_only=True (memory-mapped when the file allows it)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(f"{what} {path} holds pickled objects other than tensors, which are refused "
                           f"(weights_only loading){hint}") from None
    except Exception as exc:  # noqa: BLE001 — any parse failure of a user file is a bad file, not a bug
        raise WeightsError(f"{what} {path} is unreadable or truncated: {_first_line(exc)}") from None


def read_tensors(path: str | Path, what: str = "checkpoint", *, nested: bool = False, hint: str = ""
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of the weight file ``path``; ``what`` names it in errors
    ("checkpoint", "LPIPS weights file"), ``hint`` follows the refusal of a pickle. A torch file must
    hold a flat name → tensor dictionary; with ``nested`` a ``state_dict`` inside it is unwrapped and
    non-tensor entries are dropped (training checkpoints)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} {path} does not exist")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"{what} {path} is unreadable or truncated: {_first_line(exc)}") from None
    obj = _torch_load(path, what, hint)
    if nested:
        while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise WeightsError(f"{what} {path} holds a {type(obj).__name__}, not a dictionary of tensors")
        return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}, {}
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise WeightsError(f"{what} {path} is not a flat state dict of named tensors")
    return obj, {}


def state_dict_mismatch(module: nn.Module, tensors: dict[str, torch.Tensor]) -> str:
    """How ``tensors`` does not fit ``module``'s state dict ("" when every key and shape fits):
    the first missing, unexpected and mis-shaped tensors in the module's order."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [f"{k} {found[k]} (expected {expected[k]})" for k in expected if k in found and expected[k] != found[k]]
    return "; ".join(f"{label} {', '.join(items[:3])}{', …' if len(items) > 3 else ''}"
                     for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", reshaped))
                     if items)


def load_strict(module: nn.Module, tensors: dict[str, torch.Tensor], path: str | Path, what: str, target: str
                ) -> None:
    """``module.load_state_dict(tensors)`` after checking every key and shape; a mismatch is one
    ``WeightsError``: "<what> <path> does not fit the <target>: missing …; unexpected …; mis-shaped …"."""
    mismatch = state_dict_mismatch(module, tensors)
    if mismatch:
        raise WeightsError(f"{what} {path} does not fit the {target}: {mismatch}")
    module.load_state_dict(tensors, strict=True)
