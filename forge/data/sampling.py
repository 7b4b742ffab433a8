"""Answers a model writes itself: sampled at a temperature (greedy at 0), with their log-probability.

Used where a phase trains or judges a model on its own outputs (Phase 5's dreams and self-model). The
batch is re-run for every new token (no cache); the models here are small and answers short.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from forge.data.batching import prompt_ids
from forge.data.decoding import NextLogits
from forge.data.tasks import Example
from forge.data.tokenizer import CharTokenizer
from forge.distributed import FixedRowDraws, all_sum, gather_lists, world


@dataclass
class SampledAnswer:
    """ids: the answer's tokens (without <eos>); closed: the model wrote <eos> within the budget;
    logprob: the sum of log p(token) at temperature 1 over the answer and its <eos> (over what was written
    when not closed), i.e. how likely the model itself finds what it wrote."""
    ids: list[int]
    closed: bool
    logprob: float

    def text(self, tokenizer: CharTokenizer) -> str:
        return tokenizer.decode(self.ids)


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"Invalid temperature: {temperature!r}; expected a number >= 0 (0 = greedy)")
    return float(temperature)


@torch.no_grad()
def sample_answers(model, examples: Sequence[Example], tokenizer: CharTokenizer, max_len: int, *,
                   temperature: float = 0.0, max_new: int | None = None, generator: torch.Generator | None = None,
                   split: bool = False) -> list[SampledAnswer]:
    """The model's own answer to each example's `<bos> prompt <sep>`: up to `max_new` tokens (default: as
    many as max_len allows) or <eos>. The true answers are never read. With `split`, inside a phase run on
    several ranks (forge.distributed; every rank calls it with the same examples and generator state), each rank
    decodes its `world().slice_of` share of the examples, draws with `FixedRowDraws` (what one process draws) and
    every rank gets all the answers."""
    temperature = _check_temperature(temperature)
    if not examples:
        return []
    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        if not split or not world().active:
            return _sample(model, examples, tokenizer, max_len, temperature, max_new, generator, False)
        mine = list(examples)[world().slice_of(len(examples))]
        return gather_lists(_sample(model, mine, tokenizer, max_len, temperature, max_new, generator, True))
    finally:
        if was_training:
            model.train()


def _sample(model, examples, tokenizer, max_len, temperature, max_new, generator, split) -> list[SampledAnswer]:
    """See sample_answers; `examples` are this rank's share when `split` (possibly none), and then the loop runs
    until every rank's rows are done, drawing for every row of the whole batch at each step."""
    seqs = [prompt_ids(ex, tokenizer) for ex in examples]
    starts = [len(s) for s in seqs]
    budgets = [max_len - n if max_new is None else min(max_new, max_len - n) for n in starts]
    logprob = [0.0] * len(seqs)
    done = [b <= 0 for b in budgets]
    closed = [False] * len(seqs)
    next_logits = NextLogits(model, seqs, tokenizer.pad_id, tokenizer.vocab_size)
    every = range(len(seqs))      # finished rows too: the generator draws for every row, as it always did
    draw = FixedRowDraws(generator, split)      # so the rows of a rank never change: one layout for the loop
    while (all_sum([done.count(False)])[0] if split else done.count(False)) > 0:
        last = next_logits(every) if seqs else None
        logp = None if last is None else torch.log_softmax(last, -1).cpu()
        if temperature == 0:
            next_ids = [] if logp is None else logp.argmax(-1).tolist()
        else:
            drawn = draw(None if last is None else torch.softmax(last.cpu() / temperature, -1))
            next_ids = [] if last is None else drawn.squeeze(1).tolist()
        for b, tok in enumerate(next_ids):
            if done[b]:
                continue
            seqs[b].append(tok)
            logprob[b] += float(logp[b, tok])
            closed[b] = tok == tokenizer.eos_id
            done[b] = closed[b] or len(seqs[b]) - starts[b] >= budgets[b]
    return [SampledAnswer(s[start:len(s) - c], c, lp) for s, start, c, lp in zip(seqs, starts, closed, logprob)]
