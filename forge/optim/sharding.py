"""DTensor parameters (FSDP2's `fully_shard`) in MuonGrokfast: each rank holds a part (shard) of every tensor.

Element-wise updates (Grokfast, momentum, AdamW) run on the local parts as they are; Newton-Schulz needs the
whole matrix, so its input is all-gathered (`full_tensor`), every rank orthogonalizes it, and each applies its own
part of the result (`local_part`, no communication). Optimizer state of a sharded parameter is a DTensor laid
out like it (`as_shard_of`), so a checkpoint of the optimizer sees where each part belongs.

torch.distributed.tensor is not imported here (about a second at start-up): while nothing has imported it, no
DTensor exists, and `is_sharded` answers False from a dict look-up.
"""
from __future__ import annotations

import sys

import torch


def dtensor_class():
    """torch's DTensor class once anything has imported torch.distributed.tensor, else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_sharded(tensors) -> bool:
    """True when `tensors` (a non-empty list) are DTensors, False when they are plain tensors; a mix is refused,
    since the two are updated by different code."""
    dtensor = dtensor_class()
    if dtensor is None:
        return False
    flags = {isinstance(t, dtensor) for t in tensors}
    if len(flags) > 1:
        raise TypeError("a parameter group mixes DTensor (sharded) and plain parameters; shard the whole model "
                        "(fully_shard on its root too) or keep the two kinds in separate groups")
    return flags.pop()


def local(tensors) -> list[torch.Tensor]:
    """This rank's parts of DTensors, sharing their storage (an in-place update of one changes the DTensor)."""
    return [t.to_local() for t in tensors]


def _placements(like, leading: int):
    """`like`'s placements for a tensor of shape (*extra, *like.shape) with `leading` extra dims: Shard(d) moves to
    Shard(d + leading)."""
    from torch.distributed.tensor import Shard
    return [Shard(p.dim + leading) if isinstance(p, Shard) else p for p in like.placements]


def as_shard_of(part: torch.Tensor, like) -> torch.Tensor:
    """`part` (this rank's part of a tensor of `like`'s shape, or of (n, *like.shape) for the Grokfast ring) as a
    DTensor laid out like the DTensor `like`."""
    from torch.distributed.tensor import DTensor
    leading = part.dim() - like.dim()
    shape = torch.Size((*part.shape[:leading], *like.shape))
    return DTensor.from_local(part, like.device_mesh, _placements(like, leading), shape=shape,
                              stride=torch.empty(shape, device="meta").stride(), run_check=False)


def full_tensor(part: torch.Tensor, like) -> torch.Tensor:
    """The whole tensor of which `part` is this rank's part, laid out as DTensor `like` (an all-gather)."""
    return as_shard_of(part, like).full_tensor()


def shard_like(full: torch.Tensor, like):
    """`full` (the same on every rank) as a DTensor laid out like `like`: each rank keeps its part; no
    communication. `full` may have leading dims before `like`'s shape (the Grokfast ring)."""
    from torch.distributed.tensor import DTensor, Replicate
    mesh, leading = like.device_mesh, full.dim() - like.dim()
    whole = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return whole.redistribute(mesh, _placements(like, leading))


def local_part(full: torch.Tensor, like) -> torch.Tensor:
    """This rank's part of `full` (the same on every rank, `like`'s shape) under DTensor `like`'s layout."""
    return shard_like(full, like).to_local()


def process_group(like):
    """The process group over which the DTensor `like` is sharded (None: the default group, for a mesh of more
    than one dimension)."""
    mesh = like.device_mesh
    return mesh.get_group() if mesh.ndim == 1 else None
