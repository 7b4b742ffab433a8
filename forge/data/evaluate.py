"""Held-out evaluation: exact-match accuracy of greedy answers, answer-token loss and perplexity.

`model` is any callable mapping a LongTensor [B, T] of token ids to logits [B, T, V] (V at least
the tokenizer's vocabulary); an nn.Module is put in eval mode for the call and restored after.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Sequence

import torch
import torch.nn.functional as F

from forge._checks import check_positive_int
from forge.data.batching import IGNORE_INDEX, encode_batch, prompt_ids
from forge.data.decoding import NextLogits, _logits, _model_device
from forge.data.tasks import Example
from forge.data.tokenizer import CharTokenizer
from forge.distributed import all_sum, gather_slices, world


def _score_batch(model, examples, tokenizer, max_len, device) -> tuple[float, int, list[bool]]:
    """One teacher-forced pass: summed answer-token cross-entropy, its token count, and per
    example whether greedy decoding reproduces the answer and then <eos> exactly.

    Greedy decoding matches the answer iff the argmax at every answer position (and at the last
    one, <eos>) equals the target under teacher forcing: while the decoded prefix equals the
    answer's prefix, the model sees exactly the teacher-forced input. So one forward pass gives
    the exact-match result of full greedy decoding (`greedy_answers`, which the tests compare).
    """
    batch = encode_batch(examples, tokenizer, max_len).to(device)
    logits = _logits(model, batch.tokens, tokenizer.vocab_size)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    answer = batch.targets != IGNORE_INDEX
    exact = ((logits.argmax(-1) == batch.targets) | ~answer).all(dim=1)
    return loss.item(), int(answer.sum()), exact.tolist()


def greedy_answers(model, examples: Sequence[Example], tokenizer: CharTokenizer, max_len: int) -> list[list[int]]:
    """Greedy continuation of `<bos> prompt <sep>` for each example, as ids up to (without) <eos>.

    Each row decodes at most len(answer) + 1 tokens (enough to tell an exact match, which needs
    <eos> right after the answer) and never past max_len. Rows are right-padded; the logits at a
    row's last real position do not see the padding because the model is causal. A forge
    Transformer decodes with its key/value cache, anything else re-runs the batch for every new
    token (forge.data.decoding). `evaluate` gets the same exact-match result from one pass; this
    function shows what the model actually says. It runs on the model's own device.
    """
    seqs = [prompt_ids(ex, tokenizer) for ex in examples]
    starts = [len(s) for s in seqs]
    budgets = [min(len(tokenizer.encode(ex.answer)) + 1, max_len - len(s)) for ex, s in zip(examples, seqs)]
    done = [b <= 0 for b in budgets]
    next_logits = NextLogits(model, seqs, tokenizer.pad_id, tokenizer.vocab_size)
    while not all(done):
        live = [b for b in range(len(seqs)) if not done[b]]
        for b, tok in zip(live, next_logits(live).argmax(-1).tolist()):
            seqs[b].append(tok)
            done[b] = tok == tokenizer.eos_id or len(seqs[b]) - starts[b] >= budgets[b]
    return [_until_eos(s[start:], tokenizer.eos_id) for s, start in zip(seqs, starts)]


def _until_eos(ids: list[int], eos_id: int) -> list[int]:
    """ids before the first <eos>; without one, all ids plus a marker so they never match."""
    return ids[: ids.index(eos_id)] if eos_id in ids else ids + [-1]


def evaluate(model, examples: Sequence[Example], tokenizer: CharTokenizer, max_len: int,
             batch_size: int = 256) -> dict:
    """{"accuracy", "loss", "perplexity", "per_task_accuracy", "n"} over `examples`.

    accuracy: greedy-decoded answer ids equal the answer's ids and are followed by <eos>
    (computed from one teacher-forced pass, which is exact; see `_score_batch`).
    loss: mean cross-entropy per answer token (+ <eos>) under teacher forcing; perplexity = exp(loss).
    Inside a phase run on several ranks (forge.distributed.phase_scope) each rank scores its share of `examples`
    and the counts are summed over the ranks: every rank gets the result for all of them.
    """
    check_positive_int("batch_size", batch_size)
    if len(examples) == 0:
        raise ValueError("examples is empty; expected at least one Example")
    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            return _evaluate(model, examples, tokenizer, max_len, batch_size)
    finally:
        if was_training:
            model.train()


def exact_matches(model, examples: Sequence[Example], tokenizer: CharTokenizer, max_len: int,
                  batch_size: int = 256) -> list[bool]:
    """Per example, whether the greedy answer is exactly the answer followed by <eos> (the exact-match
    test of `evaluate`, one teacher-forced pass per batch). Inside a phase run on several ranks each rank scores
    its share of `examples` and every rank gets the flags of all of them."""
    check_positive_int("batch_size", batch_size)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    device, flags = _model_device(model), []
    mine = examples[world().slice_of(len(examples))]
    try:
        with torch.no_grad():
            for lo in range(0, len(mine), batch_size):
                flags.extend(_score_batch(model, mine[lo: lo + batch_size], tokenizer, max_len, device)[2])
    finally:
        if was_training:
            model.train()
    return [bool(flag) for flag in gather_slices(flags, len(examples))]


def _evaluate(model, examples, tokenizer, max_len, batch_size) -> dict:
    """On several ranks (forge.distributed.world) each scores its slice of `examples` and the sums are shared."""
    device, here = _model_device(model), world()
    mine = examples[here.slice_of(len(examples))]
    loss_sum, count = 0.0, 0
    right, seen = Counter(), Counter()
    for lo in range(0, len(mine), batch_size):
        chunk = mine[lo : lo + batch_size]
        s, c, exact = _score_batch(model, chunk, tokenizer, max_len, device)
        loss_sum, count = loss_sum + s, count + c
        for ex, ok in zip(chunk, exact):
            seen[ex.task] += 1
            right[ex.task] += ok
    if here.active:
        tasks = sorted({ex.task for ex in examples})
        sums = all_sum([loss_sum, count] + [right[t] for t in tasks] + [seen[t] for t in tasks])
        loss_sum, count = sums[0], int(sums[1])
        right = Counter(dict(zip(tasks, map(int, sums[2: 2 + len(tasks)]))))
        seen = Counter({t: n for t, n in zip(tasks, map(int, sums[2 + len(tasks):])) if n})
    loss = loss_sum / count
    return {
        "accuracy": sum(right.values()) / len(examples),
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "per_task_accuracy": {t: right[t] / seen[t] for t in sorted(seen)},
        "n": len(examples),
    }


def _payload(prompt: str) -> str:
    return prompt.rsplit(":", 1)[-1]


def trivial_baseline(train_examples: Sequence[Example], eval_examples: Sequence[Example]) -> dict:
    """Accuracy of answers that need no model, to measure a trained model's margin against.

    Strategies: "most_frequent_answer" (per task, the commonest training answer; catches a model
    collapsed to one output) and "copy_prompt" (echo the prompt's text after its last ':', or the
    whole prompt; catches a model that only copies). "accuracy" is the better of the two.
    """
    if len(train_examples) == 0 or len(eval_examples) == 0:
        raise ValueError("train_examples and eval_examples must both be non-empty")
    answers = defaultdict(Counter)
    for ex in train_examples:
        answers[ex.task][ex.answer] += 1
    commonest = {task: counts.most_common(1)[0][0] for task, counts in answers.items()}
    scores = {
        "most_frequent_answer": sum(commonest.get(ex.task) == ex.answer for ex in eval_examples),
        "copy_prompt": sum(_payload(ex.prompt) == ex.answer for ex in eval_examples),
    }
    scores = {k: v / len(eval_examples) for k, v in scores.items()}
    best = max(scores, key=scores.get)
    return {"accuracy": scores[best], "strategy": best, **scores}


def mean(flags) -> float:
    """The mean of an iterable of numbers or booleans, 0.0 for none: the share of right answers."""
    flags = list(flags)
    return sum(flags) / max(1, len(flags))
