"""The curriculum's machinery: the accuracy table per task and level, the start level, question pools with
mastery and hints, and the two trainers Phase 5 compares (at the edge, and uniform over all levels).

A question in a level's pool is asked in training batches; answered right (greedy-exact under teacher
forcing, computed from the training pass itself) its hint shrinks by one character, or, without a hint, its
streak grows; answered wrong its streak resets and its hint grows by one character of the answer, up to
`max_hint`. A question right
`consecutive_for_mastery` times in a row without a hint is retired and never asked again; an empty pool is
refilled with new questions. Hints exist only in training prompts (`<bos> prompt <hint> a1..ak <sep>`):
every evaluation here uses plain held-out questions of the val or test split.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from forge.data import IGNORE_INDEX, Example, exact_matches, pack_batch, per_segment_all
from forge.data.levels import level_examples
from forge.distributed import all_sum, ranks_mean, world
from forge.pipeline.devices import training_autocast
from forge.pipeline.training import rank_share_nll

HINT = "<hint>"


def accuracy_table(model, tasks, levels: int, n: int, split: str, seed: int, tokenizer, max_len: int) -> dict:
    """{task: {level: accuracy}} on n held-out questions of `split` per task and level (seeded, so two calls
    with the same arguments judge two models on the same questions)."""
    questions = {(t, lv): level_examples(t, lv, n, split, seed) for t in tasks for lv in range(1, levels + 1)}
    flat = [ex for key in questions for ex in questions[key]]
    right = exact_matches(model, flat, tokenizer, max_len, batch_size=512)
    table, i = {t: {} for t in tasks}, 0
    for (t, lv), items in questions.items():
        table[t][lv] = sum(right[i: i + len(items)]) / len(items)
        i += len(items)
    return table


def start_level(row: dict[int, float], target: float) -> int:
    """The hardest level whose accuracy is still >= target; 0 when no level reaches it."""
    return max((lv for lv, acc in row.items() if acc >= target), default=0)


def pooled(table: dict, keep) -> float | None:
    """Mean accuracy over the (task, level) cells with keep(task, level) (cells hold equal question counts);
    None when no cell is kept."""
    cells = [acc for t, row in table.items() for lv, acc in row.items() if keep(t, lv)]
    return sum(cells) / len(cells) if cells else None


@dataclass(eq=False)
class Question:
    example: Example
    streak: int = 0
    hint: int = 0
    asked: int = 0

    def prompt(self) -> Example:
        """The training form: the answer's first `hint` characters after <hint> in the prompt."""
        if self.hint == 0:
            return self.example
        ex = self.example
        return Example(ex.task, f"{ex.prompt}{HINT}{ex.answer[: self.hint]}", ex.answer)


@dataclass
class LevelPool:
    """The training questions of one task's level; retired questions leave `active` for good."""
    task: str
    level: int
    size: int
    seed: int
    active: list[Question] = field(default_factory=list)
    retired: list[Question] = field(default_factory=list)
    refills: int = 0

    def __post_init__(self):
        self._refill()

    def _refill(self) -> None:
        seen = {q.example.prompt for q in self.retired}
        fresh = level_examples(self.task, self.level, self.size, "train", self.seed * 7919 + self.refills)
        self.active = [Question(ex) for ex in dict((ex.prompt, ex) for ex in fresh).values() if ex.prompt not in seen]
        self.refills += 1
        if not self.active:    # the level's train prompts are all retired: ask them again
            self.active = [Question(ex) for ex in fresh]

    def draw(self, rng: random.Random, k: int) -> list[Question]:
        if not self.active:
            self._refill()
        return [rng.choice(self.active) for _ in range(k)]

    def record(self, question: Question, correct: bool, mastery: int, max_hint: int) -> None:
        question.asked += 1
        if correct and question.hint:        # right with a hint: the hint shrinks, no streak yet
            question.hint -= 1
        elif correct:
            question.streak += 1
        else:
            question.streak, question.hint = 0, min(max_hint, question.hint + 1, len(question.example.answer))
        if question.streak >= mastery and question.hint == 0 and question in self.active:
            self.active.remove(question)
            self.retired.append(question)


def train_step(model, optimizer, examples: list[Example], tokenizer, max_len: int,
               net=None) -> tuple[float, list[bool]]:
    """One optimizer step on the answers of `examples`; returns the loss and, per example, whether the
    model's greedy answer (before the step) was exactly right: the argmax at every answer position equals the
    target under teacher forcing, which is what greedy decoding would produce. The examples are packed end to end
    into rows (forge.data.pack_batch: each attends only to itself, at its own positions), so a batch of mixed
    levels does not pay for the padding of its short questions. `net` is what the forward pass runs through
    (default `model`; on several ranks its DDP wrapper or FSDP2 copy from forge.distributed's
    `parallel_training`, made once): each rank then trains its slice of the packed rows, and the loss and the
    flags returned are the whole batch's, on every rank."""
    here = world()
    batch = pack_batch(examples, tokenizer, max_len, min_rows=here.size)
    device = next(model.parameters()).device
    batch, rows = batch.to(device), here.slice_of(batch.tokens.shape[0])
    runner = model if net is None else net
    model.train()
    runner.train()      # an FSDP copy has a mode of its own
    with training_autocast(model):
        logits = runner(batch.tokens[rows], positions=batch.positions[rows], segments=batch.segments[rows])
        loss = rank_share_nll(logits, batch.targets, rows)
    value = ranks_mean(loss)
    if not math.isfinite(value):
        raise FloatingPointError(f"phase 5 training loss became {value}")
    mine = batch.targets[rows]
    right = per_segment_all((logits.detach().argmax(-1) == mine) | (mine == IGNORE_INDEX), batch.segments[rows],
                            batch.count)   # True for the examples in other ranks' rows
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    runner.eval()
    model.eval()
    wrong = [float(not flag) for flag in right]
    return value, [total == 0 for total in (all_sum(wrong) if here.active else wrong)]
