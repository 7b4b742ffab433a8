"""Phase 3's thought warm-up: supervised steps on worked thoughts before the RL, as STaR (Zelikman et al. 2022,
arXiv 2203.14465) starts from rationales before it learns from its own.

Quiet-STaR starts its RL from a 7B pretrained model whose sampled thoughts are already text. A sub-million-
parameter model trained only on answers samples noise as thoughts: RL from there measured a thought gain of
-0.43 (40 steps) and -0.59 (100 steps) in this repository (benchmarks/RESULTS.md). So the model first learns
the thought format from each task's exact rationale (`forge.data.rationale`: the reversed sum for addition,
the value before the reduction for modular + and -, an empty thought where a task has none), and the RL then
refines the thoughts the model samples itself. Every step trains both formats alike,

    loss = NLL(rationale + </think> | prompt) + NLL(answer | prompt, rationale) + plain_weight * NLL(answer | prompt)

so accuracy with thoughts can only beat accuracy without them through what the thoughts carry.
"""
from __future__ import annotations

import random
from typing import Callable

import torch

from forge.data import rationale
from forge.distributed import parallel_training, world
from forge.pipeline.phases.phase3_quietstar.thoughts import ThoughtIds, build_rows, example_ids
from forge.pipeline.training import batch_rows, forward_together, optimize, rank_share_nll


def warm_up_thoughts(model, optimizer, examples, tokenizer, ids: ThoughtIds, **kwargs) -> list[float]:
    """Phase 3's warm-up: `train_with_thoughts` on each example's rationale (`forge.data.rationale`)."""
    thoughts = [tokenizer.encode(rationale(ex)) for ex in examples]
    return train_with_thoughts(model, optimizer, examples, thoughts, tokenizer, ids, **kwargs)


def train_with_thoughts(model, optimizer, examples, thoughts: list[list[int]], tokenizer, ids: ThoughtIds, *,
                        steps: int, batch_size: int, plain_weight: float, seed: int,
                        on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """`steps` optimizer steps on batches of (example, its thought) drawn with a seeded RNG, each row trained
    with its thought and without; returns the losses. Phase 4 uses it to fine-tune a thinking model on the
    thoughts it wrote before quantization. On several ranks each trains on its rows of every batch, through DDP
    or (hardware.distributed.fsdp) an FSDP2 copy, as forge.pipeline.training.train_on_examples does."""
    if not examples or len(thoughts) != len(examples):
        raise ValueError(f"train_with_thoughts: {len(examples)} examples and {len(thoughts)} thoughts; expected "
                         "one thought per example and at least one example")
    prefixes, answers = example_ids(examples, tokenizer)
    rng, device = random.Random(seed), next(model.parameters()).device
    mine, ranks = batch_rows(batch_size, "train_with_thoughts"), world().size
    with parallel_training(model, optimizer) as (net, _):

        def loss_at(_step: int) -> torch.Tensor:
            rows = [rng.randrange(len(examples)) for _ in range(batch_size)]
            pick = lambda items: [items[i] for i in rows]   # noqa: E731
            with_t = build_rows(pick(prefixes), pick(answers), ids, pick(thoughts), [True] * batch_size)
            plain = build_rows(pick(prefixes), pick(answers), ids)
            if ranks == 1:
                logits_t, logits_p = net(with_t.tokens.to(device)), net(plain.tokens.to(device))
            else:   # this rank's rows of both batches in one pass (forge.pipeline.training)
                logits_t, logits_p = forward_together(net, ids.pad, with_t.tokens[mine].to(device),
                                                      plain.tokens[mine].to(device))
            return (rank_share_nll(logits_t, with_t.thought_targets.to(device), mine)
                    + rank_share_nll(logits_t, with_t.answer_targets.to(device), mine)
                    + plain_weight * rank_share_nll(logits_p, plain.answer_targets.to(device), mine))

        return optimize(net, optimizer, steps, loss_at, what="training with thoughts", on_step=on_step)
