"""Several processes (torchrun): who this process is, and the collectives the pipeline's phases use.

`torchrun --nproc-per-node N -m forge run` (or `forge run --nproc N`) runs the pipeline on N ranks.

Every rank runs every phase's code in lockstep, on the same inputs and seeds. Inside a phase, while
`phase_scope` is open, the shared training loop (forge.pipeline.training) gives each rank a disjoint slice
of every batch and DistributedDataParallel averages the gradients, and `forge.data.evaluate` scores a slice
of the held-out questions per rank and sums the counts: the same global batch and the same metrics as one
process, to float summation order. Work no phase has split yet runs on every rank alike (same seeds, same
result), so ranks never wait on each other for long. Rank 0 alone writes: checkpoints, the registry, the
tracker and the console (forge.pipeline.orchestrator); the other ranks follow its messages, load what it
wrote and discard what they computed. Every collective has a timeout (`hardware.distributed.timeout_s`), so a
rank that dies ends the run with an error instead of a hang.

Outside `phase_scope` (a handoff check, the CLI, a test) everything is single-process, even under torchrun.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def slice_of(self, count: int) -> slice:
        """This rank's contiguous share of `count` items (sizes differ by at most one)."""
        return slice(self.rank * count // self.size, (self.rank + 1) * count // self.size)


SINGLE = World()
_state = {"open": False, "share_newton_schulz": False}


def launched() -> World:
    """The world torchrun set up for this process (RANK / WORLD_SIZE), whether or not it is initialized yet."""
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def world() -> World:
    """The world phases split their work over: torch.distributed's inside `phase_scope`, else one process."""
    if _state["open"] and dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return SINGLE


@contextlib.contextmanager
def phase_scope():
    """Open while every rank runs the same phase code: only then do training and evaluation split their work."""
    previous, _state["open"] = _state["open"], True
    try:
        yield world()
    finally:
        _state["open"] = previous


def local_device(device: torch.device) -> torch.device:
    """On CUDA, one GPU per rank (LOCAL_RANK); the CPU is shared."""
    if device.type == "cuda" and launched().active:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init(settings, device: torch.device) -> World:
    """Join torchrun's process group (once); a no-op for one process. `settings` is hardware.distributed."""
    here = launched()
    _state["share_newton_schulz"] = settings.share_newton_schulz
    if not here.active or dist.is_initialized():
        return here
    backend = settings.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
    dist.init_process_group(backend, timeout=timedelta(seconds=settings.timeout_s))
    return here


def optimizer_sharing():
    """MuonGrokfast's `distributed` argument for an optimizer a phase makes: "auto" (Newton-Schulz split over the
    ranks) when several ranks train and hardware.distributed.share_newton_schulz is on, else False (each rank
    orthogonalizes every matrix itself: the gradients DDP averaged are the same on every rank, so are the steps)."""
    return "auto" if world().active and _state["share_newton_schulz"] else False


def shutdown() -> None:
    """Leave the group once every rank got here (a rank that tears gloo down while a peer still talks to it
    can abort that peer)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def explain(error: BaseException) -> str:
    """The message of an error that ended a run; one raised by a collective (gloo, NCCL) under torchrun says first
    that another rank is the likely cause, since that rank's own output holds the reason."""
    text = str(error)
    transport = ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out")
    if launched().active and isinstance(error, RuntimeError) and any(mark in text for mark in transport):
        return f"a collective failed: another rank of this run failed, was killed or hangs (see its output): {text}"
    return text


def broadcast(message=None, src: int = 0):
    """Rank `src`'s `message` (any picklable object) on every rank."""
    box = [message]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums of `values` over the ranks of `world()` (float64); the values themselves on one rank."""
    here = world()
    if not here.active:
        return list(values)
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=on)   # NCCL reduces CUDA tensors only
    dist.all_reduce(tensor)
    return tensor.tolist()


def data_parallel(model: nn.Module) -> nn.Module:
    """The module to run forward passes through: DistributedDataParallel around `model` when several ranks
    train it (gradients averaged over ranks in backward), else `model` itself. Buffers (RoPE tables) are equal
    on every rank, so they are not broadcast each step."""
    if not world().active:
        return model
    ddp = nn.parallel.DistributedDataParallel
    quiet = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
             else {"broadcast_buffers": False})    # the older name (torch <= 2.12)
    return ddp(model, **quiet)
