"""Difficulty levels of the built-in tasks (forge.data.levels): what each level changes, seeded and
split-disjoint questions, and levels that really get harder for a trained model."""
import pytest

from forge.data import TASKS, CharTokenizer, split_of
from forge.data.levels import MODULAR_LEVELS, NUM_LEVELS, level_examples, level_task

LEVELS = range(1, NUM_LEVELS + 1)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_level_is_deterministic_for_a_seed_and_split_disjoint(task):
    for level in (1, 5, NUM_LEVELS):
        splits = {s: level_examples(task, level, 40, s, 3) for s in ("train", "val", "test")}
        assert splits["train"] == level_examples(task, level, 40, "train", 3)
        assert splits["train"] != level_examples(task, level, 40, "train", 4)
        prompts = {s: {ex.prompt for ex in items} for s, items in splits.items()}
        assert not (prompts["train"] & prompts["val"] or prompts["train"] & prompts["test"]
                    or prompts["val"] & prompts["test"])
        assert all(split_of(ex.prompt) == s for s, items in splits.items() for ex in items)
        assert all(ex.task == task for items in splits.values() for ex in items)


def _digits(prompt: str, op: str) -> list[int]:
    return sorted(len(part) for part in prompt.split(op))


def test_what_a_level_changes_and_answers_stay_exact():
    for level in LEVELS:
        for ex in level_examples("addition", level, 30, "train", 0):
            a, b = ex.prompt.split("+")
            assert sum(_digits(ex.prompt, "+")) == level + 1 and ex.answer == str(int(a) + int(b))
        for ex in level_examples("multiplication", level, 30, "train", 0):
            a, b = ex.prompt.split("*")
            assert sum(_digits(ex.prompt, "*")) == level + 1 and ex.answer == str(int(a) * int(b))
        for task, f in (("copy", lambda s: s), ("reversal", lambda s: s[::-1]), ("sorting", lambda s: "".join(sorted(s)))):
            for ex in level_examples(task, level, 30, "train", 0):
                payload = ex.prompt.split(":", 1)[1]
                assert len(payload) == level + 2 and ex.answer == f(payload)
        ops, bound = MODULAR_LEVELS[level - 1]
        for ex in level_examples("modular", level, 30, "train", 0):
            inner = ex.prompt[1: ex.prompt.index(")")]
            op = next(c for c in "+-*" if c in inner[1:])
            a, b = (int(x) for x in inner.split(op, 1))
            assert op in ops and a < bound and b < bound and ex.prompt.endswith("%97")
            assert ex.answer == str({"+": a + b, "-": a - b, "*": a * b}[op] % 97)


def test_the_top_levels_fit_48_tokens_with_a_hint_and_a_verdict():
    tokenizer = CharTokenizer()
    for task in TASKS:
        for ex in level_examples(task, NUM_LEVELS, 50, "train", 0):
            assert len(tokenizer.encode(ex.prompt)) + len(tokenizer.encode(ex.answer)) + 3 + 4 + 1 <= 48


def test_bad_levels_and_tasks_are_refused():
    for bad in (0, NUM_LEVELS + 1, 2.0, True):
        with pytest.raises(ValueError, match="level"):
            level_task("copy", bad)
    with pytest.raises(ValueError, match="Unknown task 'nope'"):
        level_task("nope", 1)


@pytest.fixture(scope="module")
def trained():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
    from _small_model import small_trained_model

    return small_trained_model({"copy": 1.0, "reversal": 1.0}, examples=2000, steps=250, max_len=48)


def test_a_trained_model_finds_the_levels_harder_as_they_rise(trained):
    """A small model trained briefly on the default lengths (3-8 characters): it answers the lowest levels
    best and the levels beyond its training (9-12 characters) almost never."""
    from forge.data import evaluate

    model, tokenizer = trained
    for task in ("copy", "reversal"):
        acc = [evaluate(model, level_examples(task, lv, 64, "test", 0), tokenizer, 48)["accuracy"] for lv in LEVELS]
        assert acc[0] > 0.5 and sum(acc[:3]) / 3 > sum(acc[3:6]) / 3 + 0.1 and sum(acc[-3:]) / 3 < 0.05, (task, acc)
