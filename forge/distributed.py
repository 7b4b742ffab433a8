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

With `hardware.distributed.fsdp` on, the loops that train whole models (`parallel_training`: the shared loop,
Phase 3's warm-up and reinforcement, Phase 5's climb and control) train an FSDP2-sharded copy of the model instead
(`sharded_training`): the copy keeps 1/N of the parameters, gradients and optimizer state on each rank, and the
model itself (whole on every rank throughout) gets the trained weights back before it is evaluated or sampled
(`sync`) and when the loop ends, so nothing else ever sees a sharded tensor.

Outside `phase_scope` (a handoff check, the CLI, a test) everything is single-process, even under torchrun.
Inside it, the split functions (the training loops, `forge.data.evaluate` / `exact_matches`,
`forge.data.tools.answer_with_tool`, prompt baking (`forge.baking.PromptBaker`), Phase 8's `teacher_targets`, and
the samplers called with `split=True`: `forge.data.sampling.sample_answers`, `forge.data.tools.generate`, Phase
3's `sample_thoughts`, `forge.baking.sample_trajectories`) are collectives:
every rank must call them in the same order, so never from work dealt to one rank (Phase 8's per-layer
searches), where the other ranks would wait until the timeout.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import os
import warnings
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
_state = {"open": False, "share_newton_schulz": False, "fsdp": False}


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
    _state["fsdp"] = settings.fsdp
    if not here.active or dist.is_initialized():
        return here
    backend = settings.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
    dist.init_process_group(backend, timeout=timedelta(seconds=settings.timeout_s))
    return here


def optimizer_sharing() -> dict:
    """MuonGrokfast's `distributed` and `share_newton_schulz` arguments for an optimizer a phase makes: when several
    ranks train, "auto" (QK-clip's per-head maxima all-reduced, so every replica clips alike) with Newton-Schulz
    split over the ranks only if hardware.distributed.share_newton_schulz is on (off: each rank orthogonalizes every
    matrix itself; the gradients DDP averaged are the same on every rank, so are the steps); else no collective."""
    if not world().active:
        return {"distributed": False}
    return {"distributed": "auto", "share_newton_schulz": _state["share_newton_schulz"]}


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


def _collective_device() -> torch.device:
    """Where this process's tensors for a collective live: its GPU under NCCL (which reduces CUDA tensors only),
    else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums of `values` over the ranks of `world()` (float64); the values themselves on one rank."""
    here = world()
    if not here.active:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def ranks_mean(value: float | torch.Tensor) -> float:
    """The mean over the ranks of each rank's `value` (a float or a one-element tensor), the same on every rank;
    the value itself on one rank. What a trainer reports as a data-parallel batch's loss."""
    value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    return value if not world().active else all_sum([value])[0] / world().size


def rank_share_mean(mean: torch.Tensor, count: int, total: int) -> torch.Tensor:
    """A mean over this rank's `count` items as its share of the mean over the batch's `total` items: scaled by
    count x ranks / total, so that the mean over the ranks (what DDP averages) is the batch's mean. With no items
    here (count 0: `mean` is then NaN or anything), a zero that stays on the graph, so DDP still gets this rank's
    backward. In one process, `mean` itself."""
    here = world()
    if not here.active:
        return mean
    if count == 0:
        return torch.nan_to_num(mean, nan=0.0, posinf=0.0, neginf=0.0) * 0.0
    return mean * (count * here.size / total)


def gather_slices(mine: list[float], count: int) -> list[float]:
    """The values of all `count` items on every rank, each rank having computed `mine` for its own
    `world().slice_of(count)` (exact: every item is one rank's value plus zeros); `mine` itself on one rank."""
    here = world()
    part = here.slice_of(count)
    if len(mine) != part.stop - part.start:
        raise ValueError(f"gather_slices: rank {here.rank} holds {len(mine)} values for items {part.start}.."
                         f"{part.stop - 1} of {count}")
    if not here.active:
        return list(mine)
    full = [0.0] * count
    full[part] = list(mine)
    return all_sum(full)


def gather_rows(mine: torch.Tensor, count: int) -> torch.Tensor:
    """The rows of all `count` items on every rank, each rank having computed `mine` (same trailing shape, dtype
    and device everywhere) for its own `world().slice_of(count)`: one all_gather, in rank order; `mine` itself on
    one rank."""
    here = world()
    if not here.active:
        return mine
    shares = [len(range(count)[World(rank, here.size).slice_of(count)]) for rank in range(here.size)]
    if mine.shape[0] != shares[here.rank]:
        raise ValueError(f"gather_rows: rank {here.rank} holds {mine.shape[0]} rows of its {shares[here.rank]}")
    on = _collective_device()
    padded = torch.zeros((max(shares), *mine.shape[1:]), dtype=mine.dtype, device=on)
    padded[: mine.shape[0]] = mine.to(on)
    parts = [torch.empty_like(padded) for _ in shares]
    dist.all_gather(parts, padded)
    return torch.cat([part[:share] for part, share in zip(parts, shares)]).to(mine.device)


def split_layout(count: int, width: int, wide: bool) -> tuple[int, int, int, bool]:
    """For a batch whose rows the ranks hold in rank order, this rank `count` of them, each `width` wide (0 where
    unknown) and `wide` (float64) or not: (rows on the ranks before this one, rows on all ranks, the widest width,
    any wide), the same on every rank, from one all-reduce. (0, count, width, wide) in one process."""
    here = world()
    if not here.active:
        return 0, count, width, wide
    slots = [0.0] * (3 * here.size)
    slots[3 * here.rank: 3 * here.rank + 3] = [count, width, float(wide)]
    sums = all_sum(slots)
    counts = [int(c) for c in sums[0::3]]
    return sum(counts[:here.rank]), sum(counts), int(max(sums[1::3])), any(sums[2::3])


def draw_rows(probs: torch.Tensor, generator: torch.Generator | None = None, before: int = 0,
              total: int | None = None) -> torch.Tensor:
    """One token per row of `probs` (n, V), as (n, 1): the draws torch.multinomial(whole, 1, generator=generator)
    makes for rows before..before+n-1 of a batch `whole` of `total` rows (default n) whose other rows other ranks
    hold. torch draws a single sample per row as argmax(p / q) with q ~ Exp(1) of the whole batch's shape (its
    fast path for one sample; tests/data/test_sampling.py checks the two agree); this draws the whole q and keeps
    its rows, so ranks sharing a batch draw together what one process draws, and their generators stay equal.
    Drawn where the generator is (a CPU generator, the model on a GPU: the same draws on any device), returned
    on probs' device."""
    rows, vocab = probs.shape
    where = probs.device if generator is None else generator.device
    q = torch.empty((rows if total is None else total, vocab), dtype=probs.dtype, device=where)
    q.exponential_(1, generator=generator)
    return (probs.to(where) / q[before: before + rows]).argmax(-1, keepdim=True).to(probs.device)


def draw_split(probs: torch.Tensor | None, generator: torch.Generator | None, split: bool) -> torch.Tensor | None:
    """draw_rows for a batch whose rows the ranks hold in rank order (see the module), this rank's `probs`
    (None: no row here), when `split`; one all-reduce finds where this rank's rows sit. None when no rank holds a
    row. Not split, or in one process: draw_rows(probs)."""
    return FixedRowDraws(generator, split)(probs)


class FixedRowDraws:
    """draw_split for a decoding loop whose ranks hold the same rows at every step (each step draws for every row,
    finished or not): where this rank's rows sit is found at the first draw (one all-reduce) and kept, so the later
    steps draw what draw_split would draw without a collective. Call it with this rank's probs (None: no row)."""

    def __init__(self, generator: torch.Generator | None, split: bool):
        self.generator, self.split, self.layout = generator, split and world().active, None

    def __call__(self, probs: torch.Tensor | None) -> torch.Tensor | None:
        if not self.split:
            return None if probs is None else draw_rows(probs, self.generator)
        if self.layout is None:
            count, width = (0, 0) if probs is None else probs.shape
            self.layout = split_layout(count, width, probs is not None and probs.dtype == torch.float64)
        before, total, width, wide = self.layout
        if total == 0:
            return None
        if probs is None:    # no row here: draw the others' noise all the same, so the generators stay in step
            probs = torch.zeros((0, width), dtype=torch.float64 if wide else torch.float32)
        return draw_rows(probs, self.generator, before, total)


def gather_lists(mine: list) -> list:
    """The concatenation, in rank order, of every rank's `mine` (picklable items), on every rank: with
    `world().slice_of`'s contiguous shares, the items of the whole list in their order. `mine` on one rank."""
    if not world().active:
        return list(mine)
    parts = [None] * world().size
    dist.all_gather_object(parts, list(mine))
    return [item for part in parts for item in part]


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


@contextlib.contextmanager
def parallel_training(model: nn.Module, optimizer: torch.optim.Optimizer):
    """(net, sync) for a training loop: `net` takes the forward passes, `sync()` makes `model` hold the weights
    trained so far (before an evaluation). One process: `model` itself. Several ranks: DistributedDataParallel
    around `model` (`data_parallel`), or with hardware.distributed.fsdp an FSDP2-sharded copy that `optimizer`
    steps until the block ends, when `model` gets its trained weights (`sharded_training`)."""
    if not (world().active and _state["fsdp"]):
        yield data_parallel(model), lambda: None
        return
    with sharded_training(model, optimizer) as sharded:
        yield sharded, lambda: write_back(sharded, model)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of `model`'s outermost nn.ModuleLists (a Transformer's `blocks`): the units FSDP gathers one at
    a time, so a rank holds one block's full weights at once instead of the whole model's."""
    lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name]
    outer = [name for name in lists if not any(name.startswith(other + ".") for other in lists)]
    return [block for name in outer for block in model.get_submodule(name)]


@contextlib.contextmanager
def sharded_training(model: nn.Module, optimizer: torch.optim.Optimizer):
    """An FSDP2 (`fully_shard`) copy of `model`, every repeated block and the root sharded over the ranks, that
    `optimizer` steps while the block is open: its parameter groups, per-parameter state (each rank keeps its part)
    and QK-clip modules point at the copy. On leaving, `model` gets every trained parameter in place (the same full
    weights on every rank) and `optimizer` its own parameters back, with full (plain) state tensors. If the block
    raises, model and optimizer are left as they were on entry (no collective runs: a peer may be gone)."""
    from torch.distributed.fsdp import fully_shard

    sharded = copy.deepcopy(model)
    for block in reversed(repeated_blocks(sharded)):
        fully_shard(block)
    fully_shard(sharded)
    into = _pairs(model, sharded)
    saved = ([list(g["params"]) for g in optimizer.param_groups], {p: optimizer.state[p] for p in into
                                                                    if p in optimizer.state})
    _move_optimizer(optimizer, into, _shard_state, {m: sharded.get_submodule(n) for n, m in model.named_modules()})
    try:
        with warnings.catch_warnings():
            # FSDP2 warns that a block returns views (its key/value cache, which training never writes in place)
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
            yield sharded
    except BaseException:
        _restore_optimizer(optimizer, saved, {sharded.get_submodule(n): m for n, m in model.named_modules()})
        raise
    write_back(sharded, model)
    model.train(sharded.training)
    _move_optimizer(optimizer, {new: old for old, new in into.items()}, _gather_state,
                    {sharded.get_submodule(n): m for n, m in model.named_modules()})


def write_back(sharded: nn.Module, model: nn.Module) -> None:
    """Copy every parameter (gathered whole: `full_tensor`, an all-gather) and buffer of the FSDP copy `sharded`
    into `model` in place; every rank ends with the same full weights."""
    params, buffers = dict(sharded.named_parameters()), dict(sharded.named_buffers())
    with torch.no_grad():
        for name, p in model.named_parameters():
            value = params[name]
            p.copy_(value.full_tensor() if hasattr(value, "full_tensor") else value)
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


def _pairs(model: nn.Module, sharded: nn.Module) -> dict:
    """{parameter of `model`: the parameter of the same name in its sharded copy}."""
    copies = dict(sharded.named_parameters())
    return {p: copies[name] for name, p in model.named_parameters()}


def _move_optimizer(optimizer, into: dict, convert, modules: dict) -> None:
    """Point `optimizer` at other parameters (`into`: old -> new), each one's state converted by `convert(value,
    new)`, and (MuonGrokfast) its QK-clip modules at `modules` (old -> new)."""
    missing = [(gi, i) for gi, group in enumerate(optimizer.param_groups) for i, p in enumerate(group["params"])
               if p not in into]
    if missing:
        raise ValueError(f"optimizer param_groups[{missing[0][0]}]['params'][{missing[0][1]}] is not a parameter of "
                         "the model being trained; FSDP shards the model's own parameters only")
    for group in optimizer.param_groups:
        group["params"] = [into[p] for p in group["params"]]
    for old, new in into.items():
        if old in optimizer.state:
            optimizer.state[new] = {key: convert(value, new) for key, value in optimizer.state.pop(old).items()}
    if hasattr(optimizer, "replace_attention"):
        optimizer.replace_attention(modules)


def _restore_optimizer(optimizer, saved, modules: dict) -> None:
    """Undo `_move_optimizer` without communication: the parameter lists and state objects saved on entry."""
    params, state = saved
    for group, original in zip(optimizer.param_groups, params):
        for p in group["params"]:
            optimizer.state.pop(p, None)
        group["params"] = original
    optimizer.state.update(state)
    if hasattr(optimizer, "replace_attention"):
        optimizer.replace_attention(modules)


def _shard_state(value, param):
    """A full state tensor of the parameter's shape, or of (n, *shape) (the Grokfast ring: split one dim later), as
    a DTensor laid out like the sharded parameter (rank 0's values scattered; every rank holds the same anyway);
    another tensor (AdamW's step count) copied, so that steps inside the block leave the saved state as it was."""
    from torch.distributed.tensor import Shard, distribute_tensor
    if not isinstance(value, torch.Tensor):
        return value
    if not (value.dim() >= max(param.dim(), 1) and value.shape[value.dim() - param.dim():] == param.shape):
        return value.clone()
    lead = value.dim() - param.dim()
    placements = [Shard(p.dim + lead) if isinstance(p, Shard) else p for p in param.placements]
    return distribute_tensor(value, param.device_mesh, placements)


def _gather_state(value, _param):
    """A DTensor state tensor as the full plain tensor (an all-gather); anything else as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
