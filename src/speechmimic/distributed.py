"""Several processes, one result: torchrun's environment, PyTorch's process group, and the rules of who
writes.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) :func:`init` joins the process group: nccl
when every process has a CUDA device, gloo otherwise (CPUs, or mixed). Without torchrun nothing is
started and every helper here answers as a world of one, so the same code runs on a laptop and on a
cluster. Processes started otherwise (a scheduler, a test) set RANK, WORLD_SIZE and LOCAL_RANK and
``SPEECHMIMIC_DIST_INIT``, an init method such as ``file:///shared/dir/store`` (a file on a disk
they share instead of torchrun's TCP store, which listens on every interface). Rank 0 alone writes
files and shows progress; every rank computes the same batch order,
crops and masks (they are seeded), so a training step is a split of one batch, not N batches.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

# An init method to use instead of torchrun's (RANK and WORLD_SIZE still come from the environment).
INIT_ENV = "SPEECHMIMIC_DIST_INIT"


def init(device: str = "cpu") -> bool:
    """Join the process group if torchrun started this process; True when distributed."""
    if dist.is_initialized():
        return True
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return False
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # A rank that dies leaves the others waiting in a collective: fail after a while instead of forever.
    kwargs = {}
    if os.environ.get(INIT_ENV):  # e.g. file:///shared/dir/store: no TCP store, no open port
        kwargs = dict(init_method=os.environ[INIT_ENV], rank=int(os.environ["RANK"]), world_size=world_size)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30), **kwargs)
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def device_for(device: str) -> str:
    """A CUDA device spec made per process: ``cuda`` under torchrun means this rank's own GPU."""
    if dist.is_initialized() and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (and fills the caches it writes); then the others run it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (any picklable object)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def merged(mapping: dict) -> dict:
    """The union over ranks of a dict each rank holds (rank 0's value wins a shared key)."""
    if not dist.is_initialized():
        return mapping
    parts = [None] * world()
    dist.all_gather_object(parts, mapping)
    out: dict = {}
    for part in reversed(parts):
        out.update(part)
    return out


def all_sum(value: float) -> float:
    """The sum over ranks of a number every rank holds."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0])


def my_rows(n: int) -> list[int]:
    """This rank's rows of an n-item batch: contiguous, as equal as can be (possibly none)."""
    r, w = rank(), world()
    return list(range(n * r // w, n * (r + 1) // w))


def my_share(n: int) -> tuple[list[int], float]:
    """The rows this rank runs of an n-item batch and the weight of their loss: a rank with no rows
    runs row 0 at weight 0, because DDP's gradient reduction needs every rank to run the model."""
    rows = my_rows(n)
    return (rows, 1.0) if rows else ([0], 0.0)


def check_same(what: str, value: Sequence | str | int) -> None:
    """Refuse to go on when ranks disagree on something that must be shared (their data, say)."""
    if not dist.is_initialized():
        return
    values = [None] * world()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise RuntimeError(f"the ranks disagree on {what}: each must see the same data and settings")
