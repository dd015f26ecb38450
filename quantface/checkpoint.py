"""Resumable training state as safetensors: named parameters, Adam's moments and step counts, and
string metadata. Written atomically (temp file, rename); loading never unpickles anything."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from quantface.errors import WeightsError
from quantface.paths import atomic_path

RESUME_HINT = "delete it or pass --no-resume"


def save_checkpoint(path: str | Path, params: dict[str, torch.nn.Parameter], opt: torch.optim.Adam, step: int,
                    metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    tensors = {}
    for name, p in params.items():
        tensors[f"param.{name}"] = p.detach().contiguous()
        state = opt.state.get(p)
        if state:
            tensors[f"exp_avg.{name}"] = state["exp_avg"].contiguous()
            tensors[f"exp_avg_sq.{name}"] = state["exp_avg_sq"].contiguous()
            tensors[f"step.{name}"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**(metadata or {}), "step": str(step)})


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint was taken at; a ``WeightsError`` naming the file if it is unreadable."""
    try:
        with safe_open(str(path), "pt") as f:
            return int((f.metadata() or {})["step"])
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise WeightsError(f"checkpoint {path} is unreadable or truncated ({type(exc).__name__}); "
                           f"{RESUME_HINT}") from None


def load_checkpoint(path: str | Path, params: dict[str, torch.nn.Parameter], opt: torch.optim.Adam) -> int:
    """Restore ``params`` and Adam's state in place; returns the step the checkpoint was taken at.
    A checkpoint that is unreadable or of another run (other tensors or shapes) is one ``WeightsError``."""
    step = checkpoint_step(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"checkpoint {path} is unreadable or truncated ({exc}); {RESUME_HINT}") from None
    for name, p in params.items():
        t = tensors.get(f"param.{name}")
        if t is None or t.shape != p.shape:
            raise WeightsError(f"checkpoint {path} is of another run (tensor {name} is "
                               f"{'missing' if t is None else 'of another shape'}); {RESUME_HINT}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
            if f"exp_avg.{name}" in tensors:
                opt.state[p] = {"step": tensors[f"step.{name}"].reshape(()).clone(),
                                "exp_avg": tensors[f"exp_avg.{name}"].clone(),
                                "exp_avg_sq": tensors[f"exp_avg_sq.{name}"].clone()}
    return step
