"""The calculator tool: exact on random expressions (computed here with Python's integers from the same tree,
never with eval), and every hostile input refused with a CalculatorError that says why."""
import random

import pytest

from forge.data.calculator import MAX_CHARS, CalculatorError, calculate


def _tree(rng: random.Random, depth: int) -> tuple[str, int]:
    """(text, value) of a random expression over + - * % with brackets and unary minus."""
    if depth == 0 or rng.random() < 0.3:
        n = rng.randrange(0, 10 ** rng.randint(1, 4))
        return str(n), n
    if rng.random() < 0.1:
        text, value = _tree(rng, depth - 1)
        return f"-({text})", -value
    (a, va), (b, vb) = _tree(rng, depth - 1), _tree(rng, depth - 1)
    op = rng.choice("+-*%")
    if op == "%" and vb == 0:
        op = "+"
    value = {"+": va + vb, "-": va - vb, "*": va * vb, "%": va % vb if vb else 0}[op]
    return f"({a}){op}({b})", value


@pytest.mark.parametrize("seed", range(5))
def test_random_expressions_are_exact(seed):
    rng = random.Random(seed)
    checked = 0
    for _ in range(300):
        text, value = _tree(rng, 3)
        if len(text) <= MAX_CHARS and abs(value) <= 10 ** 24:
            assert calculate(text) == value, text
            checked += 1
    assert checked > 100


@pytest.mark.parametrize("text, value", [
    ("48213*907", 43729191), ("1+2*3", 7), ("(1+2)*3", 9), ("10-4-3", 3), ("2*3%4", 2), ("(3-5)%97", 95),
    (" 7 % 3 ", 1), ("-5+2", -3), ("--5", 5), ("0", 0), ("007", 7), ("-(2*-3)", 6), ("99%-7", -6)])
def test_precedence_associativity_and_pythons_modulo(text, value):
    assert calculate(text) == value


@pytest.mark.parametrize("text, message", [
    ("__import__('os').system('ls')", "unexpected '_'"),
    ("a.b", "unexpected 'a'"),
    ("(1).real", "unexpected '.'"),
    ("2**10", "power"),
    ("2 ** 10", "power"),
    ("1/2", "unexpected '/'"),
    ("1.5+1", "unexpected '.'"),
    ("1e9", "unexpected 'e'"),
    ("0x10", "unexpected 'x'"),
    ("１+1", "unexpected"),            # a full-width digit: not ASCII
    ("2٣", "unexpected"),              # an Arabic-Indic digit
    ("", "found end of input"),
    ("   ", "found end of input"),
    ("1+", "found end of input"),
    ("(1+2", "unbalanced '('"),
    ("1+2)", "unbalanced ')'"),
    ("()", "found ')'"),
    ("1 2", "unexpected '2'"),
    ("9" * 19, "19 digits"),
    ("1" + "+1" * 40, "characters"),
    ("-" * 20 + "1", "nesting"),
    ("(" * 17 + "1" + ")" * 17, "nesting"),
    ("999999999999*999999999999*99", "magnitude"),
    ("5%0", "modulo by zero"),
    ("5%(3-3)", "modulo by zero"),
    ("1;2", "unexpected ';'"),
    ("1\n+2", "unexpected '\\n'"),
    ("1\x00", "unexpected"),
])
def test_hostile_input_is_refused_with_a_reason(text, message):
    with pytest.raises(CalculatorError, match="^.*" + __import__("re").escape(message)):
        calculate(text)


def test_non_strings_are_refused():
    for value in (b"1+1", 3, None, ["1"]):
        with pytest.raises(CalculatorError, match="expected a str"):
            calculate(value)
    assert issubclass(CalculatorError, ValueError)
