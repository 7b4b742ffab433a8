"""Built-in procedural tasks with exact answers, and seeded, split-disjoint example sets.

Every task draws prompts from a `random.Random` it is given, so a seed fixes the data. Prompts
stay short (at most ~28 characters with the default knobs) so that `<bos> prompt <sep> answer <eos>`
fits in 48 tokens. Train/val/test membership is a property of the prompt text (a SHA-256 bucket),
so the three splits never share a prompt, whatever the seed or the task mix.
"""
from __future__ import annotations

import hashlib
import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Mapping

from forge._checks import check_positive_int

SPLITS = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}   # percent buckets of the prompt hash
_MAX_TRIES = 10_000


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= {minimum}")
    return value


def _check_range(low_name: str, low, high_name: str, high, minimum: int) -> None:
    _check_int(low_name, low, minimum)
    _check_int(high_name, high, minimum)
    if low > high:
        raise ValueError(f"Invalid {low_name}/{high_name}: {low} > {high}")


def _number(rng: random.Random, min_digits: int, max_digits: int) -> int:
    """A number whose digit count is uniform in [min_digits, max_digits] (so short ones are not rare)."""
    digits = rng.randint(min_digits, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


class Task(ABC):
    """A generator of (prompt, answer) pairs; `sample` must be a pure function of the RNG state."""

    name: str = ""

    @abstractmethod
    def sample(self, rng: random.Random) -> Example:
        ...

    def rationale(self, example: Example) -> str:
        """A worked intermediate result that makes the answer easier to produce (STaR's rationale, used to
        warm up Phase 3's thoughts), or "" where the task has none short enough to help."""
        return ""


class ModularTask(Task):
    """'(a+b)%p' -> (a + b) mod p, for a, b in [0, p); ops from '+', '-', '*' (Python's % semantics)."""

    name = "modular"

    def __init__(self, modulus: int = 97, ops: str = "+-*"):
        _check_int("modulus", modulus, 2)
        if not ops or set(ops) - set("+-*"):
            raise ValueError(f"Invalid ops: {ops!r}; expected a non-empty subset of '+-*'")
        self.modulus, self.ops = modulus, ops

    def sample(self, rng):
        a, b = rng.randrange(self.modulus), rng.randrange(self.modulus)
        op = rng.choice(self.ops)
        value = {"+": a + b, "-": a - b, "*": a * b}[op] % self.modulus
        return Example(self.name, f"({a}{op}{b})%{self.modulus}", str(value))

    def rationale(self, example):
        """The value before the reduction for '+' and '-' ('(45+67)%97' -> '112'); products have none (a
        4-digit product is harder to compute than the table lookup it would replace)."""
        inner = example.prompt[1: example.prompt.index(")")]
        op = next((c for c in "+-" if c in inner[1:]), None)
        if op is None:
            return ""
        a, b = inner.split(op, 1)
        return str(int(a) + int(b) if op == "+" else int(a) - int(b))


class AdditionTask(Task):
    """'123+45' -> '168', operands with min_digits..max_digits digits."""

    name = "addition"

    def __init__(self, min_digits: int = 1, max_digits: int = 3):
        _check_range("min_digits", min_digits, "max_digits", max_digits, 1)
        self.min_digits, self.max_digits = min_digits, max_digits

    def sample(self, rng):
        a, b = (_number(rng, self.min_digits, self.max_digits) for _ in range(2))
        return Example(self.name, f"{a}+{b}", str(a + b))

    def rationale(self, example):
        """The sum with its least significant digit first ('123+45' -> '861'): each digit then depends only
        on digits already written and one carry, and the answer is the thought reversed."""
        return example.answer[::-1]


class MultiplicationTask(Task):
    """'12*34' -> '408', small operands (1..max_digits digits)."""

    name = "multiplication"

    def __init__(self, min_digits: int = 1, max_digits: int = 2):
        _check_range("min_digits", min_digits, "max_digits", max_digits, 1)
        self.min_digits, self.max_digits = min_digits, max_digits

    def sample(self, rng):
        a, b = (_number(rng, self.min_digits, self.max_digits) for _ in range(2))
        return Example(self.name, f"{a}*{b}", str(a * b))


class _StringTask(Task):
    """Shared knobs of the string tasks: a random string of min_len..max_len characters of `alphabet`."""

    prefix = ""

    def __init__(self, min_len: int = 3, max_len: int = 8, alphabet: str = "0123456789abcdefghijklmnopqrstuvwxyz"):
        _check_range("min_len", min_len, "max_len", max_len, 1)
        if not alphabet or not set(alphabet) <= set("0123456789abcdefghijklmnopqrstuvwxyz"):
            raise ValueError(f"Invalid alphabet: {alphabet!r}; expected digits and lowercase letters")
        self.min_len, self.max_len, self.alphabet = min_len, max_len, alphabet

    def sample(self, rng):
        text = "".join(rng.choice(self.alphabet) for _ in range(rng.randint(self.min_len, self.max_len)))
        return Example(self.name, f"{self.prefix}:{text}", self.transform(text))

    @abstractmethod
    def transform(self, text: str) -> str:
        ...


class SortingTask(_StringTask):
    """'sort:5391' -> '1359' (digits by default)."""

    name, prefix = "sorting", "sort"

    def __init__(self, min_len: int = 3, max_len: int = 8, alphabet: str = "0123456789"):
        super().__init__(min_len, max_len, alphabet)

    def transform(self, text):
        return "".join(sorted(text))


class CopyTask(_StringTask):
    """'copy:ab3x' -> 'ab3x'."""

    name, prefix = "copy", "copy"

    def transform(self, text):
        return text


class ReversalTask(_StringTask):
    """'rev:ab3x' -> 'x3ba'."""

    name, prefix = "reversal", "rev"

    def transform(self, text):
        return text[::-1]


class WordProblemTask(Task):
    """Template word problems: 'tom has 3, gets 4. total?' -> '7' (also loses/gives, and bags of)."""

    name = "word_problems"
    NAMES = ("tom", "ann", "bob", "sue", "max", "eva", "sam", "kim")

    def __init__(self, max_value: int = 20):
        _check_int("max_value", max_value, 2)
        self.max_value = max_value

    def sample(self, rng):
        who, kind = rng.choice(self.NAMES), rng.randrange(4)
        a, b = rng.randint(1, self.max_value), rng.randint(1, self.max_value)
        if kind == 0:
            return Example(self.name, f"{who} has {a}, gets {b}. total?", str(a + b))
        a, b = max(a, b), min(a, b)
        if kind == 1:
            return Example(self.name, f"{who} has {a}, loses {b}. left?", str(a - b))
        if kind == 2:
            return Example(self.name, f"{who} has {a}, gives {b}. left?", str(a - b))
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return Example(self.name, f"{a} bags of {b}. total?", str(a * b))


TASKS: dict[str, Task] = {t.name: t for t in (
    ModularTask(), AdditionTask(), MultiplicationTask(), SortingTask(), CopyTask(), ReversalTask(),
    WordProblemTask())}


def rationale(example: Example, tasks: Mapping[str, Task] | None = None) -> str:
    """`example`'s worked intermediate result from its task (see Task.rationale); "" when it has none."""
    tasks = TASKS if tasks is None else tasks
    if example.task not in tasks:
        raise ValueError(f"Unknown task {example.task!r}; allowed: {sorted(tasks)}")
    return tasks[example.task].rationale(example)


def split_of(prompt: str) -> str:
    """The split a prompt belongs to: a stable SHA-256 bucket of its text (80/10/10 train/val/test)."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % 100
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def _allocate(weights: Mapping[str, float], n: int) -> dict[str, int]:
    """Split n among the tasks in proportion to the weights (largest remainder, ties by name)."""
    total = sum(weights.values())
    exact = {name: n * w / total for name, w in weights.items()}
    counts = {name: math.floor(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda k: (-(exact[k] - counts[k]), k))
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def _check_weights(task_weights, tasks: Mapping[str, Task]) -> dict[str, float]:
    if not isinstance(task_weights, Mapping) or not task_weights:
        raise ValueError(f"Invalid task_weights: {task_weights!r}; expected a non-empty dict task -> weight")
    unknown = sorted(set(task_weights) - set(tasks))
    if unknown:
        raise ValueError(f"Unknown task(s) in task_weights: {unknown}; allowed: {sorted(tasks)}")
    for name, w in task_weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"Invalid task_weights[{name!r}]: {w!r}; expected a finite number >= 0")
    if sum(task_weights.values()) <= 0:
        raise ValueError("Invalid task_weights: all weights are 0; expected at least one > 0")
    return {name: float(w) for name, w in sorted(task_weights.items()) if w > 0}


def _derived_seed(*parts) -> int:
    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def make_examples(task_weights: Mapping[str, float], n: int, split: str, seed: int,
                  tasks: Mapping[str, Task] | None = None) -> list[Example]:
    """n examples of `split`, tasks in proportion to `task_weights` (exact counts, shuffled order).

    Same arguments, same list. Prompts are drawn with replacement from the task's prompt space,
    keeping only those whose hash falls in `split` (see `split_of`), so splits are disjoint.
    `tasks` replaces the built-in TASKS (e.g. tasks with other difficulty knobs).
    """
    tasks = TASKS if tasks is None else tasks
    if split not in SPLITS:
        raise ValueError(f"Invalid split: {split!r}; expected one of {sorted(SPLITS)}")
    check_positive_int("n", n)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Invalid seed: {seed!r}; expected an integer")
    weights = _check_weights(task_weights, tasks)
    examples = []
    for name, count in _allocate(weights, n).items():
        rng = random.Random(_derived_seed(seed, split, name))
        examples.extend(_sample_split(name, tasks[name], rng, split, count))
    random.Random(_derived_seed(seed, split, "order")).shuffle(examples)
    return examples


def _sample_split(name: str, task: Task, rng: random.Random, split: str, count: int) -> list[Example]:
    out = []
    for _ in range(count):
        for _ in range(_MAX_TRIES):
            ex = task.sample(rng)
            if split_of(ex.prompt) == split:
                out.append(ex if ex.task == name else Example(name, ex.prompt, ex.answer))
                break
        else:
            raise ValueError(f"Task {name!r} found no {split!r} prompt in {_MAX_TRIES} draws; "
                             "its prompt space is too small for this split")
    return out
