"""Baking one of forge.baking's prompts into a pipeline model, shared by the phases that bake (3, 5).

PromptBaker (Bhargava et al. 2024, arXiv 2409.13697): the teacher reads prompt + `<bos> task <sep>`, the
student only the task; the trajectories are the teacher's answers, stopped at <eos>. Inputs too long for
prompt + input + trajectory are left out; batches hold inputs of one length (the baker's cache needs it).
"""
from __future__ import annotations

import random

import torch

from forge.baking import BakeResult, PromptBaker, get_prompt
from forge.data.batching import prompt_ids


def bake_task_prompt(model, prompt_id: str, examples, tokenizer, *, lr: float, steps: int, traj_len: int,
                     seed: int, rank: int = 4, alpha: float = 8.0) -> BakeResult:
    """Bake prompt `prompt_id` into a copy of `model` on the task inputs of `examples` (LoRA `rank`, `alpha`); the KL
    before and after is measured on up to 64 inputs of the commonest input length."""
    prompt = get_prompt(prompt_id).ids(tokenizer)
    room = model.config.max_len - prompt.shape[1] - traj_len
    prefixes = [p for p in (prompt_ids(ex, tokenizer) for ex in examples) if len(p) <= room]
    if not prefixes:
        raise ValueError(f"no input fits the baking prompt {prompt_id!r} ({prompt.shape[1]} tokens) plus "
                         f"{traj_len} trajectory tokens in max_len {model.config.max_len}")
    by_length: dict[int, list[list[int]]] = {}
    for prefix in prefixes:
        by_length.setdefault(len(prefix), []).append(prefix)
    groups = [torch.tensor(rows, dtype=torch.long) for rows in by_length.values()]   # in order of first appearance
    rng, device = random.Random(seed), next(model.parameters()).device

    def sampler(batch_size: int) -> torch.Tensor:
        pool = rng.choices(groups, weights=[len(g) for g in groups])[0]
        return pool[[rng.randrange(len(pool)) for _ in range(batch_size)]].to(device)

    held_out = max(groups, key=len)
    baker = PromptBaker(model, rank=rank, alpha=alpha, lr=lr, steps=steps, batch_size=16, traj_len=traj_len, seed=seed,
                        stop_token=tokenizer.eos_id, eval_every=steps)
    return baker.bake(prompt, sampler, eval_inputs=held_out[:64])
