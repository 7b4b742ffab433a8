"""Turn examples into padded token/target tensors for training and evaluation.

Sequence layout: `<bos> prompt <sep> answer <eos>`, right-padded with `<pad>`.

Target convention (targets are already shifted): `targets[b, t]` is the token the model must
predict after reading `tokens[b, :t + 1]`, i.e. `tokens[b, t + 1]`, so the loss is
`cross_entropy(logits[:, t], targets[:, t])` with no further shifting. Only answer tokens and the
final `<eos>` are targets (the positions from `<sep>` to the last answer token); every other
position holds -100, PyTorch's default `ignore_index`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from forge.data.tasks import Example
from forge.data.tokenizer import CharTokenizer
from forge._checks import check_positive_int

IGNORE_INDEX = -100


@dataclass
class Batch:
    tokens: torch.Tensor          # [B, T] long, <bos> prompt <sep> answer <eos> <pad>...
    targets: torch.Tensor         # [B, T] long, next token at answer positions, else -100
    prompt_lengths: torch.Tensor  # [B] long, length of "<bos> prompt <sep>" (where the answer starts)

    def to(self, device) -> "Batch":
        return Batch(self.tokens.to(device), self.targets.to(device), self.prompt_lengths.to(device))


def prompt_ids(example: Example, tokenizer: CharTokenizer) -> list[int]:
    """Ids of `<bos> prompt <sep>`: what a model sees before it answers."""
    return [tokenizer.bos_id, *tokenizer.encode(example.prompt), tokenizer.sep_id]


def _sequences(examples: Sequence[Example], tokenizer: CharTokenizer, max_len: int) -> tuple[list, list]:
    """Per example its ids `<bos> prompt <sep> answer <eos>` and their targets (shifted, -100 off the answer)."""
    check_positive_int("max_len", max_len)
    if len(examples) == 0:
        raise ValueError("examples is empty; expected at least one Example")
    seqs, targets = [], []
    for i, ex in enumerate(examples):
        prefix = prompt_ids(ex, tokenizer)
        seq = prefix + tokenizer.encode(ex.answer) + [tokenizer.eos_id]
        if len(seq) > max_len:
            raise ValueError(f"examples[{i}] ({ex.task}: {ex.prompt!r} -> {ex.answer!r}) needs "
                             f"{len(seq)} tokens; max_len is {max_len}")
        seqs.append(seq)
        # position t predicts seq[t + 1]; answer starts at p, so targets run from p - 1 (<sep>)
        targets.append([IGNORE_INDEX] * (len(prefix) - 1) + seq[len(prefix):] + [IGNORE_INDEX])
    return seqs, targets


def encode_batch(examples: Sequence[Example], tokenizer: CharTokenizer, max_len: int) -> Batch:
    """Pad to the longest sequence of the batch; a sequence longer than max_len is an error."""
    seqs, targets = _sequences(examples, tokenizer, max_len)
    width = max(map(len, seqs))
    tokens = torch.tensor([seq + [tokenizer.pad_id] * (width - len(seq)) for seq in seqs], dtype=torch.long)
    shifted = torch.tensor([t + [IGNORE_INDEX] * (width - len(t)) for t in targets], dtype=torch.long)
    prefix_lengths = [len(prompt_ids(ex, tokenizer)) for ex in examples]
    return Batch(tokens, shifted, torch.tensor(prefix_lengths, dtype=torch.long))


@dataclass
class PackedBatch:
    """Examples packed end to end into rows (sequence packing): fewer, fuller rows than `encode_batch`'s one row
    per example padded to the longest. `tokens` and `targets` follow `Batch`'s conventions; `positions` restart at 0
    for every example (its RoPE positions, as if it were alone) and `segments` holds the example's index in the
    batch at each of its tokens, -1 at padding. A model given both (`Transformer(tokens, positions=...,
    segments=...)`) lets a token attend only to the earlier tokens of its own example, so each example's logits
    equal those of its own padded row (tested against a float64 reference)."""
    tokens: torch.Tensor      # [R, W] long
    targets: torch.Tensor     # [R, W] long, -100 where there is no target
    positions: torch.Tensor   # [R, W] long, position within the example (0 at padding)
    segments: torch.Tensor    # [R, W] long, index of the example in the batch, -1 at padding
    count: int                # examples packed

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.tokens.to(device), self.targets.to(device), self.positions.to(device),
                           self.segments.to(device), self.count)


def per_segment_all(flags: torch.Tensor, segments: torch.Tensor, count: int) -> list[bool]:
    """Per segment 0..count-1 of a packed batch (or a slice of its rows): are `flags` true at all its tokens?
    A segment with no token in `segments` counts as true."""
    failed = torch.zeros(count, dtype=torch.long, device=flags.device)
    real = segments >= 0
    failed.index_add_(0, segments[real], (~flags[real]).long())
    return (failed == 0).tolist()


def pack_batch(examples: Sequence[Example], tokenizer: CharTokenizer, max_len: int, min_rows: int = 1) -> PackedBatch:
    """`examples` packed into rows (see `pack_rows`); a sequence longer than max_len is an error."""
    batch = encode_batch(examples, tokenizer, max_len)
    return pack_rows(batch.tokens, batch.targets, tokenizer.pad_id, min_rows)


def first_fit(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Indices of `lengths` in bins of `width`: first fit in order of decreasing length, ties in index order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def pack_rows(tokens: torch.Tensor, targets: torch.Tensor, pad_id: int, min_rows: int = 1) -> PackedBatch:
    """The sequences of a right-padded batch (`tokens`, `targets` [B, T] as `encode_batch` makes them) packed end to end
    into rows of the longest one's width by `first_fit`: deterministic, so every rank of a data-parallel run packs a
    batch alike. When that gives fewer than `min_rows` rows (e.g. one per rank), every sequence keeps a row of its own."""
    lengths = (tokens != pad_id).sum(1).tolist()
    width, stride = max(lengths), tokens.shape[1]
    rows = first_fit(lengths, width)
    if len(rows) < min_rows:
        rows = [[i] for i in range(len(lengths))]
    source, positions, segments = [], [], []
    for members in rows:
        free = width - sum(lengths[i] for i in members)
        source += [i * stride + t for i in members for t in range(lengths[i])] + [-1] * free
        positions += [t for i in members for t in range(lengths[i])] + [0] * free
        segments += [i for i in members for _ in range(lengths[i])] + [-1] * free
    shape, device = (len(rows), width), tokens.device
    source = torch.tensor(source, device=device)
    real = source >= 0
    gather = lambda x, fill: torch.where(real, x.flatten()[source.clamp(min=0)], fill).view(shape)   # noqa: E731
    return PackedBatch(gather(tokens, pad_id), gather(targets, IGNORE_INDEX),
                       torch.tensor(positions, device=device).view(shape),
                       torch.tensor(segments, device=device).view(shape), len(lengths))
