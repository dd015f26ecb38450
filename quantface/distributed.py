"""Data-parallel runs on ``torch.distributed``, launched by ``torchrun``: the one home for them.

``torchrun --nproc-per-node N -m quantface calibrate ...`` starts N processes with ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` in their environment; that is how a run knows it is one rank of several
(``launched``). ``session`` joins the process group (Gloo for CPU tensors, NCCL for CUDA ones when
torch sees a GPU) with a timeout, so a rank that stops answering ends the job instead of hanging it,
and leaves it on exit. Outside ``torchrun`` nothing here does anything: every helper is then the
single process's identity (rank 0 of 1, reductions return their input).

What the helpers guarantee to the calibration code:

* the reductions (``all_reduce_max`` / ``min`` / ``sum``) and gathers keep values exact where the
  single process's operation is exact (max, min, concatenation in the single process's order);
* ``is_main``: rank 0, the only rank that writes files, prints and shows progress bars (``log``,
  ``progress``);
* ``agree``: a check (e.g. of the user's ``--data``) run on every rank, its outcome exchanged, so a
  user error on any rank raises on every rank (one ``error:`` line, from rank 0; exit status 2 on all).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from quantface.errors import ConfigError, QuantFaceError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
# Seconds a collective waits for the other ranks before the job fails (``QUANTFACE_DIST_TIMEOUT`` overrides).
DEFAULT_TIMEOUT_S = 600
TIMEOUT_ENV = "QUANTFACE_DIST_TIMEOUT"


def launched() -> bool:
    """Whether this process is one rank of a ``torchrun`` job (its environment variables are set)."""
    return all(k in os.environ for k in TORCHRUN_ENV)


def _dist():
    import torch.distributed as dist

    return dist


def active() -> bool:
    """Whether a process group of more than one rank is initialised (collectives do something)."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ["RANK"]) if launched() else 0


def world_size() -> int:
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def local_rank() -> int:
    return int(os.environ["LOCAL_RANK"]) if launched() else 0


def is_main() -> bool:
    """Rank 0 (the single process, outside ``torchrun``): the rank that writes, prints and shows bars."""
    return rank() == 0


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return value


def backend() -> str:
    """Gloo for CPU tensors and, where torch sees a GPU, NCCL for CUDA ones (one group serves both)."""
    import torch

    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


@contextmanager
def session(device: "torch.device | None" = None):
    """Under ``torchrun``, join the process group for the ``with`` block (timeout ``timeout_seconds``)
    and leave it after; a group the caller already initialised is used as it is. Outside ``torchrun``
    a no-op."""
    dist = _dist()
    if not launched() or dist.is_initialized():
        yield
        return
    import torch

    timeout = timeout_seconds()
    if device is not None and device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # NCCL's communicators go to this rank's GPU
    dist.init_process_group(backend(), timeout=timedelta(seconds=timeout))
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---- "only rank 0" ------------------------------------------------------------------------------

def log(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> Iterable[T]:
    """A tqdm progress bar on rank 0; the bare iterable's bar is disabled on the others."""
    from tqdm import tqdm

    disable = kwargs.pop("disable", False) or not is_main()
    return tqdm(iterable, dynamic_ncols=True, disable=disable, **kwargs)


def report_error(message: str) -> None:
    """The command line's ``error:`` line: printed by rank 0 only, so a job prints it once."""
    if is_main():
        print(f"error: {message}", file=sys.stderr)


# ---- agreement on user errors ---------------------------------------------------------------------

def agree(check: Callable[[], T]) -> T:
    """Run ``check`` on every rank and exchange the outcome: if it raised a user error
    (``QuantFaceError``) on any rank, raise on every rank (that rank's exception where it was raised,
    a ``ConfigError`` with the first failing rank's sentence elsewhere). Without a group, just ``check()``."""
    if not active():
        return check()
    try:
        value, error = check(), None
    except QuantFaceError as exc:
        value, error = None, exc
    messages = all_gather_object(None if error is None else str(error))
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if not failed:
        return value
    if error is not None and (len(failed) == len(messages) or failed[0][0] == rank()):
        raise error
    first_rank, first = failed[0]
    suffix = "" if len(failed) == len(messages) else f" (on rank {first_rank} of {len(messages)})"
    raise ConfigError(first + suffix)


# ---- collectives (identity without a group) -----------------------------------------------------------

def _reduce(t: "torch.Tensor", op_name: str) -> "torch.Tensor":
    if not active():
        return t
    dist = _dist()
    flat = t.reshape(-1).contiguous()
    dist.all_reduce(flat, op=getattr(dist.ReduceOp, op_name))
    return flat.reshape(t.shape)


def all_reduce_max(t: "torch.Tensor") -> "torch.Tensor":
    """Element-wise maximum over ranks (exact: the single process's running maximum gives the same)."""
    return _reduce(t, "MAX")


def all_reduce_min(t: "torch.Tensor") -> "torch.Tensor":
    return _reduce(t, "MIN")


def all_reduce_sum(t: "torch.Tensor") -> "torch.Tensor":
    """Sum over ranks (floating-point: the order of the additions is the backend's)."""
    return _reduce(t, "SUM")


def all_reduce_grads(params: list) -> None:
    """Sum every parameter's gradient over ranks in place (one flat buffer, one collective); a
    parameter without a gradient on a rank contributes zeros."""
    if not active():
        return
    import torch

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable; tensors on the CPU), in rank order. Without a group: ``[obj]``."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (the others' argument is ignored)."""
    if not active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module(module: "torch.nn.Module", src: int = 0) -> None:
    """Every parameter and buffer of ``module`` set to rank ``src``'s values, in place."""
    if not active():
        return
    import torch

    dist = _dist()
    with torch.no_grad():
        for t in module.state_dict(keep_vars=True).values():
            if t is None:
                continue
            data = t.data if t.is_contiguous() else t.data.contiguous()
            dist.broadcast(data, src=src)
            if data.data_ptr() != t.data.data_ptr():
                t.data.copy_(data)


def check_replicated(tensors: list, what: str) -> None:
    """Raise if ``tensors`` differ between ranks in any bit (a bug: the ranks would write different
    models). Two reductions of one flat copy: the element-wise MAX and MIN over ranks are equal only
    where every rank holds the same value."""
    if not active():
        return
    import torch

    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    if not torch.equal(all_reduce_max(flat.clone()), all_reduce_min(flat.clone())):
        raise RuntimeError(f"the ranks' {what} differ: data-parallel calibration went out of step")


def barrier() -> None:
    if active():
        _dist().barrier()


def shard(n: int) -> list[int]:
    """This rank's share of ``n`` work items: items ``rank, rank + world, rank + 2·world, ...``
    (strided, so the items are spread evenly and a short last item falls to one rank)."""
    return list(range(rank(), n, world_size()))


__all__ = ["DEFAULT_TIMEOUT_S", "TIMEOUT_ENV", "active", "agree", "all_gather_object", "all_reduce_grads",
           "all_reduce_max", "all_reduce_min", "all_reduce_sum", "barrier", "broadcast_module", "broadcast_object", "check_replicated",
           "is_main", "launched", "local_rank", "log", "progress", "rank", "report_error", "session", "shard",
           "world_size"]
