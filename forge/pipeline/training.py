"""Supervised training of a language model on built-in task examples, shared by the phases that train.

Loss = cross-entropy on the answer tokens only (`forge.data.encode_batch` marks everything else -100),
so a model is judged on what it answers, never on reproducing the question. Batches are drawn with
replacement from the pre-encoded examples by a seeded generator, and packed end to end into rows of the longest
one's width (forge.data.pack_rows; trimmed to the longest row for a model that cannot take packed rows), so a run
is reproducible and pays little for padding. On several ranks (forge.distributed) every rank
draws the same global batch and trains on its own slice of it through DistributedDataParallel, each slice's
loss scaled so that the averaged gradient is the one-process gradient of the whole batch. With
hardware.distributed.fsdp, `train_on_examples` trains an FSDP2-sharded copy of the model the same way
(forge.distributed.sharded_training): FSDP too averages the gradients over the ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from forge.data import IGNORE_INDEX, PackedBatch, encode_batch, pack_rows
from forge.distributed import optimizer_sharing, parallel_training, ranks_mean, world
from forge.pipeline.devices import model_device, training_autocast


@dataclass
class TrainingLog:
    """What a training run did: the loss every step and any evaluations along the way."""

    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, dict]] = field(default_factory=list)

    def smoothed_loss(self, last: int = 20) -> float:
        tail = self.losses[-last:]
        return sum(tail) / len(tail) if tail else float("nan")


def answer_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per answer token (+ <eos>): the positions whose target is not IGNORE_INDEX."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def shard_answer_nll(logits: torch.Tensor, targets: torch.Tensor, batch_tokens: int, ranks: int) -> torch.Tensor:
    """One rank's part of `answer_nll` of a batch split over `ranks` ranks: the slice's summed cross-entropy over
    the whole batch's `batch_tokens` answer tokens, times `ranks`, so the mean over ranks (what DDP averages,
    and what `optimize` reports) is the whole batch's mean."""
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total * (ranks / max(batch_tokens, 1))


def batch_rows(batch_size: int, what: str) -> slice:
    """This rank's rows of every global batch of `batch_size` rows (all of them in one process)."""
    here = world()
    if batch_size < here.size:
        raise ValueError(f"{what}: batch_size {batch_size} is smaller than the {here.size} ranks sharing every "
                         "batch; raise the batch size or use fewer processes")
    return here.slice_of(batch_size)


def rank_share_nll(logits: torch.Tensor, targets: torch.Tensor, rows: slice) -> torch.Tensor:
    """`answer_nll` of a global batch as this rank's share: `logits` of this rank's `rows`, `targets` of all rows.
    In one process, answer_nll itself; on several ranks, shard_answer_nll (DDP's average is the batch's mean)."""
    here = world()
    if not here.active:
        return answer_nll(logits, targets)
    return shard_answer_nll(logits, targets[rows], int((targets != IGNORE_INDEX).sum()), here.size)


def packed_nll(net: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """`rank_share_nll` of a packed batch (forge.data.pack_rows): this rank's slice of its rows through `net`."""
    rows = world().slice_of(batch.tokens.shape[0])
    logits = net(batch.tokens[rows], positions=batch.positions[rows], segments=batch.segments[rows])
    return rank_share_nll(logits, batch.targets, rows)


def forward_together(net: nn.Module, pad_id: int, *batches: torch.Tensor) -> list[torch.Tensor]:
    """The logits of several token batches from one forward pass (right-padded to one width, then split back; the
    model is causal, so the padding changes no logit kept): DDP expects one forward before each backward."""
    width = max(b.shape[1] for b in batches)
    logits = net(torch.cat([F.pad(b, (0, width - b.shape[1]), value=pad_id) for b in batches]))
    starts = [0]
    for b in batches:
        starts.append(starts[-1] + b.shape[0])
    return [logits[lo:hi, : b.shape[1]] for lo, hi, b in zip(starts, starts[1:], batches)]


def optimize(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, loss_at: Callable[[int], torch.Tensor],
             *, what: str = "training", on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """`steps` optimizer steps on `loss_at(step)` (model in train mode, eval mode after); returns the losses. A
    non-finite loss stops the run with an error naming `what` and the step. The loop every trainer shares. On
    several ranks the loss reported (and checked) is the mean of the ranks' losses, the same on every rank. Each
    `loss_at` runs under forge.pipeline.devices.training_autocast (bf16 where hardware.precision says so)."""
    losses: list[float] = []
    model.train()
    for step in range(1, steps + 1):
        with training_autocast(model):
            loss = loss_at(step)
        value = ranks_mean(loss)
        if not math.isfinite(value):
            raise FloatingPointError(f"{what} loss became {value} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(value)
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


def train_on_examples(model: nn.Module, optimizer: torch.optim.Optimizer, examples, tokenizer, *, steps: int,
                      batch_size: int, max_len: int, seed: int,
                      evaluate: Callable[[nn.Module], dict] | None = None, eval_every: int = 0,
                      on_step: Callable[[int, float], None] | None = None) -> TrainingLog:
    """Train `model` for `steps` optimizer steps on `examples`; NaN losses stop the run with an error. On several
    ranks each trains on its slice of every batch, through DDP or an FSDP2 copy (module docstring)."""
    if not examples:
        raise ValueError("train_on_examples: no training examples")
    batch = encode_batch(examples, tokenizer, max_len)
    return train_on_tokens(model, optimizer, batch.tokens, batch.targets, tokenizer.pad_id, steps=steps,
                           batch_size=batch_size, seed=seed, evaluate=evaluate, eval_every=eval_every,
                           on_step=on_step)


def train_on_tokens(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor, targets: torch.Tensor,
                    pad_id: int, *, steps: int, batch_size: int, seed: int,
                    evaluate: Callable[[nn.Module], dict] | None = None, eval_every: int = 0,
                    on_step: Callable[[int, float], None] | None = None, what: str = "training") -> TrainingLog:
    """`steps` optimizer steps on batches of `batch_size` rows of right-padded `tokens` / `targets` ([N, T], targets
    already shifted, IGNORE_INDEX where nothing is trained), drawn with replacement by a generator seeded with `seed`
    and trimmed to their longest row, or, for a model with `supports_packing` (forge.nn.Transformer), packed end to end
    into fewer rows (forge.data.pack_rows: the same loss and gradients without the padding's work); `evaluate(model)`
    every `eval_every` steps and at the end. On several ranks every rank draws the same rows and trains on its slice
    of them (module docstring)."""
    rows = batch_rows(batch_size, what)
    lengths, packs = (tokens != pad_id).sum(1), getattr(model, "supports_packing", False)
    device = model_device(model)
    tokens, targets = tokens.to(device), targets.to(device)
    generator = torch.Generator().manual_seed(seed)
    log = TrainingLog()
    with parallel_training(model, optimizer) as (net, sync):

        def loss_at(_step: int) -> torch.Tensor:
            idx = torch.randint(len(tokens), (batch_size,), generator=generator)
            if packs:
                return packed_nll(net, pack_rows(tokens[idx], targets[idx], pad_id, min_rows=world().size))
            width = int(lengths[idx].max())
            return rank_share_nll(net(tokens[idx[rows], :width]), targets[idx, :width], rows)

        def after(step: int, loss: float) -> None:
            if on_step is not None:
                on_step(step, loss)
            if evaluate is not None and eval_every and (step % eval_every == 0 or step == steps):
                sync()     # FSDP: the model gets the weights trained so far
                log.evals.append((step, evaluate(model)))
                net.train()

        log.losses = optimize(net, optimizer, steps, loss_at, what=what, on_step=after)
    return log


def make_optimizer(model: nn.Module, settings, lr: float) -> torch.optim.Optimizer:
    """MuonGrokfast for `model` from a phase's `optimizer:` config block (forge.pipeline.config.OptimizerConfig)
    at the training stage's rate `lr`: Muon for the hidden matrices, AdamW (at `adamw_lr`, default `lr`) for
    the rest, QK-clip on every attention module that records its logits. The mapping of the settings to
    MuonGrokfast's arguments is MuGrokConfig's, the same the presets use."""
    from forge.optim import MuGrokConfig, MuonGrokfast, muon_param_groups
    from forge.optim.presets import register_qk_clip_modules

    preset = MuGrokConfig(muon_lr=lr, fallback_lr=settings.adamw_lr or lr, grokfast_alpha=settings.grokfast_alpha,
                          grokfast_lambda=settings.grokfast_lamb, qk_clip_threshold=settings.qk_clip_threshold,
                          kl_coefficient=settings.kl_coefficient, muon_ste_mode=settings.ste_mode,
                          momentum=settings.momentum, nesterov=settings.nesterov, weight_decay=settings.weight_decay)
    grokfast = None if settings.grokfast == "off" else settings.grokfast
    ns_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16}[settings.ns_dtype]
    optimizer = MuonGrokfast(muon_param_groups(model), grokfast=grokfast, **optimizer_sharing(),
                             ns_dtype=ns_dtype, **preset.to_kwargs())
    register_qk_clip_modules(optimizer, model)
    return optimizer
