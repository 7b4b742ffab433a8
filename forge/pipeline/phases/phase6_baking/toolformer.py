"""The A-cycle: the model learns to call the calculator where the call helps it (Toolformer, Schick et al.
2023, arXiv 2302.04761), and is scored on questions beyond what it can compute itself.

Candidates. Toolformer samples calls at positions of a text; a question-answer row has one place where a call
can help (right after <sep>, before the answer), so every candidate call sits there. The candidates of a
question are the question itself when the calculator accepts it (`12+345`, `(12*5)%97`), its numbers alone,
and its first two numbers under + - * (the calls a sampler would propose).
Filtering. L(row) = summed cross-entropy of the answer and its <eos> after the row's prefix. A call c is kept
when L- - L+ >= tau, with L+ = L(call and its result), L- = min(L(no call), L(call with an empty result)); of
the kept calls of a question the one with the lowest L+ is used. A question with none is trained without a
call, so the model learns where not to call as well.
The scorer. Toolformer's LM knew to read a result; a model that has never seen <calc> has not, so on the
first cycle the losses come from a copy of the model first trained for `format_steps` on every question with
its own expression's call and without it (it learns the format: write the call, copy the result, and keeps
answering without one as it could). Later cycles score with
the model itself. The scorer is never handed on.
"""
from __future__ import annotations

import copy
import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from forge.data import IGNORE_INDEX, Example
from forge.data.calculator import CalculatorError, calculate
from forge.data.evaluate import mean
from forge.data.levels import level_examples
from forge.data.tools import answer_with_tool, call_ids, encode_rows, sequence
from forge.pipeline.training import train_on_tokens


def candidate_calls(example: Example) -> list[str]:
    """The calls a sampler would propose for `example` (see the module), each once, the question first."""
    numbers = re.findall(r"\d+", example.prompt)
    out = []
    try:
        calculate(example.prompt)
        out.append(example.prompt)
    except CalculatorError:
        pass
    if len(numbers) >= 2:
        out += [f"{numbers[0]}{op}{numbers[1]}" for op in "+-*"]
    out += numbers
    return list(dict.fromkeys(out))


def fits(example: Example, tokenizer, max_len: int, extra: int = 0) -> bool:
    """Whether the row with the question's own call (the longest the phase trains) fits max_len."""
    return len(sequence(example, tokenizer, call_ids(example.prompt, tokenizer))[0]) + extra <= max_len


def tool_levels(task: str, tokenizer, max_len: int, num_levels: int, extra: int = 0) -> list[int]:
    """The levels of `task` whose every sampled question fits max_len with its call (and `extra` tokens)."""
    return [lv for lv in range(1, num_levels + 1)
            if all(fits(ex, tokenizer, max_len, extra) for ex in level_examples(task, lv, 32, "train", 0))]


@torch.no_grad()
def answer_losses(model, rows: list[tuple[list[int], int]], tokenizer, max_len: int,
                  batch_size: int = 512) -> list[float]:
    """Summed cross-entropy of the last `n` ids of each (ids, n) row given everything before them."""
    out: list[float] = []
    device = next(model.parameters()).device
    model.eval()
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo: lo + batch_size]
        tokens, targets = encode_rows([(ids, [i >= len(ids) - n for i in range(len(ids))]) for ids, n in chunk],
                                      tokenizer.pad_id, max_len)
        logits = model(tokens.to(device)).float()
        nll = F.cross_entropy(logits.transpose(1, 2), targets.to(device), ignore_index=IGNORE_INDEX, reduction="none")
        out.extend(nll.sum(1).tolist())
    return out


@dataclass
class Filtered:
    """Per question, the kept call's expression (None: trained without a call), with L-, L+ of the best
    candidate; `considered`: candidate calls scored."""
    examples: list[Example]
    calls: list[str | None]
    gains: list[float]
    considered: int

    def kept_rate(self, task: str | None = None) -> float:
        chosen = [c for ex, c in zip(self.examples, self.calls) if task is None or ex.task == task]
        return sum(c is not None for c in chosen) / max(1, len(chosen))


def filter_calls(scorer, examples: list[Example], tokenizer, max_len: int, tau: float) -> Filtered:
    """Toolformer's filter over every candidate of every question (see the module)."""
    answer_len = {id(ex): len(tokenizer.encode(ex.answer)) + 1 for ex in examples}
    rows, index = [], []
    for q, ex in enumerate(examples):
        n = answer_len[id(ex)]
        rows.append((sequence(ex, tokenizer)[0], n))
        index.append((q, None, "plain"))
        for expr in candidate_calls(ex):
            for with_result in (False, True):
                ids = sequence(ex, tokenizer, call_ids(expr, tokenizer, with_result=with_result))[0]
                if len(ids) <= max_len:
                    rows.append((ids, n))
                    index.append((q, expr, "result" if with_result else "empty"))
    losses = answer_losses(scorer, rows, tokenizer, max_len)
    plain = {q: loss for (q, _, kind), loss in zip(index, losses) if kind == "plain"}
    by_call: dict[tuple[int, str], dict[str, float]] = {}
    for (q, expr, kind), loss in zip(index, losses):
        if expr is not None:
            by_call.setdefault((q, expr), {})[kind] = loss
    calls, gains = [None] * len(examples), [float("-inf")] * len(examples)
    for (q, expr), got in by_call.items():
        if "result" not in got or "empty" not in got:
            continue
        gain = min(plain[q], got["empty"]) - got["result"]
        if gain >= tau and gain > gains[q]:
            calls[q], gains[q] = expr, gain
    return Filtered(examples, calls, gains, len(by_call))


def train_rows(model, optimizer, rows, tokenizer, max_len: int, *, steps: int, batch_size: int, seed: int,
               what: str, on_step=None) -> list[float]:
    """`steps` optimizer steps on (ids, trained) rows drawn with replacement by a seeded generator (on several
    ranks, each trains its slice of every batch: forge.pipeline.training.train_on_tokens)."""
    tokens, targets = encode_rows(rows, tokenizer.pad_id, max_len)
    return train_on_tokens(model, optimizer, tokens, targets, tokenizer.pad_id, steps=steps, batch_size=batch_size,
                           seed=seed, what=what, on_step=on_step).losses


def format_scorer(model, make_opt, examples: list[Example], tokenizer, max_len: int, *, steps: int,
                  batch_size: int, seed: int):
    """A copy of `model` trained on every calculable question with its own call, and on the same questions
    without one (so its loss without a call stays what the model can do itself): the first cycle's scorer."""
    scorer = copy.deepcopy(model)
    calculable = [ex for ex in examples if _calculable(ex)]
    rows = [sequence(ex, tokenizer, call_ids(ex.prompt, tokenizer)) for ex in calculable]
    rows += [sequence(ex, tokenizer) for ex in calculable]
    if rows and steps:
        train_rows(scorer, make_opt(scorer), rows, tokenizer, max_len, steps=steps, batch_size=batch_size,
                   seed=seed, what="phase 6 format warm-up")
    return scorer.eval()


def _calculable(example: Example) -> bool:
    try:
        calculate(example.prompt)
        return True
    except CalculatorError:
        return False


def tool_rows(filtered: Filtered, replay: list[Example], tokenizer, seed: int, before: list[int] = (),
              after: list[int] = ()) -> list[tuple[list[int], list[bool]]]:
    """Training rows of an A-cycle: each tool question with its kept call (or none), and as many replayed
    questions of the incoming tasks, plain, so the model keeps what it could do; every answer between the
    `before` and `after` marker ids (the model's current persona format)."""
    rows = [sequence(ex, tokenizer, None if call is None else call_ids(call, tokenizer), before, after)
            for ex, call in zip(filtered.examples, filtered.calls)]
    rng = random.Random(seed)
    rows += [sequence(ex, tokenizer, None, before, after) for ex in rng.sample(replay, min(len(replay), len(rows)))]
    return rows


def tool_scores(model, examples: list[Example], tokenizer, max_len: int, levels: list[int] | None = None) -> dict:
    """Accuracy with the calculator and without it (tool=None) and the call rate, overall and per task; with
    `levels` (one per example), both accuracies per task and level as {task: {level: accuracy}} tables."""
    with_tool = answer_with_tool(model, examples, tokenizer, max_len)
    without = answer_with_tool(model, examples, tokenizer, max_len, tool=None)
    right = [o.correct(ex, tokenizer) for o, ex in zip(with_tool, examples)]
    right_alone = [o.correct(ex, tokenizer) for o, ex in zip(without, examples)]
    called = [o.called(tokenizer) for o in with_tool]
    out = {"tool_accuracy": mean(right), "no_tool_accuracy": mean(right_alone), "call_rate": mean(called),
           "call_error_rate": sum(o.errors for o in with_tool) / max(1, sum(o.calls + o.errors for o in with_tool))}
    for task in sorted({ex.task for ex in examples}):
        pick = [i for i, ex in enumerate(examples) if ex.task == task]
        out[f"tool_accuracy/{task}"] = mean(right[i] for i in pick)
        out[f"no_tool_accuracy/{task}"] = mean(right_alone[i] for i in pick)
        out[f"call_rate/{task}"] = mean(called[i] for i in pick)
    if levels is not None:
        for key, flags in (("tool_level_accuracy", right), ("no_tool_level_accuracy", right_alone)):
            out[key] = _table(examples, levels, flags)
    return out


def _table(examples, levels, flags) -> dict:
    cells: dict[str, dict[str, list[bool]]] = {}
    for ex, lv, ok in zip(examples, levels, flags):
        cells.setdefault(ex.task, {}).setdefault(str(lv), []).append(ok)
    return {t: {lv: mean(v) for lv, v in row.items()} for t, row in cells.items()}


