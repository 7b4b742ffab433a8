"""Trajectories from the prompted teacher, with the prompt's keys/values computed once and reused.

Prompt Baking (Bhargava et al. 2024, arXiv 2409.13697) trains on sequences y ~ P_theta(. | u, x). The
prompt u is the same for every sample, so its key/value cache is computed once with batch 1 and
broadcast over every batch and every decoding step (the attention expands a batch-1 cache).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from forge.distributed import FixedRowDraws, world

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


def check_prompt_ids(prompt_ids, max_len: int) -> torch.Tensor:
    """prompt_ids must be a non-empty int64 tensor (1, P) (a 1-D tensor is taken as one row), P < max_len."""
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dtype != torch.long:
        got = prompt_ids.dtype if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__
        raise ValueError(f"prompt_ids must be an int64 tensor of shape (1, P); got {got}")
    if prompt_ids.dim() == 1:
        prompt_ids = prompt_ids[None]
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"prompt_ids must have shape (1, P); got {tuple(prompt_ids.shape)}")
    if prompt_ids.shape[1] == 0:
        raise ValueError("prompt_ids is empty; a prompt needs at least one token")
    if prompt_ids.shape[1] >= max_len:
        raise ValueError(f"prompt_ids has {prompt_ids.shape[1]} tokens; it must be shorter than the "
                         f"model's max_len={max_len} to leave room for inputs")
    return prompt_ids


@torch.no_grad()
def prefix_cache(model: nn.Module, prompt_ids: torch.Tensor) -> KVCache:
    """Keys and values of the prompt (batch 1), computed once per bake."""
    return model(prompt_ids, use_cache=True)[1]


@dataclass
class Trajectories:
    """inputs x (B, L), sampled tokens y (B, T), the teacher logits that produced each y_t (B, T, V), and
    `keep` (B, T): the positions up to and including the first stop token (all True without one). `split`: the
    rows are this rank's share of a batch sampled over several ranks (sample_trajectories' split)."""

    inputs: torch.Tensor
    tokens: torch.Tensor
    teacher_logits: torch.Tensor
    keep: torch.Tensor
    split: bool = False


@torch.no_grad()
def sample_trajectories(model: nn.Module, cache: KVCache, inputs: torch.Tensor, length: int,
                        temperature: float, generator: torch.Generator | None = None,
                        stop_token: int | None = None, split: bool = False) -> Trajectories:
    """Sample y_1..y_T from softmax(logits / temperature) of `model` continuing prompt + inputs.

    The logits that each y_t was drawn from are exactly the teacher's next-token distributions at the
    trajectory positions, so they are kept: training needs no second teacher pass. With `split`, inside a phase
    run on several ranks (forge.distributed; every rank calls it alike, with at least as many rows as ranks),
    the trajectories of this rank's `world().slice_of` share of the rows only, drawn as one process draws them
    (forge.distributed.FixedRowDraws).
    """
    split = split and world().active
    if split:
        if inputs.shape[0] < world().size:
            raise ValueError(f"split sampling of {inputs.shape[0]} rows over {world().size} ranks: a rank would "
                             f"have none")
        inputs = inputs[world().slice_of(inputs.shape[0])]
    logits, past = model(inputs, past_key_values=cache, use_cache=True)
    tokens, teacher, draw = [], [], FixedRowDraws(generator, split)     # every row drawn every step
    for step in range(length):
        last = logits[:, -1].float()
        teacher.append(last)
        probs = torch.softmax(last / temperature, dim=-1)
        nxt = draw(probs)
        tokens.append(nxt)
        if step < length - 1:
            logits, past = model(nxt, past_key_values=past, use_cache=True)
    tokens = torch.cat(tokens, 1)
    return Trajectories(inputs, tokens, torch.stack(teacher, 1), keep_until_stop(tokens, stop_token), split)


def keep_until_stop(tokens: torch.Tensor, stop_token: int | None) -> torch.Tensor:
    """(B, T) bool: True up to and including each row's first `stop_token` (the answer and its end);
    what a model emits after stopping is not behaviour anyone asked for, so it is not baked."""
    if stop_token is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    stopped_before = (tokens == stop_token).long().cumsum(1) - (tokens == stop_token).long()
    return stopped_before == 0


def student_logits(model: nn.Module, traj: Trajectories) -> torch.Tensor:
    """The student's next-token logits (B, T, V) at the trajectory positions, WITHOUT the prompt:
    forward over x, y_1..y_{T-1}; position L-1+t predicts y_{t+1}."""
    seq = torch.cat([traj.inputs, traj.tokens[:, :-1]], 1)
    return model(seq)[:, traj.inputs.shape[1] - 1:]
