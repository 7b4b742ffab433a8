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


def encode_batch(examples: Sequence[Example], tokenizer: CharTokenizer, max_len: int) -> Batch:
    """Pad to the longest sequence of the batch; a sequence longer than max_len is an error."""
    check_positive_int("max_len", max_len)
    if len(examples) == 0:
        raise ValueError("examples is empty; expected at least one Example")
    rows, prefix_lengths = [], []
    for i, ex in enumerate(examples):
        prefix = prompt_ids(ex, tokenizer)
        seq = prefix + tokenizer.encode(ex.answer) + [tokenizer.eos_id]
        if len(seq) > max_len:
            raise ValueError(f"examples[{i}] ({ex.task}: {ex.prompt!r} -> {ex.answer!r}) needs "
                             f"{len(seq)} tokens; max_len is {max_len}")
        rows.append(seq)
        prefix_lengths.append(len(prefix))
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for b, (seq, p) in enumerate(zip(rows, prefix_lengths)):
        tokens[b, : len(seq)] = torch.tensor(seq)
        # position t predicts seq[t + 1]; answer starts at p, so targets run from p - 1 (<sep>)
        targets[b, p - 1 : len(seq) - 1] = torch.tensor(seq[p:])
    return Batch(tokens, targets, torch.tensor(prefix_lengths, dtype=torch.long))
