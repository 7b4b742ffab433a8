"""Difficulty levels 1..NUM_LEVELS of the built-in tasks, for Phase 5's curriculum.

`level_task(task, level)` is a `forge.data.Task` whose questions really get harder with the level, and
`level_examples(task, level, n, split, seed)` draws them exactly as `make_examples` does (seeded,
split-disjoint by prompt through the same SHA-256 bucket of the prompt text). What a level changes:

- addition, multiplication: the operands' digits; level L has L + 1 digits in all, split as evenly as
  possible (level 1: 1+1 digits, level 2: 2+1, level 3: 2+2, ..., level 10: 6+5), order random. The
  default tasks train on 1-3 digit operands, so levels 6 and up (4+3 digits) lie beyond that.
- copy, reversal, sorting: the string's length, L + 2 characters (3 .. 12; trained: 3-8).
- modular: the operand range, a, b < MODULAR_BOUNDS[L - 1], modulus 97 and ops +-* throughout (small
  operands are mostly plain arithmetic, large ones need the reduction and the table).
- word_problems: the largest number in the story, 2 * L + 2 (4 .. 22; trained: 20).

Every prompt of the top levels fits `<bos> prompt <sep> answer <eos>` in 48 tokens with room for a hint.
"""
from __future__ import annotations

import random
from functools import lru_cache

from forge._checks import check_positive_int
from forge.data.tasks import (TASKS, AdditionTask, CopyTask, Example, ModularTask, MultiplicationTask, ReversalTask,
                              SortingTask, Task, WordProblemTask, make_examples)

NUM_LEVELS = 10
MODULAR_LEVELS = (("+", 30), ("+", 60), ("+", 97), ("+-", 40), ("+-", 97), ("+-*", 20), ("+-*", 40), ("+-*", 60),
                  ("+-*", 80), ("+-*", 97))   # (ops, operand bound) per level


class _BoundedModular(ModularTask):
    """ModularTask with operands a, b < bound (bound <= modulus)."""

    def __init__(self, ops: str, bound: int, modulus: int = 97):
        super().__init__(modulus, ops)
        self.bound = bound

    def sample(self, rng):
        a, b = rng.randrange(self.bound), rng.randrange(self.bound)
        op = rng.choice(self.ops)
        value = {"+": a + b, "-": a - b, "*": a * b}[op] % self.modulus
        return Example(self.name, f"({a}{op}{b})%{self.modulus}", str(value))


def _exact(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


class _DigitsTask(Task):
    """'a<op>b' with operands of exactly (d1, d2) digits in random order; op '+' or '*'."""

    def __init__(self, base: Task, total_digits: int):
        self.base, self.name = base, base.name
        self.digits = ((total_digits + 1) // 2, total_digits // 2)
        self.op = "+" if isinstance(base, AdditionTask) else "*"

    def sample(self, rng):
        a, b = _exact(rng, self.digits[0]), _exact(rng, self.digits[1])
        if rng.random() < 0.5:
            a, b = b, a
        return Example(self.name, f"{a}{self.op}{b}", str(a + b if self.op == "+" else a * b))

    def rationale(self, example):
        return self.base.rationale(example)


def _check_level(task: str, level: int) -> None:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; allowed: {sorted(TASKS)}")
    check_positive_int("level", level)
    if level > NUM_LEVELS:
        raise ValueError(f"Invalid level: {level}; levels are 1..{NUM_LEVELS}")


def level_task(task: str, level: int) -> Task:
    """The built-in task `task` at difficulty `level` (1 = easiest .. NUM_LEVELS); see the module docstring."""
    _check_level(task, level)
    return _level_task(task, level)


@lru_cache(maxsize=None)     # after the checks: True == 1 would hit level 1's entry
def _level_task(task: str, level: int) -> Task:
    if task in ("addition", "multiplication"):
        base = AdditionTask() if task == "addition" else MultiplicationTask()
        return _DigitsTask(base, level + 1)
    if task in ("copy", "reversal", "sorting"):
        cls = {"copy": CopyTask, "reversal": ReversalTask, "sorting": SortingTask}[task]
        return cls(min_len=level + 2, max_len=level + 2)
    if task == "modular":
        return _BoundedModular(*MODULAR_LEVELS[level - 1])
    return WordProblemTask(max_value=2 * level + 2)


def level_examples(task: str, level: int, n: int, split: str, seed: int) -> list[Example]:
    """n questions of `task` at `level` from `split` (same arguments, same list; splits never share a prompt)."""
    return make_examples({task: 1.0}, n, split, seed * 1000 + level, tasks={task: level_task(task, level)})
