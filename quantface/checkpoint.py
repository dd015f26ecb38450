"""Resumable training state as safetensors: named parameters, Adam's moments and step counts, and
string metadata. Written atomically (temp file, rename); loading never unpickles anything."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


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
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={**(metadata or {}), "step": str(step)})
    tmp.replace(path)


def load_checkpoint(path: str | Path, params: dict[str, torch.nn.Parameter], opt: torch.optim.Adam) -> int:
    """Restore ``params`` and Adam's state in place; returns the step the checkpoint was taken at."""
    with safe_open(str(path), "pt") as f:
        step = int((f.metadata() or {})["step"])
    tensors = load_file(str(path))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
            if f"exp_avg.{name}" in tensors:
                opt.state[p] = {"step": tensors[f"step.{name}"].reshape(()).clone(),
                                "exp_avg": tensors[f"exp_avg.{name}"].clone(),
                                "exp_avg_sq": tensors[f"exp_avg_sq.{name}"].clone()}
    return step
